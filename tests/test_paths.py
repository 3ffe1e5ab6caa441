import os

import pytest

from maskloom._paths import OutDirError, check_out_dir, make_out_dir


def test_make_out_dir_makes_parents_and_refuses_files_with_one_line(tmp_path):
    d = str(tmp_path / "a" / "b")
    assert make_out_dir(d) == d and os.path.isdir(d)
    assert make_out_dir(d) == d  # already there: fine
    f = tmp_path / "f"
    f.write_text("keep")
    with pytest.raises(OutDirError) as e:
        make_out_dir(str(f))
    assert str(e.value) == f"{f}: exists and is not a directory; choose another --out"
    with pytest.raises(OutDirError) as e:
        make_out_dir(str(f / "x"), "run directory")
    assert str(e.value) == f"{f / 'x'}: cannot create the run directory: Not a directory"
    assert f.read_text() == "keep"
    check_out_dir(str(tmp_path / "not" / "yet"))  # a missing directory is fine: made later
    assert not (tmp_path / "not").exists()
    with pytest.raises(OutDirError, match="f: exists and is not a directory"):
        check_out_dir(str(f))
