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


def test_urls_are_refused_by_every_command_with_one_line_not_made_into_a_folder_named_s3(
    tmp_path, monkeypatch, capsys
):
    """``-o s3://bucket/t`` made a local folder named ``s3:``; a URL among the inputs or tables read
    "no such file". Each is one line now, saying to mount the bucket."""
    from maskloom._paths import url_note
    from maskloom.cli import main

    assert url_note("s3://b/t") == (
        "s3://b/t: a URL, not a local or mounted folder: maskloom reads and writes files on local or mounted "
        "storage (mount the bucket, with s3fs, gcsfuse or blobfuse2 for example, and give its path)"
    )
    assert [url_note(p) for p in ("gs://b", "hdfs://nn/x", "file:///x", "https://h/x")] != [None] * 4
    assert [url_note(p) for p in ("/data/s3:/x", "rel/dir", "C:/x", "a:b", "x//y")] == [None] * 5
    with pytest.raises(OutDirError, match="^s3://b/t: a URL, not a local or mounted folder: "):
        make_out_dir("s3://b/t")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("1 2")
    (tmp_path / "m.csv").write_text("path\ns3://b/a.txt\n")
    cases = [
        (
            ["preprocess", "in", "-m", "text", "-o", "s3://b/t", "--num-workers", "0"],
            "s3://b/t: a URL, not a local or mounted folder",
        ),
        (["preprocess", "gs://b/in", "-m", "text", "-o", "t"], "gs://b/in: a URL, not a local path"),
        (
            ["preprocess", "m.csv", "--manifest", "-m", "text", "-o", "t"],
            "m.csv: entry 1: s3://b/a.txt: a URL, not a local path",
        ),
        (["inspect", "s3://b/t"], "s3://b/t: a URL, not a token table directory"),
        (
            ["train", "mae-lm", "--tables", "s3://b/t", "--out", "run"],
            "s3://b/t: a URL, not a token table directory",
        ),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["in", "m.csv"]  # no folder named "s3:" (nor "t", "run")
