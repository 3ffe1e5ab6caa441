"""maskloom._mkl_fft: torch.fft.rfft's MKL transform with kept plans, bit for bit."""

import ctypes
import pickle

import numpy as np
import pytest
import torch

from maskloom import _mkl_fft

needs_mkl = pytest.mark.skipif(not _mkl_fft.available(), reason="torch without MKL's DFTI exported")


@needs_mkl
@pytest.mark.parametrize("n", [512, 256, 1024])
def test_equals_torch_rfft_bit_for_bit(n):
    fft = _mkl_fft.RealFFT(n, max_plans=3)
    rng = np.random.default_rng(n)
    for t in (1, 2, 51, 7, 51, 300, 2, 51):  # repeats reuse plans; more shapes than max_plans evict some
        x = (rng.standard_normal((t, n)) * rng.uniform(1e-3, 10)).astype(np.float32)
        got = fft(x)
        want = torch.fft.rfft(torch.from_numpy(x)).numpy()
        assert got.shape == (t, n // 2 + 1) and got.dtype == np.complex64
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert list(fft._plans) == [300, 2, 51]  # the three most recently used batch sizes
    out = np.empty((4, n // 2 + 1), np.complex64)
    x = rng.standard_normal((4, n)).astype(np.float32)
    assert fft(x, out) is out
    np.testing.assert_array_equal(out, torch.fft.rfft(torch.from_numpy(x)).numpy())


@needs_mkl
def test_rejects_bad_arrays_and_survives_pickling():
    fft = _mkl_fft.RealFFT(512)
    for bad in (
        np.zeros((3, 512), np.float64),
        np.zeros((3, 256), np.float32),
        np.zeros((512, 6), np.float32).T,
        np.zeros((0, 512), np.float32),
        np.zeros(512, np.float32),
    ):
        with pytest.raises(ValueError, match="C-contiguous"):
            fft(bad)
    with pytest.raises(ValueError, match="out must be"):
        fft(np.zeros((3, 512), np.float32), np.zeros((3, 256), np.complex64))
    fft(np.ones((5, 512), np.float32))
    clone = pickle.loads(pickle.dumps(fft))  # plans are process-local: rebuilt on use
    assert clone.n == 512 and not clone._plans
    x = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    np.testing.assert_array_equal(clone(x), fft(x))


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(_mkl_fft, "_loaded", False)
    monkeypatch.setattr(_mkl_fft, "_lib", None)
    monkeypatch.setenv("MASKLOOM_MKL_FFT", "0")
    assert not _mkl_fft.available()
    with pytest.raises(RuntimeError, match="not available"):
        _mkl_fft.RealFFT(512)


@needs_mkl
def test_threads_share_plans_and_an_evicted_plan_lives_while_in_use():
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    fft = _mkl_fft.RealFFT(512, max_plans=1)
    held = fft._plan(3)
    fft._plan(4)  # evicts 3's plan from the cache; ``held`` keeps its descriptor alive
    assert list(fft._plans) == [4] and held.handle
    x = np.random.default_rng(3).standard_normal((3, 512)).astype(np.float32)
    out = np.empty((3, 257), np.complex64)
    assert fft._compute(held.handle, ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data)) == 0
    np.testing.assert_array_equal(out, torch.fft.rfft(torch.from_numpy(x)).numpy())

    def work(seed):  # several threads, more batch sizes than plans: constant eviction
        rng = np.random.default_rng(seed)
        for _ in range(30):
            x = rng.standard_normal((int(rng.integers(1, 6)), 512)).astype(np.float32)
            if not np.array_equal(fft(x), torch.fft.rfft(torch.from_numpy(x)).numpy()):
                return False
        return True

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(4)))


@needs_mkl
def test_kept_handles_are_stable_and_compute_the_same_transform():
    fft = _mkl_fft.RealFFT(512, max_plans=1)
    h3, h5 = fft.handle(3), fft.handle(5)
    assert h3 != h5 and fft.handle(3) == h3  # one kept descriptor per batch size
    for b in (1, 2, 3, 4):
        fft(np.zeros((b, 512), np.float32))  # LRU plans come and go (max_plans=1) ...
    assert fft.handle(3) == h3 and set(fft._kept) == {3, 5}  # ... the kept ones stay
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    out = np.empty((3, 257), np.complex64)
    status = _mkl_fft._lib.DftiComputeForward(  # what the compiled filterbank calls, by address
        ctypes.c_void_p(h3), ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data)
    )
    assert status == 0
    np.testing.assert_array_equal(out, torch.fft.rfft(torch.from_numpy(x)).numpy())
    assert ctypes.cast(_mkl_fft._lib.DftiComputeForward, ctypes.c_void_p).value == fft.address


@needs_mkl
def test_plans_run_on_one_thread_whatever_the_process_setting(monkeypatch):
    """Every descriptor is limited to one MKL thread (DFTI_THREAD_LIMIT = 1): MKL's threading made a
    tokenizer's small batches slower (an FSDD clip's FFT 15 instead of 9 us with 2 threads), and
    tokenizers run one per CPU. The settings are checked as MKL receives them."""
    lib = _mkl_fft._load()
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def DftiSetValue(self, h, param, value):  # noqa: N802 (MKL's name)
            seen.append((param.value, getattr(value, "value", None)))
            return lib.DftiSetValue(h, param, value)

    monkeypatch.setattr(_mkl_fft, "_lib", Spy())
    fft = _mkl_fft.RealFFT(512)
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    got = fft(x)
    assert (_mkl_fft._THREAD_LIMIT, 1) in seen and _mkl_fft._THREAD_LIMIT == 27  # mkl_dfti.h
    assert (_mkl_fft._NUMBER_OF_TRANSFORMS, 3) in seen
    np.testing.assert_array_equal(got, torch.fft.rfft(torch.from_numpy(x)).numpy())
