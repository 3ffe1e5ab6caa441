"""The attention fast path (``heads_view``: split the fused projection before the head split) keeps
the weight layout and the numbers of the straightforward ``(three h d)`` formulation, and skips the
SDPA mask when nothing is padded."""

import math

import torch
from einops import rearrange

from maskloom.backbone.blocks import CrossAttention, SelfAttention, heads_view, key_mask


def reference_attention(q, k, v, keep=None):
    """Plain softmax attention on (B, H, L, d) tensors; keep (B, 1, 1, Lk) bool or None."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.softmax(-1) @ v


def test_heads_view_is_a_view_with_the_fused_layout():
    qkv = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(1, 2, 36)  # (B=1, L=2, 3D) D=12
    q, k, v = heads_view(qkv.chunk(3, dim=-1), 4)  # H=4, d=3
    assert q.shape == (1, 4, 2, 3)
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv.data_ptr() + 12 * 4
    ref = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=4)
    for got, want in zip((q, k, v), ref, strict=True):
        assert torch.equal(got, want)
    assert q[0, 1, 0].tolist() == [3.0, 4.0, 5.0]  # head 1 of token 0 = channels 3..5


def test_self_attention_matches_reference_and_gradients():
    torch.manual_seed(0)
    attn = SelfAttention(12, 4)
    x = torch.randn(2, 5, 12, requires_grad=True)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for keep in (None, key_mask(padding)):
        out = attn(x, keep)
        q, k, v = rearrange(attn.qkv(x), "b l (three h d) -> three b h l d", three=3, h=4)
        ref = attn.proj(rearrange(reference_attention(q, k, v, keep), "b h l d -> b l (h d)"))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.autograd.grad(out.square().sum(), [x, attn.qkv.weight])
        g_ref = torch.autograd.grad(ref.square().sum(), [x, attn.qkv.weight])
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cross_attention_matches_reference():
    torch.manual_seed(1)
    attn = CrossAttention(8, 2)
    x, mem = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    q = rearrange(attn.q(x), "b l (h d) -> b h l d", h=2)
    k, v = rearrange(attn.kv(mem), "b l (two h d) -> two b h l d", two=2, h=2)
    ref = attn.proj(rearrange(reference_attention(q, k, v), "b h l d -> b l (h d)"))
    torch.testing.assert_close(attn(x, mem), ref, atol=1e-5, rtol=1e-5)


def test_key_mask_is_none_without_padding():
    assert key_mask(torch.zeros(3, 7, dtype=torch.bool)) is None
    m = key_mask(torch.tensor([[False, True], [False, False]]))
    assert m.shape == (2, 1, 1, 2) and m[:, 0, 0].tolist() == [[True, False], [True, True]]
