"""``Linear``: ``nn.Linear`` whose large fp32 CPU matmuls run on oneDNN instead of the BLAS.

PyTorch runs ``F.linear`` on the CPU through its BLAS, MKL in the PyPI wheels. On the AVX-512 AMD
test machine (Zen 5) MKL's sgemm runs at the AVX2 peak, about 115 GFLOP/s per core: it picks its
AVX-512 kernels for Intel CPUs. oneDNN, which PyTorch also ships, picks kernels by instruction set
and reaches 220-260 GFLOP/s per core there. Training can reach it through convolution: a 1x1
convolution over a channels-last view of the (m, k) rows, as 16 images of (k, 1, m/16), *is*
``X W^T + b``, with the rows' memory layout in and out, and oneDNN computes its forward and both
backward products. Forward + backward of the ViT-S Linears (m = 3136 rows, 2 threads) run at 2.0x
the FLOP/s of ``F.linear`` (445 vs 215 GFLOP/s), in fp32: results agree within 2e-6 relative (the
summation order differs; no reduced precision is involved). ``benchmarks/backbone.py`` measures it.

When the oneDNN path is taken (``cpu_matmul()`` says which backend is chosen):
- the input is a float32 CPU tensor of at least ``MIN_ROWS`` rows and ``MIN_IN`` features, and
  the product has at least ``MIN_MACS`` multiply-adds (smaller ones are faster on the BLAS);
- PyTorch has oneDNN enabled (``torch.backends.mkldnn``);
- the policy is ``onednn``, or ``auto`` (the default) on a CPU whose kernels PyTorch dispatches as
  AVX-512 and that is not an Intel one. ``blas`` always uses ``F.linear``. Set it with the
  ``MASKLOOM_CPU_MATMUL`` environment variable or :func:`set_cpu_matmul`.

Why not on Intel CPUs: MKL runs its AVX-512 kernels there, and the two backends are within ~10 % of
each other, either way. On the Intel Xeon test machine (2026-12-04; two runs each) the ViT-S encoder
step on 2 threads took 2.81 and 2.07 s on oneDNN against 2.43 and 1.93 s on MKL (MKL 7-14 % faster),
the tiny preset on 1 thread 1.00 and 0.80 s against 1.07 and 0.83 s (oneDNN 4-7 % faster), and the
products alone ran at parity. So ``auto`` keeps PyTorch's own path there. The detour pays where
MKL holds back: on AMD CPUs with AVX-512 it runs at its AVX2 speed.

Everything else, GPUs included, is plain ``F.linear``: parameters, initialisation, state dicts and
autocast behave exactly as ``nn.Linear`` (this is a subclass; only ``forward`` differs).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENV = "MASKLOOM_CPU_MATMUL"
POLICIES = ("auto", "onednn", "blas")
# below these sizes the convolution's fixed cost outweighs its faster kernels (measured, 1 and 2
# threads: 0.2-0.7x for 32 rows, 0.5-0.7x for 2 input features, 1.0-1.3x at 256 x 192 x 192)
MIN_ROWS = 256
MIN_IN = 32
MIN_MACS = 1 << 24  # m * k * n
# Rows are split over a batch of GROUPS images: PyTorch sends a 1x1 convolution to oneDNN only for
# a batch of >= 16 images when it runs on one thread (else to its slow reference kernel), and
# oneDNN is as fast with the rows split 16 ways as with one image (measured on 1 and 2 threads).
GROUPS = 16

_policy: str | None = None  # None: not resolved yet (read from the environment on first use)
_onednn: bool = False


def cpu_vendor() -> str:
    """The x86 CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` when unknown."""
    try:
        with open("/proc/cpuinfo") as f:  # Linux
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    described = platform.processor()  # Windows: "Intel64 Family 6 ..., GenuineIntel"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in described), "")


def _resolve(policy: str) -> bool:
    if policy not in POLICIES:
        raise ValueError(f"CPU matmul policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "blas" or not torch.backends.mkldnn.is_available():
        return False
    if policy == "onednn":
        return True
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_vendor() != "GenuineIntel"


def set_cpu_matmul(policy: str) -> None:
    """Choose how large fp32 CPU Linears run: ``auto``, ``onednn`` or ``blas`` (see module doc)."""
    global _policy, _onednn
    _onednn = _resolve(policy)
    _policy = policy


def cpu_matmul() -> str:
    """The backend large fp32 CPU Linears use now: ``"onednn"`` or ``"blas"``."""
    if _policy is None:
        policy = os.environ.get(ENV, "auto")
        try:
            set_cpu_matmul(policy)
        except ValueError as e:
            raise ValueError(f"{ENV}: {e}") from None
    return "onednn" if _onednn else "blas"


@contextmanager
def using_cpu_matmul(policy: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_matmul` (restores the previous policy)."""
    cpu_matmul()
    before = _policy
    set_cpu_matmul(policy)
    try:
        yield
    finally:
        set_cpu_matmul(before)  # type: ignore[arg-type]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for large fp32 CPU inputs (see module doc)."""
    k = x.shape[-1]
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or k < MIN_IN
        or x.numel() < MIN_ROWS * k
        or x.numel() * weight.shape[0] < MIN_MACS
        or cpu_matmul() != "onednn"
        or not torch.backends.mkldnn.enabled
    ):
        return F.linear(x, weight, bias)
    n = weight.shape[0]
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    pad = -m % GROUPS
    if pad:  # at most GROUPS - 1 zero rows, sliced off the output below
        rows = F.pad(rows, (0, 0, 0, pad))
    # (m, k) rows as a channels-last (N=GROUPS, C=k, H=1, W=m/GROUPS) image: same memory, no copy
    image = rows.view(GROUPS, 1, (m + pad) // GROUPS, k).permute(0, 3, 1, 2)
    y = F.conv2d(image, weight.reshape(n, k, 1, 1), bias)
    # the output is channels-last too, i.e. (m, n) rows in memory: permute + reshape are views
    y = y.permute(0, 2, 3, 1).reshape(m + pad, n)
    return (y[:m] if pad else y).reshape(*x.shape[:-1], n)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (oneDNN for large fp32 CPU inputs)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
