"""Batched real FFTs through the MKL that torch ships, with the transform planned once per shape.

``torch.fft.rfft`` on CPU plans the transform (an MKL DFTI descriptor) on every call and frees it
after: for the ~50 frames of a 0.5 s clip that is ~6 us of planning and ~3 us of dispatch around
~8 us of transform. :class:`RealFFT` keeps one committed descriptor per batch size and calls MKL's
C API directly (``ctypes``), with the settings torch uses (``_plan_mkl_fft`` in ATen's
``SpectralOps.cpp``: out of place, complex-complex conjugate-even storage, unit strides, row
distances), so the result is the same computation and the same bits as ``torch.fft.rfft``; the tests
check that bit for bit.

MKL's DFTI functions are exported by the ``libtorch_cpu`` of torch's x86-64 Linux and Windows wheels.
The library is loaded with ``ctypes`` from torch's install directory without importing torch (an
audio worker then never pays ``import torch``'s ~1 s of CPU: :mod:`maskloom.tokenizers.audio`). Where
the functions are not exported (builds without MKL: ARM, macOS), :func:`available` is False and
callers use ``torch.fft.rfft``. ``MASKLOOM_MKL_FFT=0`` turns this path off.

Threads: each descriptor is limited to one thread (``DFTI_THREAD_LIMIT``), whatever MKL's count in
the process (``MKL_NUM_THREADS``/``OMP_NUM_THREADS``, torch's ``set_num_threads``): the batches here
are small (an FSDD clip's ~50 frames: 9 us on one thread, 15 us on two), and tokenizers run one per
CPU. The transform is the same, and so are its bits (the tests compare with ``torch.fft.rfft``).

A committed descriptor may be used by several threads at once (MKL's documented guarantee); the
cache of descriptors is guarded by a lock, and a descriptor is freed only when no call holds it any
more (an evicted one that another thread is using lives until that call returns).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

# DFTI enum values (mkl_dfti.h)
_NUMBER_OF_TRANSFORMS, _CONJUGATE_EVEN_STORAGE, _PLACEMENT = 7, 10, 11
_INPUT_STRIDES, _OUTPUT_STRIDES, _INPUT_DISTANCE, _OUTPUT_DISTANCE = 12, 13, 14, 15
_THREAD_LIMIT = 27
_REAL, _COMPLEX_COMPLEX, _NOT_INPLACE = 33, 39, 44
_LONG = ctypes.c_long  # MKL_LONG: 64-bit on LP64 Linux; see _load for Windows

_lib: Any = None
_loaded = False
_lock = threading.Lock()


_FUNCS = ("DftiCreateDescriptor_s_1d", "DftiSetValue", "DftiCommitDescriptor", "DftiComputeForward",
          "DftiFreeDescriptor")  # fmt: skip
"""The DFTI functions used, each returning an MKL_LONG status (and DftiErrorMessage for messages)."""


def _torch_lib_dir() -> str | None:
    """torch's ``lib`` directory, found without importing torch (``import torch`` costs ~1 s of CPU;
    a worker that only needs this FFT loads ``libtorch_cpu`` alone, ~0.15 s)."""
    try:
        spec = importlib.util.find_spec("torch")  # an imported torch's own spec
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def _find() -> Any:
    """torch's ``libtorch_cpu`` with MKL's DFTI functions typed, or None where it does not export them
    (torch builds without MKL) or cannot be loaded."""
    if os.environ.get("MASKLOOM_MKL_FFT", "1") == "0" or os.name != "posix":  # MKL_LONG is 32-bit on Windows
        return None
    d = _torch_lib_dir()
    try:
        names = sorted(n for n in os.listdir(d) if n.startswith("libtorch_cpu.")) if d else []
        if not names:
            return None
        lib = ctypes.CDLL(os.path.join(d, names[0]))  # the one torch loads (or has loaded)
        for fn in _FUNCS:
            getattr(lib, fn).restype = _LONG  # AttributeError when not exported
        lib.DftiErrorMessage.restype = ctypes.c_char_p
        return lib
    except (OSError, AttributeError):
        return None


def _load() -> Any:
    """:func:`_find`, once per process."""
    global _lib, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                _lib, _loaded = _find(), True
    return _lib


def available() -> bool:
    """Whether :class:`RealFFT` can run here (torch with MKL's DFTI exported, not disabled)."""
    return _load() is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        msg = _lib.DftiErrorMessage(_LONG(status)).decode(errors="replace")
        raise RuntimeError(f"MKL DFTI {what} failed: {msg} (status {status})")


class _Plan:
    """One committed DFTI descriptor, freed when the last reference goes."""

    __slots__ = ("handle",)

    def __init__(self, handle: ctypes.c_void_p) -> None:
        self.handle = handle

    def __del__(self) -> None:
        if _lib is not None and self.handle:
            _lib.DftiFreeDescriptor(ctypes.byref(self.handle))
            self.handle = ctypes.c_void_p()


class RealFFT:
    """``torch.fft.rfft(x)`` for (T, n) float32 rows into (T, n // 2 + 1) complex64, with one MKL
    descriptor per batch size T kept (the ``max_plans`` most recently used: each holds MKL's tables
    for one n, a few kB)."""

    def __init__(self, n: int, max_plans: int = 256) -> None:
        if _load() is None:
            raise RuntimeError("MKL's DFTI is not available in this torch build")
        self.n = int(n)
        self.bins = self.n // 2 + 1
        self.max_plans = max_plans
        self._plans: OrderedDict[int, _Plan] = OrderedDict()
        self._kept: dict[int, tuple[_Plan, int]] = {}  # handle()'s descriptors and addresses, never evicted
        self._lock = threading.Lock()
        self._compute = _lib.DftiComputeForward
        self.address = ctypes.cast(self._compute, ctypes.c_void_p).value
        """``DftiComputeForward``'s address, for compiled callers (:func:`maskloom._kernels.fbank`)."""

    def handle(self, batch: int) -> int:
        """The descriptor for ``batch`` rows as an address, for compiled callers
        (:class:`maskloom._kernels.FbankTokens`). These descriptors are kept, one per batch size, for
        as long as this object lives, outside the ``max_plans`` LRU: an address handed to code that
        runs without the GIL must not be freed by another thread's eviction. Callers' batch sizes are
        bounded (frame counts up to a target length). A dictionary hit costs ~0.1 us, the LRU's locked
        update ~1 us."""
        kept = self._kept.get(batch)
        if kept is None:
            with self._lock:
                kept = self._kept.get(batch)
                if kept is None:
                    plan = self._create(batch)
                    kept = self._kept[batch] = (plan, plan.handle.value)
        return kept[1]

    def _plan(self, batch: int) -> _Plan:
        with self._lock:
            plan = self._plans.get(batch)
            if plan is not None:
                self._plans.move_to_end(batch)
                return plan
            plan = self._plans[batch] = self._create(batch)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)  # freed once no running call holds it
            return plan

    def _create(self, batch: int) -> _Plan:
        """A committed descriptor for ``batch`` rows of n points."""
        h = ctypes.c_void_p()
        _check(_lib.DftiCreateDescriptor_s_1d(ctypes.byref(h), ctypes.c_int(_REAL), _LONG(self.n)), "create")
        plan = _Plan(h)  # frees the descriptor if a setting below fails
        strides = (_LONG * 2)(0, 1)
        for param, value in (
            (_PLACEMENT, _LONG(_NOT_INPLACE)),
            (_NUMBER_OF_TRANSFORMS, _LONG(batch)),
            (_INPUT_DISTANCE, _LONG(self.n)),
            (_OUTPUT_DISTANCE, _LONG(self.bins)),
            (_INPUT_STRIDES, strides),
            (_OUTPUT_STRIDES, strides),
            (_CONJUGATE_EVEN_STORAGE, _LONG(_COMPLEX_COMPLEX)),
            (_THREAD_LIMIT, _LONG(1)),  # one thread (see the module's docstring)
        ):
            _check(_lib.DftiSetValue(h, ctypes.c_int(param), value), f"setting {param}")
        _check(_lib.DftiCommitDescriptor(h), "commit")
        return plan

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` (T, n) float32 C-contiguous, T >= 1 -> ``out`` (T, n // 2 + 1) complex64."""
        if (
            x.dtype != np.float32
            or x.ndim != 2
            or x.shape[1] != self.n
            or not x.flags.c_contiguous
            or not x.shape[0]
        ):
            raise ValueError(f"RealFFT({self.n}) needs a C-contiguous (T >= 1, {self.n}) float32 array, got "
                             f"{x.dtype} {x.shape}")  # fmt: skip
        if out is None:
            out = np.empty((x.shape[0], self.bins), np.complex64)
        elif out.dtype != np.complex64 or out.shape != (x.shape[0], self.bins) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous ({x.shape[0]}, {self.bins}) complex64 array")
        return self.forward(x, out)

    def forward(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`__call__` without checking the arrays (~1 us), for callers that made them as it
        requires: ``x`` (T >= 1, n) float32 and ``out`` (T, n // 2 + 1) complex64, both C-contiguous."""
        plan = self._plan(x.shape[0])  # held until the transform returns
        _check(
            self._compute(plan.handle, ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data)),
            "compute",
        )
        return out

    def __getstate__(self) -> dict[str, Any]:  # descriptors are process-local: rebuilt after pickling
        return {"n": self.n, "max_plans": self.max_plans}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["n"], state["max_plans"])  # type: ignore[misc]
