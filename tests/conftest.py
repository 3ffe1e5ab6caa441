"""Fixtures shared by the whole suite."""

import pytest


@pytest.fixture(params=["jit", "numpy"])
def jit_path(request, monkeypatch):
    """Run a test with the compiled kernels of ``maskloom._kernels`` and with the numpy formulation
    they replace (what runs without numba or with ``MASKLOOM_JIT=0``)."""
    from maskloom import _kernels

    if request.param == "jit" and not _kernels.ENABLED:
        pytest.skip("numba is not installed (or MASKLOOM_JIT=0)")
    monkeypatch.setattr(_kernels, "ENABLED", request.param == "jit")
    return request.param
