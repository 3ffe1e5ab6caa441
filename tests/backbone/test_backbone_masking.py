"""Masking strategies: exact counts, padding, tubes, blocks, learned (SMA) and adaptive (AdaMAE)."""

from __future__ import annotations

import pytest
import torch
from backbone_testkit import gen, grid

from maskloom.backbone import MaskingConfig, block_mask, num_masked, random_mask, tube_mask
from maskloom.backbone.masking import (
    AdaptiveSampler,
    LearnedMasking,
    curriculum_random_share,
    mix_with_random,
    topk_mask,
)


def ragged_padding(lengths: list[int]) -> torch.Tensor:
    n = max(lengths)
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def test_num_masked_rounds_and_clips():
    lengths = torch.tensor([1, 2, 3, 4, 10, 196])
    assert num_masked(lengths, 0.75).tolist() == [0, 1, 2, 3, 8, 147]
    assert num_masked(lengths, 0.0).tolist() == [0, 0, 0, 0, 0, 0]
    assert num_masked(lengths, 0.01).tolist() == [0, 1, 1, 1, 1, 2]  # at least one masked
    assert num_masked(lengths, 0.99).tolist() == [0, 1, 2, 3, 9, 194]  # at least one visible


def test_topk_mask_exact_and_excludes():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]])
    excluded = torch.tensor([[False, True, False, False], [False, False, False, False]])
    m = topk_mask(scores, excluded, torch.tensor([2, 1]))
    assert m.tolist() == [[False, False, True, True], [False, False, True, False]]


@pytest.mark.parametrize("ratio", [0.15, 0.5, 0.75, 0.9])
def test_random_mask_exact_counts_ragged(ratio):
    lengths = [17, 5, 1, 2, 30]
    padding = ragged_padding(lengths)
    mask = random_mask(padding, ratio, gen(3))
    assert not (mask & padding).any()
    assert mask.sum(1).tolist() == num_masked(torch.tensor(lengths), ratio).tolist()


def test_random_mask_seeded():
    padding = ragged_padding([50, 40])
    a, b = random_mask(padding, 0.6, gen(1)), random_mask(padding, 0.6, gen(1))
    c = random_mask(padding, 0.6, gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tube_mask_constant_along_axis():
    pos = grid(4, 3)  # (t, row, col), 64 tokens
    positions = torch.stack([pos, pos])
    padding = ragged_padding([64, 48])  # second video: 3 frames only
    mask = tube_mask(positions, padding, 0.75, axis=0, generator=gen(0))
    m = mask.view(2, 4, 16)  # (B, t, row*col)
    assert torch.equal(m[0], m[0, :1].expand(4, 16))  # same spatial mask at every frame
    assert torch.equal(m[1, :3], m[1, :1].expand(3, 16)) and not m[1, 3].any()
    assert mask.sum(1).tolist() == [12 * 4, 12 * 3]  # round(0.75 * 16) tubes, whole


def test_tube_mask_other_axis():
    pos = grid(4, 2)  # (channel, patch): share the mask over channels
    mask = tube_mask(pos[None], ragged_padding([16]), 0.5, axis=0, generator=gen(5))
    m = mask.view(4, 4)
    assert torch.equal(m, m[:1].expand(4, 4)) and int(m[0].sum()) == 2


def test_tube_mask_needs_two_axes():
    with pytest.raises(ValueError, match="at least 2 position axes"):
        tube_mask(torch.arange(5.0)[None, :, None], ragged_padding([5]), 0.5, axis=0)


def test_tube_mask_bad_axis():
    with pytest.raises(ValueError, match="tube_axis 3"):
        tube_mask(grid(2, 2)[None], ragged_padding([4]), 0.5, axis=3)


def count_runs(row: torch.Tensor) -> int:
    r = row.int()
    return int(r[0]) + int(((r[1:] - r[:-1]) == 1).sum())


def test_block_mask_exact_and_contiguous():
    positions = torch.arange(40.0)[None, :, None].expand(6, 40, 1)
    padding = ragged_padding([40, 40, 40, 40, 33, 9])
    for seed in range(5):
        mask = block_mask(positions, padding, 0.5, (4,), gen(seed))
        assert mask.sum(1).tolist() == num_masked(torch.tensor([40, 40, 40, 40, 33, 9]), 0.5).tolist()
        assert not (mask & padding).any()
        # 20 tokens in boxes of 4: at most 5 full boxes + trimmed edge boxes; random masking gives ~10 runs
        assert max(count_runs(mask[i]) for i in range(4)) <= 7


def test_block_mask_boxes_in_2d():
    positions = grid(8, 2)[None]
    mask = block_mask(positions, ragged_padding([64]), 4 / 64, (2, 2), gen(0)).view(8, 8)
    rows, cols = mask.nonzero(as_tuple=True)
    assert mask.sum() == 4
    # one 2x2 box (or, when it was clipped by the border, a second box): every masked cell has a
    # masked neighbour
    nb = torch.zeros_like(mask)
    nb[1:] |= mask[:-1]
    nb[:-1] |= mask[1:]
    nb[:, 1:] |= mask[:, :-1]
    nb[:, :-1] |= mask[:, 1:]
    assert (nb[rows, cols]).all()


def test_block_mask_default_size_and_bad_size():
    positions = grid(6, 2)[None]
    assert block_mask(positions, ragged_padding([36]), 0.5, None, gen(0)).sum() == 18
    with pytest.raises(ValueError, match="block_size"):
        block_mask(positions, ragged_padding([36]), 0.5, (2, 2, 2), gen(0))


def test_curriculum_share():
    cfg = MaskingConfig(kind="learned", curriculum=0.5)
    assert [curriculum_random_share(cfg, p) for p in (0.0, 0.25, 0.5, 1.0)] == [1.0, 0.5, 0.0, 0.0]
    assert curriculum_random_share(MaskingConfig(curriculum=0.0), 0.0) == 0.0


def test_mix_with_random_keeps_learned_part():
    scores = torch.arange(10.0)[None]  # the learned choice is the top indices 9, 8, ...
    excluded = torch.zeros(1, 10, dtype=torch.bool)
    m = mix_with_random(scores, excluded, torch.tensor([4]), 0.5, gen(0))
    assert int(m.sum()) == 4 and m[0, 9] and m[0, 8]


def test_learned_choice_follows_attention():
    """Crafted attention: every query attends to tokens {2, 5, 7}; those become the mask."""
    b, h, q, n = 2, 2, 4, 10
    logits = torch.zeros(b, h, q, n)
    logits[..., [2, 5, 7]] = 20.0
    cfg = MaskingConfig(kind="learned", ratio=0.3, num_queries=q, curriculum=0.5)
    layer = LearnedMasking(8, h, cfg)
    padding = torch.zeros(b, n, dtype=torch.bool)
    k = num_masked(torch.tensor([n, n]), 0.3)
    mask, score = layer.choose(logits, padding, k, gen(0), progress=1.0)
    assert mask.nonzero()[:, 1].tolist() == [2, 5, 7, 2, 5, 7]
    # at progress 0 the whole mask is random: with this seed it differs from the attention choice
    masks0 = [layer.choose(logits, padding, k, gen(s), progress=0.0)[0] for s in range(4)]
    assert all(int(m.sum(1).max()) == 3 for m in masks0)
    assert any(not torch.equal(m, mask) for m in masks0)


def test_learned_module_attention_from_weights():
    """Queries and keys built so that attention peaks on tokens whose embedding matches the queries."""
    dim, n = 8, 12
    cfg = MaskingConfig(kind="learned", ratio=0.25, num_queries=2, curriculum=0.0)
    layer = LearnedMasking(dim, 1, cfg)
    with torch.no_grad():
        e = torch.zeros(dim)
        e[0], e[1] = 1.0, -1.0
        layer.queries.copy_(torch.stack([e, e]) * 10)
        layer.q.weight.copy_(torch.eye(dim))
        layer.q.bias.zero_()
        layer.kv.weight.zero_()
        layer.kv.weight[:dim].copy_(torch.eye(dim))
        layer.kv.bias.zero_()
    x = torch.zeros(1, n, dim)
    x[0, :, 2], x[0, :, 3] = 1.0, -1.0  # unrelated direction
    target = [1, 4, 10]
    x[0, target] = 0.0
    x[0, target, 0], x[0, target, 1] = 1.0, -1.0
    logits, _ = layer.attention_logits(x)
    padding = torch.zeros(1, n, dtype=torch.bool)
    mask, _ = layer.choose(logits, padding, num_masked(torch.tensor([n]), 0.25), gen(0), progress=1.0)
    assert mask[0].nonzero().flatten().tolist() == target


def test_adaptive_sampler_counts_and_distribution():
    cfg = MaskingConfig(kind="adaptive", ratio=0.75, sampler_dim=16, sampler_depth=2)
    sampler = AdaptiveSampler(8, cfg)
    padding = ragged_padding([12, 7])
    x = torch.randn(2, 12, 8)
    log_prob = sampler(x, padding)
    assert torch.allclose(log_prob.exp().sum(1), torch.ones(2))
    assert torch.isinf(log_prob[1, 7:]).all()
    k = num_masked(torch.tensor([12, 7]), 0.75)
    mask = sampler.sample(log_prob, padding, k, gen(0), progress=1.0)
    assert mask.sum(1).tolist() == [9, 5] and not (mask & padding).any()


def test_adaptive_sampling_follows_distribution():
    """Visible tokens are drawn from p: a token with almost all the mass is always visible."""
    cfg = MaskingConfig(kind="adaptive", ratio=0.75, curriculum=0.0)
    sampler = AdaptiveSampler(8, cfg)
    log_prob = torch.full((1, 8), -20.0)
    log_prob[0, 3] = 0.0
    padding = torch.zeros(1, 8, dtype=torch.bool)
    for s in range(10):
        mask = sampler.sample(log_prob, padding, torch.tensor([6]), gen(s), progress=1.0)
        assert not mask[0, 3] and int(mask.sum()) == 6
