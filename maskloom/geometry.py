"""Batched point-cloud geometry: farthest point sampling, k nearest neighbours, grouping, Chamfer L2.

These are the three operations Point-MAE (Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", ECCV 2022) builds on: FPS picks group centres, kNN gathers a patch of
neighbours around each centre, and the reconstruction loss is the squared-L2 Chamfer distance
(``ChamferDistanceL2`` in the reference code: mean of the squared distance to the nearest
neighbour in each direction, the two means summed).

Everything is vectorised torch on whatever device the inputs live on (no Python loop over
batch elements or points; FPS loops over the k picks only). FPS of 3-D float32 points on the CPU
runs a compiled loop instead (numba, :mod:`maskloom._kernels`), with the same picks: preprocessing
samples 1,024 of a LiDAR scan's 120,000 points in 0.2 s instead of 2.0 s. When ``pytorch3d`` is importable its
compiled kernels are used by default (``use_pytorch3d=None``); ``use_pytorch3d=False`` forces the
pure-torch path, ``True`` requires pytorch3d. Both paths return the same values.

Padding: an optional ``lengths`` (B,) tensor says how many leading points of each cloud are real;
the rest are ignored.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch

__all__ = [
    "HAS_PYTORCH3D",
    "chamfer_distance",
    "farthest_point_sample",
    "knn",
    "knn_group",
    "pairwise_sq_dist",
]

HAS_PYTORCH3D = importlib.util.find_spec("pytorch3d") is not None
"""True when pytorch3d is installed (its ops are then the default)."""

# Upper bound on the number of float elements of one (chunk, N, 3) difference tensor in pairwise
# distances: keeps memory ~ 64 MB whatever the cloud size.
_CHUNK_ELEMS = 1 << 24


def _want_pytorch3d(use_pytorch3d: bool | None) -> bool:
    if use_pytorch3d is None:
        return HAS_PYTORCH3D
    if use_pytorch3d and not HAS_PYTORCH3D:
        raise ImportError(
            "use_pytorch3d=True but pytorch3d is not installed (pip install maskloom[pytorch3d])"
        )
    return bool(use_pytorch3d)


def _check_cloud(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, C), got {tuple(x.shape)}")


def _valid_mask(
    lengths: torch.Tensor | None, batch: int, n: int, device: torch.device
) -> torch.Tensor | None:
    """(B, N) bool, True for real points; None when every point is real."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    return torch.arange(n, device=device)[None, :] < lengths[:, None]


def pairwise_sq_dist(query: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distances (B, M, N) between query (B, M, C) and points (B, N, C).

    Computed from coordinate differences (not ||a||² + ||b||² - 2ab, which is not exactly 0 for
    coincident points in float32), in chunks of queries so memory stays bounded.
    """
    _check_cloud("query", query)
    _check_cloud("points", points)
    b, m, c = query.shape
    n = points.shape[1]
    chunk = max(1, _CHUNK_ELEMS // max(1, n * c * b))
    out = []
    for s in range(0, m, chunk):
        diff = query[:, s : s + chunk, None, :] - points[:, None, :, :]  # (B, m', N, C)
        out.append(diff.square().sum(-1))
    if not out:
        return query.new_zeros((b, 0, n))
    return torch.cat(out, dim=1)


def farthest_point_sample(
    points: torch.Tensor,
    k: int,
    *,
    start: int | None = 0,
    lengths: torch.Tensor | None = None,
    use_pytorch3d: bool | None = None,
) -> torch.Tensor:
    """Farthest point sampling: indices (B, k) long of k points of each cloud in points (B, N, C).

    Greedy: the first pick is point ``start`` (``None``: a random point per cloud, from torch's
    global RNG), then each next pick is the point farthest (squared L2 over the C coordinates) from
    all picked so far; ties go to the lowest index. Deterministic for an int ``start``.
    With ``lengths`` (B,), only the first lengths[b] points of cloud b are candidates, and picks
    beyond lengths[b] are -1 (as pytorch3d's ``sample_farthest_points``).
    """
    _check_cloud("points", points)
    b, n, _ = points.shape
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if lengths is None and k > n:
        raise ValueError(f"cannot sample {k} points from clouds of {n} points")
    if start is not None and not 0 <= start < max(n, 1):
        raise ValueError(f"start must lie in [0, {n}), got {start}")
    if _want_pytorch3d(use_pytorch3d) and start in (0, None):
        from pytorch3d.ops import sample_farthest_points

        lens = None if lengths is None else torch.as_tensor(lengths, device=points.device)
        _, idx = sample_farthest_points(points, lengths=lens, K=k, random_start_point=start is None)
        return idx.long()
    device = points.device
    valid = _valid_mask(lengths, b, n, device)
    if start is None:
        hi = (
            torch.full((b,), n, device=device) if lengths is None else torch.as_tensor(lengths, device=device)
        )
        far = (torch.rand(b, device=device) * hi.clamp(min=1)).long()
    else:
        far = torch.full((b,), start, dtype=torch.long, device=device)
    compiled = _compiled_fps(points, k, far, lengths)
    if compiled is not None:
        return compiled
    # dist[b, j]: squared distance of point j to its nearest pick; padding is -1 so it is never picked.
    dist = torch.full((b, n), float("inf"), dtype=points.dtype, device=device)
    if valid is not None:
        dist = dist.masked_fill(~valid, -1.0)
    idx = torch.empty((b, k), dtype=torch.long, device=device)
    batch = torch.arange(b, device=device)
    for i in range(k):
        idx[:, i] = far
        picked = points[batch, far][:, None, :]  # (B, 1, C)
        d = (points - picked).square().sum(-1)  # (B, N)
        dist = torch.minimum(dist, d)
        far = dist.argmax(dim=-1)
    if lengths is not None:
        lens = torch.as_tensor(lengths, device=device)
        idx = idx.masked_fill(torch.arange(k, device=device)[None, :] >= lens[:, None], -1)
    return idx


def _compiled_fps(
    points: torch.Tensor, k: int, starts: torch.Tensor, lengths: torch.Tensor | None
) -> torch.Tensor | None:
    """The same picks from the compiled loop (:func:`maskloom._kernels.farthest_point_sample`, 6-10x
    faster) for finite float32 3-D points on the CPU outside autograd, where numba runs; else None."""
    if (
        points.device.type != "cpu"
        or points.dtype != torch.float32
        or points.shape[2] != 3
        or points.requires_grad
    ):
        return None
    from maskloom import _kernels  # numba: only where the CPU path runs

    if not _kernels.ENABLED:
        return None
    xyz = points.numpy()
    if not np.isfinite(xyz).all():  # NaN orders differently in torch's minimum and argmax
        return None
    b, n, _ = points.shape
    lens = np.full(b, n, np.int64) if lengths is None else np.minimum(torch.as_tensor(lengths).numpy(), n)
    out = _kernels.farthest_point_sample(
        np.ascontiguousarray(xyz.transpose(0, 2, 1)),
        k,
        starts.numpy().astype(np.int64),
        lens.astype(np.int64),
    )
    return torch.from_numpy(out)


def knn(
    query: torch.Tensor,
    points: torch.Tensor,
    k: int,
    *,
    query_lengths: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    use_pytorch3d: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest points of each query: (dist (B, M, k) squared L2, idx (B, M, k) long), nearest first.

    query (B, M, C), points (B, N, C). With ``lengths`` (B,), only the first lengths[b] points are
    candidates; neighbours beyond lengths[b] get idx -1 and dist inf. ``query_lengths`` only
    matters for pytorch3d (padded queries' rows are then zero); the torch path computes every row.
    Equal distances among the k come in index order; when the k-th distance is tied with points
    left out, which of them is kept is up to ``torch.topk`` (deterministic on a given device).
    """
    _check_cloud("query", query)
    _check_cloud("points", points)
    b, m, _ = query.shape
    n = points.shape[1]
    if query.shape[0] != points.shape[0] or query.shape[2] != points.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} and points {tuple(points.shape)} disagree on B or C")
    if lengths is None and k > n:
        raise ValueError(f"cannot find {k} neighbours among {n} points")
    if _want_pytorch3d(use_pytorch3d):
        from pytorch3d.ops import knn_points

        out = knn_points(query, points, lengths1=query_lengths, lengths2=lengths, K=k, return_sorted=True)
        dist, idx = out.dists, out.idx.long()
        if lengths is not None:
            bad = (
                torch.arange(k, device=query.device)[None, None, :]
                >= torch.as_tensor(lengths, device=query.device)[:, None, None]
            )
            dist, idx = dist.masked_fill(bad, float("inf")), idx.masked_fill(bad, -1)
        return dist, idx
    d = pairwise_sq_dist(query, points)  # (B, M, N)
    valid = _valid_mask(lengths, b, n, query.device)
    if valid is not None:
        d = d.masked_fill(~valid[:, None, :], float("inf"))
    kk = min(k, n)
    # topk (much cheaper than a full sort of N), then order the k picks by (distance, index) so
    # equal distances come in index order (topk's own tie order is unspecified)
    dist, idx = torch.topk(d, kk, dim=-1, largest=False, sorted=False)
    by_idx = idx.argsort(dim=-1)
    dist, idx = dist.gather(-1, by_idx), idx.gather(-1, by_idx)
    by_dist = dist.argsort(dim=-1, stable=True)
    dist, idx = dist.gather(-1, by_dist), idx.gather(-1, by_dist)
    if kk < k:  # only possible with lengths: pad to k
        pad = k - kk
        dist = torch.cat([dist, dist.new_full((b, m, pad), float("inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_full((b, m, pad), -1)], dim=-1)
    idx = idx.masked_fill(torch.isinf(dist), -1)
    return dist, idx


def knn_group(
    points: torch.Tensor,
    centers: torch.Tensor,
    k: int,
    *,
    lengths: torch.Tensor | None = None,
    relative: bool = True,
    use_pytorch3d: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-MAE grouping: the k nearest points of each centre, as (groups (B, G, k, C), idx (B, G, k)).

    points (B, N, C) with xyz in the first 3 channels (further channels, e.g. intensity or colour,
    are carried along unchanged); centers (B, G, 3). Neighbours are found on xyz only. With
    ``relative`` the xyz of each group is expressed relative to its centre. Each group is sorted
    nearest first, so a centre that is itself a point of the cloud comes first (at offset 0).
    """
    _check_cloud("points", points)
    _check_cloud("centers", centers)
    if points.shape[2] < 3 or centers.shape[2] != 3:
        raise ValueError(
            f"points need >= 3 channels and centers exactly 3, got {points.shape[2]} and {centers.shape[2]}"
        )
    _, idx = knn(centers, points[..., :3].contiguous(), k, lengths=lengths, use_pytorch3d=use_pytorch3d)
    b, g, _ = idx.shape
    c = points.shape[2]
    flat = idx.clamp(min=0).reshape(b, g * k, 1).expand(-1, -1, c)  # (B, G*k, C)
    groups = torch.gather(points, 1, flat).reshape(b, g, k, c)  # (B, G, k, C)
    if relative:
        xyz = groups[..., :3] - centers[:, :, None, :]
        groups = torch.cat([xyz, groups[..., 3:]], dim=-1)
    return groups, idx


def chamfer_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_lengths: torch.Tensor | None = None,
    y_lengths: torch.Tensor | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
    use_pytorch3d: bool | None = None,
) -> torch.Tensor:
    """Squared-L2 Chamfer distance between clouds x (B, N, C) and y (B, M, C), as Point-MAE's
    ``ChamferDistanceL2``: per cloud, mean over x of the squared distance to the nearest y plus mean
    over y of the squared distance to the nearest x.

    Returns (B,) with ``reduction="none"``, else its mean or sum over the batch (a scalar).
    With lengths, padded points are ignored on both sides. Differentiable in x and y.
    """
    _check_cloud("x", x)
    _check_cloud("y", y)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    b = x.shape[0]
    if _want_pytorch3d(use_pytorch3d):
        from pytorch3d.loss import chamfer_distance as p3d_chamfer

        per, _ = p3d_chamfer(
            x, y, x_lengths=x_lengths, y_lengths=y_lengths, batch_reduction=None, point_reduction="mean"
        )
    else:
        d = pairwise_sq_dist(x, y)  # (B, N, M)
        vx = _valid_mask(x_lengths, b, x.shape[1], x.device)
        vy = _valid_mask(y_lengths, b, y.shape[1], x.device)
        if vy is not None:
            d = d.masked_fill(~vy[:, None, :], float("inf"))
        if vx is not None:
            d = d.masked_fill(~vx[:, :, None], float("inf"))
        dx = d.min(dim=2).values  # (B, N): each x to its nearest y
        dy = d.min(dim=1).values  # (B, M): each y to its nearest x
        per = _masked_mean(dx, vx) + _masked_mean(dy, vy)
    if reduction == "none":
        return per
    return per.mean() if reduction == "mean" else per.sum()


def _masked_mean(v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last axis of (B, N) ``v``, counting only ``valid`` entries (inf-free)."""
    if valid is None:
        return v.mean(dim=-1)
    v = torch.where(valid, v, torch.zeros_like(v))
    return v.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
