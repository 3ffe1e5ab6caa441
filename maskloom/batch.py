"""The training batch: what the loader yields and the backbone consumes.

It lives at the package root (not in ``pipelines/``) because both the loader and the backbone use
it, and the backbone must import neither Ray nor any modality (DESIGN.md, deviation noted there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class TokenBatch:
    """One batch of one modality, padded to the longest sequence L in the batch.

    tokens:    (B, L, D) continuous tokens in the table's stored dtype (uint8 pixels 0..255, float16
               audio/point/series values, float32), or (B, L) int64 ids for discrete tokens. Padding
               positions hold 0. The loader does not widen to float32: that cast costs more than the
               rest of collating (fp16 -> fp32 of an audio batch: ~10 ms on a CPU core) and moves 2-4x
               the bytes to the device; adapters and objectives cast on the device (``.float()``).
    positions: (B, L, P) float32 coordinates on the modality's axes.
    padding:   (B, L) bool, True where there is no token (padding), False for real tokens.
    modality:  the registered modality name shared by every sample of the batch.
    labels:    (B,) int64 class indices, -1 where a sample has no label; or None.
    edges:     (B, E, 2) int64 token-index pairs, padded with -1; or None.
    ids:       the B sample ids.
    meta:      per-sample meta dicts (JSON from the table), for detokenising and drawing; may be empty.
    segments:  None, or for a *packed* batch (:func:`pack_batch`) (B, L) int64: the sample each token
               belongs to, 0..N-1, and -1 on padding. A packed row holds several samples end to end;
               ``labels``, ``ids`` and ``meta`` then have N entries (one per sample, in sample order),
               ``edges`` index tokens of the row, and the backbone keeps samples apart (attention
               within a sample only, masking counted per sample, features pooled per sample).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    padding: torch.Tensor
    modality: str
    labels: torch.Tensor | None = None
    edges: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    segments: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Rows of the tensors (B); see :attr:`num_samples` for samples."""
        return int(self.tokens.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples in the batch: B, or N for a packed batch."""
        if self.segments is None:
            return self.batch_size
        if self.labels is not None:
            return int(self.labels.shape[0])
        return int(self.segments.max()) + 1 if self.segments.numel() else 0

    @property
    def sample_lengths(self) -> torch.Tensor:
        """(num_samples,) number of real tokens per sample (:attr:`lengths` for an unpacked batch)."""
        if self.segments is None:
            return self.lengths
        seg = self.segments[self.segments >= 0]
        return torch.bincount(seg, minlength=self.num_samples)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens per sample."""
        return (~self.padding).sum(dim=1)

    @property
    def is_discrete(self) -> bool:
        """Whether tokens are ids (integer, not uint8: uint8 tokens are pixel bytes)."""
        return not torch.is_floating_point(self.tokens) and self.tokens.dtype != torch.uint8

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TokenBatch:
        return self._map_tensors(lambda t: t.pin_memory())

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenBatch:
        """A copy with ``fn`` applied to every tensor field (None fields stay None)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self,
            tokens=f(self.tokens),
            positions=f(self.positions),
            padding=f(self.padding),
            labels=f(self.labels),
            edges=f(self.edges),
            segments=f(self.segments),
        )


PACK_ROW_CHOICES = 3
"""Row counts :func:`pack_plan` tries, from the fewest that can hold the batch at the row limit."""


def pack_plan(lengths: np.ndarray, row_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sample lengths (N,) -> (row (N,), offset (N,), number of rows R) for packing a batch into rows
    of at most ``cap = max(row_tokens, longest sample)`` tokens (the batch is that long anyway).

    First-fit decreasing (samples longest first, ties in sample order, each into the first row with
    room) decides the placement. A batch is as long as its fullest row, so the limit matters as
    much as the number of rows. Candidate row counts R: ``PACK_ROW_CHOICES`` counts from the rows
    first-fit decreasing needs at ``cap`` (at least ``ceil(total / cap)``), and ``ceil(N / k)``
    for k samples to a row (bucketed batches of similar lengths pack best that way). For each, the
    smallest limit at which first-fit decreasing needs at most R rows is found by bisection, and
    the packing with the fewest slots (rows x fullest row) is kept; rows limited to the longest
    sample are a candidate too, so packing never pads more than one sample per row would. 300
    tokens in rows of up to 64 become 7 rows of at most 44 tokens (308 slots), not 6 of up to 64
    with a short last row (384). Compiled with numba (``maskloom._kernels.pack_plan``): 3 us for 64
    samples that pack perfectly, ~22 us for 64 of two lengths that do not."""
    if row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1, got {row_tokens}")
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    from maskloom import _kernels

    return _kernels.pack_plan(lens, row_tokens, PACK_ROW_CHOICES)


def pack_arrays(
    tokens: np.ndarray,
    positions: np.ndarray,
    padding: np.ndarray,
    edges: np.ndarray | None,
    row_tokens: int,
    *,
    prefix: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack padded numpy columns of N samples into rows of at most ``row_tokens`` tokens
    (:func:`pack_plan`). -> (tokens, positions, padding, segments, edges) of R rows, each as long as
    the fullest row; padding slots hold 0 (tokens, positions), True (padding), -1 (segments, edges).
    A sample's tokens keep their order and sit end to end with the row's other samples; its edges
    are shifted by its offset in the row and follow the edges of the row's earlier samples.

    ``prefix``: the caller guarantees that every sample's real tokens and edges come first (the
    loader's batches); otherwise it is checked. Such batches are copied by compiled loops
    (``maskloom._kernels.pack_columns``, ~20 us for 64 small graphs); others by numpy indexing."""
    from maskloom import _kernels

    n, width = padding.shape
    real = ~padding
    lens = real.sum(1)
    valid = counts = None
    if edges is not None and prefix:  # padded edges are (-1, -1): the first column tells
        counts = np.count_nonzero(edges[..., 0] >= 0, axis=1)
    elif edges is not None:
        valid = (edges[..., 0] >= 0) & (edges[..., 1] >= 0)  # (N, E)
        counts = valid.sum(1)
    if not prefix:
        prefix = bool((real == (np.arange(width) < lens[:, None])).all()) and (
            valid is None or bool((valid == (np.arange(valid.shape[1]) < counts[:, None])).all())
        )
    row, offset, rows = pack_plan(lens, row_tokens)
    fill = np.bincount(row, weights=lens, minlength=rows).astype(np.int64)
    length = int(fill.max()) if rows else 0
    tok_out = np.zeros((rows, length, *tokens.shape[2:]), tokens.dtype)
    pos_out = np.zeros((rows, length, *positions.shape[2:]), positions.dtype)
    pad = np.ones((rows, length), bool)
    seg = np.full((rows, length), -1, np.int64)
    if _kernels.ENABLED and prefix:
        _kernels.pack_columns(
            np.ascontiguousarray(tokens),
            np.ascontiguousarray(positions),
            lens,
            row,
            offset,
            tok_out,
            pos_out,
            pad,
            seg,
        )
    else:
        src = np.flatnonzero(real.reshape(-1))  # real tokens, sample-major
        sample = src // width
        start = np.cumsum(lens) - lens  # first real token of each sample among ``src``
        dest = row[sample] * length + offset[sample] + (np.arange(src.size) - start[sample])
        tok_out.reshape(rows * length, *tokens.shape[2:])[dest] = tokens.reshape(
            n * width, *tokens.shape[2:]
        )[src]
        pos_out.reshape(rows * length, *positions.shape[2:])[dest] = positions.reshape(
            n * width, *positions.shape[2:]
        )[src]
        seg.reshape(-1)[dest] = sample
        pad.reshape(-1)[dest] = False
    out_edges = None
    if edges is not None:
        ecount = np.bincount(row, weights=counts, minlength=rows).astype(np.int64)
        out_edges = np.full((rows, int(ecount.max()) if rows else 0, 2), -1, dtype=edges.dtype)
        if _kernels.ENABLED and prefix:
            _kernels.pack_edges(np.ascontiguousarray(edges), counts, row, offset, out_edges)
        else:
            order = np.argsort(row, kind="stable")  # a row's samples in sample order
            before = np.cumsum(counts[order]) - counts[order]  # edges of earlier samples, all rows
            first = np.searchsorted(row[order], np.arange(rows))  # each row's first sample in ``order``
            estart = np.empty(n, np.int64)
            estart[order] = before - before[first][row[order]]
            if valid is None:
                valid = (edges[..., 0] >= 0) & (edges[..., 1] >= 0)
            es, ek = np.nonzero(valid)  # sample-major
            ebegin = np.cumsum(counts) - counts
            edest = row[es] * out_edges.shape[1] + estart[es] + (np.arange(es.size) - ebegin[es])
            out_edges.reshape(-1, 2)[edest] = edges[es, ek] + offset[es, None].astype(edges.dtype)
    return tok_out, pos_out, pad, seg, out_edges


def pack_batch(batch: TokenBatch, row_tokens: int, *, prefix: bool = False) -> TokenBatch:
    """The batch with its samples packed end to end into rows of at most ``row_tokens`` tokens
    (first-fit decreasing, :func:`pack_plan`), with ``segments`` saying which sample each token is.

    Packing removes most of the padding of batches of short, uneven samples (small graphs, short
    texts): MUTAG's graphs in batches of 64 pad 15 % with length bucketing, 3.4 % packed into rows
    of up to 128 tokens.
    ``labels``, ``ids`` and ``meta`` stay one per sample. Works on CPU tensors (the loader packs
    before handing a batch over); ``prefix`` as in :func:`pack_arrays`."""
    if batch.segments is not None:
        raise ValueError("the batch is already packed")
    edges = None if batch.edges is None else batch.edges.cpu().numpy()
    tokens, positions, padding, segments, edges = pack_arrays(
        batch.tokens.cpu().numpy(),
        batch.positions.cpu().numpy(),
        batch.padding.cpu().numpy(),
        edges,
        row_tokens,
        prefix=prefix,
    )
    device = batch.tokens.device
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return replace(
        batch,
        tokens=t(tokens),
        positions=t(positions),
        padding=t(padding),
        segments=t(segments),
        edges=None if edges is None else t(edges),
    )
