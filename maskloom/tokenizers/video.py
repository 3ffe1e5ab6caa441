"""Video tokenizer: a clip of sampled frames cut into 2x16x16x3 uint8 tubelets, as in VideoMAE.

Tubelet embedding follows Arnab et al., 2021, "ViViT: A Video Vision Transformer"; the defaults
(16 frames, stride 4, 224x224, 2x16x16 tubelets -> 8x14x14 = 1568 tokens) are those of Tong et
al., 2022, "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
Pre-Training" (MCG-NJU/VideoMAE, Kinetics setting). Frames are decoded with decord.

Frame sampling (``sample_indices(n)`` for a video of ``n`` frames, ``T = num_frames``,
``s = frame_stride``), exactly:

* **long enough** (``n >= T * s``): a strided clip ``start + s * i`` for ``i = 0 .. T-1``, with
  ``start = 0`` when ``clip_start == "begin"`` and ``start = (n - T * s) // 2`` when
  ``clip_start == "center"`` (the default: the clip in the middle of the video, where the action
  of a trimmed clip usually is; VideoMAE picks a random start during training, which a
  deterministic tokenizer cannot);
* **too short** (``n < T * s``): ``T`` indices spread uniformly over the whole video,
  ``floor(i * n / T)`` for ``i = 0 .. T-1``. When ``n < T`` some frames repeat
  (e.g. ``n = 3, T = 8`` -> ``[0, 0, 0, 1, 1, 1, 2, 2]``); a single-frame video repeats its frame
  ``T`` times. Every clip therefore has exactly ``T`` frames and the same number of tokens.
* **several clips** (``max_clips = N > 1``, a video of at least two slots of ``T * s`` frames): of
  its ``n // (T * s)`` consecutive slots from frame 0, all or ``N`` spread evenly (slot
  ``j * slots // N``) become clips ``start + s * i``, one record each (``<source>#k``, meta
  ``clip``); ``read`` resizes and crops each clip's frames as it decodes them, so a long video
  costs ~2.4 MB per clip at the defaults rather than its decoded frames.

Pipeline:

``read(path)``
    Looks at the file's header with PyAV (~1 ms): H.264, HEVC, VP8, VP9, MJPEG and FFV1 in MP4,
    MOV, Matroska, WebM or FLV go to decord; everything else (MPEG-1/2, MPEG-4 Part 2, WMV, AV1,
    and any codec in AVI or MPEG-TS/PS) is decoded with PyAV, sequentially from the start (or, for
    frames far in, by seeking where the container's timestamps allow it: :func:`_seek_frames`; in
    AVI, which has none to check, for MPEG-4 Part 2 and MJPEG by reading the packets up to them and
    decoding only from the last keyframe before them that their headers and the decoder's output
    show gives the same frames: :func:`_keyframe_frames`), the frame count taken from the
    container or by counting packets: decord 0.6 returns *other* frames than those asked for,
    silently, for many such files (:func:`_decord_reads_it` lists what was measured), or cannot
    open them (AV1). Where decord is right both give the same
    pixels, bit for bit.
    Otherwise opens the file with ``decord.VideoReader(path, ctx=cpu(0), num_threads=1)`` (one decoding
    thread: the pipelines parallelise over files), decodes **only the sampled frames**
    (``get_batch``), and releases the reader before returning. Returns a :class:`Video`: frames
    (T, H, W, 3) uint8 RGB, fps, the source frame indices, and the video's frame count.
    decord 0.6 fails to copy out frames of some widths (8, 12, 16, 24, 48, 72 px among those
    tried: the decoder pads RGB rows and decord's size check refuses them); then the same frames
    are decoded with PyAV, sequentially from the start. A file neither can decode is ``corrupt``.
    Both apply the container's display rotation (a phone's portrait video is landscape frames
    plus a rotation matrix), so frames come upright, as images do by their EXIF orientation.

Tar shards (WebDataset layout: Kinetics, WebVid, Panda-70M ship ``key.mp4`` + ``key.cls`` / ``.json``)
    A ``.tar``, ``.tar.gz`` or ``.tgz`` is one input of many samples, read by the rules the image
    tokenizer's docstring sets out ("Tar shards": keys, ``cls`` labels, samples skipped with one
    warning, a mostly unusable tar as the error, a truncated tar ``corrupt``, streaming), which are
    :func:`maskloom.tokenizers.base.iter_tar_items`'s. A sample's video member is the first of the
    video extensions above (``mp4``, ``avi``, ``mkv``, ... ``m2ts``, a whole extension) it has; it is
    decoded from memory exactly as a file is (the same choice of decord or PyAV by its header, the
    same clip sampling, ``max_clips`` clips, resize and fallbacks: decord takes
    ``io.BytesIO(member)``, PyAV the same file object), so it gives the file's record(s), ids
    ``<tar>#<key>`` and, with ``max_clips``, ``<tar>#<key>#k`` for clip k >= 1, ``meta["member"]`` its
    name in the tar, ``label`` its ``cls`` (``.json`` / ``.txt`` members are not read). Errors name
    ``<tar>#<member>``; a sample without a video member is ``unsupported``, an empty member ``empty``,
    one FFmpeg cannot open ``corrupt`` with FFmpeg's reason (as a file it would be decord's: decord
    is not given such bytes, which it prints on stderr). ``iter_records(tar)`` (what the pipeline
    reads) decodes one sample at a time: a shard of 1,000 clips holds one member's bytes and one
    sample's clips at once. Decoding dominates: 102 clips (Kinetics-like, 256 x 340) in one tar gave
    as many records a second as the same clips as files (~10 at the defaults, ~21 at 8 frames,
    112 px, ``max_clips=4``), the process growing by under 50 MB while it streamed the 78 MB tar.
    ``read(tar)`` gives a :class:`TarVideos` of (key, Video, label, member), every sample's clips
    decoded and held (for tests and interactive use), which ``tokenize`` turns into the same records
    and ``render`` draws the first of.

``tokenize(raw)``
    Samples ``raw`` again with the same rule — the identity on a clip ``read`` made (it has ``T``
    frames, and ``n = T`` falls in the uniform case with ``floor(i * T / T) = i``; for
    ``frame_stride == 1`` the strided case with start 0), so a whole decoded video passed as an
    array is sampled as ``read`` would. Each frame is resized (shorter side ``image_size``, bilinear
    by default, as VideoMAE's evaluation transform) and centre-cropped like an image, then cut with
    ``'(t pt) (h p1) (w p2) c -> (t h w) (pt p1 p2 c)'``: tokens (L, pt*p*p*3) uint8,
    positions (L, 3) float32 ``(t, row, col)`` tubelet-grid indices, L = (T/pt) * (S/p)^2.

``detokenize(record)``
    The processed clip back, exactly: a :class:`Video` with frames (T, S, S, 3) uint8 (tubelets
    placed by their positions; missing ones black).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar, Literal, NamedTuple

import numpy as np
from einops import rearrange

from maskloom.tokenizers.base import (
    TAR_EXTENSIONS,
    TAR_MEMBER_MAX_BYTES,
    Record,
    TableSpec,
    TarItems,
    TokenizeError,
    Tokenizer,
    ffmpeg_reason,
    is_tar_path,
    iter_tar_records,
    path_or_file,
    read_tar,
    register_tokenizer,
    rewound,
    tokenize_tar,
)
from maskloom.tokenizers.image import (
    INTERPOLATIONS,
    _resize_shorter_center_crop_view,
    grid_positions,
    grid_size_of,
    scatter_patches,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Configuration of the video tokenizer."""

    num_frames: int = 16
    """Frames T in a clip (a multiple of tubelet_size)."""
    frame_stride: int = 4
    """Step between sampled frames of a long-enough video (4 for Kinetics, 2 for SSv2 in VideoMAE)."""
    clip_start: Literal["begin", "center"] = "center"
    """Where the strided clip of a long video starts: at frame 0, or centred in the video."""
    image_size: int = 224
    """Side S of the square processed frames (shorter side resized to S, then a centre crop)."""
    patch_size: int = 16
    """Spatial side p of a tubelet; image_size must be a multiple of it."""
    tubelet_size: int = 2
    """Frames pt per tubelet; one token holds pt*p*p*3 uint8 values."""
    interpolation: str = "bilinear"
    """Frame resize filter: nearest, bilinear, bicubic, lanczos, box or hamming."""
    max_clips: int = 1
    """Records per video. 1: one clip, placed by ``clip_start`` (VideoMAE's). N > 1: a long video is
    cut into consecutive slots of ``num_frames * frame_stride`` frames from its start, and up to N
    of them, spread evenly over the video, become clips, one record each (``<source>#0``, ``#1``,
    ...); each clip's frames are resized as they are decoded, so a video holds ~2.4 MB per clip at
    the defaults, not its decoded frames. A video shorter than one slot gives its one clip."""

    def __post_init__(self) -> None:
        for name in ("num_frames", "frame_stride", "image_size", "patch_size", "tubelet_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames ({self.num_frames}) must be a multiple of tubelet_size ({self.tubelet_size})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.clip_start not in ("begin", "center"):
            raise ValueError(f"clip_start must be 'begin' or 'center', got {self.clip_start!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not isinstance(self.max_clips, int) or isinstance(self.max_clips, bool) or self.max_clips < 1:
            raise ValueError(f"max_clips must be a positive integer, got {self.max_clips!r}")


@dataclass
class Video:
    """The raw form of a video clip.

    frames:            (T, H, W, 3) uint8 RGB.
    fps:               average frame rate of the source (None when unknown, e.g. a bare array).
    frame_indices:     (T,) index of each frame in the source video.
    num_source_frames: frames in the source video.

    ``np.asarray(video)`` gives the frames.
    """

    frames: np.ndarray
    fps: float | None = None
    frame_indices: np.ndarray | None = None
    num_source_frames: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (e.g. the processed clip's meta after detokenize)."""

    def __array__(self, dtype=None, copy=None):
        return self.frames if dtype is None else self.frames.astype(dtype)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def clip_slots(n: int, num_frames: int, stride: int, max_clips: int) -> list[int]:
    """First frames of the clips of an ``n``-frame video when ``max_clips > 1``: of its
    ``n // (num_frames * stride)`` consecutive slots, all, or ``max_clips`` spread evenly (slot
    ``j * slots // max_clips``); [] when the video is shorter than one slot."""
    span = num_frames * stride
    slots = n // span
    picked = range(slots) if slots <= max_clips else (j * slots // max_clips for j in range(max_clips))
    return [k * span for k in picked]


def sample_indices(n: int, num_frames: int, stride: int, clip_start: str = "center") -> np.ndarray:
    """Indices (num_frames,) int64 of the frames of an ``n``-frame video to keep (rule in the module docstring)."""
    if n < 1:
        raise ValueError(f"a video needs at least one frame, got {n}")
    i = np.arange(num_frames, dtype=np.int64)
    if n >= num_frames * stride:
        start = 0 if clip_start == "begin" else (n - num_frames * stride) // 2
        return start + stride * i
    return (i * n) // num_frames


def _to_numpy(batch: Any) -> np.ndarray:
    """decord's batch -> numpy, whatever bridge another library switched decord to."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):  # torch bridge
        return batch.numpy()
    return np.asarray(batch)


VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
    ".ogv", ".mts", ".m2ts",
)  # fmt: skip
"""Extensions of video files; in a tar sample, the first of them present (in this order) is its video."""

_MEMBER_VIDEO_EXTENSIONS = tuple(e[1:] for e in VIDEO_EXTENSIONS)

VideoFile = str | IO[bytes]
"""What the decoders take: a path (UTF-8, see :func:`utf8_path`) or a seekable binary file object
(a tar member's ``io.BytesIO``), which every opening rewinds (:func:`~maskloom.tokenizers.base.rewound`)."""


def _av_open(file: VideoFile) -> Any:
    """``av.open`` of a path or, from its start, of a file object (closing the container leaves the
    file object open)."""
    import av

    return av.open(rewound(file))


class TarVideo(NamedTuple):
    """One usable sample of a tar shard, decoded (an element of :class:`TarVideos`)."""

    key: str
    """The sample's key: its members' path up to the first dot of the base name."""
    video: Video
    """As :meth:`VideoTokenizer.read` decodes the same video as a file (its clip, or clips)."""
    label: int | None
    """The class index in the sample's ``cls`` member, or None."""
    member: str
    """The video member's name in the tar."""


class TarVideos(TarItems):
    """What :meth:`VideoTokenizer.read` returns for a tar shard: the :class:`TarVideo` of each usable
    sample, in archive order (every sample's clips decoded and held: the pipeline streams instead)."""


@register_tokenizer("video")
class VideoTokenizer(Tokenizer):
    """Video -> T sampled frames -> grid of pt x p x p x 3 uint8 tubelets with (t, row, col) positions.

    ``meta``: ``original_size`` [H, W], ``resized_size``, ``crop_offset`` [top, left],
    ``processed_size`` [S, S], ``num_frames`` T, ``frame_indices`` (source index of each frame),
    ``num_source_frames``, ``fps``, ``patch_size``, ``tubelet_size``, ``grid`` [T/pt, S/p, S/p];
    ``clip`` k with ``max_clips`` > 1; ``member`` (the video's name in the tar) for a tar sample.
    raw: a :class:`Video`, or (T, H, W, 3) uint8 frames; for a tar shard, :class:`TarVideos`.
    """

    Config: ClassVar[type] = VideoConfig
    version: ClassVar[str] = "3"
    """2: only the crop is resampled (smoothing filters: values +-1). 3: files decord 0.6 misreads
    (MPEG-1/2, MPEG-4 Part 2, WMV, AV1; AVI and MPEG-TS/PS containers: :func:`_decord_reads_it`)
    are decoded with PyAV, so their tables hold the frames asked for (decord's were others for
    some); other files give the same tokens as in 2."""
    extensions: ClassVar[tuple[str, ...]] = (*VIDEO_EXTENSIONS, *TAR_EXTENSIONS)

    def spec(self) -> TableSpec:
        c = self.config
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=c.tubelet_size * c.patch_size * c.patch_size * 3,
            token_dtype="uint8",
            position_axes=("t", "row", "col"),
            position_kind="grid",
            token_shape=(c.tubelet_size, c.patch_size, c.patch_size, 3),
        )

    def sample_indices(self, n: int) -> np.ndarray:
        """Indices (T,) of the frames kept from an ``n``-frame video."""
        c = self.config
        return sample_indices(n, c.num_frames, c.frame_stride, c.clip_start)

    # ---- read -----------------------------------------------------------------------------------
    def read(self, source: str) -> Video | TarVideos:
        """Decode the sampled frames of a video file with decord (or PyAV: see the module docstring);
        bad files raise TokenizeError. A tar shard: the :class:`TarVideos` of its usable samples."""
        source = os.fspath(source)
        if is_tar_path(source):
            return read_tar(TarVideos, source, _MEMBER_VIDEO_EXTENSIONS, "video", self._decode, TarVideo,
                            max_member_bytes=TAR_MEMBER_MAX_BYTES)  # fmt: skip
        self.check_file(source)
        if os.path.isdir(source):
            raise TokenizeError(source, "unsupported", "is a directory, not a video file")
        return self._decode(source, source, os.path.splitext(source)[1].lower())

    def _decode(self, file: VideoFile, source: str, ext: str) -> Video:
        """Decode the video in ``file`` (a path, or a seekable binary file object such as a tar
        member's ``io.BytesIO``) as :meth:`read` documents; ``source`` names it in errors (a tar
        sample's ``<tar>#<member>``), ``ext`` is the lower-case extension (with its dot) it was named
        with, one of :data:`VIDEO_EXTENSIONS` (else ``unsupported``). Which decoder reads it is
        decided by its header, not its name, so the same bytes give the same frames either way."""
        import decord

        _quiet_ffmpeg(decord)
        if ext not in VIDEO_EXTENSIONS:
            raise TokenizeError(
                source, "unsupported", f"extension {ext or '(none)'!r} is not one of {self.extensions}"
            )
        vr = None
        with path_or_file(file) as path:  # decord and PyAV (FFmpeg) take UTF-8 paths
            if not isinstance(path, str) and not path.seek(0, os.SEEK_END):
                raise TokenizeError(source, "empty", "file is empty (0 bytes)")  # as check_file says
            decord_reads_it, cannot_open = _probe(path)
            if cannot_open is not None and not isinstance(path, str):
                # bytes FFmpeg cannot open (an HTML error page saved as .mp4): decord would fail too
                # and print them, up to their first NUL byte, on stderr (it prints a path's name)
                raise TokenizeError(source, "corrupt", f"cannot open the video (FFmpeg): {cannot_open}")
            if not decord_reads_it:
                return self._read_with_pyav(path, source)
            try:
                try:
                    vr = decord.VideoReader(rewound(path), ctx=decord.cpu(0), num_threads=1)
                except (RuntimeError, decord.DECORDError) as e:
                    empty = _why_empty(path)
                    if empty:
                        raise TokenizeError(source, "empty", empty) from None
                    raise TokenizeError(
                        source, "corrupt", f"decord cannot open the video: {_short(e)}"
                    ) from None
                n = len(vr)
                if n < 1:
                    raise TokenizeError(source, "empty", "the video has no frames")
                try:
                    fps: float | None = float(vr.get_avg_fps())
                except (RuntimeError, decord.DECORDError, ValueError, ZeroDivisionError):
                    fps = None  # no usable timing: frames still decode
                if fps is not None and not (np.isfinite(fps) and fps > 0):
                    fps = None
                c = self.config
                starts = clip_slots(n, c.num_frames, c.frame_stride, c.max_clips) if c.max_clips > 1 else []
                if len(starts) > 1:
                    return self._read_clips(vr, path, source, n, fps, starts)
                idx = self.sample_indices(n)
                frames = _decode_frames(vr, path, idx, source)
            finally:
                del vr  # decord frees the demuxer/decoder when the reader is collected
        return Video(
            frames=np.ascontiguousarray(frames),
            fps=fps,
            frame_indices=idx,
            num_source_frames=int(n),
        )

    def _read_with_pyav(self, path: VideoFile, source: str) -> Video:
        """:meth:`read` for the files decord does not decode reliably (:func:`_decord_reads_it`):
        the frame count from the container (or by counting packets), then the sampled frames
        decoded so that frame ``k`` is the ``k``-th the decoder shows from the start
        (:func:`_pyav_frames`); clips (``max_clips``) are resized and cropped as they are decoded."""
        import av

        c = self.config
        try:
            with _av_open(path) as container:
                stream = container.streams.best("video")
                if stream is None:
                    raise TokenizeError(source, "empty", "no video stream")
                n = int(stream.frames or 0)
                if n <= 0:  # Matroska, MPEG-TS and others do not store it: one packet per frame
                    n = sum(1 for p in container.demux(stream) if p.size)
                rate = stream.average_rate or stream.guessed_rate
                fps = float(rate) if rate else None
        except (av.FFmpegError, OSError, ValueError) as e:
            raise TokenizeError(
                source, "corrupt", f"cannot open the video (FFmpeg): {ffmpeg_reason(e)}"
            ) from None
        if n < 1:
            raise TokenizeError(source, "empty", "the video has no frames")
        if fps is not None and not (np.isfinite(fps) and fps > 0):
            fps = None
        for _ in range(2):  # a second pass when the decoder shows fewer frames than the packets
            starts = clip_slots(n, c.num_frames, c.frame_stride, c.max_clips) if c.max_clips > 1 else []
            step = c.frame_stride * np.arange(c.num_frames, dtype=np.int64)
            idx = np.concatenate([s + step for s in starts]) if len(starts) > 1 else self.sample_indices(n)
            prepare = None
            if len(starts) > 1:

                def prepare(f: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:  # noqa: E306
                    return _resize_shorter_center_crop_view(f, c.image_size, c.interpolation)

            got, shown = _pyav_frames(path, idx, source, prepare)
            if got is not None:
                break
            n = shown
            if n < 1:
                raise TokenizeError(source, "empty", "the video stream has no frames")
        else:  # pragma: no cover - the second pass samples from the frames the decoder showed
            raise TokenizeError(source, "corrupt", "the decoder showed fewer frames on a second pass")
        if len(starts) > 1:
            first = got[int(idx[0])]
            facts = {"original_size": list(first[2]), **first[1]}
            frames = np.stack([np.ascontiguousarray(got[int(i)][0]) for i in idx])
            return Video(frames=frames, fps=fps, frame_indices=idx, num_source_frames=int(n),
                         extra={"clips": len(starts), "prepared": facts})  # fmt: skip
        frames = np.stack([got[int(i)] for i in idx])
        return Video(frames=frames, fps=fps, frame_indices=idx, num_source_frames=int(n))

    def _read_clips(
        self, vr: Any, path: VideoFile, source: str, n: int, fps: float | None, starts: list[int]
    ) -> Video:
        """The clips starting at ``starts`` (``max_clips > 1``), each decoded and at once resized and
        cropped to S x S: a Video of (clips * T, S, S, 3) frames, ``extra`` holding the clip count
        and the source frames' size and resize facts for each clip's meta."""
        c = self.config
        step = c.frame_stride * np.arange(c.num_frames, dtype=np.int64)
        clips, indices = [], []
        for start in starts:
            idx = start + step
            frames = _decode_frames(vr, path, idx, source)
            crops = [_resize_shorter_center_crop_view(f, c.image_size, c.interpolation) for f in frames]
            facts = {"original_size": [int(frames.shape[1]), int(frames.shape[2])], **crops[-1][1]}
            clips.append(np.stack([crop for crop, _ in crops]))
            indices.append(idx)
        return Video(frames=np.concatenate(clips), fps=fps, frame_indices=np.concatenate(indices),
                     num_source_frames=int(n), extra={"clips": len(starts), "prepared": facts})  # fmt: skip

    # ---- tar shards -----------------------------------------------------------------------------
    def iter_records(self, source: str) -> Iterator[Record]:
        """The records of :meth:`__call__`; a tar shard's one sample at a time, as it is read and
        decoded (no other sample's clips are held meanwhile), under the shared tar policy
        (:func:`~maskloom.tokenizers.base.iter_tar_items`: repeated keys, members over
        TAR_MEMBER_MAX_BYTES, samples that do not decode or tokenize skipped with one warning, a
        mostly unusable tar is the error)."""
        source = os.fspath(source)
        if is_tar_path(source):
            return iter_tar_records(source, _MEMBER_VIDEO_EXTENSIONS, "video", self._decode, TarVideo,
                                    functools.partial(self._sample_records, source),
                                    max_member_bytes=TAR_MEMBER_MAX_BYTES, logger=log)  # fmt: skip
        return iter(self(source))

    def _sample_records(self, source: str, s: TarVideo) -> list[Record]:
        return self._records(s.video, source, f"{source}#{s.key}", s.label, s.member)

    # ---- tokenize -------------------------------------------------------------------------------
    def _as_video(self, raw: Any, source: str) -> Video:
        video = raw if isinstance(raw, Video) else Video(frames=raw) if isinstance(raw, np.ndarray) else None
        f = None if video is None else video.frames
        if (
            f is None
            or not isinstance(f, np.ndarray)
            or f.dtype != np.uint8
            or f.ndim != 4
            or f.shape[3] != 3
        ):
            what = f"{type(raw).__name__} {getattr(f, 'dtype', '')} {getattr(f, 'shape', '')}".strip()
            raise TokenizeError(
                source or "<array>", "invalid", f"video raw must be (T, H, W, 3) uint8 frames, got {what}"
            )
        if 0 in f.shape:
            raise TokenizeError(source or "<array>", "empty", f"video frames have shape {f.shape}")
        return video

    def preprocess(self, raw: Video | np.ndarray, *, source: str = "") -> tuple[np.ndarray, dict[str, Any]]:
        """Raw clip -> processed frames (T, S, S, 3) uint8 and the sampling/resize facts for meta."""
        c = self.config
        video = self._as_video(raw, source)
        n = len(video)
        idx = self.sample_indices(n)
        src_idx = idx if video.frame_indices is None else np.asarray(video.frame_indices)[idx]
        crops = []
        facts: dict[str, Any] = {"original_size": [int(video.frames.shape[1]), int(video.frames.shape[2])]}
        prepared = video.extra.get("prepared") if video.frames.shape[1:3] == (c.image_size,) * 2 else None
        for i in idx:  # T frames, not tokens: a short loop (a view per frame, not a copy of the clip)
            if prepared:  # resized and cropped as read decoded them (max_clips): S x S already
                crops.append(video.frames[i])
                continue
            crop, resize = _resize_shorter_center_crop_view(video.frames[i], c.image_size, c.interpolation)
            facts.update(resize)
            crops.append(crop)  # may be a view of the frame: np.stack copies
        meta = {
            **(prepared or facts),
            "processed_size": [c.image_size, c.image_size],
            "num_frames": c.num_frames,
            "frame_indices": [int(i) for i in src_idx],
            "num_source_frames": int(video.num_source_frames if video.num_source_frames is not None else n),
            "fps": video.fps,
        }
        return np.stack(crops), meta

    def tokenize(self, raw: Video | np.ndarray | TarVideos, *, source: str = "") -> list[Record]:
        """Clip -> one record: tokens (L, pt*p*p*3) uint8, positions (L, 3) float32 (t, row, col).
        A Video that :meth:`read` made of several clips (``max_clips``) -> one record per clip,
        ``<source>#k``, meta ``clip`` k. A tar shard's :class:`TarVideos`: those of each sample, ids
        ``<source>#<key>`` (``<source>#<key>#k`` for clip k >= 1), its label and ``meta["member"]``."""
        if isinstance(raw, TarVideos):
            return tokenize_tar(source, raw, functools.partial(self._sample_records, source), logger=log)
        return self._records(raw, source, None)

    def _records(
        self,
        raw: Video | np.ndarray,
        source: str,
        key_id: str | None,
        label: int | None = None,
        member: str | None = None,
    ) -> list[Record]:
        """The records of one video: ids ``<source>#k`` (``key_id`` None, a file), or ``<key_id>`` and
        ``<key_id>#k`` for k >= 1 (a tar sample, with its label and member)."""
        clips = raw.extra.get("clips", 1) if isinstance(raw, Video) else 1
        if clips == 1:
            out = [self._clip_record(raw, source, f"{source}#0" if key_id is None else key_id)]
        else:
            t = self.config.num_frames
            idx = raw.frame_indices
            out = []
            for k in range(clips):
                clip = Video(frames=raw.frames[k * t : (k + 1) * t], fps=raw.fps, extra=raw.extra,
                             num_source_frames=raw.num_source_frames,
                             frame_indices=None if idx is None else idx[k * t : (k + 1) * t])  # fmt: skip
                rid = f"{source}#{k}" if key_id is None else key_id if k == 0 else f"{key_id}#{k}"
                rec = self._clip_record(clip, source, rid)
                rec.meta["clip"] = k
                out.append(rec)
        if key_id is not None:
            for rec in out:
                rec.label = label
                if member is not None:
                    rec.meta["member"] = member
        return out

    def _clip_record(self, raw: Video | np.ndarray, source: str, rid: str) -> Record:
        c = self.config
        frames, meta = self.preprocess(raw, source=source)  # (T, S, S, 3)
        tokens = rearrange(
            frames,
            "(t pt) (h p1) (w p2) c -> (t h w) (pt p1 p2 c)",
            pt=c.tubelet_size,
            p1=c.patch_size,
            p2=c.patch_size,
        )  # (L, pt*p*p*3)
        grid = [c.num_frames // c.tubelet_size, c.image_size // c.patch_size, c.image_size // c.patch_size]
        meta.update(patch_size=c.patch_size, tubelet_size=c.tubelet_size, grid=grid)
        return Record(
            id=rid,
            source=source,
            tokens=np.ascontiguousarray(tokens),
            positions=grid_positions(*grid),
            meta=meta,
        )

    def detokenize(self, record: Record) -> Video:
        """Record -> Video with the processed frames (T, S, S, 3) uint8, tubelets placed by (t, row, col)."""
        m = record.meta
        p = int(m.get("patch_size", self.config.patch_size))
        pt = int(m.get("tubelet_size", self.config.tubelet_size))
        grid = grid_size_of(record, "grid", 3)
        canvas = scatter_patches(record, grid, (pt, p, p, 3))  # (t, h, w, pt, p, p, 3)
        frames = rearrange(canvas, "t h w pt p1 p2 c -> (t pt) (h p1) (w p2) c")
        idx = m.get("frame_indices")
        return Video(
            frames=np.ascontiguousarray(frames),
            fps=m.get("fps"),
            frame_indices=None if idx is None else np.asarray(idx, dtype=np.int64),
            num_source_frames=m.get("num_source_frames"),
        )

    def render(self, raw: Video | np.ndarray | TarVideos, path: str, *, per_row: int = 8) -> None:
        """Save the frames of a clip as one PNG: a grid of up to ``per_row`` frames per row, 2 px gaps;
        of a tar shard's :class:`TarVideos`, its first sample's frames."""
        from PIL import Image

        if isinstance(raw, TarVideos):
            if not raw:
                raise TokenizeError(str(path), "empty", "no samples to render")
            raw = raw[0].video
        frames = self._as_video(raw, str(path)).frames  # (T, H, W, 3)
        t, h, w, _ = frames.shape
        cols = min(per_row, t)
        rows = -(-t // cols)
        gap = 2
        sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
        for k in range(t):  # frames, not tokens
            r, q = divmod(k, cols)
            sheet[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = frames[k]
        Image.fromarray(sheet).save(path, format="PNG")


def _decode_frames(vr: Any, path: VideoFile, idx: np.ndarray, source: str) -> np.ndarray:
    """Frames ``idx`` of the open decord reader ``vr`` (of the file at ``path``, or in that file
    object), (T, H, W, 3) uint8; PyAV's where decord cannot copy them; TokenizeError ``corrupt``
    where neither decodes."""
    import decord

    try:
        frames = _to_numpy(vr.get_batch(idx.tolist()))  # (T, H, W, 3) uint8
    except (RuntimeError, decord.DECORDError, IndexError) as e:
        # decord 0.6 cannot copy frames whose RGB rows the decoder padded (some widths,
        # e.g. 8, 16, 24, 48, 72 px: "DECORDArrayCopyFromTo: The size must exactly match");
        # PyAV decodes those files, so it gets a second try before the file is called corrupt.
        log.info("%s: decord could not decode frames (%s); decoding with PyAV", source, _short(e))
        frames = _decode_with_pyav(path, idx, error=_short(e), source=source)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
        raise TokenizeError(
            source, "corrupt", f"decoder returned frames of shape {frames.shape} {frames.dtype}"
        )
    return frames


def _decode_with_pyav(
    path: VideoFile, indices: np.ndarray, *, error: str, source: str | None = None
) -> np.ndarray:
    """Frames ``indices`` (T,) of the file at ``path`` or in that file object (``source``, named in
    errors: the input it is a link to or the tar member it holds; by default ``path``) decoded in
    presentation order with PyAV: (T, H, W, 3) uint8, where decord (whose ``error`` the message
    carries) could not copy them out.

    Decodes sequentially up to the last wanted frame (:func:`_pyav_frames`; decord seeks instead).
    """
    source = str(path) if source is None else source
    try:
        got, shown = _pyav_frames(path, indices, source)
    except TokenizeError as e:
        raise TokenizeError(source, "corrupt", f"cannot decode frames: {error}; PyAV: {e.reason}") from None
    if got is None:
        missing = sorted({int(i) for i in indices if i >= shown})
        raise TokenizeError(source, "corrupt", f"frames {missing[:5]} could not be decoded ({error})")
    return np.stack([got[int(i)] for i in indices])


DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mjpeg", "ffv1"})
"""Codecs whose frames decord 0.6 returns at the right indices in :data:`DECORD_CONTAINERS`."""
DECORD_CONTAINERS = frozenset({"mp4", "mov", "matroska", "webm", "flv"})
"""Container formats (FFmpeg's names) where decord 0.6 finds frames by index reliably."""


def _decord_reads_it(path: VideoFile) -> bool:
    """Whether decord decodes this file's frames reliably (its video codec in
    :data:`DECORD_CODECS` and container in :data:`DECORD_CONTAINERS`), by a look at the header
    with PyAV (~1 ms). decord 0.6 seeks by timestamps it gets wrong for B-frames without
    presentation times and for several codecs, and then returns *other* frames without an error:
    MPEG-1/2 in every container tried (frame 0 for frames 4, 8 and 12), MPEG-4 Part 2 with
    B-frames in AVI and MP4 (frames 0-2 or 6-13 for 4-12), H.264 in AVI (frame 3 for frame 750),
    WMV (frame 0 for frame 4 of 300), and in MPEG-TS it fails or never returns. Those files are
    decoded sequentially with PyAV instead (:meth:`VideoTokenizer._read_with_pyav`); where decord
    is right, both give the same pixels (the real ``test.avi``, MPEG-4 with B-frames in AVI: equal
    bit for bit). A file PyAV cannot open goes to decord, whose error the row then carries (a tar
    member's bytes do not: :meth:`VideoTokenizer._decode`)."""
    return _probe(path)[0]


def _probe(path: VideoFile) -> tuple[bool, str | None]:
    """(:func:`_decord_reads_it`, FFmpeg's reason when PyAV cannot open the file's header, else None)."""
    try:
        with _av_open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                return True, None  # no video: decord's error, then _why_empty, name it
            formats = set(container.format.name.split(","))
            return stream.codec_context.name in DECORD_CODECS and bool(formats & DECORD_CONTAINERS), None
    except Exception as e:  # noqa: BLE001 - FFmpeg cannot read the header: decord reports the file
        return True, ffmpeg_reason(e) or type(e).__name__


SEEK_GAP = 300
"""Frames before a wanted frame (from the start, or from the previous wanted one) beyond which
:func:`_pyav_frames` seeks instead of decoding them (12 s at 25 fps)."""


def _pyav_frames(
    path: VideoFile, indices: np.ndarray, source: str, prepare: Any = None
) -> tuple[dict[int, Any] | None, int]:
    """Frames ``indices`` of the file at ``path`` (or in that file object), decoded with PyAV (each
    passed through ``prepare`` when given, as it is decoded): ({index: frame}, frames shown), or
    (None, frames shown) when the stream ends before the last index. Frames are upright (the
    container's display rotation) and at the first decoded frame's size.

    Frame ``k`` is the ``k``-th frame the decoder shows. Far into a video (:data:`SEEK_GAP`) the
    frames are found by seeking (:func:`_seek_frames`) when the stream's timestamps are a regular
    grid that says so, or, in AVI, by decoding from a keyframe where the packets and the decoder
    show that gives the same frames (:func:`_keyframe_frames`: MPEG-4 Part 2 and MJPEG); anything
    else is decoded sequentially from the start."""
    import av

    wanted = sorted({int(i) for i in indices})
    grab = _FrameGrab(prepare)
    try:
        if max(np.diff([-1, *wanted])) > SEEK_GAP:
            got = _seek_frames(path, wanted, grab)
            if got is None:
                grab.reset()
                got = _keyframe_frames(path, wanted, grab)
            if got is not None:
                return got, wanted[-1] + 1
        grab.reset()
        return _sequential_frames(path, wanted, grab)
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise TokenizeError(source, "corrupt", f"cannot decode frames (FFmpeg): {ffmpeg_reason(e)}") from None


class _FrameGrab:
    """A decoded frame as :func:`_pyav_frames` keeps it: RGB at the first kept frame's size, upright,
    through ``prepare`` (-> (crop, facts, (H, W))) when given."""

    def __init__(self, prepare: Any) -> None:
        self.prepare = prepare
        self.size: dict[str, int] = {}

    def reset(self) -> None:
        self.size = {}

    def __call__(self, frame: Any) -> Any:
        self.size = self.size or {"width": frame.width, "height": frame.height}
        rgb = frame.to_ndarray(format="rgb24", **self.size)
        turns = round(getattr(frame, "rotation", 0) / 90) % 4
        rgb = np.rot90(rgb, turns) if turns else rgb
        if self.prepare is None:
            return rgb
        crop, facts = self.prepare(rgb)
        return np.array(crop), facts, (int(rgb.shape[0]), int(rgb.shape[1]))


def _sequential_frames(
    path: VideoFile, wanted: list[int], grab: _FrameGrab
) -> tuple[dict[int, Any] | None, int]:
    """:func:`_pyav_frames` by decoding every frame from the start up to the last wanted one."""
    want, last = set(wanted), wanted[-1]
    got: dict[int, Any] = {}
    k = -1
    with _av_open(path) as container:
        stream = container.streams.best("video") or container.streams.video[0]
        stream.thread_count = 1
        for k, frame in enumerate(container.decode(stream)):
            if k in want:
                got[k] = grab(frame)
            if k >= last:
                break
    return (got if len(got) == len(want) else None), k + 1


SEEK_CONTAINERS = frozenset({"mpeg", "mpegts", "matroska", "webm", "mov", "mp4", "flv"})
"""Containers that store presentation timestamps, where :func:`_seek_frames` may seek. AVI and ASF
do not: FFmpeg numbers their frames in decode order, so after a seek into H.264 with B-frames in
AVI every frame was a few frames off, consistently (frame 1480 shown as 1484, measured), which no
check of the timestamps can see (:func:`_keyframe_frames` reads AVI's packets instead)."""


def _seek_frames(path: VideoFile, wanted: list[int], grab: _FrameGrab) -> dict[int, Any] | None:
    """:func:`_pyav_frames` by seeking to each group of wanted frames (those within
    :data:`SEEK_GAP` of each other), or None where that cannot be trusted to give the frames a
    sequential decode shows: a container not in :data:`SEEK_CONTAINERS`; a stream without frame
    rate, start or timestamps; a frame's timestamp off the grid ``start + k / fps``; frames from the
    seek to the last wanted one not numbered ``k, k + 1, ...`` (a gap, a repeat, the reordered
    frames of an open GOP); or the stream ending first. A seek that lands past the first wanted
    frame (MPEG-TS seeks by byte position) is retried from further back."""
    got: dict[int, Any] = {}
    with _av_open(path) as container:
        stream = container.streams.best("video")
        if stream is None or not set(container.format.name.split(",")) & SEEK_CONTAINERS:
            return None
        stream.thread_count = 1
        rate, tb, start = stream.average_rate, stream.time_base, stream.start_time
        if not rate or not tb or start is None:
            return None
        per_frame = 1 / (rate * tb)  # timestamp units per frame (a Fraction)
        groups: list[list[int]] = [[wanted[0]]]
        for k in wanted[1:]:
            if k - groups[-1][-1] > SEEK_GAP:
                groups.append([k])
            else:
                groups[-1].append(k)
        for group in groups:
            first, last, want = group[0], group[-1], set(group)
            for back in (0, 64, 256, 1024, first):  # frames to seek before the first wanted one
                container.seek(int(start + max(first - back, 0) * per_frame), stream=stream,
                               backward=True, any_frame=False)  # fmt: skip
                prev = None
                for frame in container.decode(stream):
                    if frame.pts is None:
                        return None
                    at = (frame.pts - start) / per_frame
                    k = round(at)
                    if abs(at - k) > 0.01:
                        return None
                    if prev is None:
                        if k > first:
                            break  # landed past it: seek from further back
                    elif k != prev + 1:
                        return None
                    prev = k
                    if k in want:
                        got[k] = grab(frame)
                    if k >= last:
                        break
                if prev is not None:
                    break
            if prev is None or prev < last:
                return None
    return got


KEYFRAME_CONTAINERS = frozenset({"avi"})
"""Containers where :func:`_keyframe_frames` may start decoding at a keyframe (those that do not store
presentation timestamps, where :func:`_seek_frames` may not seek)."""
KEYFRAME_CODECS = frozenset({"mpeg4", "mjpeg"})
"""Codecs whose packets :func:`_keyframe_frames` can check: MPEG-4 Part 2 (its VOP headers say which
packets hold a frame and which frames start a group that needs nothing before it) and MJPEG (every
frame stands alone)."""


def _keyframe_frames(path: VideoFile, wanted: list[int], grab: _FrameGrab) -> dict[int, Any] | None:
    """:func:`_pyav_frames` for MPEG-4 Part 2 and MJPEG in AVI (:data:`KEYFRAME_CODECS`,
    :data:`KEYFRAME_CONTAINERS`) by reading every packet but decoding only from the last *clean
    start* before each wanted frame; or None (the caller then decodes sequentially) where that is
    not shown to give the frames a sequential decode shows.

    A clean start is a packet holding one coded I-VOP (MPEG-4) or a JPEG (MJPEG) before which the
    coded VOPs equal the non-empty packets (one frame each: a DivX/Xvid packed P+B pair is
    balanced by its placeholder N-VOP packet), so that the count of those packets is the number
    of the frames before it. MPEG-4 Part 2 reorders only B-VOPs, each shown before the next anchor
    in decoding order, so no frame before the start is shown after it, and the only frames after
    it shown before it are the B-VOPs between it and the next anchor (an open GOP): a fresh decoder
    drops those (it has no frame before the start to predict them from), and the I-VOP is frame
    ``start + dropped``. The fresh decoder (first shown the file's first packet and flushed, so that
    it knows the stream headers and the encoder quirks that packet names) must then output exactly
    one frame per packet fed, ``has_b_frames`` (0 or 1) behind, after every packet: it must drop
    each of those B-VOPs and nothing else, or the file falls back. Packets before the start must
    carry the same stream headers as the first (a new VOL, or new MJPEG tables, would change how
    later frames decode), the file must not begin with a B-VOP (the sequential decoder drops those),
    and an empty packet (PyAV sends it as a flush) or the stream's end before the last wanted
    frame falls back too. What is not decoded is not seen: a damaged packet before the start that
    the sequential decoder would fail on, or show no frame for, is read as one frame (the frame
    count ``n`` counts it so too).

    Measured (PyAV 18): bit-identical to the sequential decode for every one of 1,209 sets of
    wanted frames (clips at the start, centre and end, ``max_clips`` clips, random frames) in
    MPEG-4 with and without B-frames, open and closed GOPs, DivX packed bitstreams, and MJPEG;
    counting the packets before a keyframe as its frame number instead put every open-GOP frame 2
    frames off (FFmpeg's MPEG-4 default), which the check above refuses. Decodes from at most one
    GOP (and ``b_run`` frames) before each clip: ~4x faster on a 720p clip in the middle of 4,000
    frames with 250-frame GOPs."""
    got: dict[int, Any] = {}
    with _av_open(path) as container:
        stream = container.streams.best("video")
        if stream is None or not set(container.format.name.split(",")) & KEYFRAME_CONTAINERS:
            return None
        ctx = stream.codec_context
        if ctx.name not in KEYFRAME_CODECS:
            return None
        stream.thread_count = 1
        scan = _Mpeg4Scan(ctx.extradata) if ctx.name == "mpeg4" else _MjpegScan()
        want, next_wanted = set(wanted), 0
        pending: list[tuple[Any, bool]] = []  # (packet, lone B-VOP) from the last clean start, not fed
        pending_at = 0  # the frame number of that start
        first_packet = None
        active = contiguous = False  # feeding every packet; the decoder has seen all before `pending`
        fed = out = base = delay = dropped = 0
        leading = False  # fed only the start's I-VOP and B-VOPs since (a fresh decoder drops those)
        for packet in container.demux(stream):
            if not packet.size:  # the stream's end (or an empty packet: PyAV sends it as a flush)
                if not active:
                    return None
                for frame in packet.decode():  # the frames the decoder held back
                    k = base + dropped + out
                    out += 1
                    if k in want:
                        got[k] = grab(frame)
                return got if fed - out == dropped and len(got) == len(want) else None
            at = scan.frames
            kind = scan.feed(bytes(packet))
            if kind is None:
                return None
            first_packet = first_packet or packet
            while wanted[next_wanted] in got:
                next_wanted += 1
            need = wanted[next_wanted]
            if kind != "frame" and at + scan.b_run <= need:  # a clean start before the next wanted frame
                contiguous, active = active, False
                pending, pending_at = [(packet, False)], at
                if at < need:
                    continue
            elif not active:
                if not pending:
                    continue  # no clean start yet
                pending.append((packet, kind == "frame" and scan.lone_b))
                if at < need:
                    continue
            else:
                pending = [(packet, scan.lone_b)]
            if not active:  # the packet of the next wanted frame: decode from the pending start
                if contiguous:
                    if base + fed != pending_at:
                        return None  # pragma: no cover - every packet fed is one frame (checked below)
                else:
                    ctx.flush_buffers()
                    if pending_at:
                        first_packet.decode()  # stream headers and encoder quirks, then forgotten
                        ctx.flush_buffers()
                    fed = out = dropped = 0
                    base, leading = pending_at, True
                    delay = -1
                active = True
            for p, lone_b in pending:
                frames = p.decode()
                fed += 1
                if delay < 0:
                    delay = int(ctx.has_b_frames)
                    if delay not in (0, 1):
                        return None
                elif leading and lone_b:
                    if out:
                        return None  # a frame shown before the B-VOPs shown before it: numbered too soon
                    dropped += 1  # shown before the start: the fresh decoder must drop it
                else:
                    leading = False
                for frame in frames:
                    k = base + dropped + out
                    out += 1
                    if k in want:
                        got[k] = grab(frame)
                if fed - out != delay + dropped:
                    return None  # a frame dropped (or one too many): not the sequential numbering
                if len(got) == len(want):
                    return got
            pending = []
    return None


_VOP = b"\x00\x00\x01\xb6"
_GOV = b"\x00\x00\x01\xb3"


class _Mpeg4Scan:
    """The packets of an MPEG-4 Part 2 stream as :func:`_keyframe_frames` checks them, read from their
    VOP headers (ISO/IEC 14496-2 6.2.5): ``feed(packet bytes)`` -> ``"start"`` (a clean start),
    ``"frame"``, or None where the stream is not one the check covers. ``frames``: the non-empty
    packets fed (a frame each)."""

    def __init__(self, extradata: bytes | None) -> None:
        self.time_bits = _vol_time_bits(extradata or b"")
        self.header: bytes | None = None
        """The stream headers (VOL, user data ...) of packets after the first, all equal."""
        self.frames = self.coded = 0
        self.lone_b = False
        """The last packet fed held one B-VOP and nothing else."""
        self.b_run = self._run = 0
        """The most packets of lone B-VOPs in a row so far: a start is taken for a frame at least
        that far after it (an open GOP's first frames are shown before the I-VOP)."""

    def feed(self, data: bytes) -> str | None:
        vop = data.find(_VOP)
        if vop < 0:
            return None
        header = _without_gov(data[:vop])
        if header and self.frames:  # headers after the first packet's (which a fresh decoder sees)
            if self.header is None:
                self.header = header
            elif header != self.header:
                return None  # headers changed again: a fresh decoder could miss a state between
        if header:
            self.time_bits = _vol_time_bits(header) or self.time_bits
        if self.time_bits is None:
            return None
        vops = _vops(data, vop, self.time_bits)
        if vops is None or not (
            (len(vops) == 1 and vops[0][0] in (0, 1, 2, 3))
            or (len(vops) == 2 and vops[0] in ((1, 1), (3, 1)) and vops[1] == (2, 1))
        ):
            return None
        if self.frames == 0 and vops != [(0, 1)]:
            return None  # not an I-VOP first
        if self.frames == 1 and vops[0][0] == 2:
            return None  # B-VOPs before the first P: the sequential decoder drops them
        self.lone_b = vops == [(2, 1)]
        self._run = self._run + 1 if self.lone_b else 0
        self.b_run = max(self.b_run, self._run)
        # a fresh decoder sees the first packet and then the start: the start must repeat the
        # headers packets after the first one carried (all equal), if any did
        start = vops == [(0, 1)] and self.coded == self.frames and header == (self.header or header)
        self.coded += sum(coded for _, coded in vops)
        self.frames += 1
        return "start" if start else "frame"


def _without_gov(header: bytes) -> bytes:
    """Stream headers before a VOP without the group-of-VOP header (a time code that changes)."""
    i = header.find(_GOV)
    if i < 0:
        return header
    j = header.find(b"\x00\x00\x01", i + 4)
    return header[:i] + (header[j:] if j >= 0 else b"")


class _Bits:
    """Big-endian bit reader (raises IndexError past the end)."""

    def __init__(self, data: bytes, at: int) -> None:
        self.data, self.pos = data, 8 * at

    def __call__(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = (v << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v


def _vol_time_bits(data: bytes) -> int | None:
    """Bits of ``vop_time_increment`` set by the first video object layer header in ``data``
    (rectangular shape only), or None."""
    i = 0
    while (i := data.find(b"\x00\x00\x01", i)) >= 0 and i + 3 < len(data) and not 0x20 <= data[i + 3] <= 0x2F:
        i += 3
    if i < 0 or i + 3 >= len(data):
        return None
    b = _Bits(data, i + 4)
    try:
        b(9)  # random_accessible_vol, video_object_type_indication
        if b(1):  # is_object_layer_identifier
            b(7)
        if b(4) == 15:  # aspect_ratio_info: extended PAR
            b(16)
        if b(1) and (b(3), b(1))[1]:  # vol_control_parameters; vbv_parameters
            b(79)
        if b(2) != 0 or not b(1):  # video_object_layer_shape rectangular, marker
            return None
        resolution = b(16)
        if not b(1) or resolution < 1:
            return None
    except IndexError:
        return None
    return max(1, (resolution - 1).bit_length())


def _vops(data: bytes, at: int, time_bits: int) -> list[tuple[int, int]] | None:
    """(vop_coding_type, vop_coded) of each VOP in a packet from ``at``, or None where a header does
    not parse (its marker bits)."""
    out = []
    while at >= 0:
        b = _Bits(data, at + 4)
        try:
            kind = b(2)
            while b(1):  # modulo_time_base
                pass
            if not b(1):
                return None
            b(time_bits)
            if not b(1):
                return None
            out.append((kind, b(1)))
        except IndexError:
            return None
        at = data.find(_VOP, at + 4)
    return out


class _MjpegScan:
    """:class:`_Mpeg4Scan` for MJPEG: each packet a JPEG whose headers up to its scan have the same
    layout as the first one's (the same segments in the same order, defining the same quantisation
    and Huffman tables), so that every table a frame uses is defined by the frame itself or by
    none (the decoder's defaults): nothing decoded before it changes how it decodes. Each is a
    clean start."""

    def __init__(self) -> None:
        self.layout: tuple[Any, ...] | None = None
        self.frames = self.b_run = 0
        self.lone_b = False

    def feed(self, data: bytes) -> str | None:
        layout = _jpeg_layout(data)
        if layout is None:
            return None
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            return None
        self.frames += 1
        return "start"


def _jpeg_layout(data: bytes) -> tuple[Any, ...] | None:
    """The segments of a JPEG before its first scan (SOS): (marker, detail) each, the detail being
    the tables a DQT or DHT defines, a SOF's parameters, else None; None where it does not parse."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out: list[tuple[int, Any]] = []
    at = 2
    try:
        while True:
            while data[at] == 0xFF and data[at + 1] == 0xFF:  # fill bytes
                at += 1
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xDA:
                return tuple(out)
            if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
                return None
            size = int.from_bytes(data[at + 2 : at + 4], "big")
            body = data[at + 4 : at + 2 + size]
            if size < 2 or len(body) != size - 2:
                return None
            detail: Any = None
            if marker == 0xDB:  # DQT: (precision, id) of each table
                ids, k = [], 0
                while k < len(body):
                    ids.append(body[k])
                    k += 1 + (128 if body[k] >> 4 else 64)
                detail = tuple(ids)
            elif marker == 0xC4:  # DHT: (class, id) of each table
                ids, k = [], 0
                while k < len(body):
                    ids.append(body[k])
                    k += 17 + sum(body[k + 1 : k + 17])
                detail = tuple(ids)
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                detail = body
            out.append((marker, detail))
            at += 2 + size
    except IndexError:
        return None


_QUIET = False


def _quiet_ffmpeg(decord: Any) -> None:
    """Silence the FFmpeg inside decord, once per process: a damaged file made it print a line per
    bad packet (``[matroska,webm @ 0x...] Read error``) into the job's output, while the file's
    error row already says what went wrong. Kept at ``-vv`` (this module's log at DEBUG)."""
    global _QUIET
    if not _QUIET:
        _QUIET = True
        if not log.isEnabledFor(logging.DEBUG):
            decord.logging.set_level(decord.logging.QUIET)


def _why_empty(path: VideoFile) -> str | None:
    """For a file (or file object) decord cannot open: why it holds no video, when FFmpeg (PyAV) can
    open it and finds no video stream or a video stream without frames; None otherwise (corrupt)."""
    try:
        with _av_open(path) as container:
            if not container.streams.video:
                # audio or subtitles only: a real file without video; nothing but data streams is
                # what FFmpeg makes of an MP4 cut before its index (corrupt)
                kinds = sorted({s.type for s in container.streams if s.type in ("audio", "subtitle")})
                return f"no video stream ({' and '.join(kinds)} only)" if kinds else None
            stream = container.streams.best("video") or container.streams.video[0]
            stream.thread_count = 1
            for _ in container.decode(stream):
                return None  # it has frames: decord failed for another reason
            return "the video stream has no frames"
    except Exception:  # noqa: BLE001 - FFmpeg cannot read it either: corrupt, as decord said
        return None


def _short(e: BaseException) -> str:
    """First line of a decord error (they carry long C++ stack traces)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    # drop decord's "[hh:mm:ss] /path/file.cc:123: " prefix
    return re.sub(r"\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0])[:300]
