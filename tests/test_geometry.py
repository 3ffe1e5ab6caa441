import pytest
import torch

from maskloom.geometry import HAS_PYTORCH3D, chamfer_distance, farthest_point_sample, knn, knn_group


def line(n: int) -> torch.Tensor:
    """(1, n, 3) points 0, 1, ..., n-1 on the x axis."""
    p = torch.zeros(1, n, 3)
    p[0, :, 0] = torch.arange(n, dtype=torch.float32)
    return p


def test_fps_on_a_line_picks_the_extremes_then_the_middle(jit_path):
    idx = farthest_point_sample(line(11), 3, start=0, use_pytorch3d=False)
    assert idx.tolist() == [[0, 10, 5]]
    idx = farthest_point_sample(line(11), 2, start=5, use_pytorch3d=False)
    assert idx.tolist() == [[5, 0]]  # tie between 0 and 10: lowest index


def test_fps_batched_and_deterministic_with_lengths(jit_path):
    p = torch.cat([line(11), line(11)])
    idx = farthest_point_sample(p, 3, lengths=torch.tensor([11, 5]), use_pytorch3d=False)
    assert idx.tolist() == [[0, 10, 5], [0, 4, 2]]
    idx = farthest_point_sample(p, 4, lengths=torch.tensor([11, 3]), use_pytorch3d=False)
    assert idx[1].tolist() == [0, 2, 1, -1]  # beyond the cloud's length: -1
    a = farthest_point_sample(
        torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(0)), 8, use_pytorch3d=False
    )
    b = farthest_point_sample(
        torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(0)), 8, use_pytorch3d=False
    )
    assert torch.equal(a, b) and a.dtype == torch.long
    assert all(len(set(r)) == 8 for r in a.tolist())


@pytest.mark.parametrize("n,k", [(1, 1), (7, 7), (300, 64), (20000, 200)])
def test_compiled_fps_picks_what_the_torch_loop_picks(monkeypatch, n, k):
    """The compiled CPU loop (maskloom._kernels) against the torch loop it replaces: random clouds,
    clouds full of ties (a coarse integer grid with duplicates), lengths, a random start."""
    from maskloom import _kernels

    if not _kernels.ENABLED:
        pytest.skip("numba is not installed (or MASKLOOM_JIT=0)")
    g = torch.Generator().manual_seed(n)
    clouds = [torch.randn(3, n, 3, generator=g), torch.randint(0, 3, (3, n, 3), generator=g).float()]
    lengths = torch.tensor([n, max(1, n // 2), max(1, n - 1)])

    def both(*args, **kw):
        out = []
        for enabled in (True, False):
            monkeypatch.setattr(_kernels, "ENABLED", enabled)
            torch.manual_seed(7)  # start=None draws the first picks from torch's RNG
            out.append(farthest_point_sample(*args, use_pytorch3d=False, **kw))
        return out

    for cloud in clouds:
        for kw in ({"start": 0}, {"start": n - 1}, {"start": None}, {"start": 0, "lengths": lengths}):
            compiled, loop = both(cloud, k, **kw)
            assert torch.equal(compiled, loop), kw
    # non-finite points, or other shapes, take the torch loop
    monkeypatch.setattr(_kernels, "ENABLED", True)
    bad = clouds[0].clone()
    bad[0, 0, 0] = float("nan")
    assert farthest_point_sample(bad, k, use_pytorch3d=False).shape == (3, k)
    assert farthest_point_sample(torch.randn(2, n, 6, generator=g), k, use_pytorch3d=False).shape == (2, k)


def test_fps_rejects_too_many():
    with pytest.raises(ValueError, match="cannot sample"):
        farthest_point_sample(line(3), 4)


def test_knn_exact_values_and_order():
    q = torch.tensor([[[0.0, 0, 0], [9.0, 0, 0]]])
    dist, idx = knn(q, line(11), 3, use_pytorch3d=False)
    assert idx.tolist() == [[[0, 1, 2], [9, 8, 10]]]  # ties (8 and 10) in index order
    assert dist.tolist() == [[[0.0, 1.0, 4.0], [0.0, 1.0, 1.0]]]


def test_knn_with_lengths_pads():
    dist, idx = knn(torch.zeros(1, 1, 3), line(5), 3, lengths=torch.tensor([2]), use_pytorch3d=False)
    assert idx.tolist() == [[[0, 1, -1]]]
    assert dist[0, 0, 2].item() == float("inf")


def test_knn_group_relative_and_extra_channels():
    pts = torch.cat([line(6), torch.arange(6.0).view(1, 6, 1) * 10], dim=-1)  # (1, 6, 4): xyz + "intensity"
    centers = torch.tensor([[[0.0, 0, 0], [5.0, 0, 0]]])
    groups, idx = knn_group(pts, centers, 2, use_pytorch3d=False)
    assert groups.shape == (1, 2, 2, 4)
    assert idx.tolist() == [[[0, 1], [5, 4]]]
    assert groups[0, 0, :, 0].tolist() == [0.0, 1.0]
    assert groups[0, 1, :, 0].tolist() == [0.0, -1.0]
    assert groups[0, 1, :, 3].tolist() == [50.0, 40.0]  # extra channel untouched


def test_chamfer_of_a_permutation_is_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 3, generator=g)
    y = x[:, torch.randperm(40, generator=g)]
    assert chamfer_distance(x, y, use_pytorch3d=False).item() == 0.0


def test_chamfer_two_points_by_hand():
    # x = {(0,0,0), (2,0,0)}, y = {(0,1,0)}:
    # x->y: 1, 5 -> mean 3;  y->x: 1 -> mean 1; total 4.
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]])
    y = torch.tensor([[[0.0, 1, 0]]])
    assert chamfer_distance(x, y, use_pytorch3d=False).item() == 4.0
    assert chamfer_distance(y, x, use_pytorch3d=False).item() == 4.0


def test_chamfer_reductions_and_lengths():
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]], [[0.0, 0, 0], [100.0, 0, 0]]])
    y = torch.tensor([[[0.0, 1, 0], [0.0, 0, 0]], [[0.0, 1, 0], [50.0, 0, 0]]])
    per = chamfer_distance(x[:, :, :], y[:, :1], reduction="none", use_pytorch3d=False)
    assert per.tolist() == [4.0, (1 + 100**2 + 1) / 2 + 1]
    # the second sample's padding (x[1,1], y[1,1]) is ignored with lengths
    per = chamfer_distance(
        x,
        y,
        x_lengths=torch.tensor([2, 1]),
        y_lengths=torch.tensor([1, 1]),
        reduction="none",
        use_pytorch3d=False,
    )
    assert per.tolist() == [4.0, 2.0]
    s = chamfer_distance(x, y[:, :1], reduction="sum", use_pytorch3d=False)
    m = chamfer_distance(x, y[:, :1], reduction="mean", use_pytorch3d=False)
    assert s.item() == pytest.approx(2 * m.item())


def test_chamfer_is_differentiable():
    x = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]], requires_grad=True)
    y = torch.tensor([[[0.0, 1, 0]]])
    chamfer_distance(x, y, use_pytorch3d=False).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_use_pytorch3d_true_without_it_is_a_clear_error():
    if HAS_PYTORCH3D:
        pytest.skip("pytorch3d installed")
    with pytest.raises(ImportError, match="pytorch3d"):
        chamfer_distance(line(2), line(2), use_pytorch3d=True)


@pytest.mark.skipif(not HAS_PYTORCH3D, reason="pytorch3d not installed")
def test_pytorch3d_and_torch_agree():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 64, 3, generator=g), torch.randn(2, 48, 3, generator=g)
    lx, ly = torch.tensor([64, 30]), torch.tensor([48, 20])
    for kw in ({}, {"x_lengths": lx, "y_lengths": ly}):
        a = chamfer_distance(x, y, use_pytorch3d=True, reduction="none", **kw)
        b = chamfer_distance(x, y, use_pytorch3d=False, reduction="none", **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    da, ia = knn(x, y, 5, use_pytorch3d=True)
    db, ib = knn(x, y, 5, use_pytorch3d=False)
    torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-6)
    assert torch.equal(ia, ib)
    assert torch.equal(
        farthest_point_sample(x, 10, use_pytorch3d=True), farthest_point_sample(x, 10, use_pytorch3d=False)
    )
