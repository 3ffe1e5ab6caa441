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
A fixed count (rather than "keep whatever the file has") is what lets ``spec()`` state the token
width before any file is read. Extra channels are carried through unnormalised.

Tokens: float32 (num_groups, group_size * (3 + C)), unflattened shape (group_size, 3 + C), each
group sorted nearest first (the centre itself first, at offset 0). Positions: the centres in the
normalised frame. ``meta`` keeps centroid and scale, so ``detokenize`` returns points in the
original coordinates.

Decisions: rows with a non-finite value in a kept channel are dropped (counted in meta); clouds
with more than ``num_points`` points are reduced by FPS (or a seeded random subset); clouds with
fewer are padded by repeating points in order (index ``i % N``); clouds with fewer than
``group_size`` valid points are rejected (``too_small``) rather than padded, since a group would
then be mostly copies.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from maskloom.geometry import farthest_point_sample, knn_group
from maskloom.tokenizers.base import Record, TableSpec, TokenizeError, Tokenizer, register_tokenizer

log = logging.getLogger(__name__)

MESH_EXTENSIONS = (".ply", ".off", ".obj", ".stl")
TEXT_EXTENSIONS = (".xyz", ".txt", ".pts")


@register_tokenizer("point_cloud")
class PointCloudTokenizer(Tokenizer):
    """Point clouds -> num_groups tokens of group_size centred neighbours (Point-MAE)."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        num_points: int = 1024
        """Points kept per cloud after normalisation (more: FPS/random subset; fewer: repeated)."""
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
            for name in ("num_points", "num_groups", "group_size", "sample_points"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.num_groups > self.num_points or self.group_size > self.num_points:
                raise ValueError(
                    f"num_groups ({self.num_groups}) and group_size ({self.group_size}) must not exceed "
                    f"num_points ({self.num_points})"
                )
            if self.extra_channels < 0:
                raise ValueError(f"extra_channels must be >= 0, got {self.extra_channels}")
            if self.bin_columns < 3:
                raise ValueError(f"bin_columns must be >= 3 (x, y, z), got {self.bin_columns}")
            if self.subsample not in ("fps", "random"):
                raise ValueError(f"subsample must be 'fps' or 'random', got {self.subsample!r}")

    version = "1"
    extensions = MESH_EXTENSIONS + (".npy", ".npz") + TEXT_EXTENSIONS + (".bin",)

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
    def read(self, source: str) -> np.ndarray:
        """Decode a point-cloud or mesh file to float32 (N, 3 + C_file)."""
        self.check_file(source)
        if os.path.isdir(source):
            raise TokenizeError(source, "unsupported", "is a directory, expected a point-cloud file")
        ext = os.path.splitext(source)[1].lower()
        if ext in MESH_EXTENSIONS:
            arr = self._read_trimesh(source)
        elif ext == ".npy":
            arr = self._read_npy(source)
        elif ext == ".npz":
            arr = self._read_npz(source)
        elif ext in TEXT_EXTENSIONS:
            arr = self._read_text(source)
        elif ext == ".bin":
            arr = self._read_bin(source)
        else:
            raise TokenizeError(source, "unsupported", f"extension {ext!r} not in {self.extensions}")
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise TokenizeError(source, "invalid", f"expected points of shape (N, >=3), got {arr.shape}")
        if arr.shape[0] == 0:
            raise TokenizeError(source, "empty", "no points")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _read_trimesh(self, source: str) -> np.ndarray:
        import trimesh

        try:
            obj = trimesh.load(source, process=False)
        except Exception as e:  # trimesh raises many kinds on bad files
            raise TokenizeError(
                source, "corrupt", f"trimesh could not load it: {type(e).__name__}: {e}"
            ) from None
        geoms = obj.dump() if isinstance(obj, trimesh.Scene) else [obj]
        parts = []
        for g in geoms:
            faces = getattr(g, "faces", None)
            if isinstance(g, trimesh.Trimesh) and faces is not None and len(faces):
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
                parts.append(v)
        if not parts:
            raise TokenizeError(source, "empty", "file holds no vertices")
        width = min(p.shape[1] for p in parts)
        return np.concatenate([p[:, :width] for p in parts])

    @staticmethod
    def _has_colours(g: Any) -> bool:
        visual = getattr(g, "visual", None)
        kind = getattr(visual, "kind", None)
        if kind is not None:
            return kind == "vertex"
        return getattr(g, "colors", None) is not None and len(g.colors) > 0

    @staticmethod
    def _read_npy(source: str) -> np.ndarray:
        try:
            arr = np.load(source, allow_pickle=False)
        except Exception as e:
            raise TokenizeError(
                source, "corrupt", f"not a readable .npy array: {type(e).__name__}: {e}"
            ) from None
        return PointCloudTokenizer._as_points(source, arr)

    @staticmethod
    def _read_npz(source: str) -> np.ndarray:
        try:
            with np.load(source, allow_pickle=False) as z:
                if not z.files:
                    raise TokenizeError(source, "empty", ".npz archive holds no arrays")
                key = next((k for k in ("points", "xyz") if k in z.files), z.files[0])
                arr = z[key]
        except TokenizeError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
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
        return arr.astype(np.float32)

    @staticmethod
    def _read_text(source: str) -> np.ndarray:
        try:
            with open(source, encoding="utf-8-sig") as f:
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
            return np.asarray(rows, dtype=np.float64).astype(np.float32)
        except ValueError as e:
            raise TokenizeError(source, "corrupt", f"non-numeric value: {e}") from None

    def _read_bin(self, source: str) -> np.ndarray:
        flat = np.fromfile(source, dtype=np.float32)
        cols = self.config.bin_columns
        if flat.size % cols:
            raise TokenizeError(
                source,
                "corrupt",
                f"{flat.size} float32 values is not a multiple of bin_columns={cols} (wrong column count?)",
            )
        return flat.reshape(-1, cols)

    # ---- tokenize -----------------------------------------------------------------------------
    def tokenize(self, raw: np.ndarray, *, source: str = "") -> list[Record]:
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
        pts = pts[finite]
        dropped = n_input - int(pts.shape[0])
        if dropped:
            log.debug("%s: dropped %d points with non-finite values", source, dropped)
        n = pts.shape[0]
        if n == 0:
            raise TokenizeError(
                source,
                "empty" if n_input == 0 else "invalid",
                "no points" if n_input == 0 else "every point has a non-finite value",
            )
        if n < c.group_size:
            raise TokenizeError(
                source, "too_small", f"{n} valid points, fewer than group_size={c.group_size}"
            )

        # pc_normalize: centre on the centroid, scale the farthest point to radius 1.
        centroid = pts[:, :3].mean(axis=0)
        xyz = pts[:, :3] - centroid
        scale = float(np.sqrt((xyz**2).sum(axis=1)).max())
        if not scale > 0:
            scale = 1.0
        pts = np.concatenate([xyz / scale, pts[:, 3:]], axis=1).astype(np.float32)
        cloud = torch.from_numpy(pts)  # (n, 3+C)

        # bring to exactly num_points points
        if n > c.num_points:
            if c.subsample == "fps":
                keep = farthest_point_sample(cloud[None, :, :3], c.num_points, start=0)[0]
            else:
                g = torch.Generator().manual_seed(c.seed)
                keep = torch.randperm(n, generator=g)[: c.num_points].sort().values
            cloud = cloud[keep]
        elif n < c.num_points:
            cloud = cloud[torch.arange(c.num_points) % n]  # pad by repeating points in order

        centre_idx = farthest_point_sample(cloud[None, :, :3], c.num_groups, start=0)  # (1, G)
        centres = cloud[None, :, :3][0, centre_idx[0]][None]  # (1, G, 3)
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
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=tokens,
                positions=centres[0].numpy().astype(np.float32),
                meta=meta,
            )
        ]

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
