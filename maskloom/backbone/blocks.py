"""Pre-norm transformer blocks (ViT / MAE) with attention through ``scaled_dot_product_attention``.

Attention masks follow SDPA: either ``None``, a boolean ``(B, 1, 1, Lk)`` key mask (True = the key
takes part; built by :func:`key_mask`, which never leaves a row without a key, because a fully
masked row makes SDPA return NaN), or an additive float ``(B, H, Lq, Lk)`` bias.

Drop-path is stochastic depth (Huang et al., 2016) as in timm's ``DropPath``; the cross-attention
block is CrossMAE's decoder block (Fu et al., 2024): queries attend to encoder features only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from maskloom.backbone.linear import Linear


def key_mask(padding: Tensor) -> Tensor | None:
    """(B, L) bool padding (True = no token) -> (B, 1, 1, L) bool SDPA mask (True = attend), or None
    when nothing is padded (lets SDPA pick its fastest kernel). A row with no real key attends to
    every key instead of producing NaN (its output is meaningless but finite)."""
    if not bool(padding.any()):
        return None
    keep = ~padding
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


def segment_mask(query_segments: Tensor, key_segments: Tensor | None = None) -> Tensor:
    """Block-diagonal SDPA mask of a packed batch: (B, Lq) and (B, Lk) sample indices (-1 on
    padding) -> (B, 1, Lq, Lk) bool, True where query and key belong to the same sample. A padding
    query attends to every key (finite, meaningless output, as in :func:`key_mask`); padding keys
    are never attended by a real query."""
    ks = query_segments if key_segments is None else key_segments
    same = query_segments[:, :, None] == ks[:, None, :]
    return (same | (query_segments < 0)[:, :, None])[:, None]


def heads_view(parts: tuple[Tensor, ...], heads: int) -> tuple[Tensor, ...]:
    """Views (no copies) of projections (B, L, D) as SDPA inputs (B, H, L, D/H).

    The parts are slices of one fused projection (``qkv.chunk(3, -1)``). Splitting along the last
    dim before the head split (rather than ``"b l (three h d) -> three b h l d"`` + unbind) matters
    for the backward pass on CPU: SDPA returns its gradients in (B, L, H, d) layout, so each part's
    gradient is a free view of (B, L, D) and autograd joins them with one ``cat`` instead of a
    ``stack`` followed by a permuting copy."""
    return tuple(rearrange(t, "b l (h d) -> b h l d", h=heads) for t in parts)


class DropPath(nn.Module):
    """Zero a sample's residual branch with probability p in training, rescaling the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        device = generator.device if generator is not None else x.device
        keep = torch.rand(x.shape[0], generator=generator, device=device).to(x.device) >= self.p
        return x * (keep.to(x.dtype) / (1.0 - self.p)).view(-1, *([1] * (x.dim() - 1)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        q, k, v = heads_view(self.qkv(x).chunk(3, dim=-1), self.heads)  # 3 x (B, H, L, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, d)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Lq, D) to a memory (B, Lk, Dm)."""

    def __init__(self, dim: int, heads: int, memory_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(memory_dim or dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, Lq, D), (B, Lk, Dm) -> (B, Lq, D)."""
        (q,) = heads_view((self.q(x),), self.heads)  # (B, H, Lq, d)
        k, v = heads_view(self.kv(memory).chunk(2, dim=-1), self.heads)  # 2 x (B, H, Lk, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Lq, d)
        return self.proj(rearrange(y, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """x + attn(LN(x)); x + mlp(LN(x)) — the ViT/MAE pre-norm block."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask), generator)
        return x + self.drop_path(self.mlp(self.norm2(x)), generator)


class CrossBlock(nn.Module):
    """CrossMAE decoder block: x + cross_attn(LN(x), LN(memory)); x + mlp(LN(x)); no self-attention."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, Lq, D), (B, Lk, D) -> (B, Lq, D)."""
        x = x + self.attn(self.norm1(x), self.norm_memory(memory), attn_mask)
        return x + self.mlp(self.norm2(x))
