"""Compiled kernels (numba) for the per-batch and per-clip loops that numpy can only do in many passes.

Each kernel here has a numpy formulation next to its caller, which is the reference: the tests check
that both give the same bits, and the numpy one runs when numba is missing (it is a dependency, but a
platform without its wheels still works) or when ``MASKLOOM_JIT=0`` is set.

Kernels are compiled on first use for the argument types they meet (about 0.3-1 s each) and cached on
disk by numba (``cache=True``: next to this file in ``__pycache__``, or under ``NUMBA_CACHE_DIR``), so
later processes — DataLoader and Ray workers included — load them instead, in about 0.4 s for the
first kernel of a process (``import numba`` and numba's registries, which import ``scipy.linalg``).

Compiled code does not check bounds: the wrappers' docstrings state what callers guarantee (row
starts and lengths within the source, lengths at most the output's L), which the loader and the
filterbank derive from the same offsets. ``NUMBA_BOUNDSCHECK=1`` turns checks on when debugging.

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


def _jit(fn: Any, reassociate: bool = False) -> Any:
    """Compile ``fn`` (None without numba). ``reassociate``: let LLVM reorder float sums (the
    ``reassoc``/``contract`` fast-math flags only: no assumption about NaN or inf), which vectorises
    reductions; the result then differs from sequential summation by rounding."""
    if numba is None:
        return None
    flags = {"reassoc", "contract"} if reassociate else False
    return numba.njit(cache=True, nogil=True, fastmath=flags)(fn)


def _gather_pad_py(
    src: np.ndarray, starts: np.ndarray, lens: np.ndarray, slots: np.ndarray, out: np.ndarray, fill: Any
) -> None:
    """``out[slots[i], :lens[i]] = src[starts[i] : starts[i] + lens[i]]`` and
    ``out[slots[i], lens[i]:] = fill``.

    ``src`` (N, W), ``out`` (B, L, W) with ``lens[i] <= L``; values are converted to ``out``'s dtype
    on assignment (int32 ids -> int64). One pass over the rows written."""
    L = out.shape[1]
    W = out.shape[2]
    for i in range(starts.shape[0]):
        b = slots[i]
        s = starts[i]
        n = lens[i]
        for j in range(n):
            for k in range(W):
                out[b, j, k] = src[s + j, k]
        for j in range(n, L):
            for k in range(W):
                out[b, j, k] = fill


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
    ~1.5-3 us, as much as the copying)."""
    L = out1.shape[1]
    W1 = out1.shape[2]
    W2 = out2.shape[2]
    for b in range(starts.shape[0]):
        s = starts[b]
        n = lens[b]
        for j in range(n):
            for k in range(W1):
                out1[b, j, k] = src1[s + j, k]
            for k in range(W2):
                out2[b, j, k] = src2[s + j, k]
            pad[b, j] = False
        for j in range(n, L):
            for k in range(W1):
                out1[b, j, k] = 0
            for k in range(W2):
                out2[b, j, k] = 0
            pad[b, j] = True


_gather_pad2 = _jit(_gather_pad2_py)

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
    fill = np.asarray(fill, out.dtype).view(view.dtype)[()]  # the fill's bits when moved as bits
    if slots is None:
        slots = _arange(starts.shape[0])
    elif isinstance(slots, slice):
        slots = np.arange(out.shape[0])[slots]
    w = math.prod(out.shape[2:])  # explicit widths: a reshape to -1 fails on empty arrays
    _gather_pad(src.reshape(src.shape[0], w), starts, lens, slots, view.reshape(*out.shape[:2], w), fill)
    return out


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
    if out1.dtype in _BITS or out2.dtype in _BITS:
        src1, out1 = _as_bits(src1, out1)
        src2, out2 = _as_bits(src2, out2)
    _gather_pad2(src1, src2, starts, lens, out1, out2, pad)


# ---- Kaldi filterbank (maskloom.tokenizers.audio.KaldiFbank) ------------------------------------
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


def _fbank_mel_py(
    spec: np.ndarray, starts: np.ndarray, w_own: np.ndarray, w_next: np.ndarray, floor: Any, mel: np.ndarray
) -> None:
    """The mel filterbank of an rFFT: ``spec`` (T, 2 * bins) float32 (re, im interleaved); ``mel``
    (T, F) gets ``max(sum_k w[f, k] (re_k^2 + im_k^2), floor)`` (the log is left to numpy's SIMD log).

    Kaldi's triangular filters overlap only their neighbours: every FFT bin k is in filter f(k) with
    weight ``w_own[k]`` and in f(k) + 1 with ``w_next[k]``, and the bins of filter f are
    ``starts[f] .. starts[f + 1] - 1``. Filter f is then a few multiply-adds over those bins for all
    frames at once (vectorised over frames: a loop over each frame's filters, whose bin counts vary,
    runs 1.4x slower, and the dense product 20 times the work)."""
    T = spec.shape[0]
    nb = starts[-1]
    pt = np.empty((nb, T), np.float32)  # power, bin-major
    for t in range(T):
        sp = spec[t]
        for k in range(nb):
            re = sp[2 * k]
            im = sp[2 * k + 1]
            pt[k, t] = re * re + im * im
    carry = np.zeros(T, np.float32)  # filter f's sum over the bins of filter f - 1
    nxt = np.empty(T, np.float32)
    acc = np.empty(T, np.float32)
    for f in range(mel.shape[1]):
        for t in range(T):  # explicit loops: numba's slice assignment costs ~15 ns a call, 128 x 3 calls
            acc[t] = carry[t]
            nxt[t] = 0
        for k in range(starts[f], starts[f + 1]):
            wo = w_own[k]
            wn = w_next[k]
            pk = pt[k]
            for t in range(T):
                acc[t] += pk[t] * wo
                nxt[t] += pk[t] * wn
        for t in range(T):
            mel[t, f] = max(acc[t], floor)
            carry[t] = nxt[t]


_fbank_mel = _jit(_fbank_mel_py, reassociate=True)


def mel_tables(banks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(starts, w_own, w_next)`` of :func:`_fbank_mel_py` from a dense (F, bins) filter matrix, or
    None when the filters do not have that shape (a bin in a filter other than f(k), f(k) + 1)."""
    F, bins = banks.shape
    own = np.full(bins, -1, np.int64)
    w_own, w_next = np.zeros(bins, np.float32), np.zeros(bins, np.float32)
    for k in range(bins):
        fs = np.flatnonzero(banks[:, k])
        if fs.size > 2 or (fs.size == 2 and fs[1] != fs[0] + 1):
            return None
        if fs.size:
            own[k], w_own[k] = fs[0], banks[fs[0], k]
            w_next[k] = banks[fs[1], k] if fs.size == 2 else 0.0
    used = np.flatnonzero(own >= 0)
    if not used.size:
        return None
    k0, k1 = int(used[0]), int(used[-1]) + 1
    run = own[k0:k1]
    if (run < 0).any() or (np.diff(run) < 0).any():  # bins of a filter must be one contiguous run
        return None
    starts = k0 + np.searchsorted(run, np.arange(F + 1), side="left")
    starts[F] = k1
    return starts.astype(np.int64), w_own, w_next


def fbank_frames(s: np.ndarray, window: np.ndarray, shift: int, pre: float, buf: np.ndarray) -> np.ndarray:
    """:func:`_fbank_frames_py` (compiled): ``s`` (N,) and ``window`` (W,) float32, ``buf`` (T, fft)
    float32 with ``(T - 1) * shift + W <= N``; returns ``buf``."""
    _fbank_frames(s, window, shift, np.float32(pre), buf)
    return buf


def fbank_mel(spec: np.ndarray, tables: tuple[np.ndarray, ...], floor: float, mel: np.ndarray) -> np.ndarray:
    """:func:`_fbank_mel_py` (compiled) with the :func:`mel_tables` ``tables``; returns ``mel``."""
    _fbank_mel(spec, *tables, np.float32(floor), mel)
    return mel


if numba is not None:
    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _f32_bits(typingctx: Any, x: Any) -> Any:
        """The bits of a float32 as an int32 (an LLVM bitcast: free, and vectorisable)."""
        if isinstance(x, _types.Float) and x.bitwidth == 32:

            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.bitcast(args[0], _ir.IntType(32))

            return _types.int32(x), codegen
        return None

    @numba.njit(cache=True, nogil=True, inline="always")
    def _to_half(v: Any) -> Any:
        """float32 -> the bits of the nearest float16 (round to nearest even), as an int32 in
        0..65535: IEEE conversion, the same bits as torch's and numpy's for every non-NaN input
        (zeros, subnormals, overflow to inf, inf); NaN becomes a quiet NaN of the same sign.
        Written without branches (selects) so that LLVM vectorises a loop of it (numba has no CPU
        float16). F. Giesen's float_to_half_fast3_rtne."""
        u = np.int32(_f32_bits(v))
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13  # rebias, round half to even
        small = np.int32(_f32_bits(abs(v) + np.float32(0.5))) - 0x3F000000  # subnormal/0: the FPU rounds
        big = np.int32(0x7E00) if a > 0x7F800000 else np.int32(0x7C00)  # NaN, else inf
        h = small if a < 0x38800000 else normal
        h = big if a >= 0x47800000 else h
        return h | sign


def _norm_tokens_py(
    fb: np.ndarray, frames: int, mean: Any, scale: Any, pad: Any, p: int, out: np.ndarray, half: np.ndarray
) -> None:
    """Normalise a (T, F) float32 filterbank into float16 tokens in the (rows, F // p, p * p) patch
    layout, ``rows = ceil(frames / p)``, in two passes: ``half`` (>= frames * F,) uint16 gets the
    float16 bits of ``(fb[t, f] - mean) / scale`` for ``t < frames`` (float32 arithmetic as numpy's,
    no fast-math: the same bits as ``torch.Tensor.to(float16)`` of numpy's result), contiguous so that
    the loop vectorises; then ``out`` (float16 viewed as uint16) gets them at ``[t // p, f // p,
    (t % p) * p + f % p]``, and ``pad`` (float16 bits) for the frames from ``frames`` to ``rows * p``.
    p = 16 (every built-in configuration) moves rows of 16 in a loop of constant length, 3x faster
    than a loop of length p. Returns whether every value written for the real frames is finite (an
    exponent of all ones is inf or NaN), found in the same pass: a record's validation then need not
    read its tokens again."""
    F = fb.shape[1]
    nb = F // p
    pp = p * p
    src = fb.reshape(-1)
    flat = out.reshape(-1)
    n = frames * F
    for i in range(n):
        half[i] = _to_half((src[i] - mean) / scale)
    bad = 0  # values whose exponent bits are all ones (inf, NaN)
    for i in range(n):  # a separate pass over the 2-byte results (in the loop above: 3x the cost)
        bad += (half[i] & 0x7C00) == 0x7C00
    if p == 16:
        for t in range(frames):
            d0 = (t // 16) * nb * 256 + (t % 16) * 16
            for b in range(nb):
                d = d0 + b * 256
                s = t * F + b * 16
                for j in range(16):
                    flat[d + j] = half[s + j]
    else:
        for t in range(frames):
            d0 = (t // p) * nb * pp + (t % p) * p
            for b in range(nb):
                d = d0 + b * pp
                s = t * F + b * p
                for j in range(p):
                    flat[d + j] = half[s + j]
    for t in range(frames, (frames + p - 1) // p * p):  # the padded frames of the last row
        d0 = (t // p) * nb * pp + (t % p) * p
        for b in range(nb):
            for j in range(p):
                flat[d0 + b * pp + j] = pad
    return bad == 0


_norm_tokens = _jit(_norm_tokens_py)


def norm_tokens(
    fb: np.ndarray, frames: int, mean: float, scale: float, pad: np.uint16, p: int, out: np.ndarray
) -> bool:
    """:func:`_norm_tokens_py` (compiled): ``fb`` (T, F) float32 C-contiguous with ``frames <= T``
    and F a multiple of ``p``; ``out`` (>= rows, F // p, p * p) uint16 (float16 bits) C-contiguous;
    ``pad`` the float16 bits of a padded frame. Rows of ``out`` past ``rows`` are left as they are
    (numpy fills a run of padding rows faster). Returns whether the real frames' tokens are all
    finite (the padding is the caller's)."""
    return bool(
        _norm_tokens(
            fb,
            frames,
            np.float32(mean),
            np.float32(scale),
            pad,
            p,
            out,
            np.empty(frames * fb.shape[1], np.uint16),
        )
    )
