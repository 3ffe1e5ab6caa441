"""Video in WebDataset tar shards (Kinetics, WebVid, Panda-70M: ``key.mp4`` + ``key.cls`` / ``.json`` /
``.txt``): a sample's video member gives the records of the same video as a file, decoded from memory
by decord or PyAV; the shared tar policy (skipped samples, a mostly unusable tar, a truncated one);
``iter_records`` decodes one sample at a time.

Videos are made here with PyAV, as in test_video.py: ``ffv1`` in Matroska is lossless (frame k has
background level ``5 * k`` and a red square at column k), H.264 in MP4 goes to decord, MPEG-4 Part 2
in AVI to PyAV.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import tarfile

import av
import numpy as np
import pytest
from video_frames import frames as _frames

import maskloom.tokenizers.base as base_mod
import maskloom.tokenizers.video as video_mod
from maskloom.testing import check_tokenizer, write_tar
from maskloom.tokenizers import TokenizeError
from maskloom.tokenizers.video import (
    VIDEO_EXTENSIONS,
    TarVideo,
    TarVideos,
    Video,
    VideoConfig,
    VideoTokenizer,
)

_FORMATS = {"mkv": ("matroska", "ffv1", "bgr0"), "mp4": ("mp4", "libx264", "yuv420p"),
            "avi": ("avi", "mpeg4", "yuv420p")}  # fmt: skip


def _video(frames: np.ndarray, ext: str = "mkv") -> bytes:
    """The bytes of a video file of ``frames`` (container and codec by ``ext``, see _FORMATS)."""
    fmt, codec, pix_fmt = _FORMATS[ext]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def _cut_tar(path, out) -> str:
    """``out``: the tar at ``path`` cut in the middle of its last member's data."""
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    data = open(path, "rb").read()
    with open(out, "wb") as f:
        f.write(data[: last.offset_data + last.size // 2])
    return str(out)


def _tok(**kw) -> VideoTokenizer:
    return VideoTokenizer(VideoConfig(**{"num_frames": 4, "frame_stride": 2, "image_size": 16, **kw}))


def _same(a, b) -> bool:
    return (
        (a.id, a.source, a.label, a.meta) == (b.id, b.source, b.label, b.meta)
        and a.tokens.dtype == b.tokens.dtype
        and np.array_equal(a.tokens, b.tokens)
        and np.array_equal(a.positions, b.positions)
    )


def _members(n: int, frames: int = 10, folder: str = "k") -> list[tuple[str, bytes]]:
    """n samples ``<folder>/s<i>``: a lossless mkv of ``frames + i`` frames and a ``cls`` holding i."""
    out = []
    for i in range(n):
        out += [(f"{folder}/s{i}.mkv", _video(_frames(frames + i))), (f"{folder}/s{i}.cls", b"%d" % i)]
    return out


def test_tar_shards_are_inputs():
    assert VideoTokenizer.extensions == (*VIDEO_EXTENSIONS, ".tar", ".tar.gz", ".tgz")
    assert video_mod._MEMBER_VIDEO_EXTENSIONS[:3] == ("mp4", "avi", "mkv")


@pytest.mark.parametrize("max_clips", [1, 3])
def test_tar_samples_give_the_records_of_the_same_files(tmp_path, max_clips):
    """A sample's records are those of its video as a file (tokens, positions, meta), with ids
    ``<tar>#<key>`` (``<tar>#<key>#k`` for clip k >= 1), the ``cls`` label and the member's name;
    decord (mkv, mp4) and PyAV (avi) both decode from memory."""
    files = {"a.mkv": _video(_frames(40)), "b.mp4": _video(_frames(24), "mp4"),
             "c.avi": _video(_frames(18), "avi"), "d.mkv": _video(_frames(6))}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    members = [("./train/a.MKV", files["a.mkv"]), ("./train/a.cls", b"7\n"), ("./train/a.json", b"{}"),
               ("train/b.json", b"{}"), ("train/b.mp4", files["b.mp4"]), ("train/b.txt", b"a caption"),
               ("train/c.avi", files["c.avi"]), ("train/c.cls", b"2"),
               ("train/d.mkv", files["d.mkv"]), ("train/d.cls", b"-1\n")]  # fmt: skip
    tar = write_tar(tmp_path / "shard-000.tar", members)
    tok = _tok(max_clips=max_clips)  # a slot: 8 frames; a: 5 slots, b: 3, c: 2, d: none
    recs = tok(tar)
    clips = {1: [1, 1, 1, 1], 3: [3, 3, 2, 1]}[max_clips]
    ids, want = [], []
    for key, name, n in zip(("train/a", "train/b", "train/c", "train/d"), files, clips, strict=True):
        ids += [f"{tar}#{key}"] + [f"{tar}#{key}#{k}" for k in range(1, n)]
        ref = tok(str(tmp_path / name))
        assert [r.id for r in ref] == [f"{tmp_path / name}#{k}" for k in range(n)]
        want += ref
    assert [r.id for r in recs] == ids
    assert [r.label for r in recs] == [7] * clips[0] + [None] * clips[1] + [2] * clips[2] + [None] * clips[3]
    assert [r.meta["member"] for r in recs] == (
        ["./train/a.MKV"] * clips[0] + ["train/b.mp4"] * clips[1] + ["train/c.avi"] * clips[2]
        + ["train/d.mkv"] * clips[3]
    )  # fmt: skip
    assert all(r.source == tar for r in recs)
    for rec, ref in zip(recs, want, strict=True):
        assert rec.tokens.dtype == np.uint8 and np.array_equal(rec.tokens, ref.tokens), rec.id
        np.testing.assert_array_equal(rec.positions, ref.positions)
        assert rec.meta == {**ref.meta, "member": rec.meta["member"]}, rec.id
    if max_clips == 3:
        assert [r.meta["frame_indices"][0] for r in recs[:3]] == [0, 8, 24]  # slots j * 5 // 3: 0, 1, 3
        assert [r.meta["clip"] for r in recs[:3]] == [0, 1, 2] and "clip" not in recs[-1].meta
    # read(): the samples decoded; tokenize(read()) and the stream give the same records
    raw = tok.read(tar)
    assert isinstance(raw, TarVideos) and [s.key for s in raw] == ["train/a", "train/b", "train/c", "train/d"]
    assert raw[0] == TarVideo("train/a", raw[0].video, 7, "./train/a.MKV")
    a_file = tok.read(str(tmp_path / "a.mkv"))
    np.testing.assert_array_equal(raw[0].video.frames, a_file.frames)
    np.testing.assert_array_equal(raw[0].video.frame_indices, a_file.frame_indices)
    streamed = tok.iter_records(tar)
    assert not isinstance(streamed, list)
    streamed = list(streamed)
    assert len(streamed) == len(recs) and all(map(_same, recs, streamed))
    assert all(map(_same, recs, tok.tokenize(raw, source=tar)))
    tok.render(raw, str(tmp_path / "r.png"))  # the first sample's frames
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # gzipped: the same records
    gz = str(tmp_path / "shard-000.tar.gz")
    (tmp_path / "shard-000.tar.gz").write_bytes(gzip.compress(open(tar, "rb").read()))
    assert [(r.id, r.label) for r in tok(gz)] == [(r.id.replace(tar, gz), r.label) for r in recs]


def test_pyav_fallbacks_decode_from_memory(tmp_path, monkeypatch):
    """The PyAV paths take the member's file object: frames decord cannot copy (48 px wide), and
    files decord misreads (MPEG-4 Part 2 in AVI), with or without clips; exact frames for ffv1."""
    frames = _frames(24, 24, 48)
    wide, avi = _video(frames), _video(_frames(24), "avi")
    (tmp_path / "w.mkv").write_bytes(wide)
    (tmp_path / "m.avi").write_bytes(avi)
    tar = write_tar(tmp_path / "f.tar", [("w.mkv", wide), ("w.cls", b"1"), ("m.avi", avi), ("m.cls", b"0")])
    seen = []
    pyav_frames = video_mod._pyav_frames

    def spy(path, indices, source, prepare=None):
        seen.append((type(path).__name__, source))
        return pyav_frames(path, indices, source, prepare)

    monkeypatch.setattr(video_mod, "_pyav_frames", spy)
    for max_clips in (1, 2):
        tok = _tok(num_frames=2, frame_stride=4, max_clips=max_clips)  # 3 slots of 8 frames: clips 0 and 8
        seen.clear()
        recs = tok(tar)
        # w.mkv: decord's frames, then PyAV's from memory (a try per clip); m.avi: PyAV's read
        assert seen == [("BytesIO", f"{tar}#w.mkv")] * max_clips + [("BytesIO", f"{tar}#m.avi")]
        want = tok(str(tmp_path / "w.mkv")) + tok(str(tmp_path / "m.avi"))
        n = len(recs) // 2
        assert [r.id for r in recs] == [f"{tar}#{s}" + (f"#{k}" if k else "") for s in "wm" for k in range(n)]
        for rec, ref in zip(recs, want, strict=True):
            assert np.array_equal(rec.tokens, ref.tokens) and rec.meta == {
                **ref.meta,
                "member": rec.meta["member"],
            }
        idx = [[8, 12]] if max_clips == 1 else [[0, 4], [8, 12]]  # centre start (24 - 8) // 2 = 8
        assert [r.meta["frame_indices"] for r in recs[:n]] == idx
        for rec, i in zip(recs[:n], idx, strict=True):
            (exact,) = tok.tokenize(Video(frames=frames[i]), source=tar)
            assert np.array_equal(rec.tokens, exact.tokens)


def test_decode_errors_name_the_member(tmp_path):
    """``_decode`` of a member's bytes: errors name ``<tar>#<member>``, with the kind the same bytes
    as a file get (bytes FFmpeg cannot open never reach decord, which would print them on stderr)."""
    tok = _tok()
    mp4 = _video(_frames(12), "mp4")
    cases = [
        ("g.mp4", b"<html>not found</html>" * 20, "corrupt",
         "cannot open the video (FFmpeg): Invalid data found when processing input"),
        ("e.mp4", b"", "empty", "file is empty (0 bytes)"),
        ("c.mp4", mp4[: len(mp4) // 2], "corrupt", None),  # MP4 cut before its index
        ("x.gif", mp4, "unsupported", None),
    ]  # fmt: skip
    for name, data, kind, reason in cases:
        with pytest.raises(TokenizeError) as e:
            tok._decode(io.BytesIO(data), f"s.tar#{name}", "." + name.split(".")[1])
        assert (e.value.source, e.value.kind) == (f"s.tar#{name}", kind)
        assert reason is None or e.value.reason == reason
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizeError) as e:
            tok(str(tmp_path / name))
        assert e.value.kind == kind, name


def test_bad_samples_are_skipped_with_one_warning(tmp_path, caplog):
    good = _members(4)
    bad = [("b/0.mp4", b"<html>404</html>"), ("b/1.mkv", _video(_frames(8))), ("b/1.cls", b"cat"),
           ("b/2.json", b"{}"), ("b/2.txt", b"a caption")]  # fmt: skip
    tar = write_tar(tmp_path / "some-bad.tar", good[:4] + bad + good[4:])
    tok = _tok()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.video"):
        recs = tok(tar)
    assert [(r.id, r.label) for r in recs] == [(f"{tar}#k/s{i}", i) for i in range(4)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tar}: skipped 3 of 7 samples: "
        "b/0 (corrupt: cannot open the video (FFmpeg): Invalid data found when processing input); "
        "b/1 (invalid: cls member b/1.cls holds b'cat', not an integer class index); "
        "b/2 (unsupported: no video member (b/2.json, b/2.txt))"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.video"):
        streamed = list(tok.iter_records(tar))
    assert len(streamed) == 4 and all(map(_same, recs, streamed))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_mostly_bad_tar_is_the_error(tmp_path):
    members = _members(2) + [("x/b0.mp4", b"garbage" * 40), ("x/b1.avi", b"RIFF" + bytes(200))]
    tar = write_tar(tmp_path / "bad.tar", members)
    tok = _tok()
    for run in (tok, lambda p: list(tok.iter_records(p))):
        with pytest.raises(TokenizeError) as e:
            run(tar)
        assert (e.value.source, e.value.kind, e.value.reason) == (
            tar,
            "corrupt",
            "sample x/b0: cannot open the video (FFmpeg): Invalid data found when processing input "
            "(2 of 4 samples are unusable)",
        )
    stream = tok.iter_records(tar)  # the records come first, the error at the end
    assert [r.id for r in itertools.islice(stream, 2)] == [f"{tar}#k/s0", f"{tar}#k/s1"]
    with pytest.raises(TokenizeError):
        next(stream)
    # no video member at all: an image shard given to the video tokenizer
    images = write_tar(
        tmp_path / "images.tar", [("a.jpg", b"\xff\xd8"), ("a.cls", b"1"), ("b.png", b"\x89PNG")]
    )
    with pytest.raises(TokenizeError) as e:
        tok(images)
    assert (e.value.kind, e.value.reason) == (
        "unsupported",
        "sample a: no video member (a.jpg, a.cls) (2 of 2 samples are unusable)",
    )


def test_truncated_and_empty_tars(tmp_path):
    tok = _tok()
    members = _members(4)
    cut = _cut_tar(write_tar(tmp_path / "full.tar", members[:-1]), tmp_path / "cut.tar")  # inside s3.mkv
    for run in (tok, lambda p: list(tok.iter_records(p))):
        with pytest.raises(TokenizeError) as e:
            run(cut)
        assert (e.value.source, e.value.kind) == (cut, "corrupt")
        assert e.value.reason.startswith("truncated or damaged tar archive: ")
        assert e.value.reason.endswith("(after 3 samples)")
    assert [r.id for r in itertools.islice(tok.iter_records(cut), 3)] == [f"{cut}#k/s{i}" for i in range(3)]
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(TokenizeError) as e:
        tok(str(tmp_path / "empty.tar"))
    assert e.value.kind == "empty"
    (tmp_path / "clip.tar").write_bytes(_video(_frames(4)))  # a video named .tar
    with pytest.raises(TokenizeError) as e:
        tok(str(tmp_path / "clip.tar"))
    assert e.value.kind == "corrupt" and e.value.reason.startswith("not a tar archive")


def test_iter_records_decodes_one_sample_at_a_time(tmp_path, monkeypatch):
    """The stream yields a sample's records once that sample is read and decoded, before the tar's
    later samples are read: a shard of 1,000 clips is never held decoded."""
    tar = write_tar(tmp_path / "s.tar", _members(5, frames=16))
    tok = _tok(max_clips=2)  # 2 slots of 8 frames: 2 records a sample
    read, decoded = [], []
    samples, decode = base_mod.iter_tar_samples, tok._decode

    def reading(*a, **kw):
        for s in samples(*a, **kw):
            read.append(s.key)
            yield s

    def decoding(file, name, ext):
        decoded.append(name)
        return decode(file, name, ext)

    monkeypatch.setattr(base_mod, "iter_tar_samples", reading)
    monkeypatch.setattr(tok, "_decode", decoding)
    stream = tok.iter_records(tar)
    assert (read, decoded) == ([], [])  # nothing before the first record is asked for
    first = next(stream)
    assert first.id == f"{tar}#k/s0" and (read, decoded) == (["k/s0"], [f"{tar}#k/s0.mkv"])
    assert next(stream).id == f"{tar}#k/s0#1" and len(decoded) == 1
    assert next(stream).id == f"{tar}#k/s1" and read == ["k/s0", "k/s1"] and len(decoded) == 2
    assert len(list(stream)) == 7 and len(read) == len(decoded) == 5


def test_the_guards_samples_are_not_decoded(tmp_path, monkeypatch):
    """Inside ``guarded_samples`` (the pipeline's, after a sample killed its worker) the guard hears of
    each sample before it is decoded, and its skipped samples are never handed to the decoder."""
    tar = write_tar(tmp_path / "s.tar", _members(3))
    tok = _tok()
    decoded, decode = [], tok._decode

    def decoding(file, name, ext):
        decoded.append(name)
        return decode(file, name, ext)

    class Guard:
        skip = {1: ("crashed", "the process decoding it died 2 times")}
        seen: list[int] = []

        def at(self, sample: int) -> None:
            self.seen.append(sample)

    monkeypatch.setattr(tok, "_decode", decoding)
    with base_mod.guarded_samples(Guard()):
        ids = [r.id for r in tok.iter_records(tar)]
    assert ids == [f"{tar}#k/s0", f"{tar}#k/s2"]
    assert decoded == [f"{tar}#k/s0.mkv", f"{tar}#k/s2.mkv"] and Guard.seen == [0, 2, -1]


def test_conformance_kit_with_a_tar(tmp_path):
    tar = write_tar(tmp_path / "shard.tar", _members(3) + _members(2, folder="j"))
    plain = tmp_path / "plain.mkv"
    plain.write_bytes(_video(_frames(9, 24, 40)))
    tok = _tok()

    def compare(raw, out, rec):
        if isinstance(raw, TarVideos):
            (raw,) = [s.video for s in raw if rec.id.endswith("#" + s.key)]
        np.testing.assert_array_equal(out.frames, tok.preprocess(raw)[0])
        assert out.frame_indices.tolist() == rec.meta["frame_indices"]

    assert check_tokenizer(tok, [tar, str(plain)], compare=compare) == {
        "sources": 2,
        "records": 6,
        "tokens": 6 * 2,  # (4 / 2) x (16 / 16)^2 tubelets a record
    }


def test_preprocess_a_folder_of_video_tars(tmp_path):
    """End to end: a tar with a bad sample gives its good ones with their labels, a truncated tar is
    one error row and none of its records, a plain video beside them one record."""
    from maskloom.pipelines.preprocess import preprocess
    from maskloom.tables import TokenTable

    data = tmp_path / "data"
    data.mkdir()
    members = _members(3)
    good = write_tar(data / "good-000.tar", members[:2] + [("k/bad.mp4", b"no video")] + members[2:])
    cut = _cut_tar(write_tar(tmp_path / "full.tar", _members(3, folder="j")), data / "cut-001.tar")
    other = str(data / "other.mkv")
    (data / "other.mkv").write_bytes(_video(_frames(12)))
    out = str(tmp_path / "table")
    config = {"num_frames": 4, "frame_stride": 2, "image_size": 16}
    result = preprocess([good, cut, other], "video", config, out, num_workers=0, progress=False)
    assert (result.rows, result.errors, result.inputs) == (4, 1, 3)
    table = TokenTable(out)
    rows = table.read(columns=["id", "label"]).to_pylist()
    assert sorted((r["id"], r["label"]) for r in rows) == [
        (f"{good}#k/s0", 0), (f"{good}#k/s1", 1), (f"{good}#k/s2", 2), (f"{other}#0", None),
    ]  # fmt: skip
    (error,) = table.errors().to_pylist()
    assert (error["source"], error["kind"]) == (cut, "corrupt")
    (rec,) = [r for r in table.records() if r.id == f"{good}#k/s1"]
    assert rec.meta["member"] == "k/s1.mkv"
    np.testing.assert_array_equal(rec.tokens, _tok()(good)[1].tokens)
