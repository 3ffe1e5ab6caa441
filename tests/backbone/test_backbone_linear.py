"""``maskloom.backbone.linear``: the oneDNN path computes F.linear (values and all three gradients),
is taken exactly when the module doc says, and a model trains the same on either backend."""

import pytest
import torch
import torch.nn.functional as F
from backbone_testkit import gen, make_batch, make_model
from torch import nn

from maskloom.backbone import linear as lin
from maskloom.backbone.linear import (
    MIN_IN,
    MIN_MACS,
    MIN_ROWS,
    Linear,
    cpu_matmul,
    linear,
    set_cpu_matmul,
    using_cpu_matmul,
)

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


@pytest.fixture
def any_size(monkeypatch):
    """The oneDNN path for every size (its size limits are about speed, not correctness)."""
    monkeypatch.setattr(lin, "MIN_ROWS", 1)
    monkeypatch.setattr(lin, "MIN_IN", 1)
    monkeypatch.setattr(lin, "MIN_MACS", 0)


def ops_run(fn) -> set[str]:
    """Names of the aten ops ``fn`` runs (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def forward_backward(x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = linear(x, w, b)
    grads = torch.autograd.grad(y.square().sum(), [t for t in (x, w, b) if t is not None])
    return y, grads


@needs_onednn
@pytest.mark.parametrize("shape", [(256, 24), (3, 201, 24), (2, 4, 5, 24), (7, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_f_linear_values_and_gradients(shape, bias, any_size):
    """Row counts that are and are not multiples of the 16 row groups (the latter pad)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g) if bias else None
    with using_cpu_matmul("blas"):
        y_ref, g_ref = forward_backward(x, w, b)
    with using_cpu_matmul("onednn"):
        y, grads = forward_backward(x, w, b)
        assert "aten::mkldnn_convolution" in ops_run(lambda: forward_backward(x, w, b))
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_non_contiguous_input(any_size):
    x = torch.randn(300, 48)[:, ::2]  # (300, 24), row stride 48
    w, b = torch.randn(8, 24), torch.randn(8)
    with using_cpu_matmul("onednn"):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_size_limits():
    """The oneDNN path is taken from MIN_ROWS rows, MIN_IN features and MIN_MACS multiply-adds on;
    below any of them the result is F.linear's, bit for bit."""
    n = MIN_MACS // (MIN_ROWS * MIN_IN)  # output features at which all three limits are met exactly
    cases = {
        (MIN_ROWS, MIN_IN, n): True,
        (MIN_ROWS - 1, MIN_IN, 2 * n): False,
        (2 * MIN_ROWS, MIN_IN - 1, 2 * n): False,
        (MIN_ROWS, MIN_IN, n - 1): False,
    }
    with using_cpu_matmul("onednn"):
        for (m, k, n_out), onednn in cases.items():
            x, w = torch.randn(m, k), torch.randn(n_out, k)
            assert ("aten::mkldnn_convolution" in ops_run(lambda x=x, w=w: linear(x, w))) == onednn, (
                m,
                k,
                n_out,
            )
            if not onednn:
                assert torch.equal(linear(x, w), F.linear(x, w))


def test_blas_and_other_dtypes_are_exactly_f_linear(any_size):
    w, b = torch.randn(16, 8), torch.randn(16)
    big = torch.randn(MIN_ROWS * 2, 8)
    with using_cpu_matmul("onednn"):
        big64, w64, b64 = big.double(), w.double(), b.double()
        assert torch.equal(linear(big64, w64, b64), F.linear(big64, w64, b64))
    with using_cpu_matmul("blas"):
        assert torch.equal(linear(big, w, b), F.linear(big, w, b))
        assert "aten::mkldnn_convolution" not in ops_run(lambda: linear(big, w, b))


def test_policy_resolution_and_errors(monkeypatch):
    before = cpu_matmul()
    try:
        set_cpu_matmul("blas")
        assert cpu_matmul() == "blas"
        set_cpu_matmul("auto")
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        not_intel = lin.cpu_vendor() != "GenuineIntel"
        expected = "onednn" if avx512 and not_intel and torch.backends.mkldnn.is_available() else "blas"
        assert cpu_matmul() == expected
        with pytest.raises(ValueError, match="'fast'.*auto, onednn, blas"):
            set_cpu_matmul("fast")
        # the environment variable is read on first use, and a bad value names it
        monkeypatch.setattr(lin, "_policy", None)
        monkeypatch.setenv("MASKLOOM_CPU_MATMUL", "blas")
        assert cpu_matmul() == "blas"
        monkeypatch.setattr(lin, "_policy", None)
        monkeypatch.setenv("MASKLOOM_CPU_MATMUL", "mkl")
        with pytest.raises(ValueError, match="MASKLOOM_CPU_MATMUL.*'mkl'"):
            cpu_matmul()
    finally:
        set_cpu_matmul("auto")
    assert cpu_matmul() == before


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_auto_takes_onednn_on_avx512_cpus_but_intel_ones(monkeypatch):
    cases = {  # (capability, vendor) -> auto's choice
        ("AVX512", "AuthenticAMD"): "onednn",
        ("AVX512", ""): "onednn",
        ("AVX512", "GenuineIntel"): "blas",
        ("AVX2", "AuthenticAMD"): "blas",
        ("AVX2", "GenuineIntel"): "blas",
    }
    before = cpu_matmul()
    try:
        for (capability, vendor), expected in cases.items():
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
            monkeypatch.setattr(lin, "cpu_vendor", lambda v=vendor: v)
            set_cpu_matmul("auto")
            assert cpu_matmul() == expected, (capability, vendor)
            set_cpu_matmul("onednn")  # forced: whatever the CPU
            assert cpu_matmul() == "onednn"
    finally:
        monkeypatch.undo()
        set_cpu_matmul("auto")
    assert cpu_matmul() == before


def test_cpu_vendor_reads_the_vendor_id(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k)
    )
    assert lin.cpu_vendor() == "AuthenticAMD"
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    monkeypatch.setattr(
        lin.platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
    )
    assert lin.cpu_vendor() == "GenuineIntel"
    monkeypatch.setattr(lin.platform, "processor", lambda: "arm")
    assert lin.cpu_vendor() == ""


def test_linear_module_is_an_nn_linear():
    m = Linear(8, 4)
    assert isinstance(m, nn.Linear)
    assert list(m.state_dict()) == ["weight", "bias"]
    ref = nn.Linear(8, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(m(x), ref(x))


@needs_onednn
def test_a_training_step_is_the_same_on_both_backends(any_size):
    """Loss and every gradient of a full model step (encoder, decoder, adapters) agree when every
    Linear takes the oneDNN path."""
    batch = make_batch("continuous", lengths=(40, 40, 35, 40))
    model = make_model("continuous").train()
    results = []
    for policy in ("blas", "onednn"):
        model.zero_grad(set_to_none=True)
        with using_cpu_matmul(policy):
            out = model(batch, generator=gen(3))
            loss = ((out.pred - batch.tokens) ** 2).mean(-1)[out.target_mask].mean()
            loss.backward()
            if policy == "onednn":
                assert "aten::mkldnn_convolution" in ops_run(lambda: model(batch, generator=gen(3)))
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-5, msg=name)


@needs_onednn
@pytest.mark.parametrize("threads", [1, 2])
def test_onednn_kernels_forward_and_backward_on_any_thread_count(threads):
    """PyTorch sends a 1x1 convolution of one image on one thread to its slow reference kernel
    (``_slow_conv2d``, 2x slower than the BLAS): the 16 row groups keep it on oneDNN."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(MIN_ROWS + 3, 64, requires_grad=True)
        w = torch.randn(MIN_MACS // (MIN_ROWS * 64) + 1, 64, requires_grad=True)
        with using_cpu_matmul("onednn"):
            ops = ops_run(lambda: linear(x, w).sum().backward())
    finally:
        torch.set_num_threads(before)
    assert "aten::mkldnn_convolution" in ops
    assert not {op for op in ops if "slow_conv" in op or "thnn" in op}, ops
