"""Audio tokenizer: 16x16 patches of a 128-bin Kaldi log-mel filterbank, as AudioMAE.

Huang et al., "Masked Autoencoders that Listen" (NeurIPS 2022), facebookresearch/AudioMAE
``dataset.py``: the waveform minus its mean goes through
``torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type='hanning',
num_mel_bins=128, dither=0.0, frame_shift=10)``; the (frames, 128) filterbank is zero-padded or cut
to a fixed number of frames (1024 for 10 s clips), normalised as ``(fbank - mean) / (2 * std)`` with
dataset statistics (AudioSet: -4.2677393, 4.5689974), and cut into 16x16 patches over
(time, mel) -> 64 x 8 = 512 tokens for 1024 frames.

Decisions (documented here once):

* Decoding uses ``soundfile`` (libsndfile: WAV, FLAC, Ogg Vorbis and Opus, MP3 with libsndfile >=
  1.1, AIFF), and FFmpeg through PyAV for what libsndfile lacks (``.m4a``/``.aac``: AAC, ``.wma``,
  ``.mka``; :func:`decode_with_pyav`); multi-channel audio is mixed down to mono by averaging channels; the waveform is resampled
  to ``Config.sample_rate`` with torchaudio's resampling algorithm (``functional.resample``: the
  same values within float32 rounding), ported to numpy (:class:`SincResampler`).
* The CPU path does not import torch (``import torch`` is ~1 s of CPU in every preprocessing worker):
  decoding, resampling, the filterbank's constants (:func:`mel_banks`, :func:`hann_window`), the FFT
  (MKL loaded from torch's install without importing it, :mod:`maskloom._mkl_fft`) and the compiled
  kernels are numpy, ctypes and numba. torch is imported for other devices (``KaldiFbank`` on a CUDA
  tensor), :meth:`AudioTokenizer.fbank` (which returns a tensor), and the fallbacks without numba or
  MKL.
* Padding follows AudioMAE: the *filterbank* is padded with ``Config.pad_value`` (0.0, i.e. zeros in
  the log-mel domain) before normalisation, so padded frames become ``(0 - mean) / (2 * std)``.
  Every patch is a token (padding included); ``meta["frames"]`` is the number of real frames.
* Long audio is cut to the first ``target_frames`` frames (AudioMAE's evaluation crop), and only
  that much is decoded (with the resampler's reach): an hour of 44.1 kHz stereo is read in 16 ms
  and ~0.3 GB of peak memory (the process's) instead of 8.7 s and 3.4 GB, to the same tokens.
  ``max_windows`` (0: all) cuts it instead into consecutive windows of ``target_frames`` frames,
  one record each (``<source>#k``), each the tokens that stretch of audio alone gives; a tail
  window is kept when at least half of it is real frames.
* Tar shards (WebDataset layout: AudioSet, VGGSound, LAION-Audio ship ``key.flac`` + ``key.cls`` /
  ``key.json``): a ``.tar``, ``.tar.gz`` or ``.tgz`` is one input of many samples, read by the rules
  the image tokenizer's docstring sets out ("Tar shards": keys, ``cls`` labels, samples skipped with
  one warning, a mostly unusable tar as the error, streaming), which are
  :func:`maskloom.tokenizers.base.iter_tar_items`'s. What differs: a sample's audio member is the
  first of the audio extensions above (``wav``, ``flac``, ``ogg``, ... ``mka``, a whole extension)
  it has; it is decoded from memory exactly as a file is (libsndfile or FFmpeg, the partial decode,
  the truncated-WAV check), so it gives the file's record(s), ids ``<tar>#<key>`` and, with
  ``max_windows``, ``<tar>#<key>#k`` for window k >= 1, ``meta["member"]`` its name; no audio member
  is ``unsupported``. ``read(tar)`` gives a :class:`TarAudios` of (key, Audio, label, member);
  ``fit`` reads the first ``fit_max_files // sources`` (at least one) clips of a tar.
* Audio shorter than one analysis window (25 ms, 400 samples at 16 kHz) is zero-padded to one window
  after mean removal, which gives exactly one real frame. Zero-length audio is rejected (``empty``).
* ``Config.normalize_with = "config"`` (default) normalises with ``norm_mean``/``norm_std`` (AudioSet
  statistics, as AudioMAE). ``"dataset"`` uses statistics learned by :meth:`AudioTokenizer.fit`
  (mean/std over the real frames of a bounded, evenly spaced sample of the corpus), saved as
  ``audio_stats.json`` beside the table; such a tokenizer sets ``needs_fit``.
* ``detokenize`` returns the un-normalised filterbank of the real frames, (frames, num_mel_bins):
  a log-mel filterbank discards phase, so the waveform cannot be recovered.
* Speed: :class:`KaldiFbank` computes ``kaldi.fbank`` with AudioMAE's options (equal to float32
  rounding), but builds the window and the mel filterbank once per tokenizer instead of on every call,
  skips the frame energy that ``use_energy=False`` throws away, and takes the power spectrum as
  re^2 + im^2 rather than abs()^2; on CPU it regroups the arithmetic into few numpy passes and
  multiplies only the mel filters' bins (88 instead of 146 us per FSDD clip in the tokenizer loop;
  the plain call is ~2.4x slower than the torch formulation). With numba, MKL and a CPU with a
  float16 conversion (x86 F16C, ARM64), ``tokenize`` is one compiled call from the waveform to the
  float16 patches (``maskloom._kernels.FbankTokens``): framing, the FFT (MKL's, called by address),
  the power spectrum, the mel sums (16 frames per vector multiply-add), a vectorised float32 log,
  normalisation, the float16 rounding and the patch layout, with the padding; ~20 us per FSDD clip in
  the kernel, ~22 in the benchmark's loop, where it was ~45 as numpy passes around three kernels.
  Without F16C the log-mel filterbank is two calls and ``maskloom._kernels.norm_tokens`` makes the
  tokens; without numba numpy and torch's cast do. The tokens equal, bit for bit, normalising
  :meth:`AudioTokenizer.fbank`, whose log is the same function. Only the frames kept are computed (a
  long recording cropped to the target length costs the target length). Resampling keeps one
  :class:`SincResampler` (its sinc kernel) per source rate: one matrix product, 29 us for an FSDD
  clip where torchaudio's ``conv1d`` took 47 in isolation and decoding a clip took ~225 us in a loop
  with it, ~95 us without. The FFT is torch's MKL transform, but planned once per frame count
  (``maskloom._mkl_fft``: ``torch.fft.rfft`` plans it on every call, ~6 us, and dispatches, ~3 us),
  with the same bits.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import soundfile as sf

from maskloom import _kernels, _mkl_fft
from maskloom.tables import all_finite
from maskloom.tokenizers.base import (
    TAR_EXTENSIONS,
    Record,
    TableSpec,
    TarItems,
    TokenizeError,
    Tokenizer,
    decode_tar_items,
    ffmpeg_reason,
    is_tar_path,
    iter_tar_records,
    path_or_file,
    read_tar,
    register_tokenizer,
    tokenize_tar,
)

if TYPE_CHECKING:
    import torch

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
log = logging.getLogger(__name__)

STATS_FILE = "audio_stats.json"
WINDOW_MS = 25.0  # Kaldi's default frame length


def mel_banks(num_bins: int, fft_size: int, sample_rate: float, low_freq: float = 20.0) -> np.ndarray:
    """``torchaudio.compliance.kaldi.get_mel_banks(num_bins, fft_size, sample_rate, low_freq, 0.0,
    ...)`` (mel bins from ``low_freq`` to Nyquist, no VTLN) in numpy: (num_bins, fft_size // 2)
    float32, the same float32 operations in the same order, the logarithm rounded from float64
    (bit for bit the same matrix for the configurations the tests cover)."""
    f32 = np.float32
    high_freq = 0.5 * sample_rate
    mel_low, mel_high = 1127.0 * math.log(1.0 + low_freq / 700.0), 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = f32((mel_high - mel_low) / (num_bins + 1))
    b = np.arange(num_bins, dtype=f32)[:, None]  # (F, 1)
    left = f32(mel_low) + b * delta
    center = f32(mel_low) + (b + f32(1.0)) * delta
    right = f32(mel_low) + (b + f32(2.0)) * delta
    freq = f32(sample_rate / fft_size) * np.arange(fft_size // 2, dtype=f32)
    mel = (f32(1127.0) * np.log((f32(1.0) + freq / f32(700.0)).astype(np.float64)).astype(f32))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return np.maximum(f32(0.0), np.minimum(up, down))


def hann_window(size: int) -> np.ndarray:
    """``torch.hann_window(size, periodic=False)`` in numpy float32: its float32 argument, the cosine
    rounded from float64 (torch's vectorised float32 cosine differs by one unit in the last place in
    ~2.5 % of the entries)."""
    if size == 1:
        return np.ones(1, np.float32)
    a = np.arange(size, dtype=np.float32) * np.float32(2.0 * math.pi / (size - 1))
    w = np.cos(a.astype(np.float64)).astype(np.float32)
    w *= np.float32(-0.5)
    w += np.float32(0.5)
    return w


def _sinc_hann(t: np.ndarray, lowpass_filter_width: int, scale: float) -> np.ndarray:
    """torchaudio's windowed-sinc weights at times ``t`` (in units of the filter's base rate;
    float32 or float64, clipped in place to the filter's width): ``sinc(pi t) cos^2(pi t / (2 w))``
    times ``scale``, in ``t``'s dtype, the sine and cosine rounded from float64."""
    dt = t.dtype.type
    np.clip(t, -lowpass_filter_width, lowpass_filter_width, out=t)
    a = t * dt(math.pi / lowpass_filter_width / 2)
    window = np.cos(a.astype(np.float64, copy=False)).astype(t.dtype, copy=False) ** 2
    t *= dt(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(
            t == 0, dt(1.0), np.sin(t.astype(np.float64, copy=False)).astype(t.dtype, copy=False) / t
        )
    k *= window * dt(scale)
    return k


class SincResampler:
    """``torchaudio.functional.resample(x, orig_freq, new_freq)`` (windowed-sinc interpolation with a
    Hann window, ``lowpass_filter_width=6``, ``rolloff=0.99``) in numpy, with its kernel built once.

    The kernel is torchaudio's ``_get_sinc_resample_kernel`` in float32 (sine and cosine rounded from
    float64); applying it is one matrix product of the strided input windows with the
    (window, phases) kernel, the computation torchaudio's strided ``conv1d`` does. Outputs agree with
    torchaudio's within float32 rounding (|diff| <= 2e-7 for unit-scale audio in the tests). Plain
    numpy, so that a worker that decodes audio does not import torch; 10x faster than torchaudio's
    ``conv1d`` from 44.1 kHz.
    """

    MAX_KERNEL = 1 << 22
    """Most kernel entries (phases x taps) built, 16 MB. Rates with a small common divisor need a
    huge one (44,101 -> 16,000 Hz: 16,000 phases x 44,400 taps, 2.8 GB, which torchaudio builds);
    those are resampled by evaluating each output's ~35 nonzero taps directly (:meth:`_direct`)."""

    def __init__(
        self,
        orig_freq: int,
        new_freq: int,
        lowpass_filter_width: int = 6,
        rolloff: float = 0.99,
        *,
        max_kernel: int | None = None,
    ):
        if orig_freq <= 0 or new_freq <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_freq} -> {new_freq}")
        g = math.gcd(int(orig_freq), int(new_freq))
        self.orig, self.new = int(orig_freq) // g, int(new_freq) // g
        f32 = np.float32
        base = min(self.orig, self.new) * rolloff
        self.width = math.ceil(lowpass_filter_width * self.orig / base)
        self.lowpass_filter_width, self.base = lowpass_filter_width, base
        self.kernel: np.ndarray | None = None
        if self.new * (2 * self.width + self.orig) > (self.MAX_KERNEL if max_kernel is None else max_kernel):
            return  # resampled by _direct
        idx = np.arange(-self.width, self.width + self.orig, dtype=f32)[None, :] / f32(self.orig)
        t = np.arange(0, -self.new, -1, dtype=f32)[:, None] / f32(self.new) + idx  # (new, taps)
        t *= f32(base)
        k = _sinc_hann(t, lowpass_filter_width, base / self.orig)
        self.kernel = np.ascontiguousarray(k.T, dtype=f32)  # (taps, new): one column per output phase

    def _direct(self, x: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
        """The same sum without the kernel, in float64: output ``j = i * new + p`` (frame i, phase p)
        is ``sum_m x[i * orig + m - width] k_p(m)``, and ``k_p(m)`` is nonzero only where its time
        ``t = (m - width) / orig - p / new`` (scaled by ``base``) lies within the filter's
        ``lowpass_filter_width``: ~2 * 6 * orig / base taps (and two more each side), evaluated per output."""
        n = x.shape[0]
        orig, new, w, lpw, base = self.orig, self.new, self.width, self.lowpass_filter_width, self.base
        taps = 2 * w + orig  # torchaudio's kernel length; taps beyond it are not in the sum
        band = math.ceil(2 * lpw * orig / base) + 4
        padded = np.zeros(n + taps + band, np.float64)
        padded[w : w + n] = x
        n_out = -(-new * n // orig)
        out = np.empty(n_out, np.float32)
        for s in range(0, n_out, chunk):
            j = np.arange(s, min(n_out, s + chunk), dtype=np.int64)
            i, p = j // new, j % new
            lo = np.maximum(np.floor(w + orig * (p / new - lpw / base)).astype(np.int64) - 1, 0)
            m = lo[:, None] + np.arange(band)  # (J, band) tap indices
            k = _sinc_hann(((m - w) / orig - (p / new)[:, None]) * base, lpw, base / orig)
            k[m >= taps] = 0.0
            out[s : s + j.shape[0]] = (padded[(i * orig)[:, None] + m] * k).sum(axis=1)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N,) float32 -> (ceil(N * new / orig),) float32."""
        n = x.shape[0]
        if self.orig == self.new:
            return np.array(x, np.float32)
        if self.kernel is None:
            return self._direct(x)
        taps = self.kernel.shape[0]
        padded = np.zeros(n + 2 * self.width + self.orig, np.float32)  # torchaudio's zero padding
        padded[self.width : self.width + n] = x
        frames = (padded.shape[0] - taps) // self.orig + 1
        # (taps, frames) strided view of the input windows; (phases, taps) @ it, written transposed
        # into (frames, phases): 29 us for an FSDD clip against 55 for windows @ kernel
        windows = np.ndarray((taps, frames), np.float32, buffer=padded, strides=(4, self.orig * 4))
        out = np.empty((frames, self.new), np.float32)
        np.matmul(self.kernel.T, windows, out=out.T)
        return out.reshape(-1)[: -(-self.new * n // self.orig)]  # phases interleaved in time


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Configuration of the audio tokenizer (defaults reproduce AudioMAE on 10 s AudioSet clips)."""

    sample_rate: int = 16000
    """Every input is resampled to this rate (Hz) before the filterbank."""
    num_mel_bins: int = 128
    """Mel bins of the Kaldi filterbank (the frequency axis of the spectrogram)."""
    frame_shift_ms: float = 10.0
    """Hop between filterbank frames in milliseconds (AudioMAE: 10 ms -> 100 frames per second)."""
    target_frames: int = 1024
    """Frames per sample after padding/cutting (1024 = 10.24 s at a 10 ms shift; 128 suits 1 s clips)."""
    patch_size: int = 16
    """Side of the square (time x mel) patch; target_frames and num_mel_bins must be multiples of it."""
    pad_value: float = 0.0
    """Filterbank value used for padded frames, before normalisation (AudioMAE pads with zeros)."""
    normalize_with: Literal["config", "dataset"] = "config"
    """"config": normalise with norm_mean/norm_std; "dataset": with statistics learned by fit()."""
    norm_mean: float = -4.2677393
    """Filterbank mean used when normalize_with="config" (AudioSet value from AudioMAE)."""
    norm_std: float = 4.5689974
    """Filterbank standard deviation used when normalize_with="config" (AudioSet value from AudioMAE)."""
    fit_max_files: int = 500
    """fit() reads at most this many files, evenly spaced over the sorted source list."""
    pad_tokens: bool = True
    """Keep a short clip's padding as tokens, as AudioMAE does: every record is the whole
    ``target_frames`` grid (512 tokens at the defaults, 262 kB), a 0.5 s spoken digit's 95 % padding.
    False: a record holds only the time rows of patches that hold real frames (the last one padded
    as before), so that clip is 32 tokens: rows of varied length, which the loader's length
    bucketing batches tightly and the backbone attends over without the padding. Long clips give
    the same records either way."""
    max_windows: int = 1
    """Records per recording: it is cut into consecutive windows of ``target_frames`` frames and up to
    this many become records, ids ``<source>#0``, ``#1``, ... (0: every window). 1 keeps AudioMAE's
    crop, the first window only. A window after the first is kept when at least half of it is real
    frames (its rest padded as a short clip's); such records' meta adds ``window`` and ``offset``
    (seconds)."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        for name in ("target_frames", "num_mel_bins"):
            v = getattr(self, name)
            if v <= 0 or v % self.patch_size:
                raise ValueError(
                    f"{name} must be a positive multiple of patch_size {self.patch_size}, got {v}"
                )
        if self.frame_shift_ms <= 0:
            raise ValueError(f"frame_shift_ms must be positive, got {self.frame_shift_ms}")
        if self.normalize_with not in ("config", "dataset"):
            raise ValueError(f"normalize_with must be 'config' or 'dataset', got {self.normalize_with!r}")
        if not self.norm_std > 0:
            raise ValueError(f"norm_std must be positive, got {self.norm_std}")
        if self.fit_max_files < 1:
            raise ValueError(f"fit_max_files must be >= 1, got {self.fit_max_files}")
        if (
            isinstance(self.max_windows, bool)
            or not isinstance(self.max_windows, int)
            or self.max_windows < 0
        ):
            raise ValueError(
                f"max_windows must be an integer >= 0 (0: every window), got {self.max_windows!r}"
            )


class KaldiFbank:
    """``torchaudio.compliance.kaldi.fbank`` with AudioMAE's options, with its constants computed once.

    Computes, up to float32 rounding (log-mel values within 1e-5 in the tests), what
    ``kaldi.fbank(wav[None], htk_compat=True, use_energy=False, window_type="hanning", dither=0.0,
    num_mel_bins=..., sample_frequency=..., frame_shift=...)`` returns, with the other options at their
    defaults (25 ms frames, snip_edges, remove_dc_offset, preemphasis 0.97, FFT size rounded up to a
    power of two, power spectrum, log with a float32-epsilon floor, mel bins from 20 Hz to Nyquist).
    ``kaldi.fbank`` rebuilds the Hann window and the (num_mel_bins, fft bins) mel matrix on every call
    and computes a frame log-energy that ``use_energy=False`` then discards; here the window and the
    mel matrix are built once (per device) and the energy is skipped. The power spectrum is
    ``re^2 + im^2`` (``kaldi.fbank`` takes ``abs()`` then squares: a hypot per bin, 4x slower on CPU),
    which is where the last bits differ; the stored tokens are float16, far coarser than that.

    On CPU the frames never exist as a (frames, window) copy that is edited in place step by step;
    the same arithmetic is regrouped so that each step is one pass (numpy, where a small op costs
    ~1 us instead of torch's ~5 us):

    * pre-emphasis of a DC-removed frame is ``x[j] - 0.97 x[j-1] - 0.03 m`` (``m`` the frame mean),
      so the waveform is pre-emphasised once and the frames are strided views of it; the first sample
      of a frame, which Kaldi pre-emphasises against itself, is multiplied by the Hann window's zero;
    * the windowed frames are written straight into a zero-padded (frames, fft_size) buffer;
    * the mel product skips the zeros of the triangular filters: the filters are cut into
      ``MEL_GROUPS`` runs of neighbours and each run multiplies only the FFT bins it covers (the 128
      AudioMAE filters touch 504 of 32,896 matrix entries; 4 runs do a quarter of the dense work).

    On this 2-core machine, in the tokenizer's loop over FSDD clips (8 kHz WAVs resampled to 16 kHz,
    ~50 frames): 88 us per clip instead of 146 us for the torch formulation (which other devices
    still use).

    With numba (a dependency; see :mod:`maskloom._kernels`) the CPU path is two compiled calls
    (:func:`maskloom._kernels.fbank`): the windowed, pre-emphasised, zero-padded frames (Kaldi's
    arithmetic, the mean-free pre-emphasis regrouped as above), MKL's FFT called by address, the power
    spectrum, then the mel sums as LLVM vector code (16 frames in the lanes of a vector: one 16-wide
    multiply-add per filter weight; the spectrum and the results transposed 16 x 16 in registers) and
    a vectorised float32 log
    (Cephes' ``logf``, within 0.82 ulp of the exact log; numpy's float32 log is within 3.3). ~17 us per
    FSDD clip, where the two kernels around numpy's FFT and log took ~32. As close to ``kaldi.fbank``
    (log-mel within 2e-3 on FSDD, against 3e-3 for the numpy path; the tests bound both).
    :class:`maskloom._kernels.FbankTokens` (see :meth:`fused_tokens`) does all of it in one call, straight to
    float16 patches. The numpy path runs without numba
    or with ``MASKLOOM_JIT=0``.
    """

    MEL_GROUPS = 4
    """Runs of neighbouring mel filters whose FFT-bin ranges are multiplied separately on CPU."""

    PREEMPHASIS = 0.97
    """Kaldi's default pre-emphasis coefficient."""

    def __init__(self, *, sample_rate: int, num_mel_bins: int, frame_shift_ms: float) -> None:
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        self.window_size = int(sample_rate * WINDOW_MS * 0.001)
        self.fft_size = 2 ** (self.window_size - 1).bit_length()  # Kaldi's round_to_power_of_two
        # (F, fft_size // 2 + 1) with a zero column for the Nyquist bin, as kaldi.fbank pads it
        self._np_banks = np.pad(mel_banks(num_mel_bins, self.fft_size, sample_rate), ((0, 0), (0, 1)))
        self._eps = float(np.finfo(np.float32).eps)
        self._torch_consts: tuple[Any, Any] | None = None  # (banks, window) as torch tensors, for _torch
        # CPU path (numpy): the window, and the mel filters as runs over the bins they touch
        self._np_window = hann_window(self.window_size)  # (W,)
        if self._np_window[0] != 0.0:  # the pre-emphasis regrouping needs w[0] == 0 (Hann, symmetric)
            raise AssertionError("KaldiFbank's CPU path needs a window whose first sample is 0")
        half = self.fft_size // 2  # the Nyquist bin's filter column is zero: bins 0 .. half-1
        dense = self._np_banks[:, :half]  # (F, half)
        edges = np.linspace(0, num_mel_bins, min(self.MEL_GROUPS, num_mel_bins) + 1).round().astype(int)
        self._np_runs: list[tuple[int, int, int, int, np.ndarray]] = []  # (f0, f1, bin0, bin1, (bins, f))
        for f0, f1 in zip(edges[:-1], edges[1:]):
            cols = np.flatnonzero(dense[f0:f1].any(axis=0))
            if cols.size:  # filters with no bin at all (narrow low filters at small FFT sizes) stay 0
                b0, b1 = int(cols[0]), int(cols[-1]) + 1
                self._np_runs.append((int(f0), int(f1), b0, b1, np.ascontiguousarray(dense[f0:f1, b0:b1].T)))
        # compiled path (maskloom._kernels): the filters as per-bin weights of two neighbouring filters
        self._mel_tables = _kernels.mel_tables(dense) if _kernels.ENABLED else None
        # CPU FFT: torch's MKL transform, planned once per frame count (see maskloom._mkl_fft)
        self._rfft = _mkl_fft.RealFFT(self.fft_size) if _mkl_fft.available() else None
        # waveform to tokens in one compiled call, where it can run (see fused_tokens)
        self._fused = (
            _kernels.FbankTokens(self._np_window, self.window_shift, self.PREEMPHASIS, self._rfft, self._mel_tables, self._eps)
            if _kernels.FUSED_TOKENS and self._rfft is not None and self._mel_tables is not None
            and num_mel_bins % _kernels.MEL_LANES == 0
            and _kernels.FbankTokens.fits(self._mel_tables, self.fft_size)
            else None
        )  # fmt: skip

    def _spectrum(self, buf: np.ndarray) -> np.ndarray:
        """(T, fft_size) float32 frames -> (T, fft_size // 2 + 1) complex64: ``torch.fft.rfft``'s bits,
        through a kept MKL plan when there is one (~8 instead of ~18 us for 50 frames)."""
        if self._rfft is not None:  # buf is made C-contiguous (T >= 1, fft_size) float32 by the callers
            return self._rfft.forward(buf, np.empty((buf.shape[0], self.fft_size // 2 + 1), np.complex64))
        import torch

        return torch.fft.rfft(torch.from_numpy(buf)).numpy()

    def num_frames(self, num_samples: int) -> int:
        """Frames of a waveform of ``num_samples`` (snip_edges: only frames that fit wholly)."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift

    def _check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 1 or shape[0] < self.window_size:
            raise ValueError(
                f"KaldiFbank needs a 1-D waveform of at least {self.window_size} samples, got shape {tuple(shape)}"
            )

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """(N,) float32 waveform, N >= the window size -> (T, num_mel_bins) float32 log-mel filterbank."""
        import torch

        if waveform.device.type == "cpu" and waveform.dtype == torch.float32:
            return torch.from_numpy(self.numpy(waveform.numpy()))  # checks the shape
        self._check(tuple(waveform.shape))
        return self._torch(waveform)

    def numpy(self, waveform: np.ndarray, max_frames: int | None = None) -> np.ndarray:
        """The CPU path: (N,) float32 numpy waveform, N >= the window size -> (T, F) float32 log-mel
        (T at most ``max_frames``: the rest of the waveform is not read)."""
        mel, t = self.log_mel(waveform, max_frames)
        f = self._np_banks.shape[0]
        return mel[:t] if mel.shape[1] == f else np.ascontiguousarray(mel[:t, :f])

    def log_mel(self, waveform: np.ndarray, max_frames: int | None = None) -> tuple[np.ndarray, int]:
        """:meth:`numpy` of the first ``max_frames`` frames (default all; the rest of the waveform is
        not read) as ``(mel, T)``: ``mel`` a C-contiguous float32 array whose first T rows and F columns
        are the log-mel filterbank. With the compiled kernels it is (T, F) padded to
        :func:`maskloom._kernels.mel_shape` (the padding holds log(eps)), so that no copy is made."""
        s = np.ascontiguousarray(waveform, dtype=np.float32)
        self._check(s.shape)
        n, w, h = s.shape[0], self.window_size, self.window_shift
        t = 1 + (n - w) // h
        if max_frames is not None and max_frames < t:
            t = max(int(max_frames), 1)
            n = (t - 1) * h + w
            s = s[:n]
        if _kernels.ENABLED and self._mel_tables is not None:  # compiled: one call, or two around torch's FFT
            if self._rfft is not None:
                mel = _kernels.fbank(
                    s, self._np_window, h, self.PREEMPHASIS, self._rfft, t, self._mel_tables, self._eps
                )
                return mel, t
            mel = np.empty(_kernels.mel_shape(t, self._np_banks.shape[0]), np.float32)
            buf = _kernels.fbank_frames(
                s, self._np_window, h, self.PREEMPHASIS, np.empty((t, self.fft_size), np.float32)
            )
            _kernels.fbank_log_mel(self._spectrum(buf).view(np.float32), self._mel_tables, self._eps, mel)
            return mel, t
        # strided (T, W) views; np.ndarray(buffer=...) is ~10x cheaper than as_strided
        frames = np.ndarray((t, w), np.float32, buffer=s, strides=(h * 4, 4))
        dc = frames.sum(axis=1)
        dc *= np.float32((1.0 - self.PREEMPHASIS) / w)  # 0.03 m per frame
        pre = np.empty(n, np.float32)  # s[j] - 0.97 s[j-1]; pre[0] only meets the window's zero
        np.multiply(s[:-1], np.float32(-self.PREEMPHASIS), out=pre[1:])
        pre[1:] += s[1:]
        pre[0] = 0.0
        buf = np.zeros((t, self.fft_size), np.float32)  # zero-padded frames for the FFT
        pre_frames = np.ndarray((t, w), np.float32, buffer=pre, strides=(h * 4, 4))
        np.subtract(pre_frames, dc[:, None], out=buf[:, :w])
        buf[:, :w] *= self._np_window
        # (T, fft/2 + 1) complex64; MKL's FFT is the fastest here (scipy 1.5x, numpy 2.7x slower)
        spec = self._spectrum(buf)
        half = self.fft_size // 2
        sq = spec.view(np.float32)[:, : 2 * half]  # (T, fft) re, im interleaved, Nyquist dropped
        sq = sq * sq
        power = sq[:, 0::2] + sq[:, 1::2]  # (T, half) re^2 + im^2
        mel = np.zeros((t, self._np_banks.shape[0]), np.float32)
        for f0, f1, b0, b1, m in self._np_runs:
            np.matmul(power[:, b0:b1], m, out=mel[:, f0:f1])
        np.maximum(mel, np.float32(self._eps), out=mel)
        return np.log(mel, out=mel), t

    def fused_tokens(self) -> bool:
        """Whether the one-call kernel (:class:`maskloom._kernels.FbankTokens`, waveform to float16
        16 x 16 patches, the same values as :meth:`numpy` then normalising) runs here: compiled kernels
        with a hardware float16 conversion, MKL's FFT, and filters in whole groups of 16 (every
        AudioMAE-style configuration)."""
        return _kernels.ENABLED and self._fused is not None

    def _torch(self, waveform: torch.Tensor) -> torch.Tensor:
        """The same in torch ops, on any device (GPUs)."""
        import torch

        if self._torch_consts is None or self._torch_consts[0].device != waveform.device:
            self._torch_consts = (  # torch's own window (kaldi.fbank's bits; hann_window() rounds apart)
                torch.from_numpy(self._np_banks).to(waveform.device),
                torch.hann_window(
                    self.window_size, periodic=False, dtype=torch.float32, device=waveform.device
                ),
            )
        banks, window = self._torch_consts
        wav = waveform.contiguous()
        m, w = self.num_frames(wav.shape[0]), self.window_size
        x = wav.as_strided((m, w), (self.window_shift, 1))  # (T, W) overlapping frames, a view
        x = x - x.mean(dim=1, keepdim=True)  # remove_dc_offset
        x = x - self.PREEMPHASIS * torch.cat((x[:, :1], x[:, :-1]), dim=1)  # x[j] -= 0.97 x[max(j-1, 0)]
        spectrum = torch.fft.rfft(x * window, n=self.fft_size)  # (T, fft_size // 2 + 1), zero-padded
        power = spectrum.real.square() + spectrum.imag.square()  # |X|^2 = re^2 + im^2, no hypot
        mel = torch.mm(power, banks.T)  # (T, F)
        return mel.clamp_min_(self._eps).log_()


@dataclass
class Audio:
    """Decoded audio: a mono waveform at the tokenizer's sample rate."""

    waveform: np.ndarray
    """(N,) float32 samples in [-1, 1]."""
    sample_rate: int
    """Samples per second of ``waveform``."""
    total_samples: int | None = None
    """Samples of the whole recording at ``sample_rate`` when ``waveform`` is only its beginning
    (:meth:`AudioTokenizer.read` decodes what the tokens need); None: ``waveform`` is all of it."""

    @property
    def duration(self) -> float:
        """Seconds of the whole recording."""
        n = self.waveform.shape[0] if self.total_samples is None else self.total_samples
        return n / self.sample_rate


FFMPEG_EXTENSIONS: tuple[str, ...] = (".m4a", ".aac", ".wma", ".mka")
"""Audio formats libsndfile does not read (AAC in MP4 or ADTS, Windows Media, Matroska audio),
decoded with FFmpeg through PyAV (:func:`decode_with_pyav`)."""


def decode_with_pyav(path: str | IO[bytes], samples_at: Any) -> tuple[np.ndarray, int, int]:
    """The first audio stream of the file at ``path`` (or in a binary file object, e.g. a tar member's
    ``io.BytesIO``): (data (N, C) float32, sample rate, frames of
    the whole stream). ``samples_at(rate)`` says how many frames are wanted from the start (-1: all);
    decoding stops once they are there, and the whole stream's length is then the container's
    duration (the decoded count when that is unknown or shorter). Samples are as the decoder gives
    them (an edit list's encoder delay is dropped by FFmpeg; a file without one keeps AAC's ~1024
    priming samples). Raises ``av.FFmpegError`` for undecodable data and ``LookupError`` for a file
    without an audio stream."""
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            raise LookupError("no audio stream (video or data only)")
        stream = container.streams.audio[0]
        stream.thread_count = 1
        rate = stream.codec_context.sample_rate or stream.sample_rate
        if not rate:
            raise ValueError("the audio stream has no sample rate")
        want = samples_at(rate)
        estimate = 0
        if stream.duration is not None and stream.time_base is not None:
            estimate = round(stream.duration * stream.time_base * rate)
        elif container.duration is not None:
            estimate = round(container.duration * rate / av.time_base)
        # one sample format and rate for every frame (planar float32: (C, n) per frame)
        resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        chunks: list[np.ndarray] = []
        have, stopped = 0, False
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                have += chunks[-1].shape[1]
            if 0 <= want <= have:
                stopped = True
                break
        if not stopped:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
                have += chunks[-1].shape[1]
    if not chunks:
        return np.zeros((0, 1), np.float32), rate, 0
    data = np.concatenate(chunks, axis=1).T  # (N, C)
    if stopped:
        return np.ascontiguousarray(data[:want]), rate, max(estimate, have)
    return np.ascontiguousarray(data), rate, have


def riff_truncation(file: str | IO[bytes]) -> str | None:
    """For a RIFF/WAVE file (a path, or a seekable binary file object such as a tar member's
    ``io.BytesIO``): a message when its ``data`` chunk declares more bytes than the file holds (a file
    cut short while copying), else None. libsndfile silently returns the shorter clip."""
    try:
        if isinstance(file, (str, bytes, os.PathLike)):
            with open(file, "rb") as f:
                return _riff_truncation(f)
        return _riff_truncation(file)
    except OSError:
        return None


def _riff_truncation(f: IO[bytes]) -> str | None:
    import struct

    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    size = f.seek(0, os.SEEK_END)
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        cid, n = struct.unpack("<4sI", f.read(8))
        if cid == b"data":
            if n != 0xFFFFFFFF and pos + 8 + n > size:  # 0xFFFFFFFF: streamed, size unknown
                return f"data chunk declares {n} bytes but the file holds {size - pos - 8}"
            return None
        pos += 8 + n + (n & 1)  # chunks are word-aligned
    return None


AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", *FFMPEG_EXTENSIONS,
)  # fmt: skip
"""Extensions of audio files; in a tar sample, the first of them present (in this order) is its audio."""

_MEMBER_AUDIO_EXTENSIONS = tuple(e[1:] for e in AUDIO_EXTENSIONS)


class TarAudio(NamedTuple):
    """One usable sample of a tar shard, decoded (an element of :class:`TarAudios`)."""

    key: str
    """The sample's key: its members' path up to the first dot of the base name."""
    audio: Audio
    """As :meth:`AudioTokenizer.read` decodes the same audio as a file."""
    label: int | None
    """The class index in the sample's ``cls`` member, or None."""
    member: str
    """The audio member's name in the tar."""


class TarAudios(TarItems):
    """What :meth:`AudioTokenizer.read` returns for a tar shard: the :class:`TarAudio` of each usable
    sample, in archive order (every clip decoded and held: the pipeline streams instead)."""


@register_tokenizer("audio")
class AudioTokenizer(Tokenizer):
    """Waveform -> Kaldi fbank -> normalised 16x16 (time, mel) patches (AudioMAE)."""

    Config = AudioConfig
    version = "1"
    extensions = (*AUDIO_EXTENSIONS, *TAR_EXTENSIONS)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        # Only dataset normalisation needs a pass over the corpus first.
        self.needs_fit = self.config.normalize_with == "dataset"
        self.stats: dict[str, float] | None = None
        """Learned {"mean", "std", "frames", "files"} from fit()/load_artifacts(), or None."""
        self._kaldi: KaldiFbank | None = None  # built on first use (window + mel matrix)
        # what tokenize needs per statistics (see _norm_consts)
        self._norm_cache: tuple[Any, ...] | None = None
        self._positions: np.ndarray | None = None  # (L, 2) float32, copied into every record
        self._resamplers: dict[int, SincResampler] = {}  # by source sample rate

    # ---- contract -----------------------------------------------------------------------------
    def spec(self) -> TableSpec:
        p = self.config.patch_size
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=p * p,
            token_dtype="float16",
            position_axes=("time", "freq"),
            position_kind="grid",
            token_shape=(p, p),
        )

    def read(self, source: str) -> Audio | TarAudios:
        """Decode an audio file to a mono float32 waveform at ``Config.sample_rate``: its beginning
        only, as much as the ``target_frames`` kept need (plus the resampler's reach), with the
        whole recording's length in ``total_samples``. An hour of 44.1 kHz stereo took 8.7 s and
        3.4 GB of memory to decode whole, for the 10 s that are tokenized; now 16 ms, the same tokens.
        A tar shard: the :class:`TarAudios` of its usable samples."""
        if is_tar_path(source):
            return read_tar(
                TarAudios, os.fspath(source), _MEMBER_AUDIO_EXTENSIONS, "audio", self._decode, TarAudio
            )
        self.check_file(source)
        return self._decode(source, source, os.path.splitext(source)[1].lower())

    def _decode(self, file: str | IO[bytes], source: str, ext: str) -> Audio:
        """Decode the audio in ``file`` (a path, or a seekable binary file object) as :meth:`read`
        documents; ``source`` names it in errors, ``ext`` is the lower-case extension (with its dot)
        it was named with (which picks libsndfile or FFmpeg)."""
        if ext in FFMPEG_EXTENSIONS:
            data, sr, length = self._read_with_pyav(file, source)
        else:
            try:
                with path_or_file(file) as path, sf.SoundFile(path) as f:  # libsndfile takes UTF-8 paths
                    sr, length = f.samplerate, f.frames
                    frames = self._input_samples(sr)
                    frames = frames if 0 <= frames < length else -1  # -1: all
                    data = f.read(frames=frames, dtype="float32", always_2d=True)  # (N, C)
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
                why: Any = e  # a file object's error names its repr (a memory address): not that
                if not isinstance(file, str) and isinstance(e, sf.LibsndfileError):
                    why = e.error_string
                if ext in self.extensions:
                    raise TokenizeError(source, "corrupt", f"cannot decode audio: {why}") from None
                raise TokenizeError(
                    source, "unsupported", f"not an audio format libsndfile reads ({why})"
                ) from None
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise TokenizeError(source, "empty", "audio has no samples")
        short = riff_truncation(file)
        if short:
            raise TokenizeError(source, "corrupt", f"truncated WAV: {short}")
        if not np.isfinite(data).all():
            raise TokenizeError(source, "corrupt", "audio contains non-finite samples (NaN or inf)")
        wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]  # (N,) mono mix-down
        target = self.config.sample_rate
        if sr != target:
            wav = self._resampler(sr)(wav)
        total = None
        if data.shape[0] < length:  # the beginning of a longer recording: its length at the target rate
            total = length if sr == target else -(-length * target // sr)
        wav = np.ascontiguousarray(wav, dtype=np.float32)
        return Audio(waveform=wav, sample_rate=target, total_samples=total)

    def _read_with_pyav(self, file: str | IO[bytes], source: str) -> tuple[np.ndarray, int, int]:
        """:func:`decode_with_pyav` of ``file`` (the formats libsndfile lacks), its errors as
        TokenizeErrors naming ``source``."""
        import av

        try:
            with path_or_file(file) as path:  # FFmpeg takes UTF-8 paths
                return decode_with_pyav(path, self._input_samples)
        except LookupError as e:
            raise TokenizeError(source, "empty", str(e)) from None
        except (av.FFmpegError, OSError, ValueError) as e:
            raise TokenizeError(
                source, "corrupt", f"cannot decode audio (FFmpeg): {ffmpeg_reason(e)}"
            ) from None

    def _window_samples(self, windows: int) -> int:
        """Samples at the target rate of ``windows`` consecutive windows of ``target_frames`` frames."""
        k = self._kaldi_fbank()
        return (windows * self.config.target_frames - 1) * k.window_shift + k.window_size

    def _input_samples(self, sr: int) -> int:
        """Samples at ``sr`` that :meth:`tokenize` needs from the start of a recording: those of
        ``target_frames`` frames at the target rate and, resampled, every input sample the
        resampler reads for them (each output block of ``new`` samples reads ``orig + 2 width``
        inputs), so that the tokens equal those of the whole recording's."""
        c = self.config
        if c.max_windows == 0:
            return -1  # every window: all of it
        out = self._window_samples(c.max_windows)
        if sr == self.config.sample_rate:
            return out
        r = self._resampler(sr)
        return -(-out * r.orig // r.new) + r.orig + 2 * r.width + 1

    # ---- tar shards -----------------------------------------------------------------------------
    def _tar_audios(self, source: str) -> Iterator[TarAudio]:
        """The usable samples of tar shard ``source``, decoded, as they are read, under the shared
        tar policy (:func:`~maskloom.tokenizers.base.iter_tar_items`)."""
        return decode_tar_items(source, _MEMBER_AUDIO_EXTENSIONS, "audio", self._decode, TarAudio, logger=log)

    def iter_records(self, source: str) -> Iterator[Record]:
        """The records of :meth:`__call__`; a tar shard's one sample at a time, as it is read."""
        if is_tar_path(source):  # the shared tar policy (base.iter_tar_items): a bad sample is skipped
            source = os.fspath(source)
            return iter_tar_records(source, _MEMBER_AUDIO_EXTENSIONS, "audio", self._decode, TarAudio,
                                    functools.partial(self._sample_records, source), logger=log)  # fmt: skip
        return iter(self(source))

    def _sample_records(self, source: str, s: TarAudio) -> list[Record]:
        return self._records(s.audio, source, f"{source}#{s.key}", s.label, s.member)

    # ---- tokenize -------------------------------------------------------------------------------
    def tokenize(self, raw: Audio | TarAudios, *, source: str = "") -> list[Record]:
        """One record per input (per window with ``max_windows``): (L, patch_size**2) float16 tokens,
        (L, 2) (time, freq) grid positions, ids ``<source>#0``, ``<source>#k``. A tar shard's
        :class:`TarAudios`: those of each sample, ids ``<source>#<key>``, ``<source>#<key>#k``.

        L = (target_frames / patch_size) * (num_mel_bins / patch_size), time-major.
        """
        if isinstance(raw, TarAudios):
            return tokenize_tar(source, raw, functools.partial(self._sample_records, source), logger=log)
        return self._records(raw, source, None)

    def _records(
        self, raw: Audio, source: str, key_id: str | None, label: int | None = None, member: str | None = None
    ) -> list[Record]:
        """The records of one recording: ids ``<source>#0`` and ``<source>#k`` (``key_id`` None, a
        file), or ``<key_id>`` and ``<key_id>#k`` (a tar sample, with its label and member)."""
        c = self.config
        src = source or "<memory>"
        if raw.sample_rate != c.sample_rate:
            raise TokenizeError(
                src,
                "config",
                f"waveform is at {raw.sample_rate} Hz but the tokenizer expects {c.sample_rate} Hz",
            )
        if raw.waveform.size == 0:
            raise TokenizeError(src, "empty", "audio has no samples")
        mean, std = self.norm_stats()
        consts = self._norm_consts(mean, std)
        nt, nf, p = consts[7]
        tokens, frames, total, finite = self._window_tokens(raw.waveform, raw.total_samples or 0, consts)
        meta = {
            "sample_rate": c.sample_rate,
            "frames": frames,
            "total_frames": total,
            "duration": raw.duration,
            "grid": [nt, nf],
            "patch_size": p,
            "num_mel_bins": c.num_mel_bins,
            "norm_mean": mean,
            "norm_std": std,
        }
        if member is not None:
            meta["member"] = member
        tokens, positions, finite = self._kept(tokens, frames, finite)
        first = Record(id=f"{source}#0" if key_id is None else key_id, source=source, tokens=tokens,
                       positions=positions, label=label, meta=meta, finite=finite)  # fmt: skip
        if c.max_windows == 1:
            return [first]
        first.meta.update(window=0, offset=0.0)
        records = [first]
        kaldi = self._kaldi_fbank()
        hop = c.target_frames * kaldi.window_shift  # samples from one window's first frame to the next's
        need = self._window_samples(1)
        wav = raw.waveform
        k = 1
        while c.max_windows == 0 or k < c.max_windows:
            piece = wav[k * hop : k * hop + need]
            if kaldi.num_frames(piece.shape[0]) * 2 < c.target_frames:  # under half a window left
                break
            tokens, frames, _, finite = self._window_tokens(piece, 0, consts)
            tokens, positions, finite = self._kept(tokens, frames, finite)
            meta = {**first.meta, "frames": frames, "window": k, "offset": k * hop / c.sample_rate}
            records.append(Record(id=f"{source if key_id is None else key_id}#{k}", source=source, tokens=tokens,
                                  positions=positions, label=label, meta=meta, finite=finite))  # fmt: skip
            k += 1
        return records

    def _kept(self, tokens: np.ndarray, frames: int, finite: bool) -> tuple[np.ndarray, np.ndarray, bool]:
        """(tokens, positions, finite) of a window's record: the whole grid, or with ``pad_tokens``
        off its first ceil(frames / patch_size) time rows (copied: the record does not hold on to the
        whole grid's buffer), whose finiteness is then their own (the padding's is not theirs)."""
        c = self.config
        if c.pad_tokens:
            return tokens, self._grid_positions().copy(), finite
        nf = c.num_mel_bins // c.patch_size
        keep = max(1, -(-frames // c.patch_size)) * nf
        if keep == tokens.shape[0]:
            return tokens, self._grid_positions().copy(), finite
        kept = tokens[:keep].copy()
        return kept, self._grid_positions()[:keep].copy(), all_finite(kept)

    def _window_tokens(self, wav: np.ndarray, total_samples: int, consts: tuple[Any, ...]) -> tuple[Any, ...]:
        """(tokens (L, p*p) float16, real frames, frames of the whole recording, finite?) of the first
        ``target_frames`` frames of ``wav`` (``total_samples``: the whole recording's length when
        ``wav`` is its beginning, else 0)."""
        c = self.config
        # (mean, std, pad value, its bits, finite?, float32 mean, float32 2 std, (nt, nf, p), fused kernel)
        mean, std, pad, pad_bits, pad_finite, mean32, scale32, (nt, nf, p), fused = consts
        n = wav.shape[0]
        # Normalise the real frames only; every padded frame holds the same value. The result is the
        # same as normalising the padded filterbank: the arithmetic per element is unchanged. Only the
        # frames kept are computed (a 10 min recording cropped to 10 s reads 10 s).
        if fused is not None:  # one compiled call: waveform to float16 patches (kept lean: ~2 us of Python)
            if not (
                n >= fused.window
                and wav.dtype is _F32  # native float32 (the same object for every such array)
                and wav.ndim == 1
                and wav.flags.c_contiguous
            ):
                wav = np.ascontiguousarray(self._fbank_input(wav))
                self._kaldi_fbank()._check(wav.shape)
            total = 1 + (max(wav.shape[0], total_samples) - fused.window) // fused.shift
            frames = min(total, c.target_frames)
            bits = np.empty((nt * nf, 256), np.uint16)  # (L, p*p), patch (t, f) at row t * nf + f
            finite = fused(wav, frames, mean32, scale32, pad_bits, bits) and pad_finite
            tokens = bits.view(_F16)
        else:
            kaldi = self._kaldi_fbank()
            if n < kaldi.window_size or wav.dtype != np.float32:
                wav = self._fbank_input(wav)
            total = kaldi.num_frames(max(wav.shape[0], total_samples))
            tokens = np.empty((nt, nf, p * p), np.float16)  # (nt, nf, p*p): patch (t, f) at [t, f]
            fb, computed = kaldi.log_mel(wav, max_frames=c.target_frames)  # (>= T, >= F), first (T, F) real
            frames = min(computed, c.target_frames)
            tokens[-(-frames // p) :] = pad
            finite = self._norm_tokens(fb, frames, mean, std, pad, tokens)
            tokens = tokens.reshape(nt * nf, p * p)  # (L, p*p), time-major
        return tokens, frames, total, finite

    def _norm_tokens(
        self, fb: np.ndarray, frames: int, mean: float, std: float, pad: np.float16, tokens: np.ndarray
    ) -> bool:
        """Normalise the first ``frames`` rows of a log-mel filterbank ``fb`` (C-contiguous, >= F
        columns) into ``tokens`` (nt, nf, p * p) float16 rows 0 .. ceil(frames / p) - 1, the padded
        frames of the last row with ``pad``; returns whether they were checked finite here."""
        c = self.config
        p = c.patch_size
        nt, nf = tokens.shape[:2]
        rows = -(-frames // p)
        if _kernels.ENABLED:  # compiled: normalise, float16, patch layout; the kernel also finds
            # whether the values are finite, which spares validation a pass over the tokens
            return _kernels.norm_tokens(
                fb, frames, mean, 2.0 * std, pad.view(np.uint16), p, tokens.view(np.uint16), F=c.num_mel_bins
            ) and math.isfinite(pad)
        real = np.empty((rows * p, c.num_mel_bins), np.float16)  # (rows*p, F)
        real[frames:] = pad
        # float32 arithmetic, as torch's ((fb - mean) / (2 * std)): numpy keeps Python scalars
        # weak; the float16 cast by torch (vectorised: 3 us for a 0.5 s clip, numpy's 16 us)
        norm = fb[:frames, : c.num_mel_bins] - mean
        norm /= 2.0 * std
        import torch  # only on this path (no numba)

        torch.from_numpy(real[:frames]).copy_(torch.from_numpy(norm))
        tokens.reshape(nt, nf, p, p)[:rows] = real.reshape(rows, p, nf, p).transpose(0, 2, 1, 3)
        return False

    def detokenize(self, record: Record) -> np.ndarray:
        """The un-normalised filterbank of the real frames, (frames, num_mel_bins) float32.

        The waveform cannot be recovered (a log-mel filterbank has no phase)."""
        m = record.meta
        p = int(m["patch_size"])
        nt, nf = (int(v) for v in m["grid"])
        tok = np.asarray(record.tokens, dtype=np.float32)  # (L, p*p)
        pos = np.asarray(record.positions).astype(np.int64)  # (L, 2)
        grid = np.zeros((nt, nf, p * p), np.float32)
        grid[pos[:, 0], pos[:, 1]] = tok  # placed by position: order-independent
        x = grid.reshape(nt, nf, p, p).transpose(0, 2, 1, 3).reshape(nt * p, nf * p)  # (t pt) (f pf)
        fb = x[: int(m["frames"])] * np.float32(2.0 * float(m["norm_std"]))
        fb += np.float32(m["norm_mean"])
        return fb

    # ---- statistics ---------------------------------------------------------------------------
    def fit(self, sources: Iterable[str]) -> None:
        """Learn the filterbank mean/std over the real frames of up to ``fit_max_files`` files
        (evenly spaced over the sorted list; unreadable files are skipped with a warning)."""
        srcs = sorted(str(s) for s in sources)
        if not srcs:
            raise ValueError("audio fit(): no sources given")
        if len(srcs) > self.config.fit_max_files:
            idx = np.linspace(0, len(srcs) - 1, self.config.fit_max_files).round().astype(int)
            srcs = [srcs[i] for i in np.unique(idx)]
        s1 = s2 = 0.0
        n = used = 0
        per_tar = max(1, self.config.fit_max_files // len(srcs))  # clips read from a tar shard
        for s in srcs:
            try:
                if is_tar_path(s):  # its first samples
                    clips = [a.audio for a in itertools.islice(self._tar_audios(s), per_tar)]
                else:
                    clips = [self.read(s)]
                # (T, F), the frames a record keeps only (a long file's others are not computed)
                fbs = [self._fbank_numpy(a.waveform, self.config.target_frames) for a in clips]
            except TokenizeError as e:
                log.warning("audio fit(): skipping %s", e)
                continue
            for fb in fbs:
                fb = fb.astype(np.float64)
                s1 += float(fb.sum())
                s2 += float((fb * fb).sum())
                n += fb.size
            used += 1
        if n == 0:
            raise ValueError(f"audio fit(): none of the {len(srcs)} sampled sources could be read")
        mean = s1 / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        if not std > 0:
            raise ValueError("audio fit(): the filterbank has zero variance over the sampled sources")
        self.stats = {"mean": mean, "std": std, "frames": n // self.config.num_mel_bins, "files": used}
        log.info("audio fit(): fbank mean %.6f std %.6f over %d files", mean, std, used)

    def save_artifacts(self, directory: str) -> list[str]:
        if self.stats is None:
            return []
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, STATS_FILE), "w", encoding="utf-8") as f:
            json.dump(self.stats, f, indent=1)
        return [STATS_FILE]

    def load_artifacts(self, directory: str) -> None:
        path = os.path.join(directory, STATS_FILE)
        if not os.path.exists(path):
            if self.needs_fit:
                raise FileNotFoundError(f"{path}: no audio statistics (normalize_with='dataset' needs them)")
            return
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        self.stats = {
            "mean": float(d["mean"]),
            "std": float(d["std"]),
            "frames": int(d.get("frames", 0)),
            "files": int(d.get("files", 0)),
        }

    def norm_stats(self) -> tuple[float, float]:
        """(mean, std) used to normalise the filterbank under the current config."""
        if self.config.normalize_with == "config":
            return float(self.config.norm_mean), float(self.config.norm_std)
        if self.stats is None:
            raise RuntimeError(
                "audio tokenizer: normalize_with='dataset' needs fit() or load_artifacts() first"
            )
        return float(self.stats["mean"]), float(self.stats["std"])

    # ---- helpers ------------------------------------------------------------------------------
    def fbank(self, waveform: np.ndarray) -> torch.Tensor:
        """Kaldi log-mel filterbank of a mono waveform, as AudioMAE: (N,) -> (T, num_mel_bins).

        The waveform's mean is removed first; audio shorter than one 25 ms window is zero-padded to one
        window (one frame). Equal to ``kaldi.fbank`` with AudioMAE's options up to float32 rounding (see
        :class:`KaldiFbank`)."""
        import torch

        return torch.from_numpy(self._fbank_numpy(waveform))

    def _fbank_numpy(self, waveform: np.ndarray, max_frames: int | None = None) -> np.ndarray:
        """:meth:`fbank` as a (T, num_mel_bins) float32 numpy array, T at most ``max_frames``."""
        return self._kaldi_fbank().numpy(self._fbank_input(waveform), max_frames)

    def _kaldi_fbank(self) -> KaldiFbank:
        if self._kaldi is None:
            c = self.config
            self._kaldi = KaldiFbank(
                sample_rate=c.sample_rate, num_mel_bins=c.num_mel_bins, frame_shift_ms=c.frame_shift_ms
            )
        return self._kaldi

    def _fbank_input(self, waveform: np.ndarray) -> np.ndarray:
        """The waveform :class:`KaldiFbank` gets: as it is, or, shorter than one 25 ms window, with its
        mean removed and zero-padded to one window (one frame)."""
        wav = np.asarray(waveform, dtype=np.float32)
        win = self._kaldi_fbank().window_size
        if wav.shape[0] < win:  # mean removal, then zero padding to one window (one frame)
            wav = np.pad(wav - wav.mean(dtype=np.float32), (0, win - wav.shape[0]))
        # Otherwise the waveform's mean need not be removed: Kaldi removes each frame's mean
        # (remove_dc_offset), which cancels any constant offset exactly (up to float32 rounding).
        return wav

    def _resampler(self, sr: int) -> SincResampler:
        """``torchaudio.functional.resample(x, sr, Config.sample_rate)`` (:class:`SincResampler`) with
        its sinc kernel built once per source rate (the functional form rebuilds it on every call:
        half the time of a short clip)."""
        r = self._resamplers.get(sr)
        if r is None:
            r = self._resamplers[sr] = SincResampler(sr, self.config.sample_rate)
        return r

    def _norm_consts(self, mean: float, std: float) -> tuple[Any, ...]:
        """What :meth:`tokenize` needs for ``(mean, std)``, cached per statistics: ``(mean, std, pad,
        pad bits, pad finite?, mean32, scale32, (nt, nf, p), fused)``: the padded frame's token
        ``(pad_value - mean) / (2 * std)`` as float16 in the float32 arithmetic of the real frames, its
        bits and whether it is finite; the statistics as float32 (the scale is 2 std); the patch grid;
        and the one-call kernel (:class:`maskloom._kernels.FbankTokens`) where it runs, else None."""
        if self._norm_cache is None or self._norm_cache[:2] != (mean, std):
            c = self.config
            pad = np.full(1, c.pad_value, np.float32)
            value = ((pad - mean) / (2.0 * std)).astype(np.float16)[0]
            p = c.patch_size
            kaldi = self._kaldi_fbank()
            fused = kaldi._fused if p == 16 and kaldi.fused_tokens() else None
            self._norm_cache = (
                mean, std, value, value.view(np.uint16), math.isfinite(value),
                np.float32(mean), np.float32(2.0 * std), (c.target_frames // p, c.num_mel_bins // p, p), fused,
            )  # fmt: skip
        return self._norm_cache

    def _grid_positions(self) -> np.ndarray:
        """(L, 2) float32 (time, freq) patch-grid indices, time-major (cached; callers copy)."""
        if self._positions is None:
            p = self.config.patch_size
            nt, nf = self.config.target_frames // p, self.config.num_mel_bins // p
            tt, ff = np.meshgrid(np.arange(nt), np.arange(nf), indexing="ij")
            self._positions = np.stack([tt.reshape(-1), ff.reshape(-1)], axis=1).astype(np.float32)
        return self._positions

    def render(self, raw: Audio | TarAudios | np.ndarray, path: str) -> None:
        """Draw a spectrogram PNG: ``raw`` is an :class:`Audio` (its filterbank is computed), a tar
        shard's :class:`TarAudios` (its first clip) or a (frames, mel) filterbank such as detokenize()
        returns."""
        if isinstance(raw, TarAudios):
            if not raw:
                raise TokenizeError(str(path), "empty", "no samples to render")
            raw = raw[0].audio
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fb = self._fbank_numpy(raw.waveform) if isinstance(raw, Audio) else np.asarray(raw, dtype=np.float32)
        if fb.ndim != 2:
            raise ValueError(f"render expects Audio or a (frames, mel) filterbank, got shape {fb.shape}")
        fig, ax = plt.subplots(figsize=(max(4.0, min(16.0, fb.shape[0] / 40)), 3), dpi=100)
        im = ax.imshow(
            fb.T,
            origin="lower",
            aspect="auto",
            cmap="magma",
            extent=(0, fb.shape[0] * self.config.frame_shift_ms / 1000, 0, fb.shape[1]),
        )
        ax.set_xlabel("time (s)")
        ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=ax, label="log-mel")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
