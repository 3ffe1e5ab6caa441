import json
import os

import pytest

from maskloom.pipelines.sources import Input, SourceError, find_inputs, missing_note, skipped_text


def touch(path, text="1"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def tree(tmp_path):
    for p in [
        "cat/b.jpg",
        "cat/a.JPG",
        "dog/c.png",
        "dog/notes.txt",
        "dog/.hidden.jpg",
        ".git/x.jpg",
        "z.jpg",
    ]:
        touch(tmp_path / p)
    return tmp_path


def test_directory_is_walked_recursively_filtered_and_sorted(tree):
    s = find_inputs(str(tree), extensions=(".jpg", ".png"))
    assert [os.path.relpath(i.source, tree) for i in s.inputs] == [
        "cat/a.JPG",
        "cat/b.jpg",
        "dog/c.png",
        "z.jpg",
    ]
    assert all(os.path.isabs(i.source) and i.label is None for i in s.inputs)
    assert s.label_names is None and len(s) == 4


def test_folder_labels_are_sorted_names(tree):
    os.unlink(tree / "z.jpg")
    s = find_inputs(str(tree), extensions=(".jpg", ".png"), labels="folder")
    assert s.label_names == ("cat", "dog")
    assert [i.label for i in s.inputs] == [0, 0, 1]


def test_regex_labels_sort_numerically(tmp_path):
    for name in ["10_x.wav", "2_y.wav", "2_z.wav", "0_a.wav"]:
        touch(tmp_path / name)
    s = find_inputs(str(tmp_path), extensions=(".wav",), labels="regex", label_regex=r"^(?P<label>\d+)_")
    assert s.label_names == ("0", "2", "10")
    assert [(os.path.basename(i.source), i.label) for i in s.inputs] == [
        ("0_a.wav", 0), ("10_x.wav", 2), ("2_y.wav", 1), ("2_z.wav", 1),
    ]  # fmt: skip


def test_regex_without_labels_mode_is_used(tmp_path):
    for name in ("3_a.wav", "10_b.wav"):
        (tmp_path / name).write_bytes(b"x")
    s = find_inputs(str(tmp_path), extensions=(".wav",), label_regex=r"^(?P<label>\d+)_")
    assert s.label_names == ("3", "10")
    assert [(os.path.basename(i.source), i.label) for i in s.inputs] == [("10_b.wav", 1), ("3_a.wav", 0)]


def test_regex_errors(tmp_path):
    touch(tmp_path / "nolabel.wav")
    with pytest.raises(SourceError, match="no named group 'label'"):
        find_inputs(str(tmp_path), extensions=(".wav",), labels="regex", label_regex=r"\d+")
    with pytest.raises(SourceError, match="nolabel.wav: file name does not match"):
        find_inputs(str(tmp_path), extensions=(".wav",), labels="regex", label_regex=r"(?P<label>\d+)_")


def test_glob(tree):
    s = find_inputs(str(tree / "*" / "*.jpg"), extensions=(".png",))
    assert [os.path.relpath(i.source, tree) for i in s.inputs] == ["cat/b.jpg"]
    s = find_inputs(str(tree / "**" / "*.[jp][pn]g"), extensions=())
    assert [os.path.relpath(i.source, tree) for i in s.inputs] == ["cat/b.jpg", "dog/c.png", "z.jpg"]
    with pytest.raises(SourceError, match="matches no input"):
        find_inputs(str(tree / "*.wav"))


def test_csv_and_jsonl_manifests(tmp_path):
    a, b = touch(tmp_path / "d" / "a.txt"), touch(tmp_path / "d" / "b.txt")
    (tmp_path / "m.csv").write_text("path,label\nd/b.txt,spam\n" + f"{a},ham\n")
    s = find_inputs(str(tmp_path / "m.csv"), manifest=True)
    assert s.label_names == ("ham", "spam")
    assert s.inputs == (Input(a, 0), Input(b, 1))
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "d/a.txt"}) + "\n\n" + json.dumps({"path": b}) + "\n"
    )
    s = find_inputs(str(tmp_path / "m.jsonl"), manifest=True)
    assert s.inputs == (Input(a), Input(b)) and s.label_names is None
    with pytest.raises(SourceError, match="labels='manifest' needs one per entry"):
        find_inputs(str(tmp_path / "m.jsonl"), manifest=True, labels="manifest")
    s = find_inputs(str(tmp_path / "m.csv"), manifest=True, labels="none")
    assert s.label_names is None and s.inputs == (Input(a), Input(b))


def test_manifest_entries_that_name_no_file_are_kept_as_inputs_unless_every_one_does(tmp_path):
    """A catalogue lists files deleted since: those entries stay inputs (error rows 'missing' in the
    table, or read by workers that see them) and are named in ``missing``; a manifest none of whose
    entries exists has wrong paths, and is refused with the first."""
    touch(tmp_path / "a.txt")
    touch(tmp_path / "c.txt")
    (tmp_path / "m.csv").write_text("path,label\na.txt,x\ngone.txt,y\nc.txt,x\nsub/lost.txt,y\n")
    s = find_inputs(str(tmp_path / "m.csv"), manifest=True)
    want = [str(tmp_path / n) for n in ("a.txt", "c.txt", "gone.txt", "sub/lost.txt")]
    assert [i.source for i in s.inputs] == want and [i.label for i in s.inputs] == [0, 0, 1, 1]
    assert s.missing == (str(tmp_path / "gone.txt"), str(tmp_path / "sub/lost.txt"))
    assert missing_note(s.missing) == (
        f"2 manifest entries name no file here (first: {tmp_path / 'gone.txt'}); each becomes an error row "
        "'missing' unless the workers see it"
    )
    assert missing_note(s.missing[:1]).startswith("1 manifest entry names no file here")
    assert find_inputs(str(tmp_path / "a.txt")).missing == ()
    (tmp_path / "wrong.csv").write_text("path\nx/a.txt\nx/c.txt\nx/d.txt\n")
    with pytest.raises(SourceError) as e:
        find_inputs(str(tmp_path / "wrong.csv"), manifest=True)
    assert str(e.value) == (
        f"{tmp_path / 'x/a.txt'}: no such file or directory (listed in {tmp_path / 'wrong.csv'}, as is every "
        "other of its 3 entries: are its paths right?)"
    )


def test_bad_manifests(tmp_path):
    (tmp_path / "m.csv").write_text("file\nx\n")
    with pytest.raises(SourceError, match="entry 1 has no 'path'"):
        find_inputs(str(tmp_path / "m.csv"), manifest=True)
    (tmp_path / "m.jsonl").write_text('{"path": "gone.txt"}\n')
    with pytest.raises(SourceError, match="gone.txt: no such file or directory \\(listed in"):
        find_inputs(str(tmp_path / "m.jsonl"), manifest=True)
    (tmp_path / "bad.jsonl").write_text("[1]\n")
    with pytest.raises(SourceError, match="bad.jsonl:1: each line must be a JSON object"):
        find_inputs(str(tmp_path / "bad.jsonl"), manifest=True)
    touch(tmp_path / "a.txt")
    for line, message in (
        ({"path": 5}, "entry 1: 'path' must be a string, got int 5"),
        (
            {"path": "a.txt", "label": {"x": 1}},
            "entry 1: 'label' must be a string or a number, got dict {'x': 1}",
        ),
        ({"path": "a.txt", "label": True}, "entry 1: 'label' must be a string or a number, got bool True"),
    ):
        (tmp_path / "t.jsonl").write_text(json.dumps(line) + "\n")
        with pytest.raises(SourceError) as e:
            find_inputs(str(tmp_path / "t.jsonl"), manifest=True)
        assert str(e.value) == f"{tmp_path / 't.jsonl'}: {message}"
    (tmp_path / "t.jsonl").write_text(json.dumps({"path": "a.txt", "label": 3}) + "\n")
    assert find_inputs(str(tmp_path / "t.jsonl"), manifest=True).label_names == ("3",)


def test_directory_as_one_source(tmp_path):
    touch(tmp_path / "MUTAG" / "raw" / "MUTAG_A.txt")
    s = find_inputs(str(tmp_path / "MUTAG"), extensions=())  # a tokenizer without extensions reads folders
    assert s.inputs == (Input(str(tmp_path / "MUTAG")),)
    s = find_inputs(str(tmp_path / "MUTAG"), extensions=(".txt",), as_one_source=True)
    assert s.inputs == (Input(str(tmp_path / "MUTAG")),)


def test_missing_and_empty(tmp_path):
    with pytest.raises(SourceError, match="nope: no such file or directory"):
        find_inputs(str(tmp_path / "nope"), extensions=(".jpg",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no input files with extension .jpg"):
        find_inputs(str(tmp_path / "empty"), extensions=(".jpg",))
    with pytest.raises(SourceError, match="no input paths"):
        find_inputs([])


def test_files_of_other_extensions_are_counted(tmp_path):
    """A walk says what it left out (per extension); an input set with none of the tokenizer's files
    says what the folder holds instead."""
    for name in ("a.jpg", "b.JPG", "c.gif", "sub/d.GIF", "sub/e.txt", "NOTES", ".hidden.gif"):
        touch(tmp_path / "imgs" / name)
    s = find_inputs(str(tmp_path / "imgs"), extensions=(".jpg",))
    assert [os.path.basename(i.source) for i in s.inputs] == ["a.jpg", "b.JPG"]
    assert s.skipped == {".gif": 2, ".txt": 1, "(none)": 1}
    assert skipped_text(s.skipped) == "4 files (.gif 2, (none) 1, .txt 1)"
    assert skipped_text({".wav": 1}) == "1 file (.wav 1)"
    touch(tmp_path / "more" / "x.jpg")
    touch(tmp_path / "more" / "y.bmp")
    s = find_inputs([str(tmp_path / "imgs" / "*.gif"), str(tmp_path / "more")], extensions=(".jpg",))
    assert len(s) == 2 and s.skipped == {".bmp": 1}  # a glob's matches are what was asked for
    assert find_inputs(str(tmp_path / "imgs"), extensions=(".jpg", ".gif", ".txt", "NOTES")).skipped == {}
    holds = r"it holds 2 files \(.gif 1, .txt 1\)$"
    with pytest.raises(SourceError, match=r"sub: no input files with extension .png; " + holds):
        find_inputs(str(tmp_path / "imgs" / "sub"), extensions=(".png",))


def test_duplicates_collapse(tree):
    s = find_inputs([str(tree / "cat"), str(tree / "cat" / "b.jpg")], extensions=(".jpg",))
    assert len(s) == 2


def test_manifest_from_a_spreadsheet_with_a_bom_and_duplicate_entries(tmp_path):
    a, b = touch(tmp_path / "d" / "a.txt"), touch(tmp_path / "d" / "b.txt")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfpath,label\r\nd/a.txt,x\r\nd/b.txt,y\r\nd/a.txt,x\r\n")
    s = find_inputs(str(tmp_path / "m.csv"), manifest=True)  # the BOM is not part of 'path'
    assert s.inputs == (Input(a, 0), Input(b, 1)) and s.label_names == ("x", "y")
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"path": "d/a.txt"}).encode() + b"\n")
    assert find_inputs(str(tmp_path / "m.jsonl"), manifest=True).inputs == (Input(a),)
    (tmp_path / "two.csv").write_text("path,label\nd/a.txt,x\nd/b.txt,y\nd/a.txt,z\n")
    with pytest.raises(SourceError, match=r"a.txt: listed twice with different labels \('x', 'z'; in "):
        find_inputs(str(tmp_path / "two.csv"), manifest=True)


def test_token_tables_are_output_never_input(tmp_path):
    """A folder of .parquet series with its table written inside: a rerun must not take the table's
    own shards as inputs (it did, and refused the "changed" input set), by walk or by glob."""
    series = [touch(tmp_path / f"s{i}.parquet") for i in range(2)]
    touch(tmp_path / "table" / "part-00000-ab.parquet")
    touch(tmp_path / "table" / "_manifest.json", "{}")
    touch(tmp_path / "partial" / "_commits" / "x.json", "{}")  # a job still running or cut short
    touch(tmp_path / "partial" / "part-00001-cd.parquet")
    touch(tmp_path / "more" / "s2.parquet")
    want = (*series, str(tmp_path / "more" / "s2.parquet"))
    assert find_inputs(str(tmp_path), extensions=(".parquet",)).inputs == tuple(
        Input(p) for p in sorted(want)
    )
    got = find_inputs(str(tmp_path / "**" / "*.parquet"), extensions=(".parquet",)).inputs
    assert got == tuple(Input(p) for p in sorted(want))
    with pytest.raises(SourceError, match="table: is a token table \\(maskloom's output\\), not raw input"):
        find_inputs(str(tmp_path / "table"), extensions=(".parquet",))


def test_table_markers_are_the_names_the_writers_use():
    from maskloom import tables
    from maskloom.pipelines import preprocess, sources

    assert sources.TABLE_MARKERS == (tables.MANIFEST, preprocess.COMMITS)


def test_symlinked_folders_are_walked_once_each(tmp_path):
    a = touch(tmp_path / "d" / "a.jpg")
    touch(tmp_path / "e" / "b.jpg")
    os.symlink("..", tmp_path / "d" / "up")  # a loop: d/up/d/up/... (listed ~40 times each before)
    os.symlink(tmp_path / "e", tmp_path / "d" / "also_e")  # a second way into e
    got = [i.source for i in find_inputs(str(tmp_path), extensions=(".jpg",)).inputs]
    assert got == [a, str(tmp_path / "d" / "also_e" / "b.jpg")]  # e first reached as d/also_e


def test_label_names_from_file_names_that_are_not_utf8_are_escaped(tmp_path):
    """A class folder named in Latin-1 gives a label name that any UTF-8 consumer can print (inspect's
    summary raised UnicodeEncodeError on a UTF-8 terminal), written as its ids are: ``\\xNN``."""
    try:
        a = touch(os.path.join(str(tmp_path), "caf\udce9", "a.jpg"))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system only takes UTF-8 file names")
    b = touch(tmp_path / "dog" / "b.jpg")
    s = find_inputs(str(tmp_path), extensions=(".jpg",), labels="folder")
    assert s.label_names == ("caf\\xe9", "dog") and s.inputs == (Input(a, 0), Input(b, 1))
    s = find_inputs(str(tmp_path), extensions=(".jpg",), label_regex=r"^(?P<label>.)")
    assert s.label_names == ("a", "b")


def test_a_folder_removed_during_the_walk_is_skipped(tmp_path, monkeypatch):
    """A live collection changes while it is walked: a folder listed, then gone before its stat, is
    skipped (as os.walk skips one gone before its listing), not a FileNotFoundError."""
    a = touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "b" / "y.jpg")
    real_stat, gone = os.stat, str(tmp_path / "b")

    def stat(path, *args, **kw):
        if os.fspath(path) == gone:
            raise FileNotFoundError(2, "No such file or directory", gone)
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", stat)
    assert find_inputs(str(tmp_path), extensions=(".jpg",)).inputs == (Input(a),)
