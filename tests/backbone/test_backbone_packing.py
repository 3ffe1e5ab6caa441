"""Packed batches: several samples per row, kept apart by the backbone (attention, masking, pooling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backbone_testkit import gen, make_batch, make_model

from maskloom.backbone import MaskingConfig, num_masked
from maskloom.backbone.masking import random_mask_packed, segment_topk_mask, topk_mask
from maskloom.backbone.positions import random_sign_flip
from maskloom.batch import pack_batch, pack_plan

LENGTHS = (9, 3, 7, 2, 5, 4)


def graph_batch(lengths=LENGTHS, seed: int = 0):
    """A spectral-position batch with a path graph's edges per sample, labels and ids."""
    batch = make_batch("spectral", lengths, seed=seed)
    e = max(lengths) - 1
    edges = torch.full((len(lengths), e, 2), -1)
    for i, n in enumerate(lengths):
        edges[i, : n - 1, 0] = torch.arange(n - 1)
        edges[i, : n - 1, 1] = torch.arange(1, n)
    batch.edges = edges
    batch.labels = torch.arange(len(lengths)) % 2
    batch.ids = [f"s{i}" for i in range(len(lengths))]
    return batch


def test_pack_plan_is_first_fit_decreasing_with_the_fewest_slots():
    row, offset, rows = pack_plan(np.array([3, 5, 2, 4, 1]), 6)
    # 15 tokens need 3 rows of 6, and fit 3 rows of 5: 5 -> row 0; 4 -> row 1; 3 -> row 2;
    # 2 -> row 2 (3+2); 1 -> row 1 (4+1)
    assert rows == 3
    assert row.tolist() == [2, 0, 2, 1, 1]
    assert offset.tolist() == [0, 0, 3, 0, 4]
    # a sample longer than a row sets the limit (the batch is that long anyway); ties keep sample order
    row, offset, rows = pack_plan(np.array([2, 9, 2, 2]), 4)
    assert (row.tolist(), offset.tolist(), rows) == ([1, 0, 1, 1], [0, 0, 2, 4], 2)
    # 5 + 5 > 8: three rows of one sample each
    row, offset, rows = pack_plan(np.array([5, 5, 5]), 8)
    assert (rows, row.tolist()) == (3, [0, 1, 2])
    # equal lengths: one sample per row has no padding (15 slots), two rows of 9 would have 18
    row, offset, rows = pack_plan(np.array([3] * 5), 10)
    assert rows == 5 and row.tolist() == [0, 1, 2, 3, 4] and offset.tolist() == [0] * 5
    # 14 tokens: two rows of 7 (14 slots) beat five rows of 3 (15)
    row, offset, rows = pack_plan(np.array([3, 3, 3, 3, 1, 1]), 10)
    assert (rows, row.tolist(), offset.tolist()) == (2, [0, 0, 1, 1, 0, 1], [0, 3, 0, 3, 6, 6])
    assert pack_plan(np.array([], dtype=np.int64), 4)[2] == 0
    with pytest.raises(ValueError, match="row_tokens must be >= 1"):
        pack_plan(np.array([1]), 0)


def _reference_plan(lens: np.ndarray, row_tokens: int, choices: int = 3) -> tuple[list, list, int]:
    """pack_plan as its docstring states it, without shortcuts: every candidate row count tried by
    bisection over the row limit with first-fit decreasing, the fewest slots (first among equals)."""
    lens = [int(x) for x in lens]
    n, total, longest = len(lens), sum(lens), max(lens)
    order = sorted(range(n), key=lambda i: -lens[i])  # stable: ties in sample order
    cap = max(row_tokens, longest)

    def ffd(limit):  # -> (row, offset, fill)
        row, offset, fill = [0] * n, [0] * n, []
        for i in order:
            j = next((q for q, f in enumerate(fill) if f + lens[i] <= limit), len(fill))
            if j == len(fill):
                fill.append(0)
            row[i], offset[i] = j, fill[j]
            fill[j] += lens[i]
        return row, offset, fill

    r_lo = max(1, -(-total // cap))
    first = max(r_lo, len(ffd(cap)[2]))
    last = min(n, first + choices - 1)
    rs = list(range(first, last + 1)) + [-(-n // k) for k in range(n // first, 0, -1) if -(-n // k) > last]
    candidates = [(r, max(-(-total // r), longest), cap) for r in rs] + [(n, longest, longest)]
    best = None  # (slots, limit)
    for r, lo, hi in candidates:
        if len(ffd(hi)[2]) > r:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(ffd(mid)[2]) <= r else (mid + 1, hi)
        fill = ffd(hi)[2]
        if best is None or len(fill) * max(fill) < best[0]:
            best = (len(fill) * max(fill), hi)
    row, offset, fill = ffd(best[1])
    return row, offset, len(fill)


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_pack_plan_equals_its_plain_statement(monkeypatch, path):
    """The packing's shortcuts (skipping candidates that cannot win, first-fit's answers remembered
    across candidates) leave every plan as the plain statement makes it: random lengths, and the
    near-equal lengths of bucketed batches (where perfect fits end the search early)."""
    from maskloom import _kernels

    if path == "compiled" and not _kernels.ENABLED:
        pytest.skip("numba is not available")
    if path == "python":
        _plain_python_packing(monkeypatch)
    rng = np.random.default_rng(5)
    cases = [(rng.integers(1, 40, int(rng.integers(1, 70))), int(rng.integers(4, 100))) for _ in range(150)]
    for _ in range(150):
        base = int(rng.integers(1, 30))
        n = int(rng.integers(1, 70))
        cases.append((base + rng.integers(0, int(rng.integers(1, 4)), n), 4 * base))
    for lens, row_tokens in cases:
        row, offset, rows = pack_plan(lens, row_tokens)
        ref = _reference_plan(lens, row_tokens)
        assert (row.tolist(), offset.tolist(), rows) == ref, (lens.tolist(), row_tokens)


def test_pack_batch_keeps_every_token_edge_and_label():
    batch = graph_batch()
    packed = pack_batch(batch, 12)
    # 30 tokens, 3 rows of up to 12; they fit rows of 11: 9 -> row 0, 7 -> row 1, 5 -> row 2,
    # 4 -> row 1, 3 -> row 2, 2 -> row 0
    assert packed.batch_size == 3 and packed.seq_len == 11
    assert packed.segments[:, 0].tolist() == [0, 2, 4] and packed.lengths.tolist() == [11, 11, 8]
    assert packed.num_samples == 6 and packed.sample_lengths.tolist() == list(LENGTHS)
    assert torch.equal(packed.labels, batch.labels) and packed.ids == batch.ids
    assert torch.equal(packed.segments < 0, packed.padding)
    assert int((~packed.padding).sum()) == sum(LENGTHS)
    for i, n in enumerate(LENGTHS):
        r, c = (packed.segments == i).nonzero(as_tuple=True)
        assert len(set(r.tolist())) == 1 and c.tolist() == list(range(int(c[0]), int(c[0]) + n))
        assert torch.equal(packed.tokens[r, c], batch.tokens[i, :n])
        assert torch.equal(packed.positions[r, c], batch.positions[i, :n])
        row_edges = packed.edges[r[0]]
        mine = row_edges[(row_edges[:, 0] >= c[0]) & (row_edges[:, 0] < c[0] + n)] - c[0]
        assert torch.equal(mine, batch.edges[i, : n - 1])
    assert int((packed.edges[..., 0] >= 0).sum()) == sum(n - 1 for n in LENGTHS)
    assert packed.tokens[packed.padding].abs().sum() == 0
    with pytest.raises(ValueError, match="already packed"):
        pack_batch(packed, 12)


def test_packing_removes_padding():
    lengths = (17, 28, 12, 23, 20, 11, 25, 16, 13, 22, 19, 26, 14, 18, 21, 15)
    batch = make_batch("spectral", lengths)
    packed = pack_batch(batch, 64)
    waste = lambda b: float(b.padding.float().mean())  # noqa: E731
    # 300 tokens in rows of up to 64: 5 rows need 64 each, and first-fit decreasing cannot fill
    # them; 6 rows fit at a limit of 52 (312 slots), 7 rows at 44 (308 slots): the fewest slots win
    assert tuple(packed.padding.shape) == (7, 44)
    assert round(waste(batch), 3) == 0.330 and round(waste(packed), 3) == 0.026


def _features(model, batch):
    with torch.no_grad():
        return model.features(batch)


@pytest.mark.parametrize("edge_bias", [False, True])
def test_packed_features_equal_unpacked(edge_bias):
    model = make_model("spectral", MaskingConfig(kind="random", ratio=0.5), edge_bias=edge_bias).eval()
    if edge_bias:
        with torch.no_grad():
            model.edge_bias.fill_(2.0)
    batch = graph_batch()
    packed = pack_batch(batch, 12)
    plain, pk = _features(model, batch), _features(model, packed)
    assert pk.pooled.shape == plain.pooled.shape == (6, 32)
    torch.testing.assert_close(pk.pooled, plain.pooled, atol=2e-5, rtol=1e-4)
    for i, n in enumerate(LENGTHS):
        r, c = (packed.segments == i).nonzero(as_tuple=True)
        torch.testing.assert_close(pk.tokens[r, c], plain.tokens[i, :n], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", ["mae", "cross"])
def test_packed_reconstruction_equals_unpacked_for_the_same_mask(decoder):
    model = make_model("spectral", MaskingConfig(kind="random", ratio=0.5), decoder=decoder, edge_bias=True)
    model.eval()
    batch = graph_batch()
    packed = pack_batch(batch, 12)
    mask = torch.zeros_like(batch.padding)
    for i, n in enumerate(LENGTHS):
        mask[i, 1:n:2] = True  # every other token of each sample
    pmask = torch.zeros_like(packed.padding)
    for i, n in enumerate(LENGTHS):
        r, c = (packed.segments == i).nonzero(as_tuple=True)
        pmask[r, c] = mask[i, :n]
    with torch.no_grad():
        a, b = model(batch, mask=mask), model(packed, mask=pmask)
    for i, n in enumerate(LENGTHS):
        r, c = (packed.segments == i).nonzero(as_tuple=True)
        assert torch.equal(b.target_mask[r, c], a.target_mask[i, :n])
        torch.testing.assert_close(b.pred[r, c], a.pred[i, :n], atol=2e-5, rtol=1e-4)


def test_random_mask_packed_counts_each_sample_exactly():
    packed = pack_batch(graph_batch(), 12)
    m = random_mask_packed(packed.segments, 0.5, 6, gen(3))
    assert not bool((m & packed.padding).any())
    per = torch.bincount(packed.segments[m], minlength=6)
    assert per.tolist() == num_masked(torch.tensor(LENGTHS), 0.5).tolist() == [4, 2, 4, 1, 2, 2]
    assert torch.equal(m, random_mask_packed(packed.segments, 0.5, 6, gen(3)))
    assert not torch.equal(m, random_mask_packed(packed.segments, 0.5, 6, gen(4)))


def test_segment_topk_equals_topk_when_rows_are_samples():
    g = gen(1)
    scores = torch.rand(5, 9, generator=g)
    excluded = torch.rand(5, 9, generator=g) < 0.3
    k = torch.tensor([2, 0, 3, 1, 4]).minimum((~excluded).sum(1))
    segments = torch.arange(5)[:, None].expand(5, 9).clone()
    assert torch.equal(segment_topk_mask(scores, excluded, k, segments), topk_mask(scores, excluded, k))


def test_sign_flip_is_per_sample_in_a_packed_row():
    packed = pack_batch(graph_batch(), 12)
    flipped = random_sign_flip(packed.positions, gen(0), packed.segments)
    ratio = flipped / packed.positions.masked_fill(packed.padding[..., None], 1.0)
    signs = set()
    for i in range(6):
        s = ratio[packed.segments == i]  # (n, P): one sign vector per sample
        assert torch.equal(s, s[:1].expand_as(s))
        signs.add(tuple(s[0].tolist()))
    assert len(signs) > 1  # samples of a row flip independently


def test_packed_training_step_reaches_every_parameter():
    model = make_model("spectral", MaskingConfig(kind="random", ratio=0.5), decoder="cross", edge_bias=True)
    packed = pack_batch(graph_batch(), 12)
    out = model.train()(packed, generator=gen(0))
    err = ((out.pred - packed.tokens) ** 2).mean(-1)
    err[out.target_mask].mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


@pytest.mark.parametrize("kind", ["learned", "adaptive", "tube", "block"])
def test_packed_batch_with_other_masking_is_a_clear_error(kind):
    model = make_model("spectral", MaskingConfig(kind=kind, ratio=0.5))
    packed = pack_batch(graph_batch(), 12)
    with pytest.raises(ValueError, match=f"packed batches .* random masking only; 'm' uses '{kind}'"):
        model(packed, generator=gen(0))


def test_a_packed_mask_that_hides_a_whole_sample_is_refused():
    model = make_model("spectral", MaskingConfig(kind="random", ratio=0.5))
    packed = pack_batch(graph_batch(), 12)
    mask = packed.segments == 3
    with pytest.raises(ValueError, match="at least one real token visible per sample"):
        model(packed, mask=mask)


def _plain_python_packing(monkeypatch) -> None:
    """Run packing as plain Python from here on. ``ENABLED = False`` alone is not enough: the Python
    forms call the kernels they share with the compiled ones (``_first_fit``, ``_fits``,
    ``_fit_slots``, ``_pack_rows``) through module globals, which are the compiled kernels when numba is there."""
    from maskloom import _kernels

    monkeypatch.setattr(_kernels, "ENABLED", False)
    monkeypatch.setattr(_kernels, "_first_fit", _kernels._first_fit_py)
    monkeypatch.setattr(_kernels, "_fits", _kernels._fits_py)
    monkeypatch.setattr(_kernels, "_fit_slots", _kernels._fit_slots_py)
    monkeypatch.setattr(_kernels, "_pack_rows", _kernels.pack_rows_py)


def test_compiled_packing_equals_the_python_reference(monkeypatch):
    from maskloom import _kernels

    if not _kernels.ENABLED:
        pytest.skip("numba is not available")
    rng = np.random.default_rng(0)
    trials = []
    for trial in range(200):
        n = int(rng.integers(1, 70))
        lens = rng.integers(1, 40, n) if trial % 2 else rng.integers(15, 30, n)
        order = np.argsort(-lens, kind="stable")
        cap = max(int(rng.integers(8, 128)), int(lens.max()))
        r_lo = max(1, -(-int(lens.sum()) // cap))
        trials.append((n, lens, order, r_lo, cap))
    compiled_rows = [
        _kernels.pack_rows(lens, order, r_lo, min(n, r_lo + 2), cap) for n, lens, order, r_lo, cap in trials
    ]
    cases = [rng.integers(1, 40, int(rng.integers(1, 70))) for _ in range(50)]
    compiled = [pack_plan(lens, 48) for lens in cases]
    _plain_python_packing(monkeypatch)  # the references: pack_plan's numpy steps and its loops in Python
    for (n, lens, order, r_lo, cap), got in zip(trials, compiled_rows):
        row, offset = np.empty(n, np.int64), np.empty(n, np.int64)
        r = _kernels.pack_rows_py(lens, order, r_lo, min(n, r_lo + 2), cap, row, offset)
        assert got[2] == r and np.array_equal(got[0], row) and np.array_equal(got[1], offset)
        fill = np.bincount(row, weights=lens, minlength=r)
        assert fill.max() <= cap and (fill > 0).all()
        for q in range(r):  # samples of a row sit end to end from 0
            mine = np.flatnonzero(row == q)
            ends = sorted((offset[i], offset[i] + lens[i]) for i in mine)
            assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    for lens, got in zip(cases, compiled):
        ref = pack_plan(lens, 48)
        assert got[2] == ref[2] and np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.float32, np.int64])
def test_compiled_columns_equal_numpy_indexing(monkeypatch, dtype):
    from maskloom import _kernels
    from maskloom.batch import pack_arrays

    if not _kernels.ENABLED:
        pytest.skip("numba is not available")
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 30, 50)
    width = int(lens.max())
    padding = np.arange(width)[None, :] >= lens[:, None]
    shape = (50, width) if dtype == np.int64 else (50, width, 5)
    tokens = (rng.integers(0, 200, shape)).astype(dtype)
    tokens[padding] = 0
    positions = rng.standard_normal((50, width, 3)).astype(np.float32) * ~padding[..., None]
    ecounts = rng.integers(0, 12, 50)
    edges = np.full((50, 12, 2), -1, np.int64)
    for i, c in enumerate(ecounts):
        edges[i, :c] = rng.integers(0, lens[i], (c, 2))
    compiled = pack_arrays(tokens, positions, padding, edges, 64, prefix=True)
    _plain_python_packing(monkeypatch)
    reference = pack_arrays(tokens, positions, padding, edges, 64, prefix=True)
    for a, b in zip(compiled, reference):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_crossmae_fraction_is_counted_per_sample_of_a_packed_batch():
    model = make_model("spectral", MaskingConfig(kind="random", ratio=0.5), decoder="cross", fraction=0.5)
    packed = pack_batch(graph_batch(), 12)
    with torch.no_grad():
        out = model.train()(packed, generator=gen(2))
    masked = torch.bincount(packed.segments[out.mask], minlength=6)
    scored = torch.bincount(packed.segments[out.target_mask], minlength=6)
    assert masked.tolist() == [4, 2, 4, 1, 2, 2]  # num_masked of 9, 3, 7, 2, 5, 4 at 0.5
    # round(0.5 * masked), at least 1: 2, 1, 2, 1, 1, 1 (round half to even: 0.5 -> 0 -> 1)
    assert scored.tolist() == [2, 1, 2, 1, 1, 1]
    assert not bool((out.target_mask & ~out.mask).any())
