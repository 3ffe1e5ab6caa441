"""Bad input across all seven tokenizers (issue 2, "Bad input").

Two parts:

* the defined behaviour of the six edge cases the issue names: zero-length audio, single-frame
  video, a graph with no nodes, a point cloud with fewer points than a group, an all-NaN series and
  empty text — each asserts the exact documented outcome (error kind, or output);
* corrupt, truncated, empty and unsupported files raise ``TokenizeError`` with the documented kind,
  whose ``source`` is the file and whose message names it, for every modality.

Every file is made here, small, in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from maskloom.tokenizers import TokenizeError, Tokenizer, get_tokenizer
from maskloom.tokenizers.audio import Audio
from maskloom.tokenizers.graph import Graph, GraphDataset
from maskloom.tokenizers.time_series import TimeSeries

CONFIGS = {
    "image": {"image_size": 32},
    "video": {"num_frames": 4, "image_size": 32},
    "audio": {"target_frames": 128},
    "point_cloud": {"num_points": 64, "num_groups": 8, "group_size": 16},
    "graph": {"pe_dim": 2},
    "time_series": {"window": None},
    "text": {"vocab_size": 300, "min_frequency": 1},
}


def _tok(name: str) -> Tokenizer:
    return get_tokenizer(name, CONFIGS[name])


def _text_tok(tmp_path) -> Tokenizer:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n")
    tok = _tok("text")
    tok.fit([str(corpus)])
    return tok


def _error(tok: Tokenizer, path, *, call: Callable | None = None) -> TokenizeError:
    """The TokenizeError of read + tokenize of ``path``; asserts it names the file."""
    path = str(path)
    with pytest.raises(TokenizeError) as info:
        (call or tok)(path)
    e = info.value
    assert e.kind in TokenizeError.KINDS
    assert e.source == path, f"error names {e.source!r}, not the file {path!r}"
    assert path in str(e), f"message {str(e)!r} does not name the file"
    return e


# ---------------------------------------------------------------------------------------------
# small valid files
# ---------------------------------------------------------------------------------------------
def _frames(n: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8: level 20 * k in frame k, a white 8x8 square at (4 + k, 4)."""
    f = np.zeros((n, size, size, 3), np.uint8)
    for k in range(n):  # test data
        f[k] = 20 * k
        f[k, 4 + k : 12 + k, 4:12] = 255
    return f


def _write_video(path, frames: np.ndarray, codec: str = "ffv1", pix_fmt: str = "bgr0") -> str:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def _write_ply(path, n: int = 64) -> str:
    pts = np.random.default_rng(0).normal(size=(n, 3)).astype("<f4")
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii") + pts.tobytes())
    return str(path)


def _write_tu(folder, *, attributes: str = "1.0\n2.0\n3.0\n") -> str:
    """TU dataset T: graph 1 = nodes 1-2 (one edge), graph 2 = node 3; one attribute per node."""
    raw = folder / "T" / "raw"
    raw.mkdir(parents=True)
    (raw / "T_A.txt").write_text("1, 2\n2, 1\n")
    (raw / "T_graph_indicator.txt").write_text("1\n1\n2\n")
    (raw / "T_graph_labels.txt").write_text("0\n1\n")
    (raw / "T_node_attributes.txt").write_text(attributes)
    return str(folder / "T")


def _truncate(path, keep: float | int = 0.5, name: str | None = None) -> str:
    data = open(path, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    out = os.path.join(os.path.dirname(path), name or "cut-" + os.path.basename(path))
    with open(out, "wb") as f:
        f.write(data[:n])
    return out


GARBAGE = bytes(np.random.default_rng(7).integers(0, 256, 400, dtype=np.uint8))
"""400 random bytes: not UTF-8, not any media format."""


# ---------------------------------------------------------------------------------------------
# the six defined edge cases
# ---------------------------------------------------------------------------------------------
def test_zero_length_audio_is_empty(tmp_path):
    tok = _tok("audio")
    for channels in (1, 2):
        path = tmp_path / f"silence{channels}.wav"
        sf.write(str(path), np.zeros((0, channels), np.float32), 16000)  # a valid WAV with 0 frames
        e = _error(tok, path)
        assert (e.kind, e.reason) == ("empty", "audio has no samples")
    with pytest.raises(TokenizeError) as info:
        tok.tokenize(Audio(waveform=np.zeros(0, np.float32), sample_rate=16000), source="clip.wav")
    assert (info.value.kind, info.value.source) == ("empty", "clip.wav")


def test_single_frame_video_repeats_the_frame_num_frames_times(tmp_path):
    tok = _tok("video")  # num_frames 4, tubelet 2, 32x32, patch 16
    frame = _frames(1)
    path = _write_video(tmp_path / "one.mkv", frame)  # ffv1 + bgr0: lossless
    video = tok.read(path)
    assert video.frames.shape == (4, 32, 32, 3)
    assert video.frame_indices.tolist() == [0, 0, 0, 0] and video.num_source_frames == 1
    (rec,) = tok.tokenize(video, source=path)
    assert rec.tokens.shape == (2 * 2 * 2, 2 * 16 * 16 * 3)
    assert rec.meta["frame_indices"] == [0, 0, 0, 0] and rec.meta["num_source_frames"] == 1
    out = tok.detokenize(rec).frames
    np.testing.assert_array_equal(out, np.repeat(frame, 4, axis=0))
    # the two frames of every tubelet are the same frame
    pt = rec.tokens.reshape(-1, 2, 16 * 16 * 3)
    np.testing.assert_array_equal(pt[:, 0], pt[:, 1])


def test_graph_with_no_nodes_is_empty(tmp_path):
    tok = _tok("graph")
    none = Graph(x=np.zeros((0, 2), np.float32), edge_index=np.zeros((2, 0), np.int64))
    with pytest.raises(TokenizeError) as info:
        tok.tokenize(none, source="g.csv")
    assert (info.value.kind, info.value.source, info.value.reason) == ("empty", "g.csv", "graph has no nodes")
    # an edge list with a header and no edge: no nodes
    (tmp_path / "edges.csv").write_text("src,dst\n")
    e = _error(tok, tmp_path / "edges.csv")
    assert e.kind == "empty"
    # inside a dataset a graph without nodes is skipped; a dataset with no nodes at all is empty
    one = Graph(x=np.ones((2, 2), np.float32), edge_index=np.array([[0, 1], [1, 0]]))
    ds = GraphDataset(name="d", level="graph", graphs=[none, one])
    assert [r.id for r in tok.tokenize(ds, source="d")] == ["d#1"]
    with pytest.raises(TokenizeError) as info:
        tok.tokenize(GraphDataset(name="d", level="graph", graphs=[none, none]), source="d")
    assert (info.value.kind, info.value.source) == ("empty", "d")


def test_point_cloud_with_fewer_points_than_a_group_is_too_small(tmp_path):
    tok = _tok("point_cloud")  # group_size 16
    pts = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    np.savetxt(tmp_path / "fifteen.xyz", pts[:15])
    e = _error(tok, tmp_path / "fifteen.xyz")
    assert (e.kind, e.reason) == ("too_small", "15 valid points, fewer than group_size=16")
    # non-finite points do not count: 20 points, 5 with a NaN -> 15 valid
    bad = pts.copy()
    bad[::4, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert _error(tok, tmp_path / "nan.npy").kind == "too_small"
    # exactly one group's worth is enough, not padded: every group is the whole cloud, each point once
    np.save(tmp_path / "sixteen.npy", pts[:16])
    (rec,) = tok(str(tmp_path / "sixteen.npy"))
    assert rec.tokens.shape == (8, 16 * 3) and rec.meta["num_valid_points"] == 16
    for group in tok.detokenize(rec).reshape(8, 16, 3):
        np.testing.assert_allclose(group[np.lexsort(group.T)], pts[:16][np.lexsort(pts[:16].T)], atol=1e-5)


def test_all_nan_series_is_invalid(tmp_path):
    tok = _tok("time_series")
    (tmp_path / "nan.csv").write_text("a,b\n" + "nan,\n" * 40)
    e = _error(tok, tmp_path / "nan.csv")
    assert e.kind == "invalid"
    pq.write_table(pa.table({"a": np.full(40, np.nan), "b": np.full(40, np.nan)}), tmp_path / "nan.parquet")
    e = _error(tok, tmp_path / "nan.parquet")
    assert (e.kind, e.reason) == ("invalid", "series 0: channel(s) ['a', 'b'] have no valid value")
    raw = TimeSeries(series=[np.full((40, 1), np.nan, np.float32)], channels=("a",))
    with pytest.raises(TokenizeError) as info:
        tok.tokenize(raw, source="mem.csv")
    assert (info.value.kind, info.value.source) == ("invalid", "mem.csv")


def test_empty_text_is_empty(tmp_path):
    tok = _text_tok(tmp_path)
    (tmp_path / "zero.txt").write_bytes(b"")
    assert _error(tok, tmp_path / "zero.txt").kind == "empty"
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    e = _error(tok, tmp_path / "blank.txt")
    assert (e.kind, e.reason) == ("empty", "no text")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    e = _error(tok, tmp_path / "blank.jsonl")
    assert (e.kind, e.reason) == ("empty", "all 2 documents are empty")
    with pytest.raises(TokenizeError) as info:
        tok.tokenize("", source="s.txt")
    assert (info.value.kind, info.value.source) == ("empty", "s.txt")


# ---------------------------------------------------------------------------------------------
# corrupt / truncated / empty / unsupported files, every modality
# ---------------------------------------------------------------------------------------------
def _image_cases(tmp_path) -> list[tuple[str, str, str]]:
    png = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png)
    jpg = tmp_path / "ok.jpg"
    Image.open(png).save(jpg, quality=90)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + GARBAGE)
    (tmp_path / "garbage.jpg").write_bytes(GARBAGE)
    pcx = tmp_path / "pic.png"  # a PCX named .png: a format read() refuses
    Image.open(png).save(pcx, format="PCX")
    (tmp_path / "pic.pcx").write_bytes(open(pcx, "rb").read())
    return [
        ("truncated png", _truncate(str(png)), "corrupt"),
        ("truncated jpeg", _truncate(str(jpg)), "corrupt"),
        ("corrupt png", str(tmp_path / "garbage.png"), "corrupt"),
        ("corrupt jpeg", str(tmp_path / "garbage.jpg"), "corrupt"),
        ("pcx named .png", str(pcx), "unsupported"),
        ("unsupported extension", str(tmp_path / "pic.pcx"), "unsupported"),
    ]


def _video_cases(tmp_path) -> list[tuple[str, str, str]]:
    mp4 = _write_video(tmp_path / "ok.mp4", _frames(8), "mpeg4", "yuv420p")
    (tmp_path / "garbage.mp4").write_bytes(GARBAGE * 10)
    (tmp_path / "clip.gif").write_bytes(b"GIF89a" + GARBAGE)
    return [
        ("truncated mp4", _truncate(mp4), "corrupt"),
        ("corrupt mp4", str(tmp_path / "garbage.mp4"), "corrupt"),
        ("unsupported extension", str(tmp_path / "clip.gif"), "unsupported"),
    ]


def _audio_cases(tmp_path) -> list[tuple[str, str, str]]:
    wave = (0.5 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    wav, flac = str(tmp_path / "ok.wav"), str(tmp_path / "ok.flac")
    sf.write(wav, wave, 16000, subtype="PCM_16")
    sf.write(flac, wave, 16000)
    (tmp_path / "garbage.wav").write_bytes(GARBAGE)
    (tmp_path / "notes.txt").write_text("not audio at all\n")
    return [
        ("wav cut inside its header", _truncate(wav, 20), "corrupt"),
        ("truncated flac", _truncate(flac), "corrupt"),
        ("corrupt wav", str(tmp_path / "garbage.wav"), "corrupt"),
        ("unsupported format", str(tmp_path / "notes.txt"), "unsupported"),
    ]


def _point_cloud_cases(tmp_path) -> list[tuple[str, str, str]]:
    ply = _write_ply(tmp_path / "ok.ply")
    # a real cloud: identical points (zero extent) are invalid
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    (tmp_path / "garbage.ply").write_bytes(GARBAGE)
    (tmp_path / "mixed.xyz").write_text("0 0 0\n1 1\n")
    (tmp_path / "scan.las").write_bytes(b"LASF" + GARBAGE)
    return [
        ("truncated binary ply", _truncate(ply), "corrupt"),
        ("truncated npy", _truncate(str(tmp_path / "ok.npy"), 100), "corrupt"),
        ("corrupt ply", str(tmp_path / "garbage.ply"), "corrupt"),
        ("ragged xyz", str(tmp_path / "mixed.xyz"), "corrupt"),
        ("unsupported extension", str(tmp_path / "scan.las"), "unsupported"),
    ]


def _graph_cases(tmp_path) -> list[tuple[str, str, str]]:
    (tmp_path / "cut.csv").write_text("0,1\n1,2\n2,")  # the last line lost its target
    (tmp_path / "garbage.csv").write_bytes(GARBAGE)
    (tmp_path / "g.json").write_text("{}")
    (tmp_path / "nothing").mkdir()
    tu = tmp_path / "tu"
    tu.mkdir()
    folder = _write_tu(tu)
    with open(os.path.join(folder, "raw", "T_A.txt"), "wb") as f:
        f.write(GARBAGE)
    return [
        ("truncated edge list", str(tmp_path / "cut.csv"), "corrupt"),
        ("corrupt edge list", str(tmp_path / "garbage.csv"), "corrupt"),
        ("corrupt TU folder", folder, "corrupt"),
        ("unsupported extension", str(tmp_path / "g.json"), "unsupported"),
        ("folder without a dataset", str(tmp_path / "nothing"), "unsupported"),
    ]


def _time_series_cases(tmp_path) -> list[tuple[str, str, str]]:
    pq.write_table(pa.table({"a": np.arange(50, dtype=np.float64)}), tmp_path / "ok.parquet")
    (tmp_path / "cut.csv").write_text("a,b\n1,2\n3,4\n5")
    (tmp_path / "garbage.parquet").write_bytes(GARBAGE)
    (tmp_path / "garbage.ts").write_bytes(GARBAGE)
    (tmp_path / "nodata.ts").write_text("@problemName x\n@classLabel true a b\n")
    (tmp_path / "sheet.xlsx").write_bytes(b"PK\x03\x04" + GARBAGE)
    return [
        ("truncated parquet", _truncate(str(tmp_path / "ok.parquet")), "corrupt"),
        ("truncated csv", str(tmp_path / "cut.csv"), "corrupt"),
        ("corrupt parquet", str(tmp_path / "garbage.parquet"), "corrupt"),
        ("corrupt .ts", str(tmp_path / "garbage.ts"), "corrupt"),
        (".ts without @data", str(tmp_path / "nodata.ts"), "corrupt"),
        ("unsupported extension", str(tmp_path / "sheet.xlsx"), "unsupported"),
    ]


def _text_cases(tmp_path) -> list[tuple[str, str, str]]:
    (tmp_path / "ok.txt").write_bytes("café au lait\n".encode())
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n" + json.dumps({"text": "x"}))
    (tmp_path / "garbage.txt").write_bytes(GARBAGE)
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4\n" + GARBAGE)
    return [
        ("utf-8 cut inside a character", _truncate(str(tmp_path / "ok.txt"), 4), "corrupt"),
        ("jsonl cut inside an object", _truncate(str(tmp_path / "ok.jsonl"), 20), "corrupt"),
        ("corrupt (not UTF-8)", str(tmp_path / "garbage.txt"), "corrupt"),
        ("NUL bytes", str(tmp_path / "nul.txt"), "corrupt"),
        ("unsupported extension", str(tmp_path / "doc.pdf"), "unsupported"),
    ]


BAD_FILES = {
    "image": _image_cases,
    "video": _video_cases,
    "audio": _audio_cases,
    "point_cloud": _point_cloud_cases,
    "graph": _graph_cases,
    "time_series": _time_series_cases,
    "text": _text_cases,
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_corrupt_truncated_empty_unsupported_files(name, tmp_path):
    tok = _text_tok(tmp_path) if name == "text" else _tok(name)
    ext = tok.extensions[0]
    cases = BAD_FILES[name](tmp_path)
    (tmp_path / f"zero{ext}").write_bytes(b"")
    cases += [
        ("empty file", str(tmp_path / f"zero{ext}"), "empty"),
        ("missing file", str(tmp_path / f"absent{ext}"), "missing"),
    ]
    got = {what: _error(tok, path).kind for what, path, _ in cases}
    assert got == {what: kind for what, _, kind in cases}


def _latin1_copy(path: str) -> str | None:
    """A copy of the file at ``path`` whose name starts with the byte 0xE9 (Latin-1 "é", not UTF-8:
    Python names it with the lone surrogate U+DCE9); None where the file system refuses the name."""
    out = os.path.join(os.path.dirname(path), "\udce9" + os.path.basename(path))
    try:
        shutil.copyfile(path, out)
    except (OSError, UnicodeEncodeError):
        return None
    return out


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_file_names_that_are_not_utf8(name, tmp_path):
    """Linux file names are bytes. Under a name that is not UTF-8 a good file gives the same records
    (libsndfile, decord and PyAV take UTF-8 paths: they open a link to it), and a bad one the same
    error, still naming the file."""
    tok = _text_tok(tmp_path) if name == "text" else _tok(name)
    cases = BAD_FILES[name](tmp_path)
    (tmp_path / "ok.csv").write_text("0,1\n1,2\n") if name == "graph" else None
    good = sorted(str(p) for p in tmp_path.glob("ok.*") if p.suffix in tok.extensions)
    assert good, "no valid file to read"
    for path in good:
        other = _latin1_copy(path)
        if other is None:
            pytest.skip("this file system only takes UTF-8 file names")
        want, got = tok(path), tok(other)
        assert [r.source for r in got] == [other] * len(want)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.positions, b.positions)
    files = [(what, path, kind) for what, path, kind in cases if os.path.isfile(path)]
    got_kinds = {what: _error(tok, _latin1_copy(path)).kind for what, path, _ in files}
    assert got_kinds == {what: kind for what, _, kind in files}


# ---------------------------------------------------------------------------------------------
# bugs found here (each once a strict xfail, now fixed; strict, so a fix makes these fail loudly)
# ---------------------------------------------------------------------------------------------
def test_wav_truncated_inside_its_samples_is_corrupt(tmp_path):
    wav = str(tmp_path / "ok.wav")
    sf.write(wav, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert _error(_tok("audio"), _truncate(wav)).kind == "corrupt"


def test_tu_folder_with_truncated_node_attributes_is_corrupt(tmp_path):
    folder = _write_tu(tmp_path, attributes="1.0\n2.0\n")  # 3 nodes, 2 attribute rows
    assert _error(_tok("graph"), folder).kind == "corrupt"


def test_edge_list_with_an_absurd_node_id_raises_tokenize_error(tmp_path):
    # 2**50 nodes need 4 PiB: more than any address space, so the allocation fails at once everywhere
    (tmp_path / "edges.csv").write_text(f"0,{2**50}\n")
    _error(_tok("graph"), tmp_path / "edges.csv")


def test_csv_with_duplicate_column_names_raises_tokenize_error(tmp_path):
    (tmp_path / "dup.csv").write_text("a,a\n" + "1,2\n" * 20)
    _error(_tok("time_series"), tmp_path / "dup.csv")


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_file_this_user_may_not_read_is_unreadable_not_corrupt(name, tmp_path, monkeypatch):
    """Shared storage holds files of other users: no read permission is its own kind, checked
    before the decoder (whose failure would read "corrupt"). The permission is denied by a patched
    ``os.access``, as the tests may run as root, whom no mode bit stops."""
    tok = _text_tok(tmp_path) if name == "text" else _tok(name)
    BAD_FILES[name](tmp_path)
    (tmp_path / "ok.csv").write_text("0,1\n1,2\n") if name == "graph" else None
    path = sorted(str(p) for p in tmp_path.glob("ok.*") if p.suffix in tok.extensions)[0]
    tok(path)  # readable: fine
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: p != path and real(p, mode, **kw))
    e = _error(tok, path)
    assert (e.kind, e.reason) == ("unreadable", "permission denied: this user may not read it")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_named_pipe_or_a_device_is_unsupported_not_a_hang(name, tmp_path):
    """A ``*.wav`` that is a named pipe (left by a crashed recorder) blocked the reader for ever, and
    one that links to /dev/zero never ended: each is an error row, ``unsupported``, read no further."""
    tok = _text_tok(tmp_path) if name == "text" else _tok(name)
    ext = tok.extensions[0]
    os.mkfifo(tmp_path / f"pipe{ext}")
    os.symlink("/dev/zero", tmp_path / f"zero{ext}")
    got = {p: (e.kind, e.reason) for p in ("pipe", "zero") for e in [_error(tok, tmp_path / f"{p}{ext}")]}
    assert got == {
        "pipe": ("unsupported", "not a regular file: a named pipe"),
        "zero": ("unsupported", "not a regular file: a character device"),
    }


def test_special_file_names_what_is_not_a_file_or_a_folder(tmp_path):
    from maskloom.tokenizers.base import special_file

    os.mkfifo(tmp_path / "p")
    (tmp_path / "f").write_text("x")
    assert [special_file(str(tmp_path / n)) for n in ("p", "f")] == ["a named pipe", None]
    assert special_file(str(tmp_path)) is None and special_file(str(tmp_path / "absent")) is None
    assert special_file("/dev/null") == "a character device"


def test_a_byte_order_mark_changes_nothing(tmp_path):
    """Text files saved by spreadsheets and Windows editors start with a UTF-8 BOM. It broke the text
    tokenizer's CSV header ("no text column 'text' in header ['\\ufefftext', ...]") and its JSONL
    ("line 1 is not JSON"), and rode into .txt tokens; the other text formats now ignore it too."""
    xyz = "".join(f"{np.sin(i):.4f} {np.cos(i):.4f} {i / 64:.4f}\n" for i in range(64))
    ucr = "".join(
        f"{k % 2}\t" + "\t".join(f"{np.sin(i * (k + 1) / 7):.4f}" for i in range(24)) + "\n" for k in range(4)
    )
    cases = [
        ("text", "a.txt", "the cat sat on the mat\n"),
        ("text", "a.csv", "text,id\nthe cat sat,1\nthe dog sat,2\n"),
        ("text", "a.jsonl", json.dumps({"text": "the cat sat"}) + "\n"),
        ("graph", "a.csv", "0,1\n1,2\n2,0\n"),
        ("point_cloud", "a.xyz", xyz),
        ("time_series", "a.tsv", ucr),
    ]
    for name, file, content in cases:
        tok = _text_tok(tmp_path) if name == "text" else _tok(name)
        plain, bom = tmp_path / "plain" / file, tmp_path / "bom" / file
        for p, prefix in ((plain, b""), (bom, b"\xef\xbb\xbf")):
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(prefix + content.encode())
        want, got = tok(str(plain)), tok(str(bom))
        assert len(got) == len(want) > 0, (name, file)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"{name} {file}")
            assert a.label == b.label
