"""Which tokens each sample hides from the encoder. A mask is (B, L) bool: True = masked (removed
from the encoder and reconstructed), False = visible; padding is never masked.

Counts are exact and per sample: ``k = round(ratio * length)`` clipped so that at least one real
token stays visible and, when ``ratio > 0`` and the sample has two tokens or more, at least one is
masked (:func:`num_masked`). All randomness comes from the ``torch.Generator`` passed in, so a
seeded generator reproduces the masks.

- ``random``: MAE (He et al., 2022, ``random_masking``): keep the tokens with the lowest uniform
  noise; here expressed as "mask the top-k of the noise" so ragged lengths need no loop.
- ``tube``: VideoMAE (Tong et al., 2022): tokens with equal coordinates on every axis except
  ``tube_axis`` form a tube; a share ``ratio`` of each sample's tubes is masked whole, so the mask is
  constant along the axis. The token count is exact when tubes have equal lengths (videos);
  otherwise it is whatever the chosen whole tubes hold.
- ``block``: contiguous boxes in position space (SpecAugment-like time/frequency blocks as in
  AudioMAE, Huang et al., 2022; BEiT's block-wise masking, Bao et al., 2022): boxes of
  ``block_size`` are placed around random unmasked tokens until the count is reached; the last box
  is trimmed to the exact count, keeping its tokens nearest to its centre.
- ``learned``: SMA (Xie et al., 2023, "Self-guided masked autoencoders"): learned latent queries
  cross-attend to the embedded tokens; a random subset of ``round(ratio * num_queries)`` queries is
  chosen, their detached, head-averaged attention rows are summed, the top-k tokens become the mask,
  and the same attention (with masked tokens at -inf) produces the latents that the visible tokens
  then read. A curriculum makes a share of the mask random early in training.
- ``adaptive``: AdaMAE (Bandara et al., 2023): a small transformer gives a categorical
  distribution over tokens; visible tokens are sampled from it without replacement (Gumbel top-k,
  Kool et al., 2019); it is trained only by the recipes' policy term
  ``-mean(log_prob[mask] * error.detach())``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from maskloom.backbone.blocks import Block, heads_view, key_mask
from maskloom.backbone.config import MaskingConfig
from maskloom.backbone.linear import Linear


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise drawn from ``generator`` (on its device), returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def num_masked(lengths: Tensor, ratio: float) -> Tensor:
    """(B,) real lengths -> (B,) number of tokens to mask: round(ratio * length), at least 1 visible,
    at least 1 masked when ratio > 0 and length >= 2."""
    k = torch.round(lengths.double() * ratio).long()
    if ratio > 0:
        k = torch.maximum(k, torch.ones_like(k))
    return torch.minimum(k, (lengths - 1).clamp(min=0))


def curriculum_random_share(cfg: MaskingConfig, progress: float) -> float:
    """Share of the mask chosen at random: 1 at progress 0, falling linearly to 0 at cfg.curriculum."""
    if cfg.curriculum <= 0:
        return 0.0
    return float(min(max(1.0 - progress / cfg.curriculum, 0.0), 1.0))


def topk_mask(scores: Tensor, excluded: Tensor, k: Tensor) -> Tensor:
    """(B, L) scores, (B, L) bool excluded, (B,) counts -> (B, L) bool, True on each row's k highest
    non-excluded scores. Needs k <= number of non-excluded tokens in the row."""
    scores = scores.float().masked_fill(excluded, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < k[:, None]) & ~excluded


def mix_with_random(
    scores: Tensor, excluded: Tensor, k: Tensor, random_share: float, generator: torch.Generator | None
) -> Tensor:
    """Top-k by ``scores``, except that ``round(random_share * k)`` of the k are drawn uniformly from
    the tokens the scores did not choose (the SMA/AdaMAE curriculum). Returns (B, L) bool."""
    if random_share <= 0:
        return topk_mask(scores, excluded, k)
    k_rand = torch.round(k.double() * random_share).long()
    chosen = topk_mask(scores, excluded, k - k_rand)
    noise = rand(tuple(scores.shape), generator, scores.device)
    return chosen | topk_mask(noise, excluded | chosen, k_rand)


def random_mask(padding: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """MAE random masking: (B, L) padding -> (B, L) mask with exactly num_masked(lengths) per row."""
    noise = rand(tuple(padding.shape), generator, padding.device)  # (B, L)
    return topk_mask(noise, padding, num_masked((~padding).sum(1), ratio))


def segment_counts(segments: Tensor, num_samples: int) -> Tensor:
    """(B, L) segments of a packed batch (-1 on padding) -> (N,) real tokens per sample."""
    seg = segments[segments >= 0]
    return torch.bincount(seg, minlength=num_samples)


def segment_topk_mask(scores: Tensor, excluded: Tensor, k: Tensor, segments: Tensor) -> Tensor:
    """:func:`topk_mask` per *sample* of a packed batch: (B, L) scores, excluded, segments (sample of
    each token, -1 on padding) and (N,) counts -> (B, L) bool, True on each sample's k highest
    non-excluded scores (ties broken by position). Needs k <= a sample's non-excluded tokens."""
    n = k.shape[0]
    flat_seg = segments.reshape(-1)
    key = scores.float().reshape(-1).masked_fill(excluded.reshape(-1) | (flat_seg < 0), float("-inf"))
    seg = torch.where(flat_seg < 0, torch.full_like(flat_seg, n), flat_seg)  # padding: its own group
    order = key.argsort(descending=True, stable=True)
    order = order[seg[order].argsort(stable=True)]  # by sample, each sample's tokens by descending score
    counts = torch.bincount(seg, minlength=n + 1)
    first = torch.cumsum(counts, 0) - counts  # first sorted slot of every sample
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - first[seg[order]]
    k_of = torch.cat([k, k.new_zeros(1)])[seg]
    return ((rank < k_of) & ~excluded.reshape(-1) & (flat_seg >= 0)).reshape(segments.shape)


def random_mask_packed(
    segments: Tensor, ratio: float, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """:func:`random_mask` for a packed batch: exactly num_masked(length) tokens of every *sample*."""
    noise = rand(tuple(segments.shape), generator, segments.device)
    k = num_masked(segment_counts(segments, num_samples), ratio)
    return segment_topk_mask(noise, segments < 0, k, segments)


def tube_mask(
    positions: Tensor, padding: Tensor, ratio: float, axis: int, generator: torch.Generator | None = None
) -> Tensor:
    """VideoMAE tube masking: (B, L, P) positions -> (B, L) mask constant along ``axis``.

    round(ratio * tubes) whole tubes per sample (at least 1 visible, 1 masked when there are 2+)."""
    b, n, p = positions.shape
    if p < 2:
        raise ValueError(
            f"tube masking needs at least 2 position axes (one to share the mask along), got {p}"
        )
    if not 0 <= axis < p:
        raise ValueError(f"tube masking: tube_axis {axis} out of range for {p} position axes")
    real = ~padding
    sample, index = real.nonzero(as_tuple=True)  # (N,), (N,) real tokens, sample-major
    other = torch.cat([positions[..., :axis], positions[..., axis + 1 :]], dim=-1)[sample, index]  # (N, P-1)
    keys = torch.cat([sample[:, None].to(other.dtype), other], dim=1)  # (N, P) tube = (sample, other coords)
    tubes, tube_of_token = torch.unique(keys, dim=0, return_inverse=True)  # sorted: sample-major
    tube_sample = tubes[:, 0].long()  # (U,)
    n_tubes = torch.bincount(tube_sample, minlength=b)  # (B,)
    # rank of each tube within its sample by random noise: sort by (sample, noise)
    noise = rand((tubes.shape[0],), generator, positions.device)
    order = torch.argsort(tube_sample.double() * 2.0 + noise.double(), stable=True)
    start = torch.cumsum(n_tubes, 0) - n_tubes  # (B,) first tube of each sample in sorted order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[tube_sample[order]]
    masked_tube = rank < num_masked(n_tubes, ratio)[tube_sample]  # (U,)
    mask = torch.zeros(b, n, dtype=torch.bool, device=padding.device)
    mask[sample, index] = masked_tube[tube_of_token]
    return mask


def block_mask(
    positions: Tensor,
    padding: Tensor,
    ratio: float,
    block_size: tuple[float, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Block masking: boxes of ``block_size`` (per axis, position units) around random centres.

    A token is in the box around centre c when ``-s/2 <= pos - c < s/2`` on every axis (exactly s
    cells of an integer grid). Boxes are added (all samples at once, one box per round) until each
    sample has at least k masked tokens; the last box is trimmed to exactly k by dropping its tokens
    farthest from its centre. Returns (B, L) bool."""
    b, n, p = positions.shape
    real = ~padding
    pos = positions.float()
    k = num_masked(real.sum(1), ratio)  # (B,)
    if block_size is None:
        big = torch.finfo(pos.dtype).max
        lo = pos.masked_fill(padding[..., None], big).amin(1)
        hi = pos.masked_fill(padding[..., None], -big).amax(1)
        size = ((hi - lo + 1) / 4).clamp(min=1.0)  # (B, P)
    else:
        bs = (
            tuple(block_size)
            if len(block_size) == p
            else tuple(block_size) * p
            if len(block_size) == 1
            else None
        )
        if bs is None:
            raise ValueError(f"block masking: block_size {block_size} needs 1 or {p} values")
        size = torch.tensor(bs, dtype=pos.dtype, device=pos.device).expand(b, p)
    added_round = torch.full((b, n), n + 1, dtype=torch.long, device=pos.device)  # round a token joined
    dist = torch.zeros(b, n, dtype=pos.dtype, device=pos.device)  # its distance to that round's centre
    mask = torch.zeros(b, n, dtype=torch.bool, device=pos.device)
    for r in range(n):  # at most L rounds: every round adds at least the centre to unfinished samples
        need = mask.sum(1) < k  # (B,)
        if not bool(need.any()):
            break
        noise = rand((b, n), generator, pos.device).masked_fill(mask | padding, -1.0)
        centre = pos[torch.arange(b, device=pos.device), noise.argmax(1)]  # (B, P)
        d = pos - centre[:, None, :]  # (B, L, P)
        half = size[:, None, :] / 2
        inside = ((d >= -half) & (d < half)).all(-1) & real & ~mask & need[:, None]  # (B, L)
        added_round = torch.where(inside, torch.full_like(added_round, r), added_round)
        dist = torch.where(inside, d.norm(dim=-1), dist)
        mask = mask | inside
    # earlier rounds first, then nearer the centre: drop the overshoot of the last box
    score = -(added_round.double() * (dist.max().double() + 1.0) + dist.double())
    return topk_mask(score, ~mask, k)


class LearnedMasking(nn.Module):
    """SMA's first layer: latent queries cross-attend to the embedded tokens; their attention picks
    the mask, and the latents (which saw only visible tokens) are read back by the visible tokens.

    Attention weights are computed explicitly (not by SDPA) because the mask is chosen from them."""

    def __init__(self, dim: int, heads: int, cfg: MaskingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, dim) * 0.02)  # (Q, D)
        self.norm = nn.LayerNorm(dim)
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        self.read_norm = nn.LayerNorm(dim)
        self.read_q = Linear(dim, dim)
        self.read_kv = Linear(dim, 2 * dim)
        self.read_proj = Linear(dim, dim)

    def attention_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, D) embedded tokens -> logits (B, H, Q, L) and values (B, H, L, d)."""
        q = rearrange(self.q(self.queries), "q (h d) -> h q d", h=self.heads)
        k, v = heads_view(self.kv(self.norm(x)).chunk(2, dim=-1), self.heads)  # 2 x (B, H, L, d)
        logits = torch.einsum("hqd,bhld->bhql", q, k) / math.sqrt(q.shape[-1])
        return logits, v

    def choose(
        self, logits: Tensor, padding: Tensor, k: Tensor, generator: torch.Generator | None, progress: float
    ) -> tuple[Tensor, Tensor]:
        """Detached selection: (B, H, Q, L) logits -> (B, L) mask and (B, L) selection score."""
        attn = (
            logits.detach().masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1).mean(1)
        )  # (B,Q,L)
        b, nq, _ = attn.shape
        n_sel = torch.full((b,), max(1, min(nq, round(self.cfg.ratio * nq))), device=attn.device)
        chosen = topk_mask(
            rand((b, nq), generator, attn.device), torch.zeros_like(attn[..., 0], dtype=torch.bool), n_sel
        )
        score = torch.einsum("bq,bql->bl", chosen.to(attn.dtype), attn)  # (B, L)
        share = curriculum_random_share(self.cfg, progress)
        return mix_with_random(score, padding, k, share, generator), score

    def latents(self, logits: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        """Latents that attended to the non-hidden tokens only: (B, H, Q, L), (B, L) bool -> (B, Q, D)."""
        keep = ~hidden
        keep = keep | ~keep.any(1, keepdim=True)  # never a fully hidden row
        w = logits.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)  # (B, H, Q, L)
        out = rearrange(torch.einsum("bhql,bhld->bhqd", w, v), "b h q d -> b q (h d)")
        return self.queries + self.proj(out)

    def read_back(self, x: Tensor, latents: Tensor) -> Tensor:
        """Visible tokens read the latents: (B, V, D), (B, Q, D) -> (B, V, D) (residual added)."""
        (q,) = heads_view((self.read_q(self.read_norm(x)),), self.heads)  # (B, H, V, d)
        k, v = heads_view(self.read_kv(latents).chunk(2, dim=-1), self.heads)  # 2 x (B, H, Q, d)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, V, d)
        return x + self.read_proj(rearrange(y, "b h n d -> b n (h d)"))


class AdaptiveSampler(nn.Module):
    """AdaMAE's sampling network: a small transformer over the (detached) embedded tokens giving a
    categorical distribution over each sample's real tokens."""

    def __init__(self, dim: int, cfg: MaskingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        heads = max(1, cfg.sampler_dim // 32)
        self.inp = Linear(dim, cfg.sampler_dim)
        self.blocks = nn.ModuleList(Block(cfg.sampler_dim, heads) for _ in range(cfg.sampler_depth))
        self.norm = nn.LayerNorm(cfg.sampler_dim)
        self.head = Linear(cfg.sampler_dim, 1)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        """(B, L, D) embedded tokens -> (B, L) log-probabilities over real tokens (padding: -inf).

        The input is detached: the sampler learns only from the policy term, and the policy term
        does not move the adapters."""
        h = self.inp(x.detach())
        mask = key_mask(padding)
        for blk in self.blocks:
            h = blk(h, mask)
        logits = self.head(self.norm(h)).squeeze(-1).float()  # (B, L)
        return logits.masked_fill(padding, float("-inf")).log_softmax(-1)

    def sample(
        self, log_prob: Tensor, padding: Tensor, k: Tensor, generator: torch.Generator | None, progress: float
    ) -> Tensor:
        """Visible tokens drawn without replacement from p (Gumbel top-k); returns the (B, L) mask."""
        u = rand(tuple(log_prob.shape), generator, log_prob.device).clamp(1e-9, 1 - 1e-9)
        gumbel = log_prob.detach() - torch.log(-torch.log(u))
        n_visible = (~padding).sum(1) - k
        visible = mix_with_random(
            gumbel, padding, n_visible, curriculum_random_share(self.cfg, progress), generator
        )
        return ~visible & ~padding
