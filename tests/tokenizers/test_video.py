"""Video tokenizer: frame sampling policy, exact tubelets and positions, round trip, decoding, bad inputs.

Videos are written here with PyAV. ``ffv1`` in Matroska with ``bgr0`` pixels is lossless, so frame
k of those files is known exactly: every pixel has level ``5 * k`` except a red 8x8 square whose
left edge is at column k (a moving square); lossy codecs are checked with tolerances.
"""

import dataclasses
import pickle
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from video_frames import frames as _frames

import maskloom.tokenizers.video as video_mod
from maskloom import tables
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
from maskloom.tokenizers.video import (
    Video,
    VideoConfig,
    VideoTokenizer,
    _decode_with_pyav,
    _decord_reads_it,
    _short,
    sample_indices,
)


def _write(path, frames: np.ndarray, codec: str = "ffv1", pix_fmt: str = "bgr0", fps: int = 10) -> str:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def _tok(**kw) -> VideoTokenizer:
    kw.setdefault("image_size", 32)
    return VideoTokenizer(VideoConfig(**kw))


def _levels(frames: np.ndarray) -> list[int]:
    """Frame numbers recovered from the background level of each frame (pixel at row 20, col 0)."""
    return [int(v) // 5 for v in frames[:, 20, 0, 1]]


def test_registered_and_spec():
    assert TOKENIZERS.get("video") is VideoTokenizer
    spec = get_tokenizer("video").spec()
    assert spec.modality == "video"
    assert (spec.token_kind, spec.token_dim, spec.token_dtype) == ("continuous", 1536, "uint8")
    assert spec.position_axes == ("t", "row", "col") and spec.position_kind == "grid"
    assert spec.token_shape == (2, 16, 16, 3)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        VideoConfig(num_frames=5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VideoConfig(image_size=40)
    with pytest.raises(ValueError, match="clip_start"):
        VideoConfig(clip_start="end")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame_stride"):
        VideoConfig(frame_stride=0)
    with pytest.raises(ValueError, match="unknown key"):
        get_tokenizer("video", {"frames": 8})


# ---- frame sampling ------------------------------------------------------------------------------
def test_sample_indices_strided():
    assert sample_indices(100, 16, 4, "begin").tolist() == list(range(0, 64, 4))
    assert sample_indices(100, 16, 4, "center").tolist() == list(range(18, 82, 4))  # start (100-64)//2
    assert sample_indices(64, 16, 4, "center").tolist() == list(range(0, 64, 4))  # exactly T*s frames
    assert sample_indices(65, 16, 4, "center").tolist() == list(range(0, 64, 4))


def test_sample_indices_short_clip_is_uniform():
    assert sample_indices(20, 8, 4).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]  # floor(i * 20 / 8)
    assert sample_indices(63, 16, 4).tolist() == [(i * 63) // 16 for i in range(16)]
    assert sample_indices(3, 8, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # fewer frames than T: repeats
    assert sample_indices(1, 4, 2).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("start", ["begin", "center"])
def test_resampling_a_sampled_clip_is_the_identity(stride, start):
    assert sample_indices(8, 8, stride, start).tolist() == list(range(8))


# ---- tokenize ------------------------------------------------------------------------------------
def test_tubelets_and_positions_exact():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)  # shorter side 32: crop cols 8..39
    tok = _tok(num_frames=4, frame_stride=1)
    (rec,) = tok.tokenize(frames, source="v.mp4")
    assert rec.id == "v.mp4#0"
    assert rec.tokens.shape == (8, 1536) and rec.tokens.dtype == np.uint8
    assert rec.positions.dtype == np.float32
    assert rec.positions.tolist() == [[t, r, c] for t in range(2) for r in range(2) for c in range(2)]
    tube = rec.tokens.reshape(8, 2, 16, 16, 3)  # (token, pt, p1, p2, c)
    # token 5 = (t=1, row=0, col=1): frames 2..3, rows 0..15, cols 8+16 .. 8+31
    np.testing.assert_array_equal(tube[5], frames[2:4, 0:16, 24:40])
    np.testing.assert_array_equal(tube[2, 1, 3, 4], frames[1, 16 + 3, 8 + 4])
    assert rec.meta["grid"] == [2, 2, 2] and rec.meta["frame_indices"] == [0, 1, 2, 3]
    assert rec.meta["original_size"] == [32, 48] and rec.meta["crop_offset"] == [0, 8]
    assert rec.meta["fps"] is None and rec.meta["num_source_frames"] == 4


def test_default_config_token_count():
    (rec,) = get_tokenizer("video").tokenize(np.zeros((16, 224, 224, 3), np.uint8))
    assert rec.tokens.shape == (8 * 14 * 14, 2 * 16 * 16 * 3)  # 1568 tokens, as VideoMAE
    assert rec.positions[-1].tolist() == [7, 13, 13]


def test_whole_array_is_sampled_like_read():
    frames = _frames(20)
    video = _tok(num_frames=4, frame_stride=4, clip_start="begin").preprocess(frames)
    assert video[1]["frame_indices"] == [0, 4, 8, 12]
    assert _levels(video[0]) == [0, 4, 8, 12]


def test_round_trip_exact_and_subset():
    frames = np.random.default_rng(1).integers(0, 256, (6, 40, 36, 3), dtype=np.uint8)
    tok = _tok(num_frames=4, frame_stride=2)
    processed, _ = tok.preprocess(frames)
    assert processed.shape == (4, 32, 32, 3)
    (rec,) = tok.tokenize(frames)
    out = tok.detokenize(rec)
    assert isinstance(out, Video) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, processed)
    np.testing.assert_array_equal(np.asarray(out), processed)
    assert out.frame_indices.tolist() == [0, 1, 3, 4]  # floor(i * 6 / 4)
    keep = [0, 7]  # tubelets (0,0,0) and (1,1,1); the rest stays black
    part = tok.detokenize(dataclasses.replace(rec, tokens=rec.tokens[keep], positions=rec.positions[keep]))
    np.testing.assert_array_equal(part.frames[0:2, :16, :16], processed[0:2, :16, :16])
    np.testing.assert_array_equal(part.frames[2:4, 16:, 16:], processed[2:4, 16:, 16:])
    assert part.frames[0:2, 16:].max() == 0 and part.frames[2:4, :16].max() == 0


def test_round_trip_through_table(tmp_path):
    tok = _tok(num_frames=2)
    frames = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    table = tables.write_table(str(tmp_path / "t"), tok.tokenize(frames, source="a.mp4"), tok)
    (back,) = table.records()
    np.testing.assert_array_equal(table.tokenizer().detokenize(back).frames, frames)


def test_deterministic_pickle_and_no_mutation():
    frames = np.random.default_rng(3).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    copy = frames.copy()
    tok = _tok(num_frames=4)
    a = tok.tokenize(frames)[0]
    b = pickle.loads(pickle.dumps(tok)).tokenize(Video(frames=frames))[0]
    np.testing.assert_array_equal(frames, copy)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.meta == b.meta


def test_tokenize_rejects_bad_arrays():
    tok = _tok(num_frames=2)
    for bad in (
        np.zeros((2, 8, 8), np.uint8),
        np.zeros((2, 8, 8, 3), np.float32),
        [1, 2],
        Video(frames=None),
    ):
        with pytest.raises(TokenizeError) as e:
            tok.tokenize(bad, source="s")
        assert e.value.kind == "invalid"
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(np.zeros((0, 8, 8, 3), np.uint8), source="s")
    assert e.value.kind == "empty"


# ---- read ----------------------------------------------------------------------------------------
def test_read_long_video_centre_clip(tmp_path):
    path = _write(tmp_path / "long.mkv", _frames(40))
    video = _tok(num_frames=4, frame_stride=4).read(path)  # start (40 - 16) // 2 = 12
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.frame_indices.tolist() == [12, 16, 20, 24] and video.num_source_frames == 40
    assert video.fps == 10.0
    np.testing.assert_array_equal(video.frames, _frames(40)[[12, 16, 20, 24]])  # lossless: exact
    (rec,) = _tok(num_frames=4, frame_stride=4)(path)
    assert rec.meta["frame_indices"] == [12, 16, 20, 24] and rec.meta["fps"] == 10.0
    begin = _tok(num_frames=4, frame_stride=4, clip_start="begin").read(path)
    assert _levels(begin.frames) == [0, 4, 8, 12]


def test_read_short_video_uniform(tmp_path):
    path = _write(tmp_path / "short.mkv", _frames(10))
    video = _tok(num_frames=4, frame_stride=4).read(path)  # 10 < 16: floor(i * 10 / 4)
    assert video.frame_indices.tolist() == [0, 2, 5, 7]
    assert _levels(video.frames) == [0, 2, 5, 7]


def test_read_fewer_frames_than_clip_repeats(tmp_path):
    path = _write(tmp_path / "three.mkv", _frames(3))
    tok = _tok(num_frames=8)
    (rec,) = tok(path)
    assert rec.meta["frame_indices"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert _levels(tok.detokenize(rec).frames) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_single_frame_video_repeats_the_frame(tmp_path):
    path = _write(tmp_path / "one.mkv", _frames(1))
    tok = _tok(num_frames=4)
    (rec,) = tok(path)
    assert rec.tokens.shape == (2 * 2 * 2, 1536)
    assert rec.meta["frame_indices"] == [0, 0, 0, 0] and rec.meta["num_source_frames"] == 1
    out = tok.detokenize(rec).frames
    for k in range(4):
        np.testing.assert_array_equal(out[k], _frames(1)[0])


@pytest.mark.parametrize("width", [48, 16, 50])
def test_widths_decord_cannot_copy_fall_back_to_pyav(tmp_path, width):
    frames = _frames(6, 40, width)
    path = _write(tmp_path / "w.mkv", frames)
    video = _tok(num_frames=2, frame_stride=2).read(path)  # start (6 - 4) // 2 = 1
    assert video.frame_indices.tolist() == [1, 3]
    np.testing.assert_array_equal(video.frames, frames[[1, 3]])


@pytest.mark.parametrize("max_clips,starts", [(3, [0, 8, 24]), (10, [0, 8, 16, 24, 32])])
def test_long_videos_cut_into_clips(tmp_path, max_clips, starts):
    """max_clips > 1: consecutive slots of T * stride frames, up to max_clips of them spread evenly,
    one record each, each the record that clip's frames alone give (resized as they were decoded)."""
    frames = _frames(40)  # 5 slots of 4 frames at stride 2
    path = _write(tmp_path / "long.mkv", frames)
    tok = _tok(num_frames=4, frame_stride=2, image_size=16, max_clips=max_clips)
    recs = tok(path)
    assert [r.id for r in recs] == [f"{path}#{k}" for k in range(len(starts))]
    assert [r.meta["clip"] for r in recs] == list(range(len(starts)))
    one = _tok(num_frames=4, frame_stride=2, image_size=16)
    for r, start in zip(recs, starts):
        idx = start + 2 * np.arange(4)
        assert r.meta["frame_indices"] == idx.tolist() and r.meta["num_source_frames"] == 40
        (ref,) = one.tokenize(Video(frames=frames[idx], frame_indices=idx, num_source_frames=40), source=path)
        assert np.array_equal(r.tokens, ref.tokens)
        assert {k: v for k, v in r.meta.items() if k not in ("clip", "fps")} == {
            k: v for k, v in ref.meta.items() if k != "fps"
        }
        assert r.meta["original_size"] == [32, 32] and r.meta["resized_size"] == [16, 16]
    # shorter than two slots: the one clip max_clips=1 gives
    for n in (6, 12):
        short = _write(tmp_path / f"short{n}.mkv", _frames(n))
        (a,), (b,) = tok(short), one(short)
        assert a.id == b.id and np.array_equal(a.tokens, b.tokens) and a.meta == b.meta
    with pytest.raises(ValueError, match="max_clips must be a positive integer"):
        _tok(max_clips=0)


def test_clips_of_a_video_decord_cannot_copy_come_from_pyav(tmp_path):
    frames = _frames(24, 24, 48)  # 48 px wide: decord refuses to copy these frames
    path = _write(tmp_path / "w.mkv", frames)
    recs = _tok(num_frames=2, frame_stride=4, image_size=16, max_clips=2)(path)  # 3 slots: 0 and 8
    one = _tok(num_frames=2, frame_stride=4, image_size=16)
    for r, idx in zip(recs, ([0, 4], [8, 12])):
        assert r.meta["frame_indices"] == idx
        assert np.array_equal(r.tokens, one.tokenize(Video(frames=frames[idx]), source=path)[0].tokens)


def test_pyav_fallback_decoder(tmp_path):
    frames = _frames(5)
    path = _write(tmp_path / "v.mkv", frames)
    out = _decode_with_pyav(path, np.array([0, 0, 4, 2]), error="test")
    np.testing.assert_array_equal(out, frames[[0, 0, 4, 2]])
    with pytest.raises(TokenizeError) as e:
        _decode_with_pyav(path, np.array([1, 7]), error="test")
    assert e.value.kind == "corrupt" and "[7]" in e.value.reason


def _set_display_rotation(path: str, degrees: int) -> None:
    """Write a clockwise display rotation into an MP4/MOV's track header matrix (what a phone
    records for portrait video: landscape frames plus this matrix)."""
    b = bytearray(open(path, "rb").read())
    i = b.index(b"tkhd")
    # the matrix follows: version+flags, times and ids (v0: 20 bytes), reserved, layer..volume
    off = i + 4 + 4 + (32 if b[i + 4] == 1 else 20) + 8 + 8
    one, neg = 1 << 16, (-(1 << 16)) & 0xFFFFFFFF
    a, bb, c, d = {90: (0, one, neg, 0), 180: (neg, 0, 0, neg), 270: (0, neg, one, 0)}[degrees]
    assert struct.unpack(">9I", b[off : off + 36])[:5] == (one, 0, 0, 0, one)  # the identity was there
    b[off : off + 36] = struct.pack(">9I", a, bb, 0, c, d, 0, 0, 0, 1 << 30)
    open(path, "wb").write(bytes(b))


@pytest.mark.parametrize("width", [40, 48])  # 48: decord cannot copy these frames; PyAV decodes them
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_display_rotation_is_applied_by_both_decoders(tmp_path, width, degrees):
    """A phone's portrait video (landscape frames + a rotation matrix) is read upright, as images are
    by their EXIF orientation: decord applies the matrix, and the PyAV fallback now does too (it
    returned the frames lying on their side)."""
    frames = _frames(6, 24, width)
    path = _write(tmp_path / "phone.mov", frames, "png", "rgb24")  # lossless in QuickTime
    _set_display_rotation(path, degrees)
    upright = np.rot90(frames, -degrees // 90, axes=(1, 2))  # clockwise
    video = _tok(num_frames=2, frame_stride=2).read(path)
    np.testing.assert_array_equal(video.frames, upright[[1, 3]])
    np.testing.assert_array_equal(_decode_with_pyav(path, np.array([1, 3]), error="test"), upright[[1, 3]])


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "ext"),
    [
        ("mpeg4", "yuv420p", ".mp4"),
        ("mpeg4", "yuv420p", ".avi"),
        ("mpeg4", "yuv420p", ".mov"),
        ("libx264", "yuv420p", ".mp4"),
        ("libvpx", "yuv420p", ".webm"),
        ("ffv1", "bgr0", ".mkv"),
    ],
)
def test_moving_square_decodes_in_every_container(tmp_path, codec, pix_fmt, ext):
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - the encoder is missing from this FFmpeg build
        pytest.skip(f"PyAV cannot encode {codec} here")
    path = _write(tmp_path / f"sq{ext}", _frames(16), codec, pix_fmt)
    video = _tok(num_frames=4, frame_stride=4).read(path)
    assert video.frames.shape == (4, 32, 32, 3) and video.frame_indices.tolist() == [0, 4, 8, 12]
    red = (video.frames[..., 0] > 160) & (video.frames[..., 1] < 100)  # (T, H, W)
    centre_col = [float(np.nonzero(m)[1].mean()) for m in red]
    assert np.allclose(centre_col, [k + 3.5 for k in (0, 4, 8, 12)], atol=1.0)


def _kind(path) -> str:
    with pytest.raises(TokenizeError) as e:
        _tok(num_frames=2)(str(path))
    assert e.value.source == str(path)
    return e.value.kind


def test_bad_inputs(tmp_path):
    assert _kind(tmp_path / "missing.mp4") == "missing"
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert _kind(tmp_path / "empty.mp4") == "empty"
    (tmp_path / "noise.mp4").write_bytes(
        np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    )
    assert _kind(tmp_path / "noise.mp4") == "corrupt"
    (tmp_path / "text.avi").write_text("not a video")
    assert _kind(tmp_path / "text.avi") == "corrupt"
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    assert _kind(tmp_path / "clip.gif") == "unsupported"
    (tmp_path / "dir.mp4").mkdir()
    assert _kind(tmp_path / "dir.mp4") == "unsupported"


def test_a_file_without_video_is_empty(tmp_path):
    with av.open(str(tmp_path / "speech.mp4"), "w") as out:  # audio only
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(s.encode(frame))
        out.mux(s.encode(None))
    with pytest.raises(TokenizeError) as e:
        _tok(num_frames=2)(str(tmp_path / "speech.mp4"))
    assert (e.value.kind, e.value.reason) == ("empty", "no video stream (audio only)")


def test_pyav_fallback_reads_the_main_stream_not_a_cover_picture(tmp_path):
    frames = _frames(8, 40, 16)  # 16 px wide: decord cannot copy these frames, PyAV decodes them
    with av.open(str(tmp_path / "c.mkv"), "w") as out:
        cover = out.add_stream("ffv1", rate=1)  # stream 0: one grey 32 x 32 picture
        cover.width = cover.height = 32
        cover.pix_fmt = "bgr0"
        main = out.add_stream("ffv1", rate=10)
        main.height, main.width, main.pix_fmt = 40, 16, "bgr0"
        out.mux(cover.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")))
        out.mux(cover.encode())
        for f in frames:
            out.mux(main.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(main.encode())
    video = _tok(num_frames=2, frame_stride=2).read(str(tmp_path / "c.mkv"))
    assert video.num_source_frames == 8 and video.frame_indices.tolist() == [2, 4]
    np.testing.assert_array_equal(video.frames, frames[[2, 4]])


def test_pyav_fallback_scales_frames_to_the_first_ones_size(tmp_path):
    parts = []
    for h, w in ((40, 16), (64, 64)):  # a stream whose resolution changes (MPEG-TS pieces joined)
        with av.open(str(tmp_path / "p.ts"), "w", format="mpegts") as out:
            s = out.add_stream("mpeg2video", rate=10)
            s.height, s.width, s.pix_fmt = h, w, "yuv420p"
            for f in _frames(6, h, w):
                out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(s.encode())
        parts.append((tmp_path / "p.ts").read_bytes())
    (tmp_path / "r.mkv").write_bytes(b"".join(parts))
    got = _decode_with_pyav(str(tmp_path / "r.mkv"), np.array([1, 4, 7, 10]), error="decord's")
    assert got.shape == (4, 40, 16, 3)
    video = _tok(num_frames=4, frame_stride=3).read(str(tmp_path / "r.mkv"))  # decord's copy fails at 16 px
    assert video.frames.shape == (4, 40, 16, 3)


def _write_with(path, frames: np.ndarray, codec: str, fmt: str | None = None, **options) -> str:
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {k: str(v) for k, v in options.items()}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def _all_frames(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# decord 0.6 returned other frames than asked for, without an error, for each of these
# (e.g. frame 0 for frames 12-24 of the MPEG-2 .mpg, frames 14-26 for 12-24 of the MPEG-4 .mp4)
MISREAD = [
    ("mpeg2video", ".mpg", None, {}),
    ("mpeg2video", ".mp4", None, {"bf": 2}),
    ("mpeg2video", ".mkv", None, {"bf": 2}),
    ("mpeg2video", ".m2ts", "mpegts", {}),
    ("mpeg4", ".avi", None, {"bf": 2}),
    ("mpeg4", ".mp4", None, {"bf": 2}),
    ("libx264", ".avi", None, {}),
]


@pytest.mark.parametrize(("codec", "ext", "fmt", "options"), MISREAD)
def test_files_decord_misreads_are_decoded_in_order_with_pyav(tmp_path, codec, ext, fmt, options):
    path = _write_with(tmp_path / f"v{ext}", _frames(40), codec, fmt, **options)
    assert not _decord_reads_it(path)
    video = _tok(num_frames=4, frame_stride=4).read(path)
    assert video.num_source_frames == 40 and video.frame_indices.tolist() == [12, 16, 20, 24]
    np.testing.assert_array_equal(video.frames, _all_frames(path)[[12, 16, 20, 24]])
    assert np.abs(np.array(_levels(video.frames)) - [12, 16, 20, 24]).max() <= 1  # lossy levels


def test_decord_keeps_the_files_it_reads_right(tmp_path):
    frames = _frames(40)
    assert _decord_reads_it(_write_with(tmp_path / "a.mp4", frames, "libx264"))
    assert _decord_reads_it(_write_with(tmp_path / "a.webm", frames, "libvpx-vp9"))
    assert _decord_reads_it(_write(tmp_path / "a.mkv", frames))  # ffv1
    assert not _decord_reads_it(_write(tmp_path / "b.avi", frames, "mpeg4", "yuv420p"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    assert _decord_reads_it(str(tmp_path / "junk.mp4"))  # FFmpeg cannot read it: decord's error names it


def test_clips_of_a_pyav_read_video_are_cut_as_decoded(tmp_path):
    frames = _frames(100, 40, 48)
    path = _write_with(tmp_path / "c.mpg", frames, "mpeg2video")
    video = _tok(num_frames=4, frame_stride=4, max_clips=3).read(path)  # 6 slots of 16 frames: 0, 2, 4
    assert video.extra["clips"] == 3 and video.num_source_frames == 100
    assert video.frame_indices.tolist() == [s + 4 * i for s in (0, 32, 64) for i in range(4)]
    assert video.frames.shape == (12, 32, 32, 3)  # resized (shorter side 32) and centre-cropped
    assert video.extra["prepared"]["original_size"] == [40, 48]
    levels = np.array(_levels(video.frames))  # frame k's level is 5 k modulo 256
    assert np.abs(levels - (5 * video.frame_indices % 256) // 5).max() <= 1


@pytest.mark.parametrize(
    ("codec", "ext", "fmt", "seeks"),
    [("mpeg2video", ".mpg", None, True), ("mpeg2video", ".m2ts", "mpegts", True), ("mpeg4", ".mp4", None, True),
     ("libx264", ".avi", None, False), ("mpeg4", ".avi", None, False)],
)  # fmt: skip
def test_far_frames_of_a_pyav_read_video_are_found_by_seeking_where_timestamps_allow(
    tmp_path, monkeypatch, codec, ext, fmt, seeks
):
    n = 2 * video_mod.SEEK_GAP + 100
    frames = np.zeros((n, 16, 32, 3), np.uint8)
    frames[..., 1] = (5 * np.arange(n) % 250)[:, None, None]  # frame k: green 5 k mod 250
    frames[..., 0] = (5 * (np.arange(n) // 50))[:, None, None]  # and red 5 (k // 50)
    path = _write_with(tmp_path / f"long{ext}", frames, codec, fmt, bf=2) if codec == "mpeg4" else (
        _write_with(tmp_path / f"long{ext}", frames, codec, fmt))  # fmt: skip
    used = []
    seek = video_mod._seek_frames
    monkeypatch.setattr(video_mod, "_seek_frames", lambda *a: used.append(seek(*a)) or used[-1])
    video = _tok(num_frames=4, frame_stride=4).read(path)  # the middle clip: frames 342..354
    assert video.frame_indices.tolist() == [342, 346, 350, 354] and video.num_source_frames == n
    np.testing.assert_array_equal(video.frames, _all_frames(path)[[342, 346, 350, 354]])
    assert len(used) == 1 and (used[0] is not None) == seeks  # AVI: decode order, no seeking


def test_ffmpeg_inside_decord_does_not_print_a_line_per_bad_packet(tmp_path, monkeypatch, capfd):
    import decord

    data = open(_write_with(tmp_path / "full.mkv", _frames(40), "libx264"), "rb").read()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 6 // 10])
    decord.logging.set_level(decord.logging.INFO)  # FFmpeg's default: it prints "Read error" lines
    monkeypatch.setattr(video_mod, "_QUIET", False)
    try:
        _tok(num_frames=4).read(str(tmp_path / "cut.mkv"))  # the frames that are there
    except TokenizeError:
        pass
    assert "@ 0x" not in capfd.readouterr().err  # "[matroska,webm @ 0x...] Read error"


def test_decord_messages_lose_their_source_prefixes():
    e = RuntimeError("[14:25:37] /github/workspace/src/a.cc:218: [14:25:37] /github/workspace/src/b.cc:9: "
                     "Check failed: x >= 0 (-1 vs. 0) Error sending packet.\nStack trace:\n  [bt] (0) lib.so")  # fmt: skip
    assert _short(e) == "Check failed: x >= 0 (-1 vs. 0) Error sending packet."


def test_truncated_mp4_is_corrupt(tmp_path):
    data = open(_write(tmp_path / "full.mp4", _frames(16), "mpeg4", "yuv420p"), "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    assert _kind(tmp_path / "cut.mp4") == "corrupt"


def test_render_frame_sheet(tmp_path):
    frames = _frames(4)
    tok = _tok(num_frames=4)
    tok.render(Video(frames=frames), str(tmp_path / "s.png"))
    sheet = np.asarray(Image.open(tmp_path / "s.png"))
    assert sheet.shape == (32, 4 * 32 + 3 * 2, 3)
    np.testing.assert_array_equal(sheet[:, 34:66], frames[1])
    assert (sheet[:, 32:34] == 255).all()
    tok.render(_frames(10), str(tmp_path / "t.png"), per_row=4)  # 3 rows of up to 4
    assert np.asarray(Image.open(tmp_path / "t.png")).shape == (3 * 34 - 2, 4 * 34 - 2, 3)


def test_conformance_kit(tmp_path):
    testing = pytest.importorskip("maskloom.testing")
    paths = [
        _write(tmp_path / "a.mkv", _frames(12)),
        _write(tmp_path / "b.mp4", _frames(5, 40, 48), "mpeg4", "yuv420p"),
        _write(tmp_path / "c.avi", _frames(1), "mpeg4", "yuv420p"),
    ]
    tok = _tok(num_frames=4, frame_stride=2)

    def compare(raw, out, rec):
        np.testing.assert_array_equal(out.frames, tok.preprocess(raw)[0])

    report = testing.check_tokenizer(tok, paths, compare=compare)
    assert report == {"sources": 3, "records": 3, "tokens": 24}


def _long_avi(path, codec: str, n: int = 2 * video_mod.SEEK_GAP + 100, **options) -> str:
    """An AVI of ``n`` 32x48 frames: green 5 k mod 250, red 5 (k // 50), a square moving 2 px a frame
    (so that every frame differs and P/B-frames have motion to code)."""
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    frames[..., 1] = (5 * np.arange(n) % 250)[:, None, None]
    frames[..., 0] = (5 * (np.arange(n) // 50))[:, None, None]
    for k in range(n):  # test data
        x = 2 * k % 40
        frames[k, 8:16, x : x + 8] = [255, 255, 255]
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream(codec, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {k: str(v) for k, v in options.items()}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def _pack_divx(src: str, dst: str) -> str:
    """``src`` (MPEG-4 with single B-frames) as DivX 5 writes it, a packed bitstream: each P-VOP and
    the B-VOP after it in one packet followed by a placeholder N-VOP, user data ``DivX503b1393p``."""
    with av.open(src) as c:
        s = c.streams.video[0]
        extradata, (h, w) = s.codec_context.extradata, (s.height, s.width)
        packets = [(bytes(p), p.is_keyframe) for p in c.demux(s) if p.size]
    bits = video_mod._vol_time_bits(extradata or packets[0][0])
    kinds = [video_mod._vops(d, d.find(video_mod._VOP), bits)[0][0] for d, _ in packets]
    nvop = "01" + "0" + "1" + "0" * bits + "1" + "0"  # P, time 0, not coded; then stuffing 0111..
    nvop += "0" + "1" * ((7 - len(nvop)) % 8)
    nvop_bytes = video_mod._VOP + int(nvop, 2).to_bytes(len(nvop) // 8, "big")
    packed, i = [], 0
    while i < len(packets):
        (d, key), i = packets[i], i + 1
        if kinds[i - 1] == 1 and i < len(packets) and kinds[i] == 2:
            packed += [(d + packets[i][0], key), (nvop_bytes, False)]
            i += 1
        else:
            packed.append((d, key))
    user_data = b"\x00\x00\x01\xb2DivX503b1393p"
    with av.open(dst, "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.height, stream.width = h, w
        for t, (d, key) in enumerate(packed):
            at = d.find(video_mod._VOP)
            p = av.Packet(d[:at] + user_data + d[at:] if key and at > 0 else d)
            p.stream, p.time_base, p.is_keyframe = stream, Fraction(1, 25), key
            p.dts = p.pts = t
            out.mux(p)
    return dst


KEYFRAME_AVIS = {
    "mpeg4 closed GOP": ("mpeg4", {"g": 12, "bf": 2, "flags": "+cgop", "sc_threshold": 10**9}),
    "mpeg4 open GOP": ("mpeg4", {"g": 12, "bf": 2, "sc_threshold": 10**9}),
    "mpeg4 no B": ("mpeg4", {"g": 25, "bf": 0, "sc_threshold": 10**9}),
    "mjpeg": ("mjpeg", {}),
}


@pytest.mark.parametrize("case", list(KEYFRAME_AVIS))
def test_far_frames_of_mpeg4_and_mjpeg_avi_are_decoded_from_a_keyframe(tmp_path, monkeypatch, case):
    codec, options = KEYFRAME_AVIS[case]
    path = _long_avi(tmp_path / "k.avi", codec, **options)
    used = []
    fast = video_mod._keyframe_frames
    monkeypatch.setattr(video_mod, "_keyframe_frames", lambda *a: used.append(fast(*a)) or used[-1])
    every = _all_frames(path)  # the sequential decode: frame k is the k-th the decoder shows
    video = _tok(num_frames=4, frame_stride=4).read(path)  # the middle clip: frames 342..354
    assert video.frame_indices.tolist() == [342, 346, 350, 354] and video.num_source_frames == 700
    np.testing.assert_array_equal(video.frames, every[[342, 346, 350, 354]])
    clips = _tok(num_frames=2, frame_stride=4, max_clips=2).read(path)  # slots 0 and 43 of 8 frames
    assert clips.frame_indices.tolist() == [0, 4, 344, 348]
    seq, _ = video_mod._sequential_frames(
        path, sorted(set(clips.frame_indices.tolist())), video_mod._FrameGrab(None)
    )
    crops = [
        video_mod._resize_shorter_center_crop_view(seq[int(k)], 32, "bilinear")[0]
        for k in clips.frame_indices
    ]
    np.testing.assert_array_equal(clips.frames, np.stack(crops))
    assert len(used) == 2 and all(got is not None for got in used)  # both took the fast path


def test_an_open_gop_start_numbers_the_b_frames_the_fresh_decoder_drops(tmp_path):
    # FFmpeg's MPEG-4 default is an open GOP: the two B-VOPs after each I-VOP are shown before it,
    # predicted from the GOP before; decoding from the I-VOP drops them, and the numbering counts them
    path = _long_avi(tmp_path / "o.avi", "mpeg4", n=120, g=12, bf=2, sc_threshold=10**9)
    every = _all_frames(path)
    for k in range(40, 80):  # every phase of three GOPs, each frame on its own
        got = video_mod._keyframe_frames(path, [k, k + 3], video_mod._FrameGrab(None))
        assert got is not None and sorted(got) == [k, k + 3]
        np.testing.assert_array_equal(got[k], every[k])
        np.testing.assert_array_equal(got[k + 3], every[k + 3])
    # the packets before an I-VOP's are not its frame number there: a count of them is 2 frames off
    starts = [i for i, p in enumerate(av.open(path).demux(video=0)) if p.is_keyframe and i]
    assert starts[:3] == [10, 22, 34]  # the I-VOPs shown as frames 12, 24, 36


def test_packed_divx_avi_is_decoded_from_a_keyframe(tmp_path, monkeypatch):
    src = _long_avi(tmp_path / "b1.avi", "mpeg4", g=30, bf=1, sc_threshold=10**9)
    path = _pack_divx(src, str(tmp_path / "packed.avi"))
    sizes = [p.size for p in av.open(path).demux(video=0)]
    assert sizes.count(7) > 300 or sizes.count(6) > 300  # the placeholder N-VOPs
    every = _all_frames(path)
    assert len(every) == 700
    np.testing.assert_array_equal(every, _all_frames(src))  # the same frames as unpacked
    for wanted in ([342, 346, 350, 354], [0, 31, 400, 699], [121, 122, 600]):
        got = video_mod._keyframe_frames(path, wanted, video_mod._FrameGrab(None))
        assert got is not None and sorted(got) == wanted
        for k in wanted:
            np.testing.assert_array_equal(got[k], every[k])


def test_keyframe_decoding_is_refused_where_it_is_not_shown_exact(tmp_path):
    grab = video_mod._FrameGrab(None)
    h264 = _long_avi(tmp_path / "h.avi", "libx264", n=100)  # H.264: frame order it cannot check
    assert video_mod._keyframe_frames(h264, [50], grab) is None
    mp4 = _write_with(tmp_path / "m.mp4", _frames(100), "mpeg4")  # not AVI: _seek_frames's
    assert video_mod._keyframe_frames(mp4, [50], grab) is None
    # headers that change after the first packet's, then again: a start could miss one
    src = _long_avi(tmp_path / "s.avi", "mpeg4", n=100, g=10, sc_threshold=10**9)
    with av.open(src) as c:
        packets = [bytes(p) for p in c.demux(video=0) if p.size]
    scan = video_mod._Mpeg4Scan(None)
    kinds = [scan.feed(d) for d in packets]
    assert kinds[0] == "start" and kinds.count("start") == 10 and None not in kinds
    scan = video_mod._Mpeg4Scan(None)
    at = packets[20].find(video_mod._VOP)
    changed = packets[20][:at] + b"\x00\x00\x01\xb2other" + packets[20][at:]
    assert [scan.feed(d) for d in [*packets[:20], changed]][-1] is None
    assert video_mod._MjpegScan().feed(b"\xff\xd8\xff\xd9") is None  # no scan: not a frame
