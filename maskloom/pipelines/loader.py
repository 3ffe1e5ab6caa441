"""Token tables -> :class:`~maskloom.batch.TokenBatch` for PyTorch (and a Ray Data path for Ray Train).

How an epoch is planned (from sequence lengths only, no token decoding; identical on every rank):

1. **Row groups are the unit of I/O.** The Parquet row groups of all tables of one modality form a
   *stream*. With ``shuffle`` their order is permuted by ``(seed, epoch)``; rows are then taken in
   that order, so a reader only ever holds a few row groups in memory (shard-then-buffer shuffling,
   as in WebDataset).
2. **Pools.** Consecutive rows are cut into pools of ``bucket_window * batch_size`` rows. Inside a
   pool the rows are permuted (``shuffle``), sorted by length (``bucket``; length bucketing as in
   Khomenko et al. 2016, "Accelerating recurrent neural network training using sequence
   bucketing", and fairseq's ``max_tokens`` batching), cut into batches of ``batch_size`` rows (or
   of at most ``max_tokens`` padded tokens), and the batch order inside the pool is permuted. So
   padding stays small while batches still arrive in random length order. Inside a batch the rows
   are in table order, so a batch that spans row groups takes one contiguous run from each.
3. **Ranks (DDP).** Each stream's batch list is cut into ``world_size`` contiguous, equal blocks;
   rank ``r`` gets block ``r``. The ``n_batches % world_size`` batches left over at the end of the
   (shuffled) list are dropped for that epoch — which ones changes every epoch — so ranks get
   disjoint, equal-size sets of batches and step in lock-step. Contiguous blocks mean a rank reads
   only about ``1/world_size`` of the row groups.
4. **Modalities.** With several streams, the sequence of stream choices is drawn from ``(seed,
   epoch)`` only — so at every step all ranks get a batch of the *same* modality (no unused
   adapters in DDP). Without ``weights`` every batch of every stream appears once, in random
   interleaving; with ``weights={modality: w}`` each step picks a modality with probability
   proportional to ``w`` for ``steps_per_epoch`` steps (default: the total number of batches) and
   a stream that runs out starts its next pass (a new permutation).
5. **Workers.** With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` over an
   ``IterableDataset`` runs the plan: worker ``w`` builds batches ``w, w + n, w + 2n, ...`` of the
   plan and the DataLoader's round-robin collection puts them back in plan order, so the batches
   are identical *and in the same order* as with ``num_workers=0``. Each worker reads the row
   groups its batches touch, so workers may decode the same row group: workers parallelise padding
   and conversion, not Parquet decoding (which pyarrow already multithreads). ``num_workers=1`` or
   ``thread_prefetch=N`` (a background thread, no extra process) overlap loading with training.
   Small batches come back pickled through the worker's pipe, not as shared-memory tensors, which
   cost ~0.3 ms per tensor (see ``PIPE_BATCH_BYTES``). A batch still costs ~0.2 ms to hand over, so
   tables of tiny rows load fastest with ``num_workers=0``.
6. **Resume.** ``state_dict()`` holds ``(epoch, position)``; the plan is a pure function of the
   configuration and the epoch, so a loader restored with ``load_state_dict`` yields exactly the
   batches that were not yet consumed. Iterating the loader to the end advances the epoch
   (``set_epoch`` sets it explicitly, as for ``DistributedSampler``).

Reading is per row group with ``pyarrow.parquet.ParquetFile.read_row_group`` of only the needed
columns; list columns become numpy arrays through their offsets and values without a copy (vectors
are stored as fixed-size binary: see ``maskloom.tables``), decoded once per row group (no pyarrow
call per batch). A stream under ``RESIDENT_BYTES`` is read whole into one chunk per pass; a larger
stream of short rows is read in *segments* (``SEGMENT_BYTES``: about one pool's row groups, merged
into one chunk, the chunk rows of all its batches computed at once); either way a batch has no
row-group bookkeeping of its own. Other streams read the row groups each batch touches.
Collating is vectorised across the batch. Short rows (text ids, time-series patches, small graphs)
are gathered, converted and padded by one compiled pass per chunk and column (numba,
:mod:`maskloom._kernels`; tokens, positions and the padding mask together for a batch from one
chunk). Without numba (or with ``MASKLOOM_JIT=0``) the numpy formulation runs: every row's window of
``L`` values is picked by *one* fancy index per column from a strided view over the chunk's values
(a batch spanning row groups outside a segment: one per row group, straight into its run of the
batch), and padding is reset by one boolean row index. Big rows (image patches) are copied one
contiguous slice per row. Tokens keep their stored dtype (uint8, float16, float32; ids become
int64). ``TokenBatch.meta`` is parsed from its JSON only when read.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import sys
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from maskloom import _kernels
from maskloom.batch import TokenBatch, pack_batch, pack_plan
from maskloom.tables import TableError, TableSpec, TokenTable, open_shard, shard_error, vector_values

log = logging.getLogger(__name__)

READ_COLUMNS = ("id", "tokens", "positions", "edges", "label", "meta")
"""Columns the loader reads (``source`` and ``modality`` are not needed for training)."""

_MIX_STREAM = 1_000_003  # rng stream id of the modality-choice sequence (distinct from stream indices)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How :class:`TokenLoader` turns token tables into batches."""

    batch_size: int = 32
    """Samples per batch (the cap when ``max_tokens`` is set)."""
    seed: int = 0
    """Seed of every permutation; with the epoch it fully determines the batches."""
    shuffle: bool = True
    """Permute row groups, rows within a pool and batches within a pool, by ``(seed, epoch)``."""
    bucket: bool = True
    """Sort rows by length within each pool before cutting batches (less padding)."""
    bucket_window: int = 100
    """Pool size in batches: rows are shuffled and sorted within ``bucket_window * batch_size`` rows."""
    max_tokens: int | None = None
    """If set, a batch holds at most this many padded tokens (``B * L``), and at most ``batch_size`` rows."""
    drop_last: bool = False
    """Drop batches with fewer than ``batch_size`` rows (ignored with ``max_tokens``)."""
    pack: int | Mapping[str, int] | None = None
    """Pack each batch's samples end to end into rows of at most this many tokens
    (:func:`maskloom.batch.pack_batch`; a mapping: per modality, others unpacked). The batch still
    holds ``batch_size`` samples (or ``max_tokens`` worth), in fewer, fuller rows, with
    ``TokenBatch.segments`` telling them apart; the backbone attends, masks and pools per sample.
    For tables of short, uneven samples (small graphs): 64 MUTAG graphs per batch pad 15 % with
    bucketing alone, 3.4 % packed into rows of up to 128 tokens. Needs random masking."""
    rank: int = 0
    """This process's rank for DDP."""
    world_size: int = 1
    """Number of ranks; each gets a disjoint, equal-size block of every stream's batches."""
    num_workers: int = 0
    """DataLoader worker processes building batches; 0 builds them in the calling process. Handing a
    batch over from a worker costs ~0.2 ms (batches under 256 kB, pickled) or ~1.5 ms (larger ones,
    as shared-memory tensors) here, so workers pay off when building a batch costs more than that
    (images, audio, video); tables of tiny rows (text, small graphs) load fastest without them."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (``num_workers > 0`` only)."""
    thread_prefetch: int = 0
    """With ``num_workers=0``: a background thread prepares up to this many batches ahead, overlapping
    reading and padding with the training step (pyarrow and numpy copies release the GIL); 0: none."""
    pin_memory: bool = False
    """Pin batch tensors (for fast host-to-GPU copies)."""
    weights: Mapping[str, float] | None = None
    """Per-modality sampling weights for mixing several modalities; None: every batch once."""
    steps_per_epoch: int | None = None
    """Batches per epoch when sampling by weights; default: total batches of all streams."""
    with_meta: bool = True
    """Parse the per-sample ``meta`` JSON into ``TokenBatch.meta`` (set False to skip the work)."""
    cache: bool = True
    """Keep small streams (at most ``RESIDENT_BYTES`` = 64 MB of row groups, e.g. SMS, MUTAG, ETTh1)
    decoded in memory after their first pass, so later epochs read nothing: a pass over such a table
    takes 1-5 ms, of which reading and decoding is more than half. With ``num_workers > 0`` the
    worker processes live for one epoch and read the table again (for such tables,
    ``num_workers=0`` is the fast choice). False: read them again every pass."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bucket_window < 1:
            raise ValueError(f"bucket_window must be >= 1, got {self.bucket_window}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        packs = self.pack.values() if isinstance(self.pack, Mapping) else [self.pack]
        if not all(_valid_pack(p) for p in packs):
            raise ValueError(f"pack must be a number of tokens >= 1 (or a mapping of them), got {self.pack}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank {self.rank}, world_size {self.world_size}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if self.weights is not None:
            bad = {k: w for k, w in self.weights.items() if not (float(w) >= 0)}
            if bad or not any(float(w) > 0 for w in self.weights.values()):
                raise ValueError(f"weights must be >= 0 with at least one > 0, got {dict(self.weights)}")


# ---------------------------------------------------------------------------------------------
# lengths and the row-group index
# ---------------------------------------------------------------------------------------------
def _valid_pack(pack: Any) -> bool:
    """Whether ``pack`` is None or a number of tokens >= 1 (``LoaderConfig.pack``, ``collate_fn``)."""
    return pack is None or (isinstance(pack, int) and pack >= 1)


def _open(table: str | TokenTable) -> TokenTable:
    return table if isinstance(table, TokenTable) else TokenTable(os.fspath(table))


def _length_column(spec: TableSpec) -> str:
    """The cheaper of tokens/positions to read for list offsets (both have one entry per token)."""
    token_bytes = spec.token_dim * np.dtype(spec.token_dtype).itemsize
    return "tokens" if token_bytes <= 4 * spec.position_dim else "positions"


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) int64 entries per row of a list column, from its offsets (values are not touched)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [np.diff(c.offsets.to_numpy()) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass
class _Group:
    """One Parquet row group of a stream."""

    path: str
    index: int  # row-group index inside the file
    start: int  # first stream row
    rows: int
    nbytes: int = 0  # uncompressed size of the row group (Parquet metadata)


def _table_groups(table: TokenTable) -> tuple[list[tuple[str, int, int, int]], np.ndarray]:
    """[(path, row_group, rows, uncompressed bytes)] in manifest order, and the (N,) token count of
    every row."""
    col = _length_column(table.spec)
    groups, lengths = [], []
    for path in table.shard_paths():
        pf = open_shard(path)  # TableError naming a missing or damaged shard
        for g in range(pf.metadata.num_row_groups):
            rg = pf.metadata.row_group(g)
            groups.append((path, g, rg.num_rows, rg.total_byte_size))
            try:
                lengths.append(_list_lengths(pf.read_row_group(g, columns=[col]).column(col)))
            except (OSError, pa.ArrowException) as e:  # a shard damaged inside, its footer intact
                raise shard_error(path, e, f", row group {g}") from None
    return groups, (np.concatenate(lengths) if lengths else np.zeros(0, np.int64))


def table_lengths(table: str | TokenTable) -> np.ndarray:
    """(N,) int64 number of tokens of every row of a token table, in manifest order.

    Read from the list offsets of the cheapest per-token column; tokens are never decoded.
    """
    return _table_groups(_open(table))[1]


def _spec_key(spec: TableSpec) -> tuple:
    return (spec.token_kind, spec.token_dim, spec.token_dtype, spec.position_axes, spec.vocab_size)


class _Stream:
    """All tables of one modality, concatenated in the order given: rows 0..N-1."""

    def __init__(self, tables: list[TokenTable]) -> None:
        self.tables = tables
        self.spec = tables[0].spec
        self.modality = self.spec.modality
        for t in tables[1:]:
            if _spec_key(t.spec) != _spec_key(self.spec):
                raise TableError(
                    f"{t.directory} and {tables[0].directory} are both {self.modality!r} tables but with "
                    f"different token specs ({t.spec.token_dim}x{t.spec.token_dtype}, axes {t.spec.position_axes} vs "
                    f"{self.spec.token_dim}x{self.spec.token_dtype}, axes {self.spec.position_axes}); "
                    "they cannot share batches"
                )
        self.groups: list[_Group] = []
        lengths = []
        start = 0
        for t in tables:
            gs, ls = _table_groups(t)
            for path, g, n, nbytes in gs:
                self.groups.append(_Group(path=path, index=g, start=start, rows=n, nbytes=nbytes))
                start += n
            lengths.append(ls)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # (N,)
        self.group_of_row = np.repeat(np.arange(len(self.groups)), [g.rows for g in self.groups])  # (N,)
        self.group_start = np.array([g.start for g in self.groups], np.int64)  # (G,)
        self.resident = sum(g.nbytes for g in self.groups) <= RESIDENT_BYTES
        """Small enough to hold every row group of a pass in one chunk (see :class:`_Reader`)."""

    @property
    def num_rows(self) -> int:
        return int(self.lengths.shape[0])


# ---------------------------------------------------------------------------------------------
# planning: pure functions of (config, epoch, lengths)
# ---------------------------------------------------------------------------------------------
def _split_max_tokens(
    rows: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int
) -> list[np.ndarray]:
    """Greedy cut of ``rows`` (in order) into batches of at most ``max_tokens`` padded tokens."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths[rows].tolist()):  # one step per row, not per token
        m = max(longest, n)
        if i > start and ((i - start + 1) * m > max_tokens or i - start == batch_size):
            out.append(rows[start:i])
            start, m = i, n
        longest = m
    if rows.size:
        out.append(rows[start:])
    return out


def plan_stream(
    lengths: np.ndarray,
    group_sizes: Sequence[int],
    cfg: LoaderConfig,
    *,
    epoch: int,
    stream: int = 0,
    cycle: int = 0,
) -> list[np.ndarray]:
    """All batches (arrays of stream row indices) of one pass over a stream, before rank splitting.

    ``lengths`` (N,) tokens per row; ``group_sizes`` rows per row group (summing to N). Deterministic
    in ``(cfg.seed, epoch, stream, cycle)``; see the module docstring for the steps.
    """
    rng = np.random.default_rng([cfg.seed, epoch, stream, cycle])
    sizes = np.asarray(group_sizes, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes.size else sizes
    order = rng.permutation(sizes.size) if cfg.shuffle else np.arange(sizes.size)
    rows = (
        np.concatenate([np.arange(starts[g], starts[g] + sizes[g]) for g in order])
        if sizes.size
        else np.zeros(0, np.int64)
    )
    pool = cfg.bucket_window * cfg.batch_size
    batches: list[np.ndarray] = []
    for p0 in range(0, rows.size, pool):
        chunk = rows[p0 : p0 + pool]
        if cfg.shuffle:
            chunk = rng.permutation(chunk)
        if cfg.bucket:
            keys = lengths[chunk]
            if keys.size and keys.max() < 1 << 16:  # the same stable order; numpy radix-sorts 16-bit keys
                keys = keys.astype(np.uint16)  # (15x faster than its merge sort of int64 here)
            chunk = chunk[np.argsort(keys, kind="stable")]
        # the rows of a batch in table order
        if cfg.max_tokens is not None:
            pb = [np.sort(b) for b in _split_max_tokens(chunk, lengths, cfg.batch_size, cfg.max_tokens)]
        else:  # full batches sorted row-wise in one call
            full = chunk.size - chunk.size % cfg.batch_size
            pb = list(np.sort(chunk[:full].reshape(-1, cfg.batch_size), axis=1))
            if full < chunk.size:
                pb.append(np.sort(chunk[full:]))
        if cfg.shuffle:
            pb = [pb[i] for i in rng.permutation(len(pb))]
        batches.extend(pb)
    if cfg.drop_last and cfg.max_tokens is None:
        batches = [b for b in batches if b.size == cfg.batch_size]
    return batches


def _rank_block(batches: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    k = len(batches) // world_size  # the last len % world_size batches are dropped
    return batches[rank * k : (rank + 1) * k]


# ---------------------------------------------------------------------------------------------
# reading and collating
# ---------------------------------------------------------------------------------------------
RESIDENT_BYTES = 64 << 20
"""A stream whose row groups hold at most this many uncompressed bytes is read whole, into one chunk per
pass, and every batch is gathered from it without per-batch row-group bookkeeping."""
ROW_COPY_MIN = 4096
"""Values per padded sample (``L * D``) from which :func:`collate` copies sample by sample (one
contiguous slice each: big rows such as image patches) instead of one gather for the whole batch (short
rows such as text ids or time-series patches, where a Python step per sample would dominate)."""


def _strings(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) object array of the Python strings of a string column (one C-level conversion)."""
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


@dataclass
class _Chunk:
    """Decoded columns of some rows (one row group, or one Ray batch) as numpy arrays, decoded once and
    then only sliced/gathered by :func:`collate` (no pyarrow call per batch)."""

    tok_off: np.ndarray  # (n+1,) offsets into tok
    tok: np.ndarray  # (T, D) continuous or (T,) discrete
    pos_off: np.ndarray  # (n+1,)
    pos: np.ndarray  # (T, P) float32
    edge_off: np.ndarray | None  # (n+1,) or None when no row has edges
    edges: np.ndarray | None  # (E, 2) int32
    labels: np.ndarray  # (n,) int64, -1 for missing
    ids: np.ndarray  # (n,) object: str
    meta: np.ndarray | None = None  # (n,) object: raw JSON strings, None when not read
    _ext: dict = field(default_factory=dict, repr=False)  # lazily built: padded values, longest row

    @classmethod
    def from_arrow(cls, t: pa.Table, spec: TableSpec) -> _Chunk:
        def lst(name: str) -> pa.Array:
            col = t.column(name)
            if isinstance(col, pa.ChunkedArray):
                return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            return col

        tok = lst("tokens")
        continuous = spec.token_kind == "continuous"
        tvals = vector_values(tok.values, np.dtype(spec.token_dtype), spec.token_dim if continuous else None)
        pos = lst("positions")
        pvals = vector_values(pos.values, np.float32, spec.position_dim)
        edge_off = edges = None
        if "edges" in t.column_names and t.column("edges").null_count < t.num_rows:
            e = lst("edges")
            edge_off = e.offsets.to_numpy()
            edges = vector_values(e.values, np.int32, 2)
        if "label" in t.column_names:
            labels = pc.fill_null(t.column("label"), -1).to_numpy().astype(np.int64)
        else:
            labels = np.full(t.num_rows, -1, np.int64)
        ids = _strings(t.column("id")) if "id" in t.column_names else np.full(t.num_rows, "", object)
        meta = _strings(t.column("meta")) if "meta" in t.column_names else None
        return cls(
            tok_off=tok.offsets.to_numpy(),
            tok=tvals,
            pos_off=pos.offsets.to_numpy(),
            pos=pvals,
            edge_off=edge_off,
            edges=edges,
            labels=labels,
            ids=ids,
            meta=meta,
        )

    def maxlen(self) -> int:
        """Longest row (tokens, positions or edges) of the chunk, in values."""
        if "maxlen" not in self._ext:
            offs = [self.tok_off, self.pos_off] + ([self.edge_off] if self.edge_off is not None else [])
            self._ext["maxlen"] = max((int(np.diff(o).max()) for o in offs if o.size > 1), default=0)
        return self._ext["maxlen"]

    def ext(self, name: str, dtype: Any = None) -> np.ndarray | None:
        """Column ``name`` (tok, pos, edges) followed by ``maxlen()`` zero rows, as ``dtype`` (default: as
        stored): built once, so that a window of up to ``maxlen()`` values starting at any row start
        stays inside the array, and batches need no dtype conversion. A column is always asked for
        in the same dtype (the batch's: int64 ids and edges, stored-dtype vectors, float32 positions)."""
        if name not in self._ext:
            flat = getattr(self, name)
            if flat is None:
                self._ext[name] = None
            else:
                ext = np.zeros((flat.shape[0] + self.maxlen(), *flat.shape[1:]), dtype or flat.dtype)
                ext[: flat.shape[0]] = flat
                self._ext[name] = ext
                setattr(self, name, ext[: flat.shape[0]])  # same values; the decoded buffer can go
        return self._ext[name]

    def row_lengths(self, name: str = "tok_off") -> np.ndarray:
        """(n,) values per row of the column with offsets ``name`` (cached)."""
        key = ("row_lengths", name)
        n = self._ext.get(key)
        if n is None:
            n = self._ext[key] = np.diff(getattr(self, name))
        return n

    def same_offsets(self) -> bool:
        """Whether positions and tokens have the same offsets (always, unless the chunk was merged from
        chunks that start differently): row starts are then looked up once per batch."""
        same = self._ext.get("same_offsets")
        if same is None:
            same = self._ext["same_offsets"] = bool(np.array_equal(self.tok_off, self.pos_off))
        return same

    def windows(self, name: str, length: int, dtype: Any = None) -> np.ndarray | None:
        """:func:`_windows` of ``ext(name, dtype)`` for ``length`` (cached: batches repeat lengths)."""
        key = (name, length)
        w = self._ext.get(key)
        if w is None:
            ext = self.ext(name, dtype)
            if ext is None:
                return None
            w = self._ext[key] = _windows(ext, length)
        return w

    def gather(
        self,
        name: str,
        length: int,
        starts: np.ndarray,
        dtype: Any = None,
        smax: int | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """(B, length, ...) array: row b holds column ``name``'s values from ``starts[b]`` on; past a
        row's own end the values are unspecified (the caller resets the padding). A new array, or
        ``out`` (contiguous, of that shape and dtype ``dtype``) filled in place.

        When the column is already in ``dtype``, the windows are a view of the decoded values
        themselves, not of an :meth:`ext` copy: a window that would run past the chunk's last value
        is taken at the last full window and its row rewritten with the values that exist (only rows
        starting within ``length`` values of the chunk's end). That saves a copy of the whole column
        per row group (ENZYMES: 1.6 MB, ~1 ms, every epoch). ``smax``: ``starts.max()`` if known."""
        flat = getattr(self, name)
        if flat is None:
            return None
        converted = dtype is not None and flat.dtype != dtype
        if out is not None:  # np.take needs a contiguous source: row indices, not windows (a view)
            src = self.ext(name, dtype) if converted else flat
            idx = starts[:, None] + np.arange(length)  # (B, length); past a row's end: padding
            return np.take(src, idx, axis=0, out=out, mode="clip")  # "clip": out is not buffered
        if converted or flat.shape[0] < length or length == 0:
            return self.windows(name, length, dtype)[starts]  # converted (or tiny) column: ext copy
        key = (name, length, "own")
        w = self._ext.get(key)
        if w is None:
            w = self._ext[key] = _windows(flat, length)
        last = flat.shape[0] - length  # the last full window's start
        if not starts.size or (int(starts.max()) if smax is None else smax) <= last:
            return w[starts]
        out = w[np.minimum(starts, last)]
        for b in np.flatnonzero(starts > last).tolist():
            s = int(starts[b])
            out[b, : flat.shape[0] - s] = flat[s:]
        return out

    @classmethod
    def merge(cls, chunks: Sequence[_Chunk], dtypes: Mapping[str, Any] | None = None) -> _Chunk:
        """One chunk of all rows of ``chunks`` in order (one copy of their values, converted to
        ``dtypes[column]`` when given: see :meth:`ext`), so that a batch spread over several row groups
        is still gathered with one fancy index per column."""

        longest = max(c.maxlen() for c in chunks)
        ext: dict[str, Any] = {"maxlen": longest}

        def cat(name: str, off_name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
            """Offsets and values of column ``name`` of all chunks; the values are a view of one array
            that also holds the ``longest`` zero rows of :meth:`ext` (one copy for both)."""
            flats = [getattr(c, name) for c in chunks]
            if all(f is None for f in flats):
                ext[name] = None
                return None, None
            offs, vals, base = [np.zeros(1, np.int64)], [], 0
            for c, f in zip(chunks, flats):
                off = getattr(c, off_name)
                if off is None:  # rows without values (no edges in this chunk)
                    offs.append(np.full(c.labels.size, base, np.int64))
                    continue
                offs.append(off[1:] - off[0] + base)
                vals.append(f[off[0] : off[-1]])
                base += int(off[-1] - off[0])
            like = next(f for f in flats if f is not None)
            dtype = (dtypes or {}).get(name, like.dtype)
            vals.append(np.zeros((longest, *like.shape[1:]), dtype))
            ext[name] = np.concatenate(vals, dtype=dtype)
            return np.concatenate(offs), ext[name][:base]

        tok_off, tok = cat("tok", "tok_off")
        pos_off, pos = cat("pos", "pos_off")
        edge_off, edges = cat("edges", "edge_off")
        metas = [c.meta for c in chunks]
        return cls(
            tok_off=tok_off,
            tok=tok,
            pos_off=pos_off,
            pos=pos,
            edge_off=edge_off,
            edges=edges,
            labels=np.concatenate([c.labels for c in chunks]),
            ids=np.concatenate([c.ids for c in chunks]),
            meta=None if any(m is None for m in metas) else np.concatenate(metas),
            _ext=ext,
        )


class _MetaJSON:
    """The unparsed per-sample meta JSON strings of a batch (parsed by :class:`_Batch` on access)."""

    __slots__ = ("strings",)

    def __init__(self, strings: list[str]) -> None:
        self.strings = strings

    def parse(self) -> list[dict]:
        return json.loads("[" + ",".join(self.strings) + "]")  # one parse per batch, not per sample

    def __getstate__(self) -> list[str]:
        return self.strings

    def __setstate__(self, strings: list[str]) -> None:
        self.strings = strings


class _Batch(TokenBatch):
    """A :class:`TokenBatch` whose ``meta`` JSON is parsed only when ``meta`` is first read.

    Training never reads ``meta``; detokenising and drawing do. ``to`` and ``pin_memory`` hand the
    unparsed JSON on to the new batch, so moving a batch does not parse it either.
    """

    @property
    def meta(self) -> list[dict]:  # type: ignore[override]
        d = self.__dict__
        m = d["_meta"]
        if isinstance(m, _MetaJSON) and not d.get("_handing_over"):
            m = d["_meta"] = m.parse()
        return m

    @meta.setter
    def meta(self, value: list[dict] | _MetaJSON) -> None:
        self.__dict__["_meta"] = value

    def _hand_over(self, method: Any, *args: Any, **kwargs: Any) -> TokenBatch:
        self.__dict__["_handing_over"] = True  # dataclasses.replace reads .meta: pass the raw JSON on
        try:
            return method(*args, **kwargs)
        finally:
            del self.__dict__["_handing_over"]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        return self._hand_over(super().to, device, non_blocking=non_blocking)

    def pin_memory(self) -> TokenBatch:
        return self._hand_over(super().pin_memory)


def _windows(ext: np.ndarray, L: int) -> np.ndarray:
    """(T - L + 1, L, ...) read-only view of ``ext`` (T, ...): window i is ``ext[i : i + L]``."""
    w = np.ndarray(
        (ext.shape[0] - L + 1, L, *ext.shape[1:]),
        ext.dtype,
        buffer=ext,
        strides=(ext.strides[0], *ext.strides),
    )
    w.flags.writeable = False
    return w


class _BufferPool:
    """Big batch buffers (row-copied columns such as image or video patches) reused once nothing else
    references them, instead of a fresh allocation per batch.

    A fresh 154 MB video batch costs the kernel 0.1-0.4 s of page faults (zeroing, and with
    transparent huge pages sometimes reclaim), more than decoding its row group, while a bare
    pyarrow scan reuses its allocator's memory. A buffer is handed out again only when its reference
    count shows that the pool holds the last reference: the batch tensors (``torch.from_numpy`` keeps
    the array alive) and any view of them are gone. A loader's reader keeps one pool, so up to
    ``SIZE`` batch-sized buffers stay allocated while the loader lives."""

    MIN_BYTES = 8 << 20
    """Smaller columns are allocated fresh (the allocator keeps such sizes)."""
    SIZE = 3
    """Buffers kept per pool: the batch in use, the one being built and one more (prefetching)."""

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a copy (a spawned worker) starts empty
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def get(self, shape: tuple[int, ...], dtype: Any, fill: int) -> tuple[np.ndarray, bool]:
        """(array of ``shape``, whether it was reused: its contents are stale); a new array is
        filled with ``fill``."""
        dtype = np.dtype(dtype)
        if math.prod(shape) * dtype.itemsize < self.MIN_BYTES:
            return (np.zeros(shape, dtype) if fill == 0 else np.full(shape, fill, dtype)), False
        with self.lock:
            for a in self.buffers:
                # references: the list, the loop variable and getrefcount's argument
                if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) <= 3:
                    return a, True
            a = np.zeros(shape, dtype) if fill == 0 else np.full(shape, fill, dtype)
            self.buffers.append(a)
            if len(self.buffers) > self.SIZE:
                self.buffers.pop(0)
            return a, False


def _pad_column(
    parts: Sequence[tuple[_Chunk, np.ndarray, np.ndarray | None]],
    name: str,
    starts: Sequence[np.ndarray],
    lens: np.ndarray,
    pad: np.ndarray,
    width: tuple[int, ...],
    dtype: Any,
    pad_value: int,
    padded: bool | None = None,
    pool: _BufferPool | None = None,
) -> np.ndarray:
    """One padded (B, L, *width) column: row i = its values, then ``pad_value``. ``padded``: whether
    any row is shorter than L (computed from ``lens`` when None).

    Short rows: one fancy index per chunk picks every row's window of L values at once (windows are a
    strided view over the chunk's values; what spills past a row's end is overwritten with the pad
    value by one masked assignment). Big rows (``L * prod(width) >= ROW_COPY_MIN``): one contiguous
    slice copy per row. Never a step per token.
    """
    B, L = pad.shape
    shape = (B, L, *width)
    big = L * math.prod(width) >= ROW_COPY_MIN
    if big or L == 0:
        if pool is None:
            out, stale = (
                (np.zeros(shape, dtype) if pad_value == 0 else np.full(shape, pad_value, dtype)),
                False,
            )
        else:
            out, stale = pool.get(shape, dtype, pad_value)
        filled = np.zeros(B, bool)
        for (c, _, slot), st in zip(parts, starts):
            flat = getattr(c, name)
            if flat is None:
                continue
            slots = range(st.size) if slot is None else np.arange(B)[slot].tolist()  # index array or slice
            for i, s, n in zip(slots, st.tolist(), (lens if slot is None else lens[slot]).tolist()):
                out[i, :n] = flat[s : s + n]
                if stale and n < L:
                    out[i, n:] = pad_value
                filled[i] = True
        if stale and not filled.all():
            out[~filled] = pad_value
        return out
    if _kernels.ENABLED:  # one compiled pass per chunk: gather, convert, pad
        out = np.empty(shape, dtype)
        for (c, _, slot), st in zip(parts, starts):
            flat = getattr(c, name)
            if flat is None:  # no values in this chunk (no edges): its rows are all padding
                out[slice(None) if slot is None else slot] = pad_value
            else:
                _kernels.gather_pad(flat, st, lens if slot is None else lens[slot], out, pad_value, slot)
        return out
    if len(parts) == 1 and parts[0][2] is None:  # the common case: the whole batch from one chunk
        out = parts[0][0].gather(name, L, starts[0], dtype)  # (B, L, *width)
        if out is None:
            return np.full(shape, pad_value, dtype)
        if out.dtype != dtype:  # the chunk's ext was built for another dtype
            out = out.astype(dtype)
    else:
        out = np.empty(shape, dtype)
        for (c, _, slot), st in zip(parts, starts):
            n = min(L, c.maxlen())  # this chunk's rows are no longer than its longest row
            if n == L and isinstance(slot, slice) and getattr(c, name) is not None:
                c.gather(name, L, st, dtype, out=out[slot])  # straight into its run of the batch
                continue
            g = c.gather(name, n, st, dtype)
            if g is not None:
                out[slot, :n] = g
    if padded if padded is not None else B * L != int(lens.sum()):
        _reset_padding(out, pad, pad_value)
    return out


def batch_dtypes(spec: TableSpec) -> Mapping[str, np.dtype]:
    """numpy dtypes of the batch columns: tokens as stored (int64 for ids), float32 positions, int64
    edges."""
    return _batch_dtypes(spec.token_kind, spec.token_dtype)


@functools.lru_cache(maxsize=16)
def _batch_dtypes(token_kind: str, token_dtype: str) -> Mapping[str, np.dtype]:
    tok = np.dtype(token_dtype) if token_kind == "continuous" else np.dtype(np.int64)
    return types.MappingProxyType({"tok": tok, "pos": np.dtype(np.float32), "edges": np.dtype(np.int64)})


def _reset_padding(out: np.ndarray, pad: np.ndarray, value: int) -> None:
    """Set the padded slots of a contiguous (B, L, *width) batch column to ``value``; ``pad`` (B, L).

    Gathered windows run past each row's end into the next rows' values: one masked write resets
    them. For vectors, each slot's vector is seen as one opaque ``width * itemsize``-byte value
    (a void view), so the masked write copies whole slots: 3.7 instead of 7 us for a batch of
    ENZYMES nodes (64 x 57 x 21 float32), 4.9 instead of 28 us for its edges (64 x 232 x 2 int64;
    a boolean row index broadcasting a scalar over the width was the previous form)."""
    if out.ndim == 2:
        np.copyto(out, value, where=pad)
    elif out.flags.c_contiguous:
        slots = out.reshape(*pad.shape, -1)
        fill = _void_fill(out.dtype, slots.shape[2], value)
        np.copyto(slots.view(fill.dtype)[..., 0], fill, where=pad)
    else:  # pragma: no cover - collate's columns are always fresh contiguous arrays
        out[pad] = value


@functools.lru_cache(maxsize=64)
def _void_fill(dtype: np.dtype, width: int, value: int) -> np.void:
    """``width`` values ``value`` of ``dtype`` as one void scalar (a whole padded slot)."""
    return np.full(width, value, dtype).view(np.dtype((np.void, width * np.dtype(dtype).itemsize)))[0]


def _padding_mask(lens: np.ndarray, length: int) -> np.ndarray:
    """(B, length) bool, True where a row of ``lens[b]`` real tokens is padded: one gather from a
    cached table for short batches (where the per-batch cost matters), else one comparison."""
    if length <= PADDING_TABLE_MAX:
        return _padding_table(length)[lens]
    return np.arange(length) >= lens[:, None]


PADDING_TABLE_MAX = 256
"""Longest batch whose padding mask comes from a cached table (a table costs (L + 1) * L bytes)."""


@functools.lru_cache(maxsize=PADDING_TABLE_MAX)
def _padding_table(length: int) -> np.ndarray:
    """(length + 1, length) bool, row n = [j >= n for j < length]: the padding mask of a row of n real
    tokens in a batch of length ``length``; ``table[lens]`` is a batch's mask in one gather."""
    t = np.arange(length) >= np.arange(length + 1)[:, None]
    t.flags.writeable = False
    return t


def _collate_short(
    c: _Chunk, r: np.ndarray, st: np.ndarray, lens: np.ndarray, spec: TableSpec, with_meta: bool
) -> TokenBatch | None:
    """:func:`collate` of a whole batch of short rows from one chunk (text ids, series patches, small
    graphs) without numba: the same result with the fewest numpy calls (one gather per column, one
    gather per mask), as this is the per-batch cost that dominates tables of tiny rows. (With numba,
    :func:`_collate_short_parts` does it.) None: not that case."""
    if not lens.size:
        return None
    L = int(lens.max())
    dtypes = batch_dtypes(spec)
    width = spec.token_dim if spec.token_kind == "continuous" else 1
    if L * max(width, spec.position_dim) >= ROW_COPY_MIN:
        return None
    edges = None
    if c.edge_off is not None:
        e_st = c.edge_off[r]
        elens = c.row_lengths("edge_off")[r]  # (B,) edges per sample
        E = int(elens.max())
        if E * 2 >= ROW_COPY_MIN:
            return None
        edges = c.gather("edges", E, e_st, dtypes["edges"], int(e_st.max()))  # (B, E, 2)
        if lens.size * E != int(elens.sum()):
            _reset_padding(edges, _padding_mask(elens, E), -1)
    smax = int(st.max())  # once for both columns (their offsets are the same)
    tokens = c.gather("tok", L, st, dtypes["tok"], smax)
    positions = c.gather("pos", L, st, dtypes["pos"], smax)
    if tokens.dtype != dtypes["tok"]:
        tokens = tokens.astype(dtypes["tok"])
    pad = _padding_mask(lens, L)  # (B, L)
    if lens.size * L != int(lens.sum()):
        _reset_padding(tokens, pad, 0)
        _reset_padding(positions, pad, 0)
    meta = c.meta[r] if with_meta and c.meta is not None else None
    return _make_batch(spec, tokens, positions, pad, c.labels[r], edges, c.ids[r], meta, with_meta)


def _row_fields(
    parts: Sequence[tuple[Any, ...]], size: int, with_meta: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The (labels, ids, meta or None) of a batch of ``size`` rows taken from ``parts`` (as
    :func:`collate`'s, or longer tuples that begin so): one gather each when a single part is the
    whole batch in order (slot None or a slice), else per part into its slots."""
    if len(parts) == 1 and (parts[0][2] is None or isinstance(parts[0][2], slice)):
        c, r = parts[0][0], parts[0][1]
        return c.labels[r], c.ids[r], (c.meta[r] if with_meta and c.meta is not None else None)
    labels, ids = np.empty(size, np.int64), np.empty(size, object)
    meta = np.full(size, "{}", object) if with_meta else None
    for c, r, slot, *_ in parts:
        labels[slot] = c.labels[r]
        ids[slot] = c.ids[r]
        if meta is not None and c.meta is not None:
            meta[slot] = c.meta[r]
    return labels, ids, meta


def _collate_short_parts(
    parts: Sequence[tuple[_Chunk, np.ndarray, np.ndarray | None]], spec: TableSpec, with_meta: bool
) -> TokenBatch | None:
    """:func:`collate` of a batch of short rows (text ids, series patches, small graphs) with numba,
    from one chunk or drawn from several in runs (a batch of a large table whose rows span two or
    three row groups): per chunk, one compiled call for tokens, positions and the padding mask
    together, one for the edges, into the batch's rows of that run (``slot`` None or a slice: a
    contiguous view). This per-batch cost dominates tables of tiny rows; per chunk and column calls
    and their index arrays were most of it. None: not that case (no numba, index-array slots,
    different token and position offsets, empty or long rows)."""
    found = _short_runs(parts)
    if found is None:
        return None
    runs, B = found
    L = max(int(n.max()) for _, _, _, n, _ in runs)
    ens = [en for *_, en in runs if en is not None]
    has_edges = bool(ens)
    E = max((int(en.max()) for en in ens), default=0)
    width = spec.token_dim if spec.token_kind == "continuous" else 1
    if not L or L * max(width, spec.position_dim) >= ROW_COPY_MIN or E * 2 >= ROW_COPY_MIN:
        return None
    dtypes = batch_dtypes(spec)
    tokens = np.empty((B, L, width), dtypes["tok"])
    positions = np.empty((B, L, spec.position_dim), dtypes["pos"])
    pad = np.empty((B, L), bool)
    edges = np.empty((B, E, 2), dtypes["edges"]) if has_edges else None
    for c, r, slot, n, en in runs:
        tok2 = c.tok if c.tok.ndim == 2 else c.tok.reshape(-1, 1)  # ids (T,) as (T, 1)
        _kernels.gather_pad2(tok2, c.pos, c.tok_off[r], n, tokens[slot], positions[slot], pad[slot])
        if edges is not None:
            if en is None:
                edges[slot] = -1
            else:
                _kernels.gather_pad(c.edges, c.edge_off[r], en, edges[slot], -1)
    labels, ids, meta = _row_fields(runs, B, with_meta)
    if spec.token_kind != "continuous":
        tokens = tokens.reshape(B, L)
    return _make_batch(spec, tokens, positions, pad, labels, edges, ids, meta, with_meta)


def _short_runs(
    parts: Sequence[tuple[_Chunk, np.ndarray, np.ndarray | None]],
) -> tuple[list[tuple[_Chunk, np.ndarray, slice, np.ndarray, np.ndarray | None]], int] | None:
    """The parts of a batch as runs for the compiled short-row paths: (chunk, rows, slot as a slice,
    token lengths, edge lengths or None) and the batch size; None without numba or when a part does
    not qualify (an index-array slot, different token and position offsets, no rows)."""
    if not _kernels.ENABLED:
        return None
    runs = []
    B = 0
    for c, r, slot in parts:
        if slot is None:  # the only part: the whole batch
            slot = slice(0, r.size)
        elif not isinstance(slot, slice) or slot.step not in (None, 1):
            return None
        if not c.same_offsets() or not r.size:
            return None
        en = c.row_lengths("edge_off")[r] if c.edge_off is not None else None
        B += r.size
        runs.append((c, r, slot, c.row_lengths()[r], en))
    return runs, B


def _collate_packed_parts(
    parts: Sequence[tuple[_Chunk, np.ndarray, np.ndarray | None]],
    spec: TableSpec,
    with_meta: bool,
    row_tokens: int,
) -> TokenBatch | None:
    """``_pack(collate(parts), row_tokens)`` built straight from the chunks with numba: the packing
    plan (:func:`maskloom.batch.pack_plan`) from the rows' lengths, then one compiled call per run for
    tokens, positions, padding and segments together, and one for the edges, into the packed rows.
    The padded batch in between, and its round trip through tensors, are never made (on 100 copies
    of SMS they took most of the time packing added). The same batch, bit for bit. None: not that
    case (no numba, or a part :func:`_short_runs` turns down)."""
    found = _short_runs(parts)
    if found is None:
        return None
    runs, B = found
    lens = np.empty(B, np.int64)
    has_edges = any(en is not None for *_, en in runs)
    elens = np.zeros(B, np.int64) if has_edges else None
    for _, _, slot, n, en in runs:
        lens[slot] = n
        if en is not None:
            elens[slot] = en
    row, offset, R = pack_plan(lens, row_tokens)
    L = int(_kernels.row_bases(row, lens, R)[1].max())
    dtypes = batch_dtypes(spec)
    width = spec.token_dim if spec.token_kind == "continuous" else 1
    tokens = np.zeros((R, L, width), dtypes["tok"])
    positions = np.zeros((R, L, spec.position_dim), dtypes["pos"])
    pad = np.ones((R, L), bool)
    seg = np.full((R, L), -1, np.int64)
    edges = None
    if has_edges:
        base, efill = _kernels.row_bases(row, elens, R)
        edges = np.full((R, int(efill.max()), 2), -1, dtypes["edges"])
    for c, r, slot, n, en in runs:
        tok2 = c.tok if c.tok.ndim == 2 else c.tok.reshape(-1, 1)  # ids (T,) as (T, 1)
        first = slot.start or 0  # the run's first sample in the batch
        _kernels.gather_pack(tok2, c.pos, c.tok_off[r], n, first, row, offset, tokens, positions, pad, seg)
        if en is not None:
            _kernels.gather_pack_edges(c.edges, c.edge_off[r], en, first, row, offset, base, edges)
    labels, ids, meta = _row_fields(runs, B, with_meta)
    if spec.token_kind != "continuous":
        tokens = tokens.reshape(R, L)
    batch = _make_batch(spec, tokens, positions, pad, labels, edges, ids, meta, with_meta)
    batch.segments = torch.from_numpy(seg)
    return batch


def collate(
    parts: Sequence[tuple[_Chunk, np.ndarray, np.ndarray | None]],
    spec: TableSpec,
    *,
    with_meta: bool = True,
    pool: _BufferPool | None = None,
    pack: int | None = None,
) -> TokenBatch:
    """Pad rows taken from decoded chunks into one TokenBatch (packed into rows of at most ``pack``
    tokens if given: :func:`_pack`, straight from the chunks when it can: :func:`_collate_packed_parts`).

    ``parts``: (chunk, local row indices (n,), batch slots) triples; the slots, an (n,) index array or
    a slice, together cover 0..B-1 exactly once (``None``: the only part, the whole batch in order). The work is
    vectorised per chunk and column (see :func:`_pad_column`); ``meta`` JSON is parsed only when
    ``batch.meta`` is first read.
    """
    if pack is not None:
        packed = _collate_packed_parts(parts, spec, with_meta, pack)
        return (
            packed
            if packed is not None
            else _pack(collate(parts, spec, with_meta=with_meta, pool=pool), pack)
        )
    fast = _collate_short_parts(parts, spec, with_meta)
    if fast is not None:
        return fast
    single = len(parts) == 1 and parts[0][2] is None
    if single:
        c, r, _ = parts[0]
        st = c.tok_off[r]
        lens = c.row_lengths()[r]  # (B,) tokens per sample
        if c.same_offsets():
            fast = _collate_short(c, r, st, lens, spec, with_meta)
            if fast is not None:
                return fast
        tok_st, pos_st = [st], [st if c.same_offsets() else c.pos_off[r]]
    else:
        B = sum(int(r.size) for _, r, _ in parts)
        lens = np.empty(B, np.int64)
        tok_st, pos_st = [], []
        for c, r, slot in parts:
            lens[slot] = c.row_lengths()[r]
            tok_st.append(c.tok_off[r])
            pos_st.append(c.pos_off[r])
    L = int(lens.max()) if lens.size else 0
    pad = _padding_mask(lens, L)  # (B, L) True = padding
    padded = lens.size * L != int(lens.sum())
    dtypes = batch_dtypes(spec)
    continuous = spec.token_kind == "continuous"
    tokens = _pad_column(  # (B, L, D) stored dtype or (B, L) int64
        parts,
        "tok",
        tok_st,
        lens,
        pad,
        (spec.token_dim,) if continuous else (),
        dtypes["tok"],
        0,
        padded,
        pool,
    )
    positions = _pad_column(
        parts, "pos", pos_st, lens, pad, (len(spec.position_axes),), dtypes["pos"], 0, padded
    )
    edges = None
    if (c.edge_off is not None) if single else any(c.edge_off is not None for c, _, _ in parts):
        elens = np.zeros(lens.size, np.int64)  # (B,) edges per sample
        e_st = []
        for c, r, slot in parts:
            if c.edge_off is None:
                e_st.append(np.zeros(r.size, np.int64))
                continue
            e_st.append(c.edge_off[r])
            elens[slice(None) if slot is None else slot] = c.row_lengths("edge_off")[r]
        epad = _padding_mask(elens, int(elens.max()) if elens.size else 0)  # (B, E)
        edges = _pad_column(parts, "edges", e_st, elens, epad, (2,), np.int64, -1)  # (B, E, 2)
    labels, ids, meta = _row_fields(parts, lens.size, with_meta)
    return _make_batch(spec, tokens, positions, pad, labels, edges, ids, meta, with_meta)


def _make_batch(
    spec: TableSpec,
    tokens: np.ndarray,
    positions: np.ndarray,
    pad: np.ndarray,
    labels: np.ndarray,
    edges: np.ndarray | None,
    ids: np.ndarray,
    meta: np.ndarray | None,
    with_meta: bool,
) -> TokenBatch:
    """The TokenBatch of collated numpy columns (tensors share their memory); ``meta``: the raw JSON
    strings (None: none read), parsed only when ``batch.meta`` is first read."""
    return _Batch(
        tokens=torch.from_numpy(tokens),
        positions=torch.from_numpy(positions),
        padding=torch.from_numpy(pad),
        modality=spec.modality,
        labels=torch.from_numpy(labels),
        edges=None if edges is None else torch.from_numpy(edges),
        ids=ids.tolist(),
        meta=_MetaJSON(meta.tolist() if meta is not None else ["{}"] * len(ids)) if with_meta else [],
    )


def _pack(batch: _Batch, row_tokens: int) -> TokenBatch:
    """A collated batch (real tokens and edges first) packed into rows of at most ``row_tokens``
    tokens (:func:`pack_batch`), its ``meta`` JSON handed on unparsed."""
    return batch._hand_over(pack_batch, batch, row_tokens, prefix=True)


SEGMENT_BYTES = 32 << 20
"""A stream too big to be resident but of short rows is read in *segments*: runs of consecutive planned
batches whose row groups together hold at most this many uncompressed bytes (or one batch's groups,
if more). A segment's row groups are merged into one chunk once, and the chunk rows of all its
batches are computed with a few vectorised operations, so each batch is then one gather per column
as from a resident stream, with no row-group bookkeeping of its own. The plan's pools are runs of
consecutive row groups, so a segment spans about one pool's groups and most groups are merged once
per epoch."""
SEGMENT_MERGE_BYTES = 64 << 10
"""Segments are used for a stream only if their merges copy at most this many row-group bytes per batch
(~10 us), less than the per-batch bookkeeping they save. When a pool's row groups exceed
``SEGMENT_BYTES`` (big row groups: 100 copies of ENZYMES in 20 MB groups), segments shrink to a
batch or two and would merge the same groups again and again; such streams are read batch by batch
from the row groups each batch touches, without merging."""


@dataclass(eq=False)
class _Segment:
    """Consecutive planned batches of one short-row stream, read from one merged chunk (see
    ``SEGMENT_BYTES``)."""

    stream: int
    groups: list[int]  # sorted row groups the batches take rows from
    items: list[int]  # the batches: indices into the run's items, in order
    keep: set[int]  # groups a later segment also takes rows from: their decoded chunks are kept


class _Reader:
    """Runs a list of planned batches, holding each row group in memory only while it is needed.

    Three ways, by stream: a *resident* stream (at most ``RESIDENT_BYTES``) is one chunk per pass; a
    larger stream of short rows is read in segments (:class:`_Segment`); any other stream (big rows
    such as image, audio or video patches, or short rows in row groups too big to merge) reads the
    row groups each batch needs, one part of the batch per row group.
    """

    def __init__(
        self,
        streams: list[_Stream],
        *,
        with_meta: bool,
        cache: bool = False,
        pack: Sequence[int | None] | None = None,
    ) -> None:
        self.streams = streams
        self.with_meta = with_meta
        self.cache = cache
        self.pack = list(pack) if pack is not None else [None] * len(streams)  # row tokens per stream
        self._resident: dict[int, tuple[_Chunk, np.ndarray | None]] = {}  # stream -> all its rows
        self._files: dict[str, pq.ParquetFile] = {}
        self.pool = _BufferPool()  # big token columns reuse buffers the consumer has let go of
        self._pid = os.getpid()
        # short rows on average (values per padded row below ROW_COPY_MIN): read in segments when not
        # resident; a segment's merge copies every value once more, which big rows would not repay
        self._segmented = [
            not s.resident
            and s.num_rows > 0
            and float(s.lengths.mean())
            * max(s.spec.token_dim if s.spec.token_kind == "continuous" else 1, len(s.spec.position_axes))
            < ROW_COPY_MIN
            for s in streams
        ]

    def __getstate__(self) -> dict[str, Any]:  # a spawned DataLoader worker starts with no handles, no cache
        return {**self.__dict__, "_files": {}, "_resident": {}}

    def _file(self, path: str) -> pq.ParquetFile:
        if self._pid != os.getpid():  # a forked worker opens its own handles
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = open_shard(path)
        return self._files[path]

    def _load(self, s: int, g: int) -> _Chunk:
        st = self.streams[s]
        grp = st.groups[g]
        cols = [c for c in READ_COLUMNS if self.with_meta or c != "meta"]
        try:
            t = self._file(grp.path).read_row_group(grp.index, columns=cols)
        except (OSError, pa.ArrowException) as e:  # a shard damaged inside, its footer intact
            raise shard_error(grp.path, e, f", row group {grp.index}") from None
        return _Chunk.from_arrow(t, st.spec)

    def _load_groups(self, s: int, groups: list[int]) -> tuple[_Chunk, np.ndarray | None]:
        """Row groups ``groups`` (sorted) of stream ``s`` as one chunk, and the (N,) map from stream row
        to chunk row (-1: not loaded), or None when the chunk holds every row of the stream in order."""
        st = self.streams[s]
        chunks = [self._load(s, g) for g in groups]
        chunk = chunks[0] if len(chunks) == 1 else _Chunk.merge(chunks, batch_dtypes(st.spec))
        if len(groups) == len(st.groups):
            return chunk, None
        local = np.full(st.num_rows, -1, np.int64)
        at = 0
        for g in groups:
            n = st.groups[g].rows
            local[st.group_start[g] : st.group_start[g] + n] = np.arange(at, at + n)
            at += n
        return chunk, local

    def _uses(self, items: Sequence[tuple[int, int, np.ndarray]]) -> dict[tuple[int, int, int], int]:
        """How many rows of each (stream, pass, group) the items take: one bincount per (stream, pass)."""
        rows_of: dict[tuple[int, int], list[np.ndarray]] = {}
        for s, cyc, rows in items:
            rows_of.setdefault((s, cyc), []).append(rows)
        uses = {}
        for (s, cyc), rs in rows_of.items():
            st = self.streams[s]
            cnt = np.bincount(st.group_of_row[np.concatenate(rs)], minlength=len(st.groups))
            for g in np.flatnonzero(cnt).tolist():
                uses[(s, cyc, g)] = int(cnt[g])
        return uses

    def _segments(self, items: Sequence[tuple[int, int, np.ndarray]]) -> dict[int, _Segment]:
        """The segment of every item of a segmented stream (see ``SEGMENT_BYTES``): consecutive items
        of the stream, cut greedily when the next item's new row groups would exceed the budget. The
        row groups of every item come from one ``np.unique`` over (item, group) pairs per stream."""
        by_stream: dict[int, list[int]] = {}
        for i, (s, _, _) in enumerate(items):
            if self._segmented[s]:
                by_stream.setdefault(s, []).append(i)
        out: dict[int, _Segment] = {}
        for s, idx in by_stream.items():
            st = self.streams[s]
            n_groups = len(st.groups)
            sizes = [items[i][2].size for i in idx]
            rows = np.concatenate([items[i][2] for i in idx])
            pairs = np.unique(np.repeat(np.arange(len(idx)), sizes) * n_groups + st.group_of_row[rows])
            item_of, group_of = np.divmod(pairs, n_groups)  # sorted by item, then group
            bounds = np.searchsorted(item_of, np.arange(len(idx) + 1)).tolist()
            groups_of = group_of.tolist()
            nbytes = [g.nbytes for g in st.groups]
            cuts: list[tuple[set[int], list[int]]] = []
            have: set[int] = set()
            held = 0
            run: list[int] = []
            for k, i in enumerate(idx):
                gs = groups_of[bounds[k] : bounds[k + 1]]
                new = [g for g in gs if g not in have]
                add = sum(nbytes[g] for g in new)
                if run and held + add > SEGMENT_BYTES:
                    cuts.append((have, run))
                    have, held, run = set(), 0, []
                    new, add = gs, sum(nbytes[g] for g in gs)
                have.update(new)
                held += add
                run.append(i)
            if run:
                cuts.append((have, run))
            merged = sum(sum(nbytes[g] for g in gs) for gs, _ in cuts if len(gs) > 1)
            if merged > SEGMENT_MERGE_BYTES * len(idx):
                continue  # big row groups: segments would merge them again and again
            last = {g: j for j, (gs, _) in enumerate(cuts) for g in gs}  # the last segment of each group
            for j, (gs, its) in enumerate(cuts):
                seg = _Segment(stream=s, groups=sorted(gs), items=its, keep={g for g in gs if last[g] > j})
                for i in its:
                    out[i] = seg
        return out

    def _open_segment(
        self,
        seg: _Segment,
        items: Sequence[tuple[int, int, np.ndarray]],
        decoded: dict[tuple[int, int], _Chunk],
    ) -> tuple[_Chunk, dict[int, np.ndarray]]:
        """One chunk of the segment's row groups (decoded ones that a later segment needs stay in
        ``decoded``), and every item's rows in that chunk (computed for all items at once)."""
        s = seg.stream
        st = self.streams[s]
        chunks = []
        for g in seg.groups:
            c = decoded.pop((s, g), None)
            if c is None:
                c = self._load(s, g)
            if g in seg.keep:
                decoded[(s, g)] = c
            chunks.append(c)
        chunk = chunks[0] if len(chunks) == 1 else _Chunk.merge(chunks, batch_dtypes(st.spec))
        first = np.zeros(len(st.groups), np.int64)  # (G,) first chunk row of each of the segment's groups
        first[seg.groups] = np.cumsum([0] + [st.groups[g].rows for g in seg.groups[:-1]])
        rows = np.concatenate([items[i][2] for i in seg.items])
        g_of = st.group_of_row[rows]
        local = first[g_of] + rows - st.group_start[g_of]
        ends = np.cumsum([items[i][2].size for i in seg.items]).tolist()
        return chunk, {i: local[a:b] for i, a, b in zip(seg.items, [0, *ends[:-1]], ends)}

    def run(self, items: Sequence[tuple[int, int, np.ndarray]]) -> Iterator[TokenBatch]:
        """``items``: (stream, pass, stream rows) per batch, in the order to yield."""
        segments = self._segments(items)
        # rows each (stream, pass, group) still gives the batches read without segments: a group is
        # evicted when they are all used (segments keep their own account, _Segment.keep)
        remaining = self._uses([it for i, it in enumerate(items) if i not in segments])
        cache: dict[tuple[int, int], _Chunk] = {}
        # resident streams: (pass, one chunk of the pass's row groups, stream row -> chunk row or None
        # when they are the same), held until the pass's last batch
        whole: dict[int, tuple[int, _Chunk, np.ndarray | None]] = {}
        last = {(s, cyc): i for i, (s, cyc, _) in enumerate(items) if self.streams[s].resident}
        decoded: dict[tuple[int, int], _Chunk] = {}  # (stream, group) kept for a later segment
        current: dict[int, tuple[_Segment, _Chunk, dict[int, np.ndarray]]] = {}  # stream -> its open segment
        pool = self.pool
        for i, (s, cyc, rows) in enumerate(items):
            st = self.streams[s]
            pack = self.pack[s]  # row tokens, or None: not packed
            if st.resident:  # one gather from one chunk; no row-group bookkeeping per batch
                w = whole.get(s)
                if w is None or w[0] != cyc:
                    if self.cache:  # every row of the stream, decoded once per loader (and worker)
                        if s not in self._resident:
                            self._resident[s] = self._load_groups(s, list(range(len(st.groups))))
                        w = whole[s] = (cyc, *self._resident[s])
                    else:
                        groups = sorted(g for (s2, c2, g) in remaining if (s2, c2) == (s, cyc))
                        w = whole[s] = (cyc, *self._load_groups(s, groups))
                local = rows if w[2] is None else w[2][rows]
                yield collate([(w[1], local, None)], st.spec, with_meta=self.with_meta, pool=pool, pack=pack)
                if last[(s, cyc)] == i:
                    del whole[s]
                continue
            seg = segments.get(i)
            if seg is not None:  # short rows: one gather per column from the segment's chunk
                cur = current.get(s)
                if cur is None or cur[0] is not seg:
                    current[s] = cur = (seg, *self._open_segment(seg, items, decoded))
                yield collate(
                    [(cur[1], cur[2].pop(i), None)], st.spec, with_meta=self.with_meta, pool=pool, pack=pack
                )
                continue
            # big rows, or big row groups: one part per row group the batch takes rows from; a batch's
            # rows are in table order (see plan_stream), so each part is a contiguous run of the batch
            g_of = st.group_of_row[rows]  # (B,) row group of every batch row, non-decreasing
            bounds = [0, *(np.flatnonzero(g_of[1:] != g_of[:-1]) + 1).tolist(), rows.size]
            groups = [int(g_of[a]) for a in bounds[:-1]]
            for g in groups:
                if (s, g) not in cache:
                    cache[(s, g)] = self._load(s, g)
            if len(groups) == 1:
                parts = [(cache[(s, groups[0])], rows - st.group_start[groups[0]], None)]
            else:
                parts = [
                    (cache[(s, g)], rows[a:b] - st.group_start[g], slice(a, b))
                    for g, a, b in zip(groups, bounds[:-1], bounds[1:])
                ]
            batch = collate(parts, st.spec, with_meta=self.with_meta, pool=pool, pack=pack)
            for g, a, b in zip(groups, bounds[:-1], bounds[1:]):
                key = (s, cyc, g)
                remaining[key] -= b - a
                if remaining[key] == 0:
                    cache.pop((s, g), None)
            yield batch
            del batch  # not held while the next one is built: its buffers can be reused


PIPE_BATCH_BYTES = 256 << 10
"""A batch built in a DataLoader worker with at most this many bytes of arrays travels to the main
process pickled through the worker's pipe (:class:`_PipeBatch`) instead of as tensors. Torch sends a
tensor from a worker through shared memory, one segment and one file descriptor per tensor: ~0.3 ms
each here, 1.2-1.5 ms per batch of 4-5 small tensors whatever their size, where the pipe takes 0.12
ms for 20 kB. Two workers loading 64 SMS messages per batch ran 20x slower than no worker (1.3 ms
against 65 us per batch). The two are even at ~0.8 MB; above, shared memory wins (8 MB: 4.4 ms
against 11.5 ms), so bigger batches keep it."""


class _PipeBatch:
    """A batch's numpy columns, pickled by value (DataLoader's conversion leaves this type alone)."""

    COLUMNS = ("tokens", "positions", "padding", "labels", "edges", "segments")
    """The TokenBatch fields that hold tensors (None for labels, edges or segments when absent)."""

    __slots__ = ("arrays", "modality", "ids", "meta")

    def __init__(self, b: _Batch) -> None:
        self.arrays = {k: None if (t := getattr(b, k)) is None else t.numpy() for k in self.COLUMNS}
        self.modality, self.ids = b.modality, b.ids
        self.meta = b.__dict__["_meta"]  # the unparsed JSON (or [] without meta), as it is

    def __getstate__(self) -> tuple:
        return self.arrays, self.modality, self.ids, self.meta

    def __setstate__(self, state: tuple) -> None:
        self.arrays, self.modality, self.ids, self.meta = state

    def batch(self) -> _Batch:
        t = {k: None if a is None else torch.from_numpy(a) for k, a in self.arrays.items()}
        return _Batch(**t, modality=self.modality, ids=self.ids, meta=self.meta)  # type: ignore[arg-type]

    @classmethod
    def nbytes(cls, b: TokenBatch) -> int:
        return sum(t.numel() * t.element_size() for k in cls.COLUMNS if (t := getattr(b, k)) is not None)


class _PlanDataset(torch.utils.data.IterableDataset):
    """The plan of one epoch for DataLoader workers: worker w builds items w, w+n, w+2n, ...

    In a worker, a batch of at most ``PIPE_BATCH_BYTES`` goes out as a :class:`_PipeBatch` (the loader
    turns it back into a TokenBatch), a bigger one as tensors in shared memory."""

    def __init__(self, reader: _Reader, items: list[tuple[int, int, np.ndarray]]) -> None:
        self.reader = reader
        self.items = items

    def __iter__(self) -> Iterator[TokenBatch | _PipeBatch]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.reader.run(self.items)
        return self._worker(self.items[info.id :: info.num_workers])

    def _worker(
        self, items: list[tuple[int, int, np.ndarray]]
    ) -> Iterator[TokenBatch | _PipeBatch | _Failure]:
        try:
            for b in self.reader.run(items):
                if _PipeBatch.nbytes(b) <= PIPE_BATCH_BYTES:
                    yield _PipeBatch(b)  # type: ignore[arg-type]
                else:
                    yield b
        except TableError as e:  # a damaged shard: raised in the loader's process as itself, one line,
            yield _Failure(e)  # not as DataLoader's "Caught TableError in DataLoader worker ..." dump


def _background(it: Iterator[TokenBatch], depth: int) -> Iterator[TokenBatch]:
    """Run ``it`` in a daemon thread, at most ``depth`` items ahead; errors re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in it:
                if not put(x):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))
            return
        put(done)

    thread = threading.Thread(target=work, name="maskloom-loader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()


@dataclass
class _Failure:
    error: BaseException


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------
class TokenLoader:
    """Iterate token tables as padded, one-modality :class:`TokenBatch` es.

    ``tables``: one table directory (or :class:`TokenTable`) or several; tables of the same
    modality are concatenated into one stream, several modalities are mixed batch by batch.
    Keyword arguments are the fields of :class:`LoaderConfig` (or pass ``config=``).

    >>> loader = TokenLoader("tables/image", batch_size=64, seed=1, rank=0, world_size=1)
    >>> for epoch in range(10):
    ...     loader.set_epoch(epoch)
    ...     for batch in loader:  # TokenBatch: tokens (B, L, D), positions (B, L, P), padding (B, L)
    ...         ...
    """

    def __init__(
        self,
        tables: str | os.PathLike | TokenTable | Sequence[str | os.PathLike | TokenTable],
        config: LoaderConfig | None = None,
        **overrides: Any,
    ) -> None:
        names = {f.name for f in fields(LoaderConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"TokenLoader got unknown option(s) {unknown}; valid: {sorted(names)}")
        self.config = replace(config or LoaderConfig(), **overrides)
        if isinstance(tables, (str, os.PathLike, TokenTable)):
            tables = [tables]
        opened = [_open(t) for t in tables]
        if not opened:
            raise ValueError("TokenLoader needs at least one token table")
        by_mod: dict[str, list[TokenTable]] = {}
        for t in opened:
            by_mod.setdefault(t.modality, []).append(t)
        self.streams = [_Stream(ts) for ts in by_mod.values()]
        self.modalities = [s.modality for s in self.streams]
        w = self.config.weights
        if w is not None:
            missing, extra = set(self.modalities) - set(w), set(w) - set(self.modalities)
            if missing or extra:
                raise ValueError(
                    f"weights must name exactly the modalities of the tables {sorted(self.modalities)}; "
                    f"missing {sorted(missing)}, unknown {sorted(extra)}"
                )
        pack = self.config.pack
        if isinstance(pack, Mapping):
            unknown = sorted(set(pack) - set(self.modalities))
            if unknown:
                raise ValueError(
                    f"pack names modalities {unknown} that no table has; tables: {sorted(self.modalities)}"
                )
            per_stream = [pack.get(m) for m in self.modalities]
        else:
            per_stream = [pack] * len(self.streams)
        self._reader = _Reader(
            self.streams, with_meta=self.config.with_meta, cache=self.config.cache, pack=per_stream
        )
        self._epoch = 0
        self._position = 0
        self._plan_cache: tuple[int, list[tuple[int, int, np.ndarray]]] | None = None

    # ---- plan -----------------------------------------------------------------------------------
    def _stream_pass(self, s: int, epoch: int, cycle: int) -> list[np.ndarray]:
        st, cfg = self.streams[s], self.config
        batches = plan_stream(
            st.lengths, [g.rows for g in st.groups], cfg, epoch=epoch, stream=s, cycle=cycle
        )
        mine = _rank_block(batches, cfg.rank, cfg.world_size)
        if not mine and batches:
            log.warning(
                "%s: %d batches for %d ranks: rank %d gets none",
                st.modality,
                len(batches),
                cfg.world_size,
                cfg.rank,
            )
        return mine

    def plan(self, epoch: int | None = None) -> list[tuple[int, int, np.ndarray]]:
        """This rank's batches of ``epoch`` (default: the current one), in order, without reading
        tokens: (stream index, pass, stream row indices) per batch. ``self.streams[s].modality`` names
        the modality of stream ``s``."""
        epoch = self._epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        cfg = self.config
        first = [self._stream_pass(s, epoch, 0) for s in range(len(self.streams))]
        rng = np.random.default_rng([cfg.seed, epoch, _MIX_STREAM])
        counts = np.array([len(b) for b in first])
        if cfg.weights is None and cfg.steps_per_epoch is None:
            choice = np.repeat(np.arange(len(first)), counts)
            if len(first) > 1 and cfg.shuffle:
                choice = rng.permutation(choice)
        else:
            w = (
                np.array([float(cfg.weights[s.modality]) for s in self.streams])
                if cfg.weights is not None
                else counts.astype(float)
            )
            if not (w > 0).any() or (w[counts == 0] > 0).any():
                empty = [self.streams[i].modality for i in np.flatnonzero((counts == 0) & (w > 0))]
                raise ValueError(
                    f"cannot sample by weight from modalities with no batches on rank {cfg.rank}: {empty}"
                )
            steps = cfg.steps_per_epoch or int(counts.sum())
            choice = (
                rng.choice(len(first), size=steps, p=w / w.sum()) if len(first) > 1 else np.zeros(steps, int)
            )
        items: list[tuple[int, int, np.ndarray]] = []
        cur, cycle, nxt = list(first), [0] * len(first), [0] * len(first)
        for s in choice.tolist():
            if nxt[s] == len(cur[s]):  # this stream ran out: its next pass
                cycle[s] += 1
                cur[s], nxt[s] = self._stream_pass(s, epoch, cycle[s]), 0
            items.append((s, cycle[s], cur[s][nxt[s]]))
            nxt[s] += 1
        self._plan_cache = (epoch, items)
        return items

    def __len__(self) -> int:
        """Batches in the current epoch for this rank (including those already consumed)."""
        return len(self.plan())

    # ---- iteration state --------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (call it before each epoch, as with DistributedSampler)."""
        self._epoch, self._position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands: the epoch and how many of its batches were handed out."""
        cfg = self.config
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "tables": [t.directory for s in self.streams for t in s.tables],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches after ``state['position']``."""
        cfg = self.config
        for key, mine in (("seed", cfg.seed), ("batch_size", cfg.batch_size), ("world_size", cfg.world_size)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    "the batches would differ"
                )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    # ---- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenBatch]:
        cfg = self.config
        plan = self.plan()
        if 0 < len(plan) <= self._position:
            # a state saved after the epoch's last batch, before the loop asked for more (a checkpoint
            # at the end of an epoch): that epoch is over, this iteration is the next one
            self.set_epoch(self._epoch + 1)
            plan = self.plan()
        items = plan[self._position :]
        if cfg.num_workers == 0:
            it: Any = self._reader.run(items)
            if cfg.thread_prefetch > 0:
                it = _background(it, cfg.thread_prefetch)
        else:
            dl = torch.utils.data.DataLoader(
                _PlanDataset(self._reader, items),
                batch_size=None,
                num_workers=cfg.num_workers,
                prefetch_factor=cfg.prefetch_factor,
                pin_memory=False,
            )
            it = iter(dl)
        for batch in it:
            if isinstance(batch, _PipeBatch):
                batch = batch.batch()
            elif isinstance(batch, _Failure):
                raise batch.error
            if cfg.pin_memory:
                batch = batch.pin_memory()
            self._position += 1
            yield batch
            del batch  # not held while the next one is built: its buffers can be reused
        self.set_epoch(self._epoch + 1)


# ---------------------------------------------------------------------------------------------
# Ray Data path (Ray Train)
# ---------------------------------------------------------------------------------------------
def _ray_collate_base() -> type:
    from ray.data.collate_fn import ArrowBatchCollateFn

    return ArrowBatchCollateFn


class _CollateMixin:
    def __init__(self, spec: TableSpec, with_meta: bool = True, pack: int | None = None) -> None:
        self.spec = spec
        self.with_meta = with_meta
        self.pack = pack

    def __call__(self, batch: pa.Table) -> TokenBatch:
        chunk = _Chunk.from_arrow(batch, self.spec)
        rows = np.arange(batch.num_rows)
        return collate([(chunk, rows, None)], self.spec, with_meta=self.with_meta, pack=self.pack)


def collate_fn(table: str | TokenTable | TableSpec, *, with_meta: bool = True, pack: int | None = None):
    """A Ray ``ArrowBatchCollateFn`` turning a pyarrow batch of token-table rows into a TokenBatch
    (packed into rows of at most ``pack`` tokens if given, as ``LoaderConfig.pack``).

    Use as ``ds.iter_torch_batches(batch_size=64, collate_fn=collate_fn(table))``; move the batch to
    the device yourself (``batch.to(device)``), Ray only moves plain tensor batches.
    """
    if not _valid_pack(pack):
        raise ValueError(f"pack must be a number of tokens >= 1, got {pack}")
    spec = table if isinstance(table, TableSpec) else _open(table).spec
    cls = type("TokenBatchCollateFn", (_CollateMixin, _ray_collate_base()), {})
    return cls(spec, with_meta, pack)


def ray_dataset(tables: str | TokenTable | Sequence[str | TokenTable], *, with_meta: bool = True):
    """A ``ray.data.Dataset`` over the shards the manifests list (one modality), for Ray Train.

    Shuffle with ``ds.random_shuffle()`` or ``iter_torch_batches(local_shuffle_buffer_size=...)``;
    length bucketing is not done on this path.
    """
    import ray.data

    if isinstance(tables, (str, os.PathLike, TokenTable)):
        tables = [tables]
    opened = [_open(t) for t in tables]
    mods = sorted({t.modality for t in opened})
    if len(mods) != 1:
        raise ValueError(
            f"ray_dataset reads one modality per dataset, got {mods}; make one dataset per modality"
        )
    for t in opened[1:]:
        if _spec_key(t.spec) != _spec_key(opened[0].spec):
            raise TableError(f"{t.directory}: token spec differs from {opened[0].directory}")
    paths = [p for t in opened for p in t.shard_paths()]
    cols = [c for c in READ_COLUMNS if with_meta or c != "meta"]
    return ray.data.read_parquet(paths).select_columns(cols)
