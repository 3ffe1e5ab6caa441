"""Compiled kernels (numba) for the per-batch and per-clip loops that numpy can only do in many passes.

Each kernel here has a numpy formulation next to its caller (for farthest point sampling, the torch
loop in :mod:`maskloom.geometry`), which is the reference: the tests check that both give the same
bits, and the reference runs when numba is missing (it is a dependency, but a platform without its
wheels still works) or when ``MASKLOOM_JIT=0`` is set.

Kernels are compiled on first use for the argument types they meet (about 0.3-1 s each) and cached on
disk by numba (``cache=True``: next to this file in ``__pycache__``, under ``NUMBA_CACHE_DIR``, in the
user's cache folder, or else in the temporary folder: :func:`_cached_njit`), so
later processes — DataLoader and Ray workers included — load them instead, in about 0.4 s for the
first kernel of a process (``import numba`` and numba's registries, which import ``scipy.linalg``).

Compiled code does not check bounds: the wrappers' docstrings state what callers guarantee (row
starts and lengths within the source, lengths at most the output's L), which the loader and the
filterbank derive from the same offsets. ``NUMBA_BOUNDSCHECK=1`` turns checks on when debugging.

Where numba's loop vectoriser gives up, a kernel's inner loop is LLVM vector code written with
llvmlite (numba intrinsics): the Kaldi filterbank's mel sums (16 frames per multiply-add), its float32
log (Cephes' ``logf`` on 16 lanes, within 0.82 ulp of the exact log where numba calls libm per
element) and its float16 rounding (``fptrunc``, the CPU's conversion where it has one). The numpy
formulation of the filterbank is within float32 rounding of it, not bit for bit (the tests bound
both against ``kaldi.fbank``); its tokens equal normalising the compiled log-mel bit for bit.

Why compiled: a batch of 64 short rows (text ids, series patches, small graphs) is ~10 numpy calls of
1-5 us each when gathered, converted and padded with numpy (window gather, dtype conversion, masked
padding reset per column), about as long as pyarrow takes to decode the same rows. One pass over the
output in a loop does the same in a few microseconds.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

try:  # pragma: no branch - numba is a dependency; the fallback is for platforms without its wheels
    if os.environ.get("MASKLOOM_JIT", "1") == "0":
        raise ImportError("disabled by MASKLOOM_JIT=0")
    import numba
except ImportError:  # pragma: no cover - exercised by MASKLOOM_JIT=0 in the tests
    numba = None

ENABLED = numba is not None
"""Whether the compiled kernels are used (numba importable and ``MASKLOOM_JIT`` not ``0``)."""


NO_CACHE_LOCATOR = "no locator available"
"""Part of numba's RuntimeError when it finds no folder it can write its cache to."""


def _temp_cache_dir() -> str | None:
    """This user's folder for numba's cache in the system's temporary folder (made 0700), or None
    when it cannot be made or written."""
    import tempfile

    folder = os.path.join(
        tempfile.gettempdir(), f"maskloom-numba-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _cached_njit(fn: Any, **options: Any) -> Any:
    """``numba.njit(cache=True, **options)(fn)``, wherever maskloom is installed.

    numba keeps its cache next to this file (``__pycache__``), under ``NUMBA_CACHE_DIR``, or in the
    user's cache folder (``~/.cache/numba``), and raises RuntimeError ("no locator available") at
    import when it can write to none of them: maskloom installed read-only (a container image, a
    cluster's shared software folder) for a user whose home is not writable (containers run as an
    arbitrary user with ``HOME=/``) could not even be imported. Then the cache goes to this user's
    folder in the system's temporary folder (``numba.config.CACHE_DIR``, read when a function is
    decorated), and where even that fails each process compiles its kernels anew (``cache=False``)."""
    compiled = _njit_cached_or_none(fn, options)
    if compiled is None and not numba.config.CACHE_DIR and (folder := _temp_cache_dir()) is not None:
        numba.config.CACHE_DIR = folder
        compiled = _njit_cached_or_none(fn, options)
    return compiled if compiled is not None else numba.njit(cache=False, **options)(fn)


def _njit_cached_or_none(fn: Any, options: dict[str, Any]) -> Any:
    """``numba.njit(cache=True, **options)(fn)``, or None when numba finds no folder for its cache."""
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError as e:
        if NO_CACHE_LOCATOR not in str(e):
            raise
        return None


def _jit(fn: Any, reassociate: bool = False) -> Any:
    """Compile ``fn`` (None without numba). ``reassociate``: let LLVM reorder float sums (the
    ``reassoc``/``contract`` fast-math flags only: no assumption about NaN or inf), which vectorises
    reductions; the result then differs from sequential summation by rounding."""
    if numba is None:
        return None
    flags = {"reassoc", "contract"} if reassociate else False
    return _cached_njit(fn, nogil=True, fastmath=flags)


def _jit_callee(fn: Any) -> Any:
    """:func:`_jit` for a kernel that other kernels call: without numba, ``fn`` itself, so that their
    plain-Python forms can call it."""
    compiled = _jit(fn)
    return fn if compiled is None else compiled


def _copy_pad_py(seg: np.ndarray, row: np.ndarray, fill: Any) -> None:
    """``row[:n] = seg`` and ``row[n:] = fill`` (n = ``len(seg)``), 1-D views: flat loops that LLVM
    vectorises (a loop per token and channel, or indices from an offset, is not: 1.4-2.8x slower)."""
    n = seg.shape[0]
    for j in range(n):
        row[j] = seg[j]
    rest = row[n:]
    for j in range(rest.shape[0]):
        rest[j] = fill


_copy_pad = _cached_njit(_copy_pad_py, nogil=True, inline="always") if numba is not None else None


def _gather_pad_py(
    src: np.ndarray, starts: np.ndarray, lens: np.ndarray, slots: np.ndarray, out: np.ndarray, fill: Any
) -> None:
    """``out[slots[i], :lens[i]] = src[starts[i] : starts[i] + lens[i]]`` and
    ``out[slots[i], lens[i]:] = fill``.

    ``src`` (N, W), ``out`` (B, L, W) with ``lens[i] <= L``, both C-contiguous; values are converted
    to ``out``'s dtype on assignment (int32 ids -> int64). A row's values are contiguous in both, so
    each row is one :func:`_copy_pad_py` of ``lens[i] * W`` values."""
    L = out.shape[1]
    W = out.shape[2]
    flat = src.reshape(-1)
    rows = out.reshape(out.shape[0], L * W)
    for i in range(starts.shape[0]):
        _copy_pad(flat[starts[i] * W : (starts[i] + lens[i]) * W], rows[slots[i]], fill)


_gather_pad = _jit(_gather_pad_py)


def _gather_pad2_py(
    src1: np.ndarray,
    src2: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    out1: np.ndarray,
    out2: np.ndarray,
    pad: np.ndarray,
) -> None:
    """:func:`_gather_pad_py` of two columns with the same row starts (tokens and positions), padded
    with zeros, and the (B, L) padding mask (True = padding): one call instead of three (a call costs
    ~1.5-3 us, as much as the copying). Flat loops over 1-D views (:func:`_copy_pad_py`), as there."""
    L = out1.shape[1]
    W1 = out1.shape[2]
    W2 = out2.shape[2]
    flat1 = src1.reshape(-1)
    flat2 = src2.reshape(-1)
    rows1 = out1.reshape(out1.shape[0], L * W1)
    rows2 = out2.reshape(out2.shape[0], L * W2)
    for b in range(starts.shape[0]):
        s = starts[b]
        n = lens[b]
        _copy_pad(flat1[s * W1 : (s + n) * W1], rows1[b], 0)
        _copy_pad(flat2[s * W2 : (s + n) * W2], rows2[b], 0)
        pb = pad[b]
        for j in range(n):
            pb[j] = False
        rest = pb[n:]
        for j in range(rest.shape[0]):
            rest[j] = True


_gather_pad2 = _jit(_gather_pad2_py)


def _first_fit_py(
    lens: np.ndarray,
    order: np.ndarray,
    limit: int,
    rows: int,
    fill: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
) -> int:
    """First fit of the samples in ``order`` into rows of at most ``limit`` tokens: each goes to the
    first row with room, or a new row. Writes ``row``/``offset`` and the rows' ``fill``; returns the
    rows used, or ``rows + 1`` as soon as more than ``rows`` are needed."""
    used = 0
    for i in order:
        need = lens[i]
        j = 0
        while j < used and fill[j] + need > limit:
            j += 1
        if j == used:
            if used == rows:
                return rows + 1
            fill[used] = 0
            used += 1
        row[i] = j
        offset[i] = fill[j]
        fill[j] += need
    return used


_first_fit = _jit_callee(_first_fit_py)


def _fits_py(
    lens: np.ndarray,
    order: np.ndarray,
    limit: int,
    rows: int,
    fill: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
    memo: np.ndarray,
) -> bool:
    """Whether first-fit decreasing at row limit ``limit`` needs at most ``rows`` rows, remembered in
    ``memo`` (3, cap + 1) for the other candidates of a packing, which probe many of the same limits:
    ``memo[0, limit]`` the rows it needs (-1: not known), ``memo[1, limit]`` its fullest row,
    ``memo[2, limit]`` the most rows it is known not to fit in (0: none)."""
    used = memo[0, limit]
    if used >= 0:
        return used <= rows
    if memo[2, limit] >= rows:
        return False
    used = _first_fit(lens, order, limit, rows, fill, row, offset)
    if used > rows:  # stopped early: it needs more than ``rows``
        memo[2, limit] = max(memo[2, limit], rows)
        return False
    fullest = 0
    for q in range(used):
        fullest = max(fullest, fill[q])
    memo[0, limit] = used
    memo[1, limit] = fullest
    return True


_fits = _jit_callee(_fits_py)


def _fit_slots_py(
    lens: np.ndarray,
    order: np.ndarray,
    rows: int,
    lo: int,
    cap: int,
    fill: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
    memo: np.ndarray,
) -> tuple[int, int]:
    """(slots = rows used x fullest row, limit) of first-fit decreasing into at most ``rows`` rows
    at the smallest limit in ``lo..cap`` that fits (bisection), or (-1, cap) if none does."""
    hi = cap
    if not _fits(lens, order, hi, rows, fill, row, offset, memo):
        return -1, cap
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(lens, order, mid, rows, fill, row, offset, memo):
            hi = mid
        else:
            lo = mid + 1
    return memo[0, hi] * memo[1, hi], hi


_fit_slots = _jit_callee(_fit_slots_py)


def pack_rows_py(
    lens: np.ndarray, order: np.ndarray, r_lo: int, r_hi: int, cap: int, row: np.ndarray, offset: np.ndarray
) -> int:
    """The packing of :func:`maskloom.batch.pack_plan` (plain Python, compiled by numba when there).

    Candidate row counts R: the ``r_hi - r_lo + 1`` counts from the rows first-fit decreasing
    (``order``: longest first) needs at ``cap`` (at least ``r_lo``), and ``ceil(N / k)`` for every k
    samples per row that needs more rows (batches of similar lengths pack best k to a row). For
    each, the smallest row limit from ``max(ceil(total / R), longest)`` to ``cap`` at which
    first-fit decreasing needs at most R rows (bisection); the fit with the fewest slots, rows x
    fullest row, wins (the first tried among equals), unless rows no longer than the longest sample
    have fewer slots (so a packed batch never pads more than the unpacked one). Writes its
    ``row``/``offset``; returns its rows.

    Two shortcuts leave the result as it is: a candidate whose fewest possible slots cannot beat the
    best fit so far is skipped (a perfect fit, slots == total, ends the search), and first-fit's
    answer at each limit is remembered across candidates (:func:`_fits_py`). On bucketed batches of
    64 SMS messages they took the packing from ~47 to ~23 us."""
    n = lens.shape[0]
    total = 0
    longest = 0
    for i in range(n):
        total += lens[i]
        longest = max(longest, lens[i])
    fill = np.zeros(n, np.int64)
    memo = np.zeros((3, cap + 1), np.int64)
    memo[0] = -1
    # fewer rows than first-fit decreasing needs at the full limit do not fit: start there
    _fits(lens, order, cap, n, fill, row, offset, memo)  # n rows always do (cap >= longest)
    first = max(r_lo, memo[0, cap])
    last = min(n, first + (r_hi - r_lo))
    # candidates: (rows, lowest limit, highest limit); the last one, rows as long as the longest
    # sample (no longer than the unpacked batch), always fits, so packing never has more slots
    candidates = [(r, max((total + r - 1) // r, longest), cap) for r in range(first, last + 1)]
    for k in range(n // first, 0, -1):  # k samples to a row
        r = (n + k - 1) // k
        if r > last:
            candidates.append((r, max((total + r - 1) // r, longest), cap))
    candidates.append((n, longest, longest))
    best_cost = -1
    best_limit = cap
    for r, lo, hi in candidates:
        # a fit into at most r rows has fullest row >= lo (the longest sample, total / r) and uses
        # >= total / hi rows, so at least this many slots: skip it if that cannot beat the best
        if best_cost >= 0 and max(total, lo * ((total + hi - 1) // hi)) >= best_cost:
            continue
        cost, limit = _fit_slots(lens, order, r, lo, hi, fill, row, offset, memo)
        if cost >= 0 and (best_cost < 0 or cost < best_cost):
            best_cost, best_limit = cost, limit
    return _first_fit(lens, order, best_limit, n, fill, row, offset)


_pack_rows = _jit_callee(pack_rows_py)


def _pack_plan_py(
    lens: np.ndarray, row_tokens: int, choices: int, row: np.ndarray, offset: np.ndarray
) -> int:
    """:func:`maskloom.batch.pack_plan` in one compiled call: the order (longest first, stable), the
    row limit and the row counts to try, then :func:`pack_rows_py`. Needs at least one sample."""
    n = lens.shape[0]
    order = np.argsort(-lens, kind="mergesort")
    cap = max(row_tokens, lens.max())
    r_lo = max(1, (lens.sum() + cap - 1) // cap)
    return _pack_rows(lens, order, r_lo, min(n, r_lo + choices - 1), cap, row, offset)


_pack_plan = _jit(_pack_plan_py)


def pack_plan(lens: np.ndarray, row_tokens: int, choices: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row (N,), offset (N,), R) of :func:`_pack_plan_py`, compiled when numba is there."""
    lens = np.ascontiguousarray(lens, np.int64)
    row = np.empty(lens.size, np.int64)
    offset = np.empty(lens.size, np.int64)
    fn = _pack_plan if ENABLED else _pack_plan_py
    return row, offset, int(fn(lens, int(row_tokens), int(choices), row, offset))


def pack_rows(
    lens: np.ndarray, order: np.ndarray, r_lo: int, r_hi: int, cap: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(row (N,), offset (N,), R) of :func:`pack_rows_py`, compiled when numba is there. Needs
    ``1 <= r_lo <= r_hi`` and ``cap`` >= the longest length."""
    lens = np.ascontiguousarray(lens, np.int64)
    order = np.ascontiguousarray(order, np.int64)
    row = np.empty(lens.size, np.int64)
    offset = np.empty(lens.size, np.int64)
    fn = _pack_rows if ENABLED else pack_rows_py
    r = fn(lens, order, int(r_lo), int(r_hi), int(cap), row, offset)
    return row, offset, int(r)


def _pack_columns_py(
    tok: np.ndarray,
    pos: np.ndarray,
    lens: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
    tok_out: np.ndarray,
    pos_out: np.ndarray,
    pad_out: np.ndarray,
    seg_out: np.ndarray,
) -> None:
    """Sample i's first ``lens[i]`` tokens and positions (``tok`` (N, Lb, Dt), ``pos`` (N, Lb, Dp))
    to row ``row[i]`` from slot ``offset[i]`` of ``tok_out`` (R, L, Dt) and ``pos_out`` (R, L, Dp),
    with ``pad_out`` False and ``seg_out`` i there. The outputs come filled (0, True, -1); slots stay
    within L (the packing's fullest row). Flat loops over 1-D views, as :func:`_gather_pad_py`."""
    dt = tok.shape[2]
    dp = pos.shape[2]
    tin = tok.reshape(tok.shape[0], -1)
    pin = pos.reshape(pos.shape[0], -1)
    tout = tok_out.reshape(tok_out.shape[0], -1)
    pout = pos_out.reshape(pos_out.shape[0], -1)
    for i in range(lens.shape[0]):
        r = row[i]
        o = offset[i]
        n = lens[i]
        src = tin[i]
        dst = tout[r, o * dt : (o + n) * dt]
        for j in range(n * dt):
            dst[j] = src[j]
        src = pin[i]
        dst2 = pout[r, o * dp : (o + n) * dp]
        for j in range(n * dp):
            dst2[j] = src[j]
        for j in range(o, o + n):
            pad_out[r, j] = False
            seg_out[r, j] = i


_pack_columns = _jit(_pack_columns_py)


def _pack_edges_py(
    edges: np.ndarray, counts: np.ndarray, row: np.ndarray, offset: np.ndarray, out: np.ndarray
) -> None:
    """Sample i's first ``counts[i]`` edges (``edges`` (N, E, 2)), shifted by ``offset[i]``, to row
    ``row[i]`` of ``out`` (R, E', 2, filled with -1), after the edges of the row's earlier samples
    (in sample order)."""
    fill = np.zeros(out.shape[0], np.int64)
    for i in range(counts.shape[0]):
        r = row[i]
        s = fill[r]
        o = offset[i]
        for k in range(counts[i]):
            out[r, s + k, 0] = edges[i, k, 0] + o
            out[r, s + k, 1] = edges[i, k, 1] + o
        fill[r] = s + counts[i]


pack_edges = _jit(_pack_edges_py)
"""Compiled :func:`_pack_edges_py` (None without numba)."""


def _gather_pack_py(
    src1: np.ndarray,
    src2: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    first: int,
    row: np.ndarray,
    offset: np.ndarray,
    out1: np.ndarray,
    out2: np.ndarray,
    pad_out: np.ndarray,
    seg_out: np.ndarray,
) -> None:
    """Rows of a decoded chunk straight into packed rows (:func:`_pack_columns_py` without the padded
    batch in between): sample ``b = first + i`` of the batch is ``src1[starts[i] : starts[i] +
    lens[i]]`` (src1 (T, W1)) and the same rows of ``src2`` (T, W2); it goes to row ``row[b]`` from
    slot ``offset[b]`` of ``out1`` (R, L, W1) and ``out2`` (R, L, W2), with ``pad_out`` False and
    ``seg_out`` b there. The outputs come filled (0, True, -1). Values are converted to the outputs'
    dtypes (int32 ids -> int64). Flat loops over 1-D views, as :func:`_gather_pad2_py`."""
    W1 = out1.shape[2]
    W2 = out2.shape[2]
    flat1 = src1.reshape(-1)
    flat2 = src2.reshape(-1)
    rows1 = out1.reshape(out1.shape[0], out1.shape[1] * W1)
    rows2 = out2.reshape(out2.shape[0], out2.shape[1] * W2)
    for i in range(starts.shape[0]):
        b = first + i
        r = row[b]
        o = offset[b]
        s = starts[i]
        n = lens[i]
        d1 = rows1[r, o * W1 : (o + n) * W1]
        v1 = flat1[s * W1 : (s + n) * W1]
        for j in range(n * W1):
            d1[j] = v1[j]
        d2 = rows2[r, o * W2 : (o + n) * W2]
        v2 = flat2[s * W2 : (s + n) * W2]
        for j in range(n * W2):
            d2[j] = v2[j]
        pr = pad_out[r, o : o + n]
        sr = seg_out[r, o : o + n]
        for j in range(n):
            pr[j] = False
            sr[j] = b


_gather_pack = _jit(_gather_pack_py)


def _gather_pack_edges_py(
    edges: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    first: int,
    row: np.ndarray,
    offset: np.ndarray,
    base: np.ndarray,
    out: np.ndarray,
) -> None:
    """The edges of chunk rows straight into packed rows (:func:`_pack_edges_py` from a chunk):
    sample ``b = first + i``'s ``counts[i]`` edges ``edges[starts[i]:]`` (E, 2), shifted by
    ``offset[b]``, go to row ``row[b]`` of ``out`` (R, E', 2, filled with -1) from slot ``base[b]``
    (:func:`_row_bases_py`)."""
    flat = edges.reshape(-1)
    rows = out.reshape(out.shape[0], out.shape[1] * 2)
    for i in range(starts.shape[0]):
        b = first + i
        o = offset[b]
        m = 2 * counts[i]
        src = flat[2 * starts[i] : 2 * starts[i] + m]
        dst = rows[row[b], 2 * base[b] : 2 * base[b] + m]
        for k in range(m):  # flat 1-D views, as _gather_pad2_py: vectorised
            dst[k] = src[k] + o


gather_pack_edges = _jit(_gather_pack_edges_py)
"""Compiled :func:`_gather_pack_edges_py` (None without numba)."""


def _row_bases_py(row: np.ndarray, counts: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(base (N,), fill (rows,)): sample b's values start at ``base[b]`` in its row ``row[b]``, after
    those of the row's earlier samples (in sample order); ``fill``: each row's total."""
    fill = np.zeros(rows, np.int64)
    base = np.empty(row.shape[0], np.int64)
    for b in range(row.shape[0]):
        base[b] = fill[row[b]]
        fill[row[b]] += counts[b]
    return base, fill


_row_bases = _jit(_row_bases_py)


def gather_pack(
    src1: np.ndarray,
    src2: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    first: int,
    row: np.ndarray,
    offset: np.ndarray,
    out1: np.ndarray,
    out2: np.ndarray,
    pad_out: np.ndarray,
    seg_out: np.ndarray,
) -> None:
    """Compiled :func:`_gather_pack_py` (needs numba); float16 columns are copied as their bits."""
    src1, out1 = _as_bits(src1, out1)
    src2, out2 = _as_bits(src2, out2)
    _gather_pack(src1, src2, starts, lens, first, row, offset, out1, out2, pad_out, seg_out)


def row_bases(row: np.ndarray, counts: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_row_bases_py`, compiled when numba is there."""
    fn = _row_bases if ENABLED else _row_bases_py
    return fn(row, np.ascontiguousarray(counts, np.int64), int(rows))


def pack_columns(
    tok: np.ndarray,
    pos: np.ndarray,
    lens: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
    tok_out: np.ndarray,
    pos_out: np.ndarray,
    pad_out: np.ndarray,
    seg_out: np.ndarray,
) -> None:
    """Compiled :func:`_pack_columns_py` (needs numba); ``tok`` (N, Lb) ids are taken as (N, Lb, 1)
    and float16 columns are copied as their bits."""
    if tok.ndim == 2:
        tok, tok_out = tok[..., None], tok_out[..., None]
    tok, tok_out = _as_bits(tok, tok_out)
    pos, pos_out = _as_bits(pos, pos_out)
    _pack_columns(tok, pos, lens, row, offset, tok_out, pos_out, pad_out, seg_out)


_BITS = {np.dtype(np.float16): np.dtype(np.uint16)}
"""dtypes numba does not compute with on CPU, copied as integers of the same width (same bits)."""


def _as_bits(src: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = _BITS.get(out.dtype)
    if bits is None:
        return src, out
    if src.dtype != out.dtype:
        raise TypeError(f"gather_pad: {src.dtype} into {out.dtype} needs a conversion numba lacks")
    return src.view(bits), out.view(bits)


def gather_pad(
    src: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    out: np.ndarray,
    fill: Any,
    slots: np.ndarray | slice | None = None,
) -> np.ndarray:
    """Write the rows ``src[starts[i] : starts[i] + lens[i]]`` of ``src`` (N, *W), padded with ``fill``,
    to ``out[slots[i]]`` of ``out`` (B, L, *W); return ``out``. ``slots``: batch rows (an index array
    or a slice; None: all, in order). Values are converted to ``out``'s dtype (int32 ids -> int64);
    float16 is moved as its bits (numba has no CPU float16), so it must be float16 on both sides.
    Needs :data:`ENABLED`."""
    src, view = _as_bits(src, out)
    try:  # the fill's bits when moved as bits
        fill = _fill_bits(fill, out.dtype, view.dtype)
    except TypeError:  # an unhashable fill (an array)
        fill = _fill_bits.__wrapped__(fill, out.dtype, view.dtype)
    if slots is None:
        slots = _arange(starts.shape[0])
    elif isinstance(slots, slice):
        slots = _arange(out.shape[0])[slots]
    if out.ndim != 3 or src.ndim != 2:  # explicit widths: a reshape to -1 fails on empty arrays
        w = math.prod(out.shape[2:])
        src, view = src.reshape(src.shape[0], w), view.reshape(*out.shape[:2], w)
    _gather_pad(src, starts, lens, slots, view, fill)
    return out


@functools.lru_cache(maxsize=64)
def _fill_bits(fill: Any, dtype: np.dtype, bits: np.dtype) -> Any:
    return np.asarray(fill, dtype).view(bits)[()]


@functools.lru_cache(maxsize=64)
def _arange(n: int) -> np.ndarray:
    return np.arange(n)


def gather_pad2(
    src1: np.ndarray,
    src2: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    out1: np.ndarray,
    out2: np.ndarray,
    pad: np.ndarray,
) -> None:
    """:func:`gather_pad` of two columns (N, W1), (N, W2) with the same row starts into (B, L, W1) and
    (B, L, W2), zero-padded, in one pass; ``pad`` (B, L) bool gets the padding mask."""
    src1, out1 = _as_bits(src1, out1)
    src2, out2 = _as_bits(src2, out2)
    _gather_pad2(src1, src2, starts, lens, out1, out2, pad)


# ---- Kaldi filterbank (maskloom.tokenizers.audio.KaldiFbank) ------------------------------------
MEL_LANES = 16
"""Frames computed together: one 16-float vector (an AVX-512 register or two AVX ones) holds a filter's
value in 16 frames; the filter outputs are also written in groups of 16 (a 16 x 16 patch)."""


def _cpu_has_f16c() -> bool:
    """Whether numba compiles for a CPU that converts float32 to float16 in hardware (x86 F16C,
    every 64-bit ARM). Without it LLVM would call a compiler-runtime function numba may not link."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False  # a generic or chosen target (portable caches): keep the integer conversion
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - an llvmlite without the query
        return False


def _fbank_frames_py(s: np.ndarray, window: np.ndarray, shift: int, pre: Any, buf: np.ndarray) -> None:
    """Kaldi's framing into ``buf`` (T, fft_size), zero-padded past the window: frame t is
    ``x = s[t * shift : t * shift + W]`` minus its mean m (``remove_dc_offset``), pre-emphasised
    (``x[j] - pre * x[j - 1]``; ``x[0] - pre * x[0]``) and multiplied by ``window`` (W,), in float32.
    The pre-emphasis of the mean-free frame is computed as ``s[j] - pre * s[j - 1] - (1 - pre) m``
    (one pass, vectorised); 1-D row views let LLVM vectorise (2-D indexing does not: 8x slower)."""
    w = window.shape[0]
    one = np.float32(1.0)
    for t in range(buf.shape[0]):
        fr = s[t * shift : t * shift + w]
        acc = np.float32(0.0)
        for j in range(w):
            acc += fr[j]
        m = acc / np.float32(w)
        c = m * (one - pre)
        row = buf[t]
        row[0] = (fr[0] - m) * (one - pre) * window[0]
        for j in range(1, w):
            row[j] = (fr[j] - pre * fr[j - 1] - c) * window[j]
        row[w:] = 0


_fbank_frames = _jit(_fbank_frames_py, reassociate=True)


def _fbank_log_mel_py(
    spec: np.ndarray,
    lo: np.ndarray,
    width: np.ndarray,
    start: np.ndarray,
    weights: np.ndarray,
    kp: int,
    floor: Any,
    mel: np.ndarray,
) -> None:
    """The log-mel filterbank of an rFFT: ``spec`` (T, 2 * bins) float32 (re, im interleaved) ->
    ``mel`` (Tp, Fp) with ``mel[t, f] = log(max(sum_k w[f, k] (re_k^2 + im_k^2), floor))``, Tp = T
    rounded up to :data:`MEL_LANES`. The filters are :class:`MelTables` (``lo``, ``width``,
    ``start``, ``weights``; kp their ``span``, ``2 kp <= 2 * bins``); :func:`_mel_log` computes 16
    frames at a time. Rows T..Tp-1 of ``mel`` get log(floor)."""
    T, rs = spec.shape
    pt = np.empty((kp, MEL_LANES), np.float32)
    _mel_log(
        spec, rs, T, kp, mel.shape[0], pt, lo, width, start, weights, width.shape[0], floor, mel, mel.shape[1]
    )


def _frames_fft_py(
    s: np.ndarray,
    window: np.ndarray,
    shift: int,
    pre: Any,
    fft: int,
    plan: int,
    buf: np.ndarray,
    spec: np.ndarray,
) -> int:
    """:func:`_fbank_frames_py` into ``buf``, then MKL's ``DftiComputeForward`` (at address ``fft``,
    with the committed descriptor ``plan`` for ``buf.shape[0]`` rows) from ``buf`` into ``spec``.
    Returns the FFT's status (0: done)."""
    _fbank_frames(s, window, shift, pre, buf)
    return _call_ptr3(fft, plan, buf, spec)


def _fbank_tokens_py(
    cf: np.ndarray,
    ci: np.ndarray,
    s: np.ndarray,
    plan: int,
    mean: Any,
    scale: Any,
    frames: int,
    pad: Any,
    out: np.ndarray,
) -> tuple[int, bool]:
    """:func:`_frames_fft_py`, then :func:`_mel_tokens` (the power spectrum and log-mel sums straight to
    normalised float16 16 x 16 tokens) and the padding: waveform to tokens in one call (see
    :class:`FbankTokens`). The constants come packed in two arrays, ``cf`` float32 and ``ci`` int64
    (:meth:`FbankTokens.pack`: numba's dispatcher checks the type of every argument on every call,
    ~40 ns each; 9 arguments instead of 19 save ~0.35 us a call). The scratch arrays are made here
    (numba's allocator: ~50 ns each, numpy's ~400 ns). Returns the FFT's status and whether the real
    frames' tokens are finite."""
    shift, fft, n, kp, nwin, nwt, groups = ci[0], ci[1], ci[2], ci[3], ci[4], ci[5], ci[6]
    lo = ci[7 : 7 + 16 * groups]
    width = ci[7 + 16 * groups : 7 + 17 * groups]
    start = ci[7 + 17 * groups : 7 + 18 * groups]
    window = cf[:nwin]
    weights = cf[nwin : nwin + nwt]
    pre, floor = cf[nwin + nwt], cf[nwin + nwt + 1]
    tp = (frames + MEL_LANES - 1) // MEL_LANES * MEL_LANES  # kp: 2 kp <= n + 2 (FbankTokens checks)
    buf = np.empty((frames, n), np.float32)
    spec = np.empty((frames, n + 2), np.float32)
    pt = np.empty((kp, MEL_LANES), np.float32)
    flag = np.empty(MEL_LANES, np.uint16)
    status = _frames_fft(s, window, shift, pre, fft, plan, buf, spec)
    if status != 0:
        return status, False
    _mel_tokens(
        spec, n + 2, frames, kp, tp, pt, lo, width, start, weights, groups, floor, out, 0, mean, scale,
        frames, flag,
    )  # fmt: skip
    finite = True
    for i in range(MEL_LANES):
        finite = finite and flag[i] != 0x7C00
    # padding: the rest of the last row of patches, then the rows after it
    for t in range(frames, (frames + 15) // 16 * 16):
        for g in range(groups):
            row = out[(t // 16) * groups + g]
            for j in range(16):
                row[(t % 16) * 16 + j] = pad
    rest = out.reshape(-1)[(frames + 15) // 16 * groups * 256 :]
    for i in range(rest.shape[0]):  # over a view: a loop from an offset is not vectorised (8x slower)
        rest[i] = pad
    return status, finite


class MelTables:
    """The mel filters as :func:`_fbank_log_mel_py` reads them (see :func:`mel_tables`)."""

    __slots__ = ("arrays", "bins", "span", "filters")

    def __init__(
        self, lo: np.ndarray, width: np.ndarray, start: np.ndarray, weights: np.ndarray, filters: int
    ) -> None:
        self.arrays = (lo, width, start, weights)
        # power spectrum bins computed: the bins any filter reads
        self.bins = max(int((lo.reshape(-1, MEL_LANES) + width[:, None]).max(initial=0)), 1)
        # the bins the kernels compute: ``bins`` in whole 16s (they read the spectrum 16 bins at a time)
        self.span = -(-self.bins // MEL_LANES) * MEL_LANES
        self.filters = filters


def mel_tables(banks: np.ndarray) -> MelTables:
    """The :class:`MelTables` of a dense (F, bins) filter matrix: filters in groups of
    :data:`MEL_LANES` (the last padded with zero filters); the filters of group g read ``width[g]``
    consecutive bins each (the widest support in the group: the loop count is the same for the 16),
    filter f the bins ``lo[f] ..`` with the weights ``weights[start[g] + (f % 16) * width[g] ..]``
    (zeros outside its support; Kaldi's 128 filters: 592 weights where the dense (128, 256) matrix
    has 504 non-zeros, and 268 rows of 16 in a bin-by-bin layout). Every bin read is a real bin
    (``lo`` is moved left where a support ends near the last one); a filter without any bin reads
    zeros (its value is the floor)."""
    F, bins = banks.shape
    groups = -(-F // MEL_LANES)
    padded = np.zeros((groups * MEL_LANES, bins), np.float32)
    padded[:F] = banks
    nz = padded != 0
    has = nz.any(axis=1)
    first = np.where(has, nz.argmax(axis=1), 0)
    last = np.where(has, bins - nz[:, ::-1].argmax(axis=1), 0)  # one past the last non-zero
    width = (last - first).reshape(groups, MEL_LANES).max(axis=1).astype(np.int64)
    lo = np.minimum(first, bins - np.repeat(width, MEL_LANES)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(width * MEL_LANES)[:-1]]).astype(np.int64)
    weights = np.zeros(int((width * MEL_LANES).sum()) + 1, np.float32)  # + 1: never empty
    for f in range(groups * MEL_LANES):
        g = f // MEL_LANES
        w = int(width[g])
        o = int(start[g]) + (f % MEL_LANES) * w
        weights[o : o + w] = padded[f, lo[f] : lo[f] + w]
    return MelTables(lo, width, start, weights, F)


def fbank_frames(s: np.ndarray, window: np.ndarray, shift: int, pre: float, buf: np.ndarray) -> np.ndarray:
    """:func:`_fbank_frames_py` (compiled): ``s`` (N,) and ``window`` (W,) float32, ``buf`` (T, fft)
    float32 with ``(T - 1) * shift + W <= N``; returns ``buf``."""
    _fbank_frames(s, window, shift, np.float32(pre), buf)
    return buf


def mel_shape(frames: int, filters: int) -> tuple[int, int]:
    """The (Tp, Fp) ``mel`` buffer of :func:`fbank_log_mel` for ``frames`` frames of ``filters``
    filters (both rounded up to :data:`MEL_LANES`)."""
    return -(-frames // MEL_LANES) * MEL_LANES, -(-filters // MEL_LANES) * MEL_LANES


def fbank_log_mel(spec: np.ndarray, tables: MelTables, floor: float, mel: np.ndarray) -> np.ndarray:
    """:func:`_fbank_log_mel_py` (compiled): ``spec`` (T, 2 * bins) float32 C-contiguous with
    ``bins`` > ``tables.bins``; ``mel`` (Tp, Fp) float32 C-contiguous as :func:`mel_shape`; returns
    ``mel``."""
    if spec.shape[1] < 2 * tables.span:  # a small FFT: zero bins up to a whole 16
        spec = np.pad(spec, ((0, 0), (0, 2 * tables.span - spec.shape[1])))
    _fbank_log_mel(spec, *tables.arrays, tables.span, np.float32(floor), mel)
    return mel


def fbank(
    s: np.ndarray,
    window: np.ndarray,
    shift: int,
    pre: float,
    fft: Any,
    frames: int,
    tables: MelTables,
    floor: float,
) -> np.ndarray:
    """Framing and MKL's FFT in one compiled call (:func:`_frames_fft_py`), then
    :func:`fbank_log_mel`: the log-mel filterbank of the first ``frames`` frames; ``fft`` a
    :class:`maskloom._mkl_fft.RealFFT`, ``s`` (N,) float32 C-contiguous with ``(frames - 1) * shift +
    len(window) <= N``. Returns the (Tp, Fp) :func:`mel_shape` array whose first (frames, F) part is
    the log-mel filterbank."""
    plan = fft._plan(frames)  # held until the transform returns
    buf = np.empty((frames, fft.n), np.float32)
    spec = np.empty((frames, 2 * fft.bins), np.float32)
    _fft_check(_frames_fft(s, window, shift, np.float32(pre), fft.address, plan.handle.value, buf, spec))
    return fbank_log_mel(spec, tables, floor, np.empty(mel_shape(frames, tables.filters), np.float32))


def _fft_check(status: int) -> None:
    """Raise MKL's message for a failed transform (status != 0)."""
    if status:
        from . import _mkl_fft

        _mkl_fft._check(status, "compute")


class FbankTokens:
    """:func:`fbank` straight to tokens, with the constant arguments bound once (a call then costs
    the kernel and ~2 us, where binding them per call cost ~1 us more). ``fft`` a
    :class:`maskloom._mkl_fft.RealFFT`; ``window``, ``shift``, ``pre``, ``tables``, ``floor`` as
    :func:`fbank`. Needs :data:`FUSED_TOKENS` and F a multiple of 16 (16 x 16 patches; other shapes
    go through :func:`fbank` and :func:`norm_tokens`)."""

    __slots__ = ("consts", "fft", "window", "shift")

    def __init__(
        self, window: np.ndarray, shift: int, pre: float, fft: Any, tables: MelTables, floor: float
    ) -> None:
        if not self.fits(tables, fft.n):
            raise ValueError(
                f"FbankTokens: filters reading {tables.bins} bins need an FFT of more than {fft.n} points"
            )
        self.fft = fft
        self._bind(self.pack(window, shift, pre, fft, tables, floor))

    @staticmethod
    def fits(tables: MelTables, n: int) -> bool:
        """Whether filters ``tables`` fit an FFT of ``n`` points: the kernel reads the spectrum 16 bins
        at a time (``tables.span``) from rows of ``n // 2 + 1`` (re, im) bins."""
        return 2 * tables.span <= n + 2

    @staticmethod
    def pack(
        window: np.ndarray, shift: int, pre: float, fft: Any, tables: MelTables, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The constants of :func:`_fbank_tokens_py` as two arrays: ``cf`` float32 = window, mel
        weights, pre-emphasis, floor; ``ci`` int64 = shift, MKL's address, FFT size, the bins computed
        (``tables.span``), the lengths of the window and the weights, the filter groups, then ``lo``,
        ``width``, ``start``."""
        lo, width, start, weights = tables.arrays
        cf = np.concatenate([window, weights, np.array([pre, floor])]).astype(np.float32)
        head = [
            int(shift),
            fft.address,
            fft.n,
            tables.span,
            window.shape[0],
            weights.shape[0],
            width.shape[0],
        ]
        ci = np.concatenate([np.array(head, np.int64), lo, width, start]).astype(np.int64)
        return cf, ci

    def _bind(self, consts: tuple[np.ndarray, np.ndarray]) -> None:
        self.consts = consts
        self.window = int(consts[1][4])
        """Samples per frame: a waveform needs at least this many."""
        self.shift = int(consts[1][0])
        """Samples between frames."""

    def __getstate__(self) -> tuple[Any, ...]:  # MKL's address is the process's own
        return self.fft, self.consts

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fft, (cf, ci) = state
        ci = ci.copy()
        ci[1] = self.fft.address  # rebound in this process
        self._bind((cf, ci))

    def __call__(
        self, s: np.ndarray, frames: int, mean: np.float32, scale: np.float32, pad: np.uint16, out: np.ndarray
    ) -> bool:
        """``out`` (rows * F // 16, 256) uint16 (float16 bits, C-contiguous, rows >= ceil(frames / 16))
        gets ``(log-mel - mean) / scale`` of frame t, filters 16 b .. 16 b + 15, as row ``t % 16`` of
        patch ``(t // 16) * (F // 16) + b``, for t < ``frames``, and ``pad`` (float16 bits) in every
        row after; ``s`` (N,) float32 C-contiguous with ``(frames - 1) * shift + len(window) <= N``;
        ``mean`` and ``scale`` float32. Returns whether every value computed is finite (the padding is
        the caller's)."""
        cf, ci = self.consts
        status, finite = _fbank_tokens(cf, ci, s, self.fft.handle(frames), mean, scale, frames, pad, out)
        if status:
            _fft_check(status)
        return finite


def _norm_tokens_py(
    fb: np.ndarray,
    F: int,
    frames: int,
    mean: Any,
    scale: Any,
    pad: Any,
    p: int,
    out: np.ndarray,
    half: np.ndarray,
) -> bool:
    """Normalise the first F columns of a (T, Fp) float32 filterbank into float16 tokens in the
    (rows, F // p, p * p) patch layout, ``rows = ceil(frames / p)``, in two passes: ``half``
    (>= frames * F,) uint16 gets the float16 bits of ``(fb[t, f] - mean) / scale`` for ``t < frames``
    (float32 arithmetic as numpy's, no fast-math: the same bits as ``torch.Tensor.to(float16)`` of
    numpy's result), contiguous so that the loop vectorises; then ``out`` (float16 viewed as uint16)
    gets them at ``[t // p, f // p, (t % p) * p + f % p]``, and ``pad`` (float16 bits) for the frames
    from ``frames`` to ``rows * p``. Runs of p moved as 64-bit words when p is a multiple of 4 (a loop
    over p bits is not vectorised: 3x slower). Returns whether every value written for the real
    frames is finite (an exponent of all ones is inf or NaN), found in the first pass: a record's
    validation then need not read its tokens again."""
    Fp = fb.shape[1]
    nb = F // p
    pp = p * p
    high = np.int32(0)  # the largest exponent field seen
    if Fp == F:  # one flat loop
        src = fb.reshape(-1)
        for i in range(frames * F):
            h = _half((src[i] - mean) / scale)
            high = max(high, h & 0x7C00)
            half[i] = h
    else:
        for t in range(frames):
            row = fb[t]
            o = t * F
            for i in range(F):
                h = _half((row[i] - mean) / scale)
                high = max(high, h & 0x7C00)
                half[o + i] = h
    if p % 4 == 0:
        q = p // 4
        h64 = half[: frames * F].view(np.uint64)
        o64 = out.reshape(-1).view(np.uint64)
        for t in range(frames):
            d0 = ((t // p) * nb * pp + (t % p) * p) // 4
            s0 = t * F // 4
            for b in range(nb):
                for j in range(q):
                    o64[d0 + b * (pp // 4) + j] = h64[s0 + b * q + j]
    else:
        flat = out.reshape(-1)
        for t in range(frames):
            d0 = (t // p) * nb * pp + (t % p) * p
            for b in range(nb):
                d = d0 + b * pp
                s = t * F + b * p
                for j in range(p):
                    flat[d + j] = half[s + j]
    flat = out.reshape(-1)
    for t in range(frames, (frames + p - 1) // p * p):  # the padded frames of the last row
        d0 = (t // p) * nb * pp + (t % p) * p
        for b in range(nb):
            for j in range(p):
                flat[d0 + b * pp + j] = pad
    return high != 0x7C00


def norm_tokens(
    fb: np.ndarray,
    frames: int,
    mean: float,
    scale: float,
    pad: np.uint16,
    p: int,
    out: np.ndarray,
    F: int = -1,
) -> bool:
    """:func:`_norm_tokens_py` (compiled): ``fb`` (T, Fp) float32 C-contiguous with ``frames <= T``,
    of which the first ``F`` columns (default all) are used, F a multiple of ``p``; ``out``
    (>= rows, F // p, p * p) uint16 (float16 bits) C-contiguous; ``pad`` the float16 bits of a padded
    frame. Rows of ``out`` past ``rows`` are left as they are (numpy fills a run of padding rows
    faster). Returns whether the real frames' tokens are all finite (the padding is the caller's)."""
    F = fb.shape[1] if F < 0 else F
    half = np.empty(frames * F + 4, np.uint16)  # + 4: a 64-bit view of any multiple-of-4 prefix
    return bool(_norm_tokens(fb, F, frames, np.float32(mean), np.float32(scale), pad, p, out, half))


if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    _F32 = _ir.FloatType()
    _I32 = _ir.IntType(32)
    _I64 = _ir.IntType(64)
    _VEC = _ir.VectorType(_F32, MEL_LANES)

    def _ptr(context: Any, builder: Any, ty: Any, value: Any, elem: Any) -> Any:
        """A pointer to ``elem`` at an array argument's data. Intrinsics take the arrays themselves:
        numba frees an array after its last use, and an address taken with ``.ctypes.data`` would be
        its last use (a use-after-free that showed in threads, whose malloc arenas unmap freed memory
        sooner)."""
        data = context.make_array(ty)(context, builder, value).data
        return builder.bitcast(data, elem.as_pointer())

    @_intrinsic
    def _f32_bits(typingctx: Any, x: Any) -> Any:
        """The bits of a float32 as an int32 (an LLVM bitcast: free, and vectorisable)."""
        if isinstance(x, _types.Float) and x.bitwidth == 32:

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.bitcast(args[0], _ir.IntType(32))

            return _types.int32(x), codegen
        return None

    @functools.partial(_cached_njit, nogil=True, inline="always")
    def _to_half(v: Any) -> Any:
        """float32 -> the bits of the nearest float16 (round to nearest even), as an int32 in
        0..65535: IEEE conversion, the same bits as torch's and numpy's for every non-NaN input
        (zeros, subnormals, overflow to inf, inf); NaN becomes a quiet NaN of the same sign.
        Written without branches (selects) so that LLVM vectorises a loop of it (numba has no CPU
        float16). F. Giesen's float_to_half_fast3_rtne. Used where the CPU lacks F16C."""
        u = np.int32(_f32_bits(v))
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13  # rebias, round half to even
        small = np.int32(_f32_bits(abs(v) + np.float32(0.5))) - 0x3F000000  # subnormal/0: the FPU rounds
        big = np.int32(0x7E00) if a > 0x7F800000 else np.int32(0x7C00)  # NaN, else inf
        h = small if a < 0x38800000 else normal
        h = big if a >= 0x47800000 else h
        return h | sign

    @_intrinsic
    def _f16_hw(typingctx: Any, x: Any) -> Any:
        """float32 -> float16 bits (int32) by LLVM's ``fptrunc``: the CPU's IEEE round-to-nearest-even
        conversion (x86 ``vcvtps2ph``), the same bits as :func:`_to_half` (NaN payloads aside), 2x
        faster in a loop."""
        if isinstance(x, _types.Float) and x.bitwidth == 32:

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                h = builder.bitcast(builder.fptrunc(args[0], _ir.HalfType()), _ir.IntType(16))
                return builder.zext(h, _I32)

            return _types.int32(x), codegen
        return None

    _half = _f16_hw if _cpu_has_f16c() else _to_half

FUSED_TOKENS = ENABLED and _cpu_has_f16c()
"""Whether :class:`FbankTokens` can run: the compiled kernels, on a CPU with a float16 conversion."""

if numba is not None:
    _MKL_LONG = _ir.IntType(8 * __import__("ctypes").sizeof(__import__("ctypes").c_long))

    @_intrinsic
    def _call_ptr3(typingctx: Any, fn: Any, a: Any, b: Any, c: Any) -> Any:
        """``fn(a, b, c)`` for a C function ``long fn(void *, void *, ...)`` at address ``fn``: ``a`` an
        address, ``b`` and ``c`` arrays (their data). How the compiled filterbank calls
        MKL's ``DftiComputeForward`` without a Python round trip (ctypes costs ~3 us a call: the call,
        and ``ndarray.ctypes`` for each pointer)."""
        sig = _types.intp(_types.intp, _types.intp, b, c)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            i8 = _ir.IntType(8)
            fnty = _ir.FunctionType(_MKL_LONG, [i8.as_pointer(), i8.as_pointer()], var_arg=True)  # variadic
            f = builder.inttoptr(args[0], fnty.as_pointer())
            ptrs = [builder.inttoptr(args[1], i8.as_pointer())]
            ptrs += [_ptr(context, builder, t, v, i8) for t, v in zip(signature.args[2:], args[2:])]
            r = builder.call(f, ptrs)
            return builder.sext(r, _I64) if _MKL_LONG.width < 64 else r

        return sig, codegen

    def _fma(builder: Any) -> Any:
        """LLVM's fused multiply-add on 16-float vectors (``llvm.fma``: one rounding, on every CPU)."""
        return _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{MEL_LANES}f32"
        )

    def _splat(builder: Any, x: Any, vec: Any = None) -> Any:
        vec = vec or _VEC
        v = builder.insert_element(_ir.Constant(vec, _ir.Undefined), x, _ir.Constant(_I32, 0))
        mask = _ir.Constant(_ir.VectorType(_I32, vec.count), [0] * vec.count)
        return builder.shuffle_vector(v, _ir.Constant(vec, _ir.Undefined), mask)

    _LOG_POLY = (  # Cephes logf: log(1 + x) = x - x^2/2 + x^3 P(x) for x in [sqrt(1/2) - 1, sqrt(2) - 1]
        7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    )  # fmt: skip

    def _vlog(builder: Any, a: Any) -> Any:
        """Natural log of a 16-float vector of positive values (inf and NaN pass through), Cephes'
        ``logf`` in float32: within 0.82 ulp of the exact log over the normal range (measured against
        float64; numpy's float32 log: 3.3), vectorised where numba's scalar ``log`` calls libm per
        element (6x slower than numpy's, which is why the log was a separate numpy pass)."""
        vi = _ir.VectorType(_I32, MEL_LANES)

        def c(v: float) -> Any:
            return _ir.Constant(_VEC, [v] * MEL_LANES)

        u = builder.bitcast(a, vi)
        e = builder.sub(
            builder.lshr(u, _ir.Constant(vi, [23] * MEL_LANES)), _ir.Constant(vi, [126] * MEL_LANES)
        )
        m = builder.or_(
            builder.and_(u, _ir.Constant(vi, [0x007FFFFF] * MEL_LANES)),
            _ir.Constant(vi, [0x3F000000] * MEL_LANES),
        )
        x = builder.bitcast(m, _VEC)  # mantissa in [0.5, 1): a = x 2^e
        low = builder.fcmp_ordered("<", x, c(0.707106781186547524))
        e = builder.sub(e, builder.zext(low, vi))
        x = builder.fsub(builder.select(low, builder.fadd(x, x), x), c(1.0))
        fma = _fma(builder)
        z = builder.fmul(x, x)
        y = c(_LOG_POLY[0])
        for k in _LOG_POLY[1:]:
            y = builder.call(fma, [y, x, c(k)])
        y = builder.fmul(builder.fmul(y, x), z)
        fe = builder.sitofp(e, _VEC)
        y = builder.call(fma, [fe, c(-2.12194440e-4), y])
        y = builder.call(fma, [z, c(-0.5), y])
        r = builder.call(fma, [fe, c(0.693359375), builder.fadd(x, y)])
        return builder.select(builder.fcmp_ordered("<", a, c(math.inf)), r, a)  # inf, NaN: themselves

    def _transpose16(builder: Any, rows: list[Any]) -> list[Any]:
        """The 16 x 16 transpose of 16 vectors of 16 lanes (any element type): four rounds of
        two-input shuffles, each swapping the off-diagonal blocks of size d = 8, 4, 2, 1 (64 shuffles,
        which x86 does as ``vpermt2ps`` / ``vunpck*``)."""
        rows = list(rows)
        for d in (8, 4, 2, 1):
            ma = _ir.Constant(_ir.VectorType(_I32, 16), [c if not c & d else 16 + c - d for c in range(16)])
            mb = _ir.Constant(_ir.VectorType(_I32, 16), [c + d if not c & d else 16 + c for c in range(16)])
            for i in range(16):
                if i & d:
                    continue
                a, b = rows[i], rows[i + d]
                rows[i], rows[i + d] = builder.shuffle_vector(a, b, ma), builder.shuffle_vector(a, b, mb)
        return rows

    def _mel_codegen(tokens: bool) -> Any:
        """Code of :func:`_mel_log` (``tokens=False``) or :func:`_mel_tokens` (``True``)."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            spec, rs, T, kp, tp, pt, los, widths, starts, wts, ng, floor, out, Fp = (
                _ptr(context, builder, t, v, e) if isinstance(t, _types.Array) else v
                for t, v, e in zip(
                    signature.args,
                    args,
                    (_F32, 0, 0, 0, 0, _VEC, _I64, _I64, _I64, _F32, 0, 0, _OUT[tokens], 0),
                )
            )
            fma = _fma(builder)
            n16 = _ir.Constant(_I64, MEL_LANES)
            vi64 = _ir.VectorType(_I64, MEL_LANES)
            vf16 = _ir.VectorType(_ir.HalfType(), MEL_LANES)

            def i64(v: int) -> Any:
                return _ir.Constant(_I64, v)

            vh = _ir.VectorType(_ir.IntType(16), MEL_LANES)
            acc = _cgutils.alloca_once(builder, _VEC)  # promoted to a register
            cols = _cgutils.alloca_once(builder, _ir.ArrayType(vh if tokens else _VEC, MEL_LANES))
            floorv = _splat(builder, floor)
            evens = _ir.Constant(_ir.VectorType(_I32, MEL_LANES), list(range(0, 2 * MEL_LANES, 2)))
            odds = _ir.Constant(_ir.VectorType(_I32, MEL_LANES), list(range(1, 2 * MEL_LANES, 2)))
            zero = _cgutils.alloca_once(builder, _ir.ArrayType(_F32, 2 * MEL_LANES))  # a row of 16 bins
            builder.store(_ir.Constant(_ir.ArrayType(_F32, 2 * MEL_LANES), None), zero)
            zero = builder.bitcast(zero, _F32.as_pointer())
            if tokens:
                mean, scale, frames = args[14:17]
                flag = _ptr(context, builder, signature.args[17], args[17], _ir.IntType(16))
                meanv, scalev = _splat(builder, mean), _splat(builder, scale)
                expo = _ir.Constant(vh, [0x7C00] * MEL_LANES)
                iota = _ir.Constant(vi64, list(range(MEL_LANES)))
                high = _cgutils.alloca_once(builder, vh)  # the largest exponent field stored, per lane
                builder.store(_ir.Constant(vh, None), high)
            with _cgutils.for_range(builder, builder.udiv(tp, n16)) as blk:
                t0 = builder.mul(blk.index, n16)
                # pt[k] = the power of bin k in frames t0 .. t0 + 15 (0 from frame T on), frames in
                # the lanes: per frame and 16 bins, re^2 + im^2 as fma(re, re, im * im),
                # then a 16 x 16 transpose
                rowp = [
                    builder.gep(spec, [builder.mul(builder.add(t0, i64(r)), rs)]) for r in range(MEL_LANES)
                ]
                live = [builder.icmp_unsigned("<", builder.add(t0, i64(r)), T) for r in range(MEL_LANES)]
                with _cgutils.for_range(builder, builder.udiv(kp, n16)) as chunk:
                    k0 = builder.mul(chunk.index, n16)
                    rows = []
                    for p, ok in zip(rowp, live):
                        src = builder.select(ok, builder.gep(p, [builder.add(k0, k0)]), zero)
                        src = builder.bitcast(src, _VEC.as_pointer())
                        a = builder.load(src, align=4)  # re, im of bins k0 .. k0 + 7
                        b = builder.load(builder.gep(src, [i64(1)]), align=4)  # bins k0 + 8 .. k0 + 15
                        re = builder.shuffle_vector(a, b, evens)
                        im = builder.shuffle_vector(a, b, odds)
                        rows.append(builder.call(fma, [re, re, builder.fmul(im, im)]))
                    for j, col in enumerate(_transpose16(builder, rows)):
                        builder.store(col, builder.gep(pt, [builder.add(k0, i64(j))]), align=4)
                if tokens:  # the lanes of the real frames
                    lanes = builder.add(_splat(builder, t0, vi64), iota)
                    real = builder.icmp_unsigned("<", lanes, _splat(builder, frames, vi64))
                with _cgutils.for_range(builder, ng) as grp:
                    g = grp.index
                    w = builder.load(builder.gep(widths, [g]))
                    base = builder.load(builder.gep(starts, [g]))
                    # the group's 16 filters, each over its w bins, into cols[i] (a loop, not
                    # unrolled: the kernel's code stays small enough for the instruction cache)
                    with _cgutils.for_range(builder, n16) as fi:
                        i = fi.index
                        lo = builder.load(builder.gep(los, [builder.add(builder.mul(g, n16), i)]))
                        wrow = builder.gep(wts, [builder.add(base, builder.mul(w, i))])
                        prow = builder.gep(pt, [lo])
                        builder.store(_ir.Constant(_VEC, None), acc)
                        with _cgutils.for_range(builder, w) as kk:
                            wk = _splat(builder, builder.load(builder.gep(wrow, [kk.index])))
                            pk = builder.load(builder.gep(prow, [kk.index]), align=4)
                            builder.store(builder.call(fma, [wk, pk, builder.load(acc)]), acc)
                        a = builder.load(acc)
                        a = builder.select(builder.fcmp_unordered(">=", a, floorv), a, floorv)  # NaN kept
                        y = _vlog(builder, a)
                        if tokens:
                            v = builder.fdiv(builder.fsub(y, meanv), scalev)
                            h = builder.bitcast(builder.fptrunc(v, vf16), vh)
                            e = builder.select(real, builder.and_(h, expo), _ir.Constant(vh, None))
                            hi = builder.load(high)
                            builder.store(builder.select(builder.icmp_unsigned(">", e, hi), e, hi), high)
                            y = h
                        builder.store(y, builder.gep(cols, [i64(0), i]))
                    cols_v = [builder.load(builder.gep(cols, [i64(0), i64(i)])) for i in range(MEL_LANES)]
                    # frame t0 + r, filters 16 g .. 16 g + 15: row r of the transpose
                    if tokens:  # patch (t0 // 16, g)
                        patch = builder.mul(builder.add(builder.mul(blk.index, ng), g), i64(256))
                    for r, row in enumerate(_transpose16(builder, cols_v)):
                        if tokens:  # its row r
                            dst = builder.gep(out, [builder.add(patch, i64(16 * r))])
                            builder.store(row, builder.bitcast(dst, vh.as_pointer()), align=2)
                        else:  # mel[t0 + r, 16 g : 16 g + 16]
                            off = builder.add(builder.mul(builder.add(t0, i64(r)), Fp), builder.mul(g, n16))
                            builder.store(
                                row, builder.bitcast(builder.gep(out, [off]), _VEC.as_pointer()), align=4
                            )
            if tokens:
                builder.store(builder.load(high), builder.bitcast(flag, vh.as_pointer()), align=2)
            return context.get_dummy_value()

        return codegen

    @_intrinsic
    def _log_vectors(typingctx: Any, src: Any, dst: Any, n: Any) -> Any:
        """``dst[i] = _vlog(src[i])`` for the first n 16-float vectors of float32 arrays ``src``, ``dst``."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            src, dst = (_ptr(context, builder, t, v, _VEC) for t, v in zip(signature.args[:2], args[:2]))
            with _cgutils.for_range(builder, args[2]) as loop:
                v = builder.load(builder.gep(src, [loop.index]), align=4)
                builder.store(_vlog(builder, v), builder.gep(dst, [loop.index]), align=4)
            return context.get_dummy_value()

        return _types.void(src, dst, _types.intp), codegen

    _i = _types.intp
    _OUT = {False: _F32, True: _ir.IntType(16)}  # the element of _mel_log's and _mel_tokens' output

    def _mel_sig(
        spec: Any, pt: Any, lo: Any, width: Any, start: Any, weights: Any, out: Any
    ) -> tuple[Any, ...]:
        return (spec, _i, _i, _i, _i, pt, lo, width, start, weights, _i, _types.float32, out, _i)

    @_intrinsic
    def _mel_log(
        typingctx: Any, spec: Any, rs: Any, T: Any, Kp: Any, tp: Any, pt: Any, lo: Any, width: Any,
        start: Any, weights: Any, groups: Any, floor: Any, mel: Any, Fp: Any,
    ) -> Any:  # fmt: skip
        """The power spectrum and filter sums of :func:`_fbank_log_mel_py` written as LLVM vector
        code, 16 frames at a time in the 16 lanes of a vector: for each block of frames t0 .. t0 + 15,
        the power of the first Kp bins, ``fma(re, re, im * im)`` (0 for frames from T on;
        the rounding of a fused ``re * re + im * im``), goes into ``pt`` (Kp, 16) through a 16 x 16 register transpose per 16 bins; then
        filter f of group g is ``acc = fma(splat(weight), pt[lo[f] + j], acc)`` over its ``width[g]``
        bins (one ``llvm.fma`` per weight and 16 frames, where a frame-major sum over dense groups of
        16 filters does 16 multiply-adds per bin and frame, 14 of them with a zero weight),
        ``log(max(acc, floor))`` (NaN kept, as ``np.maximum``; the log is :func:`_vlog`), and the
        group's 16 vectors are transposed back into rows ``mel[t0 + r, 16 g : 16 g + 16]``. Each sum
        adds its terms bin by bin in ascending order from +0, as the dense product does (a zero weight
        adds +0). ``spec`` (T, rs) float32 (re, im interleaved) with ``2 Kp <= rs``; tp and Kp
        multiples of 16 (bins past those the filters read are never used); ``lo`` (16 groups,),
        ``width``, ``start`` (groups,) int64 and ``weights`` float32 as :func:`mel_tables`; ``mel``
        (tp, Fp) float32."""
        return _types.void(*_mel_sig(spec, pt, lo, width, start, weights, mel)), _mel_codegen(False)

    @_intrinsic
    def _mel_tokens(
        typingctx: Any, spec: Any, rs: Any, T: Any, Kp: Any, tp: Any, pt: Any, lo: Any, width: Any,
        start: Any, weights: Any, groups: Any, floor: Any, out: Any, Fp: Any, mean: Any, scale: Any,
        frames: Any, flag: Any,
    ) -> Any:  # fmt: skip
        """:func:`_mel_log` straight into 16 x 16 float16 tokens: the log-mel value of frame t and
        filter f, normalised as ``(y - mean) / scale`` (float32, exact division) and rounded to float16
        (``fptrunc``: the CPU's conversion), is element ``(t % 16, f % 16)`` of patch ``(t // 16) *
        groups + f // 16`` of ``out`` (uint16, (rows * groups, 256)), for every t < tp: rows for
        ``t >= frames`` hold the floor's value, for the caller to overwrite (``Fp`` is unused).
        ``flag`` (16,) uint16 gets the largest exponent field stored for the real frames (``t <
        frames``) in each lane (0x7C00: an inf or NaN). Needs the hardware float16 conversion
        (``_cpu_has_f16c``)."""
        sig = _types.void(
            *_mel_sig(spec, pt, lo, width, start, weights, out), _types.float32, _types.float32, _i, flag
        )
        return sig, _mel_codegen(True)


def _log32_py(x: np.ndarray, out: np.ndarray) -> None:
    _log_vectors(x, out, x.shape[0] // MEL_LANES)


def log32(x: np.ndarray) -> np.ndarray:
    """The float32 natural log the compiled filterbank uses (:func:`_vlog`), of a 1-D array: for tests
    and for comparing with ``np.log``. Needs :data:`ENABLED`."""
    x = np.asarray(x, np.float32).ravel()
    n = -(-x.shape[0] // MEL_LANES) * MEL_LANES
    src = np.ones(n, np.float32)
    src[: x.shape[0]] = x
    out = np.empty(n, np.float32)
    _log32(src, out)
    return out[: x.shape[0]]


_log32 = _jit(_log32_py)
# Not reassociated: numba puts its fast-math flags on every float operation of a function, the
# intrinsics' included, and LLVM would then regroup the log and the normalisation differently in
# each caller (a token one float16 step from the log-mel path's). The sums that gain from it are in
# their own function (_fbank_frames); the power and filter sums are explicit llvm.fma calls.
_frames_fft = _jit(_frames_fft_py)
_fbank_log_mel = _jit(_fbank_log_mel_py)
_fbank_tokens = _jit(_fbank_tokens_py)
_norm_tokens = _jit(_norm_tokens_py)


def _fps_py(xyz: np.ndarray, k: int, starts: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
    """Farthest point sampling, ``geometry.farthest_point_sample``'s loop for 3-D points: ``xyz``
    (B, 3, N) float32 C-contiguous and finite (coordinates as rows: the distance loop then streams
    three arrays), ``starts`` (B,) int64 first picks, ``lens`` (B,) int64 candidates per cloud (the
    first lens[b] points, lens[b] <= N), ``out`` (B, k) int64 picks, -1 beyond lens[b]. Each pick
    lowers every candidate's squared distance to its nearest pick (``0 + dx^2 + dy^2 + dz^2`` in
    float32, the order of torch's ``square().sum(-1)``) while taking the largest, then picks the
    first candidate at that distance, as ``argmax``."""
    dist = np.empty(xyz.shape[2], np.float32)
    for b in range(xyz.shape[0]):
        m = lens[b]
        x, y, z = xyz[b, 0], xyz[b, 1], xyz[b, 2]
        for j in range(m):
            dist[j] = np.inf
        far = starts[b]
        for i in range(k):
            if i >= m:
                out[b, i] = -1
                continue
            out[b, i] = far
            px, py, pz = x[far], y[far], z[far]
            best = np.float32(-1.0)
            for j in range(m):
                tx, ty, tz = x[j] - px, y[j] - py, z[j] - pz
                v = min(dist[j], np.float32(0.0) + tx * tx + ty * ty + tz * tz)
                dist[j] = v
                best = max(best, v)
            for j in range(m):
                if dist[j] == best:
                    far = j
                    break


_fps = _jit(_fps_py)


def farthest_point_sample(xyz: np.ndarray, k: int, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(B, k) int64 picks of :func:`_fps_py` (see there for the arguments' contract): 0.2 s for 1,024
    of 120,000 points (a LiDAR scan) where the torch loop takes 2.0 s. Needs :data:`ENABLED`."""
    out = np.empty((xyz.shape[0], k), np.int64)
    _fps(xyz, k, starts, lens, out)
    return out
