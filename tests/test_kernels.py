"""The compiled kernels give exactly what their numpy formulation gives."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from maskloom import _kernels

pytestmark = pytest.mark.skipif(not _kernels.ENABLED, reason="numba is not installed (or MASKLOOM_JIT=0)")


def reference(src, starts, lens, shape, dtype, fill, slots=None):
    out = np.full(shape, fill, dtype)
    for i, (s, n) in enumerate(zip(starts, lens)):
        out[i if slots is None else slots[i], :n] = src[s : s + n]
    return out


CASES = [  # (source dtype, batch dtype, trailing shape, fill)
    (np.int32, np.int64, (), 0),  # text ids, widened
    (np.int32, np.int64, (2,), -1),  # graph edges
    (np.float16, np.float16, (3,), 0),  # series patches: float16 moved as bits
    (np.float16, np.float16, (3,), 1.5),
    (np.uint8, np.uint8, (5,), 0),
    (np.float32, np.float32, (1,), 0),
]


@pytest.mark.parametrize("src_dtype,dtype,tail,fill", CASES)
def test_gather_pad_equals_row_by_row_padding(src_dtype, dtype, tail, fill):
    rng = np.random.default_rng(0)
    src = (rng.standard_normal((50, *tail)) * 100).astype(src_dtype)
    lens = np.array([3, 0, 7, 1, 7])
    starts = np.array([0, 5, 10, 43, 20])
    out = np.empty((5, 7, *tail), dtype)
    got = _kernels.gather_pad(src, starts, lens, out, fill)
    assert got is out
    want = reference(src, starts, lens, out.shape, dtype, fill)
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("slots", [np.array([4, 0, 2]), slice(1, 4)])
def test_gather_pad_writes_only_its_slots(slots):
    src = np.arange(40, dtype=np.int32).reshape(20, 2)
    starts, lens = np.array([3, 9, 0]), np.array([2, 4, 1])
    out = np.full((5, 4, 2), 99, np.int64)
    _kernels.gather_pad(src, starts, lens, out, -1, slots)
    idx = np.arange(5)[slots]
    want = np.full((5, 4, 2), 99, np.int64)
    want[idx] = reference(src, starts, lens, (3, 4, 2), np.int64, -1)
    assert np.array_equal(out, want)


def test_gather_pad_empty_batch_and_zero_length():
    src = np.zeros((0, 3), np.float32)
    out = _kernels.gather_pad(
        src, np.zeros(2, np.int64), np.zeros(2, np.int64), np.empty((2, 0, 3), np.float32), 0
    )
    assert out.shape == (2, 0, 3)
    out = _kernels.gather_pad(
        src, np.zeros(0, np.int64), np.zeros(0, np.int64), np.empty((0, 0, 3), np.float32), 0
    )
    assert out.shape == (0, 0, 3)


def test_gather_pad_refuses_a_float16_conversion():
    with pytest.raises(TypeError, match="float32 into float16"):
        _kernels.gather_pad(
            np.zeros((3, 2), np.float32),
            np.zeros(1, np.int64),
            np.ones(1, np.int64),
            np.empty((1, 1, 2), np.float16),
            0,
        )


def test_gather_pad2_equals_two_gather_pads():
    rng = np.random.default_rng(1)
    tok = rng.integers(0, 500, (60, 1)).astype(np.int32)
    pos = rng.standard_normal((60, 2)).astype(np.float32)
    starts, lens = np.array([50, 2, 30, 11]), np.array([4, 9, 0, 6])
    t, p, pad = np.empty((4, 9, 1), np.int64), np.empty((4, 9, 2), np.float32), np.empty((4, 9), bool)
    _kernels.gather_pad2(tok, pos, starts, lens, t, p, pad)
    assert np.array_equal(pad, np.arange(9) >= lens[:, None])
    assert np.array_equal(t, reference(tok, starts, lens, t.shape, np.int64, 0))
    assert np.array_equal(p, reference(pos, starts, lens, p.shape, np.float32, 0))


def test_fbank_frames_is_kaldis_framing():
    rng = np.random.default_rng(2)
    s = rng.standard_normal(1000).astype(np.float32)
    window = np.hanning(400).astype(np.float32)
    t, shift = 1 + (1000 - 400) // 160, 160
    buf = _kernels.fbank_frames(s, window, shift, 0.97, np.full((t, 512), np.nan, np.float32))
    for i in range(t):
        x = s[i * shift : i * shift + 400].astype(np.float64)
        x = x - x.mean()
        x = x - 0.97 * np.concatenate([x[:1], x[:-1]])  # Kaldi: x[0] against itself
        np.testing.assert_allclose(buf[i, :400], x * window, rtol=0, atol=2e-6)
    assert (buf[:, 400:] == 0).all()


@pytest.mark.parametrize("overlap", [False, True])
def test_mel_tables_and_fbank_log_mel_equal_the_log_of_the_dense_product(overlap):
    rng = np.random.default_rng(3)
    F, bins = 5, 12
    banks = np.zeros((F, bins), np.float32)  # triangles over neighbours, bin 0 and 11 in no filter
    edges = [1, 3, 4, 6, 8, 10, 11]
    for f in range(F):
        lo, mid, hi = edges[f], edges[f + 1], edges[f + 2]
        for k in range(lo, hi):
            banks[f, k] = (k - lo + 1) / (mid - lo + 1) if k < mid else (hi - k) / (hi - mid + 1)
    if overlap:  # any filter shape works: bin 6 now in filters 0, 2 and 3
        banks[0, 6] = 0.5
    tables = _kernels.mel_tables(banks)
    lo, width, start, weights = tables.arrays
    # widths 3, 3, 4, 4, 3 (filter 0: 6 with bin 6): every filter of the group reads the widest; the
    # last filter's start moves left so that it reads real bins only (12 - 6 = 6 <= 8)
    w = 6 if overlap else 4
    assert lo.tolist() == ([1, 3, 4, 6, 6] if overlap else [1, 3, 4, 6, 8]) + [0] * 11
    assert width.tolist() == [w] and start.tolist() == [0] and weights.shape == (16 * w + 1,)
    assert weights[: 5 * w].reshape(5, w).tolist() == [banks[f, lo[f] : lo[f] + w].tolist() for f in range(5)]
    assert not weights[5 * w :].any() and tables.bins == 12 and tables.filters == F
    T = 7
    spec = rng.standard_normal((T, 2 * (bins + 1))).astype(np.float32)  # (T, re/im of bins + Nyquist)
    power = spec[:, 0::2].astype(np.float64) ** 2 + spec[:, 1::2].astype(np.float64) ** 2
    want = np.log(np.maximum(power[:, :bins] @ banks.T.astype(np.float64), 1e-3))
    mel = np.full(_kernels.mel_shape(T, F), np.nan, np.float32)
    assert mel.shape == (16, 16)  # frames and filters to a multiple of 16
    got = _kernels.fbank_log_mel(spec, tables, 1e-3, mel)
    np.testing.assert_allclose(got[:T, :F], want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got[T:], np.log(np.float32(1e-3)), rtol=0, atol=1e-6)  # padding: the floor
    np.testing.assert_allclose(got[:T, F:], np.log(np.float32(1e-3)), rtol=0, atol=1e-6)


def test_fbank_log_mel_over_several_blocks_of_frames_and_groups_of_filters():
    """40 random sparse filters (three groups, one partly padded; two filters without any bin) over
    37 frames (three blocks of 16): the float64 product's log."""
    rng = np.random.default_rng(8)
    F, bins, T = 40, 70, 37
    banks = np.zeros((F, bins), np.float32)
    for f in range(F):
        if f in (7, 30):
            continue
        lo = int(rng.integers(0, bins - 1))
        hi = min(bins, lo + int(rng.integers(1, 12)))
        banks[f, lo:hi] = rng.uniform(0.1, 1.0, hi - lo)
    tables = _kernels.mel_tables(banks)
    assert tables.arrays[1].shape == (3,) and tables.bins <= bins
    spec = rng.standard_normal((T, 2 * (bins + 1))).astype(np.float32)
    power = spec[:, 0::2].astype(np.float64) ** 2 + spec[:, 1::2].astype(np.float64) ** 2
    want = np.log(np.maximum(power[:, :bins] @ banks.T.astype(np.float64), 1e-3))
    got = _kernels.fbank_log_mel(spec, tables, 1e-3, np.full(_kernels.mel_shape(T, F), np.nan, np.float32))
    assert got.shape == (48, 48)
    np.testing.assert_allclose(got[:T, :F], want, rtol=0, atol=3e-6)
    assert (got[:T, [7, 30]] == np.log(np.float32(1e-3))).all()
    np.testing.assert_allclose(got[T:], np.log(np.float32(1e-3)), rtol=0, atol=1e-6)


def test_log32_is_within_one_ulp_of_the_exact_log():
    rng = np.random.default_rng(4)
    x = np.concatenate(
        [
            np.exp(rng.uniform(-87, 88, 200_000)).astype(np.float32),  # the normal range
            rng.uniform(0.5, 2.0, 100_000).astype(np.float32),  # around 1, where log is small
            np.array([np.finfo(np.float32).eps, np.finfo(np.float32).tiny, 1.0, 2.0, 0.5], np.float32),
        ]
    )
    got = _kernels.log32(x).astype(np.float64)
    exact = np.log(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) <= ulp).all()  # measured: 0.82 ulp at most (numpy's float32 log: 3.3)
    assert _kernels.log32(np.array([1.0], np.float32))[0] == 0.0
    special = _kernels.log32(np.array([np.inf, np.nan, np.finfo(np.float32).max], np.float32))
    assert special[0] == np.inf and np.isnan(special[1]) and abs(special[2] - 88.72284) < 1e-4


def test_maskloom_jit_0_selects_the_numpy_paths():
    code = "import maskloom._kernels as k; print(k.ENABLED, k.numba is None)"
    env = {**os.environ, "MASKLOOM_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize(
    ("frames", "nt", "p"), [(53, 8, 16), (64, 4, 16), (1, 1, 16), (1, 3, 16), (7, 3, 4), (8, 2, 4)]
)
def test_norm_tokens_is_numpys_normalise_then_torchs_float16_then_patch(frames, nt, p):
    rng = np.random.default_rng(frames + nt)
    F = 2 * p
    fb = (rng.standard_normal((frames + 3, F)) * 4 - 4).astype(np.float32)  # more frames than used
    fb[0, :3] = [1e-9, -7e5, 3e-6]  # a float16 zero after normalising, an overflow to -inf, a subnormal
    mean, scale, pad = -4.2677393, 2.0 * 4.5689974, np.float16(0.934)
    out = np.full((nt, F // p, p * p), np.nan, np.float16)
    finite = _kernels.norm_tokens(fb, frames, mean, scale, pad.view(np.uint16), p, out.view(np.uint16))
    assert finite is False  # the -inf of fb[0, 1]
    ok = fb.copy()
    ok[0, 1] = 7e4  # 7.7e3 after normalising: finite in float16
    assert (
        _kernels.norm_tokens(ok, frames, mean, scale, pad.view(np.uint16), p, out.copy().view(np.uint16))
        is True
    )
    rows = -(-frames // p)
    assert np.isnan(out[rows:]).all()  # rows past the real frames' are the caller's
    out[rows:] = pad
    want = np.full((nt * p, F), pad, np.float16)
    norm = fb[:frames] - mean  # numpy: float32 arithmetic with weak Python scalars
    norm /= scale
    want[:frames] = torch.from_numpy(norm).to(torch.float16).numpy()
    want = want.reshape(nt, p, F // p, p).transpose(0, 2, 1, 3).reshape(nt, F // p, p * p)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))  # bit for bit


def test_to_half_rounds_as_torch_for_every_float32_class():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.standard_normal(20000).astype(np.float32) * s for s in (1e-8, 1e-6, 1e-4, 1.0, 1e2, 1e4, 7e4)]
        + [rng.integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32).view(np.float32)]  # any bits
        + [
            np.array(
                [0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2**-14, 2**-24, 2**-25, 2.99e-8, 1e-45],
                np.float32,
            )
        ]
    )
    got = np.empty(x.size, np.float16)  # one frame of len(x) "mel bins", p = 1, mean 0, scale 1
    finite = _kernels.norm_tokens(
        x.reshape(1, -1), 1, 0.0, 1.0, np.uint16(0), 1, got.view(np.uint16).reshape(1, -1, 1)
    )
    assert finite is False  # inf, NaN and overflows among them
    want = torch.from_numpy(x).to(torch.float16).numpy()
    nan = np.isnan(x)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(got[nan]).all() and (np.signbit(got[nan]) == np.signbit(x[nan])).all()


def test_integer_half_conversion_equals_the_hardware_one():
    """``_to_half`` (bit operations, for CPUs without F16C) and ``_f16_hw`` (``fptrunc``) agree on every
    float32 class; the kernels use the second where the CPU has it, so the first is tested here."""
    import numba

    @numba.njit
    def both(x, a, b):
        for i in range(x.shape[0]):
            a[i] = _kernels._to_half(x[i])
            b[i] = _kernels._f16_hw(x[i])

    rng = np.random.default_rng(5)
    x = np.concatenate(
        [rng.standard_normal(20000).astype(np.float32) * s for s in (1e-8, 1e-6, 1e-4, 1.0, 1e4, 7e4)]
        + [rng.integers(0, 2**32, 50000, dtype=np.uint64).astype(np.uint32).view(np.float32)]
        + [np.array([0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2**-14, 2**-24, 2**-25], np.float32)]
    )
    a, b = np.empty(x.size, np.int32), np.empty(x.size, np.int32)
    both(x, a, b)
    nan = np.isnan(x)
    np.testing.assert_array_equal(a[~nan], b[~nan])
    np.testing.assert_array_equal(
        b[~nan], torch.from_numpy(x[~nan]).to(torch.float16).numpy().view(np.uint16)
    )
    assert ((a[nan] & 0x7C00) == 0x7C00).all() and ((b[nan] & 0x7C00) == 0x7C00).all()  # NaN stays NaN
    assert ((a[nan] >> 15) == np.signbit(x[nan])).all() and ((b[nan] >> 15) == np.signbit(x[nan])).all()


def test_float16_in_hardware_only_for_the_host_cpu(monkeypatch):
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")  # portable caches: no assumption about F16C
    assert _kernels._cpu_has_f16c() is False


def test_fbank_tokens_refuses_filters_past_the_fft_bins():
    """The one-call kernel reads the spectrum 16 bins at a time from the FFT's rows: filters reading
    more bins than the FFT has (rounded up to 16) are refused up front, not read past a row."""
    from maskloom import _mkl_fft

    if not (_kernels.FUSED_TOKENS and _mkl_fft.available()):
        pytest.skip("the one-call kernel does not run here")
    fft = _mkl_fft.RealFFT(32)  # 17 bins
    window = np.hanning(24).astype(np.float32)
    ok = _kernels.mel_tables(np.eye(16, 16, dtype=np.float32))  # reads 16 bins: 32 floats <= 34
    assert _kernels.FbankTokens(window, 8, 0.97, fft, ok, 1e-7).window == 24
    wide = _kernels.mel_tables(np.eye(16, 17, k=1, dtype=np.float32))  # reads 17 bins: 48 floats > 34
    with pytest.raises(ValueError, match="filters reading 17 bins need an FFT of more than 32 points"):
        _kernels.FbankTokens(window, 8, 0.97, fft, wide, 1e-7)


def test_a_read_only_install_with_no_writable_home_caches_its_kernels_in_the_temporary_folder(tmp_path):
    """maskloom installed read-only (a container image, a shared software folder) for a user whose
    home is not writable either (containers run as an arbitrary user with HOME=/): numba found no
    folder for its cache and `import maskloom._kernels` raised "no locator available". The cache now
    goes to this user's folder in the temporary folder, and a second process loads it from there."""
    import shutil

    if not _kernels.ENABLED:
        pytest.skip("numba is off here")
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(_kernels.__file__)))
    copy = tmp_path / "site"
    shutil.copytree(
        os.path.join(pkg, "maskloom"), copy / "maskloom", ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "maskloom" / "__pycache__").write_text("a file: numba cannot make its folder here")
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(
        PYTHONPATH=str(copy),
        HOME="/proc/no-home",
        XDG_CACHE_HOME="/proc/no-home",
        TMPDIR=str(tmp_path / "tmp"),
    )
    code = (
        "import numpy as np, numba\n"
        "from maskloom import _kernels\n"
        "print(_kernels.__file__)\n"
        "bases, starts = _kernels.row_bases(np.array([0, 0, 1], np.int64), np.array([2, 3, 4]), 2)\n"
        "print(bases.tolist(), starts.tolist())\n"
        "print(numba.config.CACHE_DIR)\n"
    )
    want_dir = str(tmp_path / "tmp" / f"maskloom-numba-{os.getuid()}")
    for _ in range(2):  # compiled and cached, then loaded from the cache
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        where, result, cache = proc.stdout.splitlines()
        assert where == str(copy / "maskloom" / "_kernels.py") and cache == want_dir
        ref = _kernels.row_bases(np.array([0, 0, 1], np.int64), np.array([2, 3, 4]), 2)
        assert result == f"{ref[0].tolist()} {ref[1].tolist()}"
    assert any(name.endswith(".nbi") for _, _, files in os.walk(want_dir) for name in files)
