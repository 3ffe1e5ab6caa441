"""Point-cloud tokenizer: FPS centres + kNN groups, as Point-MAE.

Point-MAE (Pang et al., "Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022;
Pang-Yatian/Point-MAE): a cloud is normalised to the unit sphere (``pc_normalize``: subtract the
centroid, divide by the largest distance to it), brought to 1024 points, 64 centres are chosen by
farthest point sampling and each centre's 32 nearest neighbours, expressed relative to the centre,
form one token; the token's position is its centre (x, y, z).

Raw form: float32 array (N, 3 + C) — x, y, z and C extra channels exactly as stored in the file
(intensity for KITTI ``.bin``, r, g, b for coloured scans; PLY colours come as 0..255 values).
Inputs:

* ``.ply .off .obj .stl`` through trimesh. A mesh (with faces) is surface-sampled with a seeded
  sampler to ``Config.sample_points`` points (xyz only); a point cloud (PLY without faces) is used
  as is, with r, g, b as extra channels when it carries vertex colours.
* ``.npy`` (one 2-D array) / ``.npz`` (the array named ``points`` or ``xyz``, else the first one).
* ``.xyz .txt .pts``: one point per line, values separated by whitespace or commas, ``#`` comments.
* ``.bin``: KITTI-style raw float32 with ``Config.bin_columns`` values per point (default 4).

Extra channels: ``Config.extra_channels`` (int, default 0 = xyz only as Point-MAE) keeps that many
channels after x, y, z; further channels are dropped and a file with fewer is a ``config`` error.
A PLY point cloud's channels after x, y, z are its colours (red, green, blue), then its intensity
(a vertex property named as in :data:`INTENSITY_NAMES`, as LiDAR scans store it): r, g, b,
intensity for a coloured scan with intensity (``extra_channels=4`` keeps all four, 3 the colours),
intensity alone for an uncoloured one.
A fixed count (rather than "keep whatever the file has") is what lets ``spec()`` state the token
width before any file is read. Extra channels are carried through unnormalised.

Tokens: float32 (num_groups, group_size * (3 + C)), unflattened shape (group_size, 3 + C), each
group sorted nearest first (the centre itself first, at offset 0). Positions: the centres in the
normalised frame. ``meta`` keeps centroid and scale, so ``detokenize`` returns points in the
original coordinates.

Decisions:

* Rows with a non-finite value in a kept channel are dropped (counted in meta). So are rows with a
  value beyond float32's range (possible in float64 ``.npy``/``.npz`` files and text): the raw form
  is float32, where such a value is infinite. A cloud left with no point is ``invalid`` (its reason
  says which of the two it was).
* Clouds with more than ``num_points`` points are reduced by FPS (or a seeded random subset).
* Clouds with fewer are used as they are, not padded: FPS and kNN run on their own points, so each
  group holds ``group_size`` distinct points. (Version 1 padded them to ``num_points`` by
  repeating points, which made every group of a 32-point cloud 32 copies of its centre.)
* Clouds with fewer than ``group_size`` valid points are rejected (``too_small``) rather than
  padded, since a group would then be mostly copies; ``group_size`` is the minimum valid size.
  A ``(3, N)`` array gets a hint that it looks transposed.
* Clouds with at least ``group_size`` but fewer than ``num_groups`` points still give a row of
  ``num_groups`` tokens, keeping that minimum: every point is a centre (in FPS order) and the
  centres then repeat in that order (centre ``i`` is FPS pick ``i % N``), so some tokens are
  duplicates of others. Rejecting them instead would make the minimum size
  ``max(group_size, num_groups)`` and fail clouds the docs promise to accept.
* A cloud whose valid points are all the same (zero extent) is ``invalid``: it has no shape to
  normalise, and every token would be zeros.
* Files that disagree with their own header are ``corrupt``: a PLY with fewer vertices than its
  ``element vertex`` line declares, a binary STL shorter than its triangle count, mesh faces that
  index missing vertices, a ``.bin`` whose size is not a whole number of points.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import torch

from maskloom.geometry import farthest_point_sample, knn_group
from maskloom.tokenizers.base import (
    TAR_EXTENSIONS,
    Record,
    TableSpec,
    TarItems,
    TokenizeError,
    Tokenizer,
    is_tar_path,
    iter_tar_records,
    read_tar,
    register_tokenizer,
    rewound,
    tokenize_tar,
)

log = logging.getLogger(__name__)

MESH_EXTENSIONS = (".ply", ".off", ".obj", ".stl")
INTENSITY_NAMES = ("intensity", "scalar_intensity", "reflectance", "remission")
"""PLY vertex properties taken as a point's intensity (the extra channel of an uncoloured cloud)."""
TEXT_EXTENSIONS = (".xyz", ".txt", ".pts")
F32_MAX = float(np.finfo(np.float32).max)


_MEMBER_FORMATS = (*MESH_EXTENSIONS, ".npy", ".npz", *TEXT_EXTENSIONS, ".bin")
"""Extensions of the files (and tar members) read as clouds, in the order a tar sample's member is picked."""
_TAR_MEMBERS = tuple(e[1:] for e in _MEMBER_FORMATS)


def _file_bytes(file: str | IO[bytes]) -> bytes:
    """All bytes of a path or of a (seekable) binary file object, from its start."""
    if isinstance(file, str):
        with open(file, "rb") as f:
            return f.read()
    return rewound(file).read()


def _ply_vertex(g: Any) -> dict[str, Any]:
    """trimesh's parse of a loaded PLY's vertex element: ``length`` as the header declares it,
    ``data`` the properties by name (a dict, or a record array for binary files); {} otherwise."""
    raw = getattr(g, "metadata", {}).get("_ply_raw")
    vertex = raw.get("vertex") if isinstance(raw, dict) else None
    return vertex if isinstance(vertex, dict) else {}


def _beyond_float32(values: np.ndarray) -> str:
    """The reason for a cloud whose every point has a value beyond float32's range (or non-finite)."""
    finite = np.abs(np.asarray(values, np.float64)[np.isfinite(values)])
    return (
        f"values exceed float32's range (largest |value| {finite.max():.3g}, float32 max {F32_MAX:.3g}): "
        "no point is finite as float32"
    )


class TarCloud(NamedTuple):
    """One usable sample of a tar shard, decoded (an element of :class:`TarClouds`)."""

    key: str
    """The sample's key: its members' path up to the first dot of the base name."""
    points: np.ndarray
    """float32 (N, 3 + C_file), as :meth:`PointCloudTokenizer.read` decodes the same file."""
    label: int | None
    """The class index in the sample's ``cls`` member, or None."""
    member: str
    """The point-cloud member's name in the tar."""


class TarClouds(TarItems):
    """What :meth:`PointCloudTokenizer.read` returns for a tar shard: the :class:`TarCloud` of each
    usable sample, in archive order (every cloud held: the pipeline streams instead)."""


@register_tokenizer("point_cloud")
class PointCloudTokenizer(Tokenizer):
    """Point clouds -> num_groups tokens of group_size centred neighbours (Point-MAE)."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        num_points: int = 1024
        """Points kept per cloud after normalisation (more: FPS/random subset; fewer: kept as they are)."""
        num_groups: int = 64
        """Tokens per cloud: FPS centres."""
        group_size: int = 32
        """Nearest neighbours per centre (points per token); also the minimum valid cloud size."""
        extra_channels: int = 0
        """Channels after x, y, z to keep (e.g. 1 for KITTI intensity, 3 for r, g, b); 0 = xyz only."""
        sample_points: int = 8192
        """Points sampled from a mesh surface (.ply/.off/.obj/.stl with faces)."""
        bin_columns: int = 4
        """float32 values per point in a raw .bin file (KITTI velodyne: x, y, z, intensity)."""
        subsample: Literal["fps", "random"] = "fps"
        """How a cloud with more than num_points points is reduced: farthest point sampling or a
        seeded random subset (much faster on large LiDAR scans)."""
        seed: int = 0
        """Seed of the mesh surface sampler and of the random subset."""

        def __post_init__(self) -> None:
            lowest = {
                "num_points": 1,
                "num_groups": 1,
                "group_size": 1,
                "sample_points": 1,
                "extra_channels": 0,
                "bin_columns": 3,
                "seed": 0,
            }
            for name, lo in lowest.items():
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ValueError(f"{name} must be an integer, got {v!r}")
                if v < lo:
                    what = " (x, y, z)" if name == "bin_columns" else ""
                    raise ValueError(f"{name} must be >= {lo}{what}, got {v}")
            if self.num_groups > self.num_points or self.group_size > self.num_points:
                raise ValueError(
                    f"num_groups ({self.num_groups}) and group_size ({self.group_size}) must not exceed "
                    f"num_points ({self.num_points})"
                )
            if self.subsample not in ("fps", "random"):
                raise ValueError(f"subsample must be 'fps' or 'random', got {self.subsample!r}")

    version = "2"
    """2: clouds with fewer than num_points points are no longer padded by repetition before FPS
    and kNN (their tokens changed; clouds of >= num_points points give the same tokens as in 1)."""
    extensions = MESH_EXTENSIONS + (".npy", ".npz") + TEXT_EXTENSIONS + (".bin",) + TAR_EXTENSIONS

    @property
    def channels(self) -> int:
        """Values per point in tokens and detokenized clouds: 3 + extra_channels."""
        return 3 + self.config.extra_channels

    def spec(self) -> TableSpec:
        c = self.config
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=c.group_size * self.channels,
            token_dtype="float32",
            position_axes=("x", "y", "z"),
            position_kind="continuous",
            token_shape=(c.group_size, self.channels),
        )

    # ---- read ---------------------------------------------------------------------------------
    def read(self, source: str) -> np.ndarray | TarClouds:
        """Decode a point-cloud or mesh file to float32 (N, 3 + C_file); a tar shard to the
        :class:`TarClouds` of its usable samples."""
        source = os.fspath(source)
        if is_tar_path(source):
            return read_tar(TarClouds, source, _TAR_MEMBERS, "point-cloud", self._decode, TarCloud)
        self.check_file(source)
        if os.path.isdir(source):
            raise TokenizeError(source, "unsupported", "is a directory, expected a point-cloud file")
        ext = os.path.splitext(source)[1].lower()
        if ext not in _MEMBER_FORMATS:
            raise TokenizeError(source, "unsupported", f"extension {ext!r} not in {self.extensions}")
        return self._decode(source, source, ext)

    def _decode(self, file: str | IO[bytes], source: str, ext: str) -> np.ndarray:
        """Decode the cloud in ``file`` (a path, or a seekable binary file object) as :meth:`read`
        documents; ``source`` names it in errors, ``ext`` is the lower-case extension (with its dot)
        it was named with, which picks the reader."""
        if ext in MESH_EXTENSIONS:
            arr = self._read_trimesh(file, source, ext)
        elif ext == ".npy":
            arr = self._read_npy(file, source)
        elif ext == ".npz":
            arr = self._read_npz(file, source)
        elif ext in TEXT_EXTENSIONS:
            arr = self._read_text(file, source)
        else:
            arr = self._read_bin(file, source)
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise TokenizeError(source, "invalid", f"expected points of shape (N, >=3), got {arr.shape}")
        if arr.shape[0] == 0:
            raise TokenizeError(source, "empty", "no points")
        return self._to_float32(source, arr)

    def _to_float32(self, source: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` as float32; a value beyond float32's range becomes inf (dropped by tokenize)
        without a RuntimeWarning, and a file where that leaves no point is ``invalid``."""
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
            kept = slice(0, self.channels)
            over = np.isfinite(arr[:, kept]) & ~np.isfinite(out[:, kept])
            if over.any():
                if not np.isfinite(out[:, kept]).all(axis=1).any():
                    raise TokenizeError(source, "invalid", _beyond_float32(arr[:, kept]))
                log.debug("%s: %d points have values beyond float32's range", source, over.any(1).sum())
        return out

    def _read_trimesh(self, file: str | IO[bytes], source: str, ext: str) -> np.ndarray:
        import trimesh

        try:
            if isinstance(file, str):
                obj = trimesh.load(file, process=False)
            else:  # from memory: the format from the member's name
                obj = trimesh.load(file, file_type=ext[1:], process=False)
        except Exception as e:  # trimesh raises many kinds on bad files
            raise TokenizeError(
                source, "corrupt", f"trimesh could not load it: {type(e).__name__}: {e}"
            ) from None
        geoms = obj.dump() if isinstance(obj, trimesh.Scene) else [obj]
        if ext == ".ply":
            counts = [_ply_vertex(g).get("length") for g in geoms]  # as the header declares them
            declared = None if None in counts else sum(counts)
            loaded = sum(len(getattr(g, "vertices", ())) for g in geoms)
            if declared is not None and loaded != declared:
                raise TokenizeError(
                    source,
                    "corrupt",
                    f"header declares {declared} vertices, the file holds {loaded} (truncated?)",
                )
        parts = []
        for g in geoms:
            faces = getattr(g, "faces", None)
            if isinstance(g, trimesh.Trimesh) and faces is not None and len(faces):
                f, nv = np.asarray(faces), len(g.vertices)
                if f.min() < 0 or f.max() >= nv:
                    bad = int(f.min()) if f.min() < 0 else int(f.max())
                    raise TokenizeError(
                        source, "corrupt", f"face indices out of range: {bad} is not in [0, {nv})"
                    )
                if g.area <= 0 or not np.isfinite(g.area):
                    raise TokenizeError(source, "invalid", "mesh has zero or non-finite surface area")
                pts, _ = trimesh.sample.sample_surface(g, self.config.sample_points, seed=self.config.seed)
                parts.append(np.asarray(pts, np.float64))
            elif hasattr(g, "vertices") and len(g.vertices):
                v = np.asarray(g.vertices, np.float64)
                colors = getattr(g, "colors", None)
                if colors is None:  # Trimesh without faces keeps colours on its visual
                    colors = getattr(getattr(g, "visual", None), "vertex_colors", None)
                if colors is not None and len(colors) == len(v) and self._has_colours(g):
                    v = np.concatenate([v, np.asarray(colors, np.float64)[:, :3]], axis=1)
                # a LiDAR PLY's intensity: the extra channel after x, y, z, or after r, g, b (a
                # coloured scan that also stores it, as terrestrial scanners' exports do)
                raw = _ply_vertex(g).get("data", {})
                names = (raw.dtype.names or ()) if hasattr(raw, "dtype") else raw  # binary: a record array
                key = next((k for k in INTENSITY_NAMES if k in names), None)
                if key is not None and len(raw[key]) == len(v):
                    v = np.concatenate([v, np.asarray(raw[key], np.float64).reshape(-1, 1)], axis=1)
                parts.append(v)
        if not parts:
            if ext == ".stl":
                self._check_empty_stl(file, source)
            raise TokenizeError(source, "empty", "file holds no vertices")
        width = min(p.shape[1] for p in parts)
        return np.concatenate([p[:, :width] for p in parts])

    @staticmethod
    def _check_empty_stl(file: str | IO[bytes], source: str) -> None:
        """Raise ``corrupt`` unless an STL trimesh read no triangles from is a valid empty STL:
        a binary one whose header count (0) matches its size, or an ASCII ``solid ... endsolid``.
        (trimesh reads a binary STL whose size disagrees with its header as ASCII, finding nothing.)"""
        data = _file_bytes(file)
        size = len(data)
        count = int.from_bytes(data[80:84], "little") if size >= 84 else None
        if count is not None and 84 + 50 * count == size:
            return
        if b"endsolid" in data.lower():
            return
        if count is None:
            reason = f"{size} bytes: not an ASCII STL and shorter than a binary STL header (84 bytes)"
        else:
            reason = (
                f"not an ASCII STL, and as a binary STL its header declares {count} triangles "
                f"({84 + 50 * count} bytes) but the file has {size} bytes (truncated?)"
            )
        raise TokenizeError(source, "corrupt", reason)

    @staticmethod
    def _has_colours(g: Any) -> bool:
        visual = getattr(g, "visual", None)
        kind = getattr(visual, "kind", None)
        if kind is not None:
            return kind == "vertex"
        return getattr(g, "colors", None) is not None and len(g.colors) > 0

    @staticmethod
    def _read_npy(file: str | IO[bytes], source: str) -> np.ndarray:
        try:
            arr = np.load(rewound(file), allow_pickle=False)
        except Exception as e:
            raise TokenizeError(
                source, "corrupt", f"not a readable .npy array: {type(e).__name__}: {e}"
            ) from None
        return PointCloudTokenizer._as_points(source, arr)

    @staticmethod
    def _read_npz(file: str | IO[bytes], source: str) -> np.ndarray:
        try:
            # our own handle: np.load leaks its file when the zip directory is unreadable
            with open(file, "rb") if isinstance(file, str) else contextlib.nullcontext(rewound(file)) as f:
                loaded = np.load(f, allow_pickle=False)
                if isinstance(loaded, np.ndarray):  # a plain .npy under a .npz name
                    arr = loaded
                else:
                    with loaded as z:
                        if not z.files:
                            raise TokenizeError(source, "empty", ".npz archive holds no arrays")
                        key = next((k for k in ("points", "xyz") if k in z.files), z.files[0])
                        arr = z[key]
                    if not isinstance(arr, np.ndarray):  # NpzFile returns a non-.npy member's bytes
                        raise TokenizeError(source, "corrupt", f"member {key!r} is not a .npy array")
        except TokenizeError:
            raise
        except Exception as e:  # zipfile, zlib and numpy's header parser raise many kinds
            raise TokenizeError(
                source, "corrupt", f"not a readable .npz archive: {type(e).__name__}: {e}"
            ) from None
        return PointCloudTokenizer._as_points(source, arr)

    @staticmethod
    def _as_points(source: str, arr: np.ndarray) -> np.ndarray:
        if arr.dtype.kind not in "fiu":
            raise TokenizeError(source, "invalid", f"expected a numeric array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise TokenizeError(source, "invalid", f"expected a 2-D (N, 3+C) array, got shape {arr.shape}")
        return arr  # read() casts to float32

    @staticmethod
    def _read_text(file: str | IO[bytes], source: str) -> np.ndarray:
        try:
            f = (
                open(file, encoding="utf-8-sig")  # noqa: SIM115 - closed by the with below
                if isinstance(file, str)
                else io.TextIOWrapper(io.BytesIO(_file_bytes(file)), encoding="utf-8-sig")
            )
            with f:
                lines = [ln.split("#", 1)[0].replace(",", " ").split() for ln in f]
        except UnicodeDecodeError as e:
            raise TokenizeError(
                source, "corrupt", f"not a text file ({e.reason} at byte {e.start})"
            ) from None
        rows = [r for r in lines if r]
        if not rows:
            raise TokenizeError(source, "empty", "no points (only blank lines or comments)")
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise TokenizeError(
                source, "corrupt", f"lines have different numbers of values: {sorted(widths)}"
            )
        try:
            return np.asarray(rows, dtype=np.float64)  # read() casts to float32
        except ValueError as e:
            raise TokenizeError(source, "corrupt", f"non-numeric value: {e}") from None

    def _read_bin(self, file: str | IO[bytes], source: str) -> np.ndarray:
        cols = self.config.bin_columns
        data = None if isinstance(file, str) else _file_bytes(file)
        size = os.path.getsize(file) if data is None else len(data)
        if size % (4 * cols):
            raise TokenizeError(
                source,
                "corrupt",
                f"{size} bytes is not a whole number of points of bin_columns={cols} float32 values "
                f"({4 * cols} bytes each; wrong column count or truncated?)",
            )
        pts = (
            np.fromfile(file, dtype=np.float32) if data is None else np.frombuffer(data, np.float32).copy()
        ).reshape(-1, cols)
        xyz = np.abs(pts[:, :3])
        if xyz.size and (xyz[np.isfinite(xyz)] < np.finfo(np.float32).tiny).all():
            # raw bytes have no dtype: integers (a label or mask file such as semantic_mask.bin, or
            # SemanticKITTI's .label) read as float32 are subnormals and zeros, never a scan
            raise TokenizeError(
                source, "invalid", "every coordinate is zero or a float32 subnormal (< 1.2e-38): the "
                "file holds no float32 points (integers such as labels or a mask?)"
            )  # fmt: skip
        return pts

    # ---- tar shards ---------------------------------------------------------------------------
    def iter_records(self, source: str) -> Iterator[Record]:
        """The records of :meth:`__call__`; a tar shard's one sample at a time, as it is read (a sample
        that does not decode or tokenize, e.g. too few points, is skipped: base.iter_tar_items)."""
        source = os.fspath(source)
        if is_tar_path(source):
            return iter_tar_records(source, _TAR_MEMBERS, "point-cloud", self._decode, TarCloud,
                                    functools.partial(self._sample_records, source), logger=log)  # fmt: skip
        return iter(self(source))

    def _sample_records(self, source: str, s: TarCloud) -> list[Record]:
        return [self._record(s.points, source, f"{source}#{s.key}", s.label, s.member)]

    # ---- tokenize -----------------------------------------------------------------------------
    def tokenize(self, raw: np.ndarray | TarClouds, *, source: str = "") -> list[Record]:
        """(N, 3 + C) points -> one record, id ``<source>#0``. A tar shard's :class:`TarClouds` -> one
        record per sample, id ``<source>#<key>``, its ``cls`` label, ``meta["member"]``."""
        if isinstance(raw, TarClouds):
            return tokenize_tar(source, raw, functools.partial(self._sample_records, source), logger=log)
        return [self._record(raw, source, f"{source}#0")]

    def _record(
        self, raw: np.ndarray, source: str, rid: str, label: int | None = None, member: str | None = None
    ) -> Record:
        c = self.config
        arr = np.asarray(raw)
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise TokenizeError(source, "invalid", f"expected points of shape (N, >=3), got {arr.shape}")
        if arr.shape[1] < self.channels:
            raise TokenizeError(
                source,
                "config",
                f"extra_channels={c.extra_channels} needs {self.channels} values per point, the input has {arr.shape[1]}",
            )
        n_input = int(arr.shape[0])
        pts = arr[:, : self.channels].astype(np.float64)  # a copy: the caller's array is untouched
        finite = np.isfinite(pts).all(axis=1)
        if arr.dtype != np.float32:  # a float64 raw given directly: float32's range, as read()
            finite &= (np.abs(np.where(np.isfinite(pts), pts, 0)) <= F32_MAX).all(axis=1)
        pts = pts[finite]
        dropped = n_input - int(pts.shape[0])
        if dropped:
            log.debug("%s: dropped %d points with non-finite values", source, dropped)
        n = pts.shape[0]
        if n_input == 0:
            raise TokenizeError(source, "empty", "no points")
        if n == 0:
            kept = arr[:, : self.channels]
            beyond = arr.dtype != np.float32 and bool(np.isfinite(kept).all(axis=1).any())
            reason = _beyond_float32(kept) if beyond else "every point has a non-finite value"
            raise TokenizeError(source, "invalid", reason)
        if n < c.group_size:
            reason = f"{n} valid points, fewer than group_size={c.group_size}"
            if 3 <= arr.shape[0] < arr.shape[1] and arr.shape[1] >= c.group_size:
                reason += f"; shape {tuple(arr.shape)} looks transposed (points must be rows: (N, 3+))"
            raise TokenizeError(source, "too_small", reason)
        if not (pts[:, :3].max(axis=0) > pts[:, :3].min(axis=0)).any():
            raise TokenizeError(source, "invalid", "all points are the same (zero extent)")

        # pc_normalize: centre on the centroid, scale the farthest point to radius 1.
        centroid = pts[:, :3].mean(axis=0)
        xyz = pts[:, :3] - centroid
        scale = float(np.sqrt((xyz**2).sum(axis=1)).max())
        if not scale > 0:  # distinct points whose squared offsets underflow (a float64 raw)
            scale = 1.0
        pts = np.concatenate([xyz / scale, pts[:, 3:]], axis=1).astype(np.float32)
        cloud = torch.from_numpy(pts)  # (n, 3+C)

        # bring to at most num_points points
        if n > c.num_points:
            if c.subsample == "fps":
                keep = farthest_point_sample(cloud[None, :, :3], c.num_points, start=0)[0]
            else:
                g = torch.Generator().manual_seed(c.seed)
                keep = torch.randperm(n, generator=g)[: c.num_points].sort().values
            cloud = cloud[keep]
        # fewer than num_points: not padded, so each group holds group_size distinct points

        g = min(c.num_groups, int(cloud.shape[0]))
        centre_idx = farthest_point_sample(cloud[None, :, :3], g, start=0)[0]  # (g,)
        if g < c.num_groups:  # fewer points than centres: every point, then repeated in FPS order
            centre_idx = centre_idx[torch.arange(c.num_groups) % g]
        centres = cloud[:, :3][centre_idx][None]  # (1, G, 3)
        groups, _ = knn_group(cloud[None], centres, c.group_size)  # (1, G, K, 3+C), xyz relative
        tokens = groups[0].reshape(c.num_groups, c.group_size * self.channels).numpy().astype(np.float32)
        meta = {
            "centroid": [float(v) for v in centroid],
            "scale": scale,
            "num_input_points": n_input,
            "num_valid_points": n,
            "dropped_nonfinite": dropped,
            "channels": self.channels,
        }
        if member is not None:
            meta["member"] = member
        return Record(
            id=rid,
            source=source,
            tokens=tokens,
            positions=centres[0].numpy().astype(np.float32),
            label=label,
            meta=meta,
        )

    def detokenize(self, record: Record) -> np.ndarray:
        """All group points in the original frame: float32 (num_groups * group_size, 3 + C).

        Each centre is a point of its own group, so the centres are included; points shared by
        several groups appear several times.
        """
        ch = int(record.meta.get("channels", self.channels))
        tok = np.asarray(record.tokens, np.float64)
        g = tok.shape[0]
        groups = tok.reshape(g, -1, ch)  # (G, K, 3+C)
        centres = np.asarray(record.positions, np.float64)  # (G, 3)
        xyz = (groups[..., :3] + centres[:, None, :]) * float(record.meta["scale"]) + np.asarray(
            record.meta["centroid"]
        )
        out = np.concatenate([xyz, groups[..., 3:]], axis=-1)
        return out.reshape(-1, ch).astype(np.float32)

    # ---- render -------------------------------------------------------------------------------
    def render(self, raw: np.ndarray, path: str) -> None:
        """3-D scatter of a raw cloud (coloured by height) to a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        pts = np.asarray(raw, np.float32)
        pts = pts[np.isfinite(pts[:, :3]).all(axis=1)]
        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(projection="3d")
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=pts[:, 2], s=2, cmap="viridis", depthshade=False)
            lo, hi = pts[:, :3].min(axis=0), pts[:, :3].max(axis=0)
            mid, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
            ax.set_xlim(mid[0] - half, mid[0] + half)
            ax.set_ylim(mid[1] - half, mid[1] + half)
            ax.set_zlim(mid[2] - half, mid[2] + half)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_zlabel("z")
        ax.set_title(f"{len(pts)} points")
        fig.savefig(path)
