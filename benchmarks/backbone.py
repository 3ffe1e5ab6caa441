"""Backbone speed figures (issue 4), as ratios measured in one run. Prints ONE JSON object.

- encoder_vs_torch: a training step (forward + backward + AdamW) of maskloom's encoder blocks vs
  ``torch.nn.TransformerEncoder`` (pre-norm, GELU, no dropout) of the same width, depth and token
  count; ratio = peer time / ours (target >= 1.0). ``encoder_vs_timm`` does the same against timm's
  ViT ``Block``s when timm is importable (the ``bench`` extra).
- mae_speedup: full model step (embed, mask, encode, decode, MSE, backward, AdamW) at 75% masking
  divided by the step at 0% masking, 196 tokens, small preset (target <= 0.4). The decoder is a
  light one (192-d, 4 blocks) so that the figure measures the encoder's saving; MAE's 512-d x 8
  decoder costs more per token than a ViT-S encoder. ``encoder_mae_speedup`` is encoder only.
- masking overhead: learned (SMA) and adaptive (AdaMAE) vs random masking, same model (target <= 0.2).
- cpu_efficiency: analytic FLOP/s of the encoder training step (3x forward matmul FLOPs) divided by
  the FLOP/s of a large float32 GEMM measured in the same run (target >= 0.6).

Token values do not change the timings, so the inputs are generated (no data files needed).
Usage: python benchmarks/backbone.py [--preset small] [--batch 4] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from maskloom.backbone import AdapterConfig, DecoderConfig, MaskedModel, MaskingConfig, ModelConfig, preset
from maskloom.backbone.blocks import Block
from maskloom.batch import TokenBatch


def timed(step, steps: int, warmup: int = 1) -> float:
    """Median seconds of ``step()`` over ``steps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(steps: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per named step, running the steps in rotation so that a shared machine's
    load drifts over all of them alike (the ratios are what matter)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(module: nn.Module, make_loss):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        make_loss().backward()
        opt.step()

    return step


def gemm_flops(n: int = 1536, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: a @ b, reps)
    return 2 * n**3 / t


def encoder_flops(batch: int, tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of the encoder blocks: qkv + proj + MLP, plus the two attention matmuls."""
    per_token = 2 * (4 * dim * dim + 2 * mlp_ratio * dim * dim)
    attn = 2 * 2 * tokens * tokens * dim
    return depth * batch * (tokens * per_token + attn)


class Ours(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def torch_peer(dim: int, depth: int, heads: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.Sequential(
        nn.TransformerEncoder(layer, depth, enable_nested_tensor=False),
        nn.LayerNorm(dim),
    )


def timm_peer(dim: int, depth: int, heads: int) -> nn.Module | None:
    try:
        from timm.models.vision_transformer import Block as TimmBlock
    except ImportError:
        return None
    return nn.Sequential(*[TimmBlock(dim, heads, qkv_bias=True) for _ in range(depth)], nn.LayerNorm(dim))


def image_batch(batch: int, side: int = 14, token_dim: int = 768) -> TokenBatch:
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    pos = pos.reshape(1, side * side, 2).float().expand(batch, -1, -1).contiguous()
    return TokenBatch(
        tokens=torch.rand(batch, side * side, token_dim) * 255,
        positions=pos,
        padding=torch.zeros(batch, side * side, dtype=torch.bool),
        modality="image",
    )


def model_step(enc, masking: MaskingConfig, batch: TokenBatch):
    """A training step of the full model (decoder 192-d x 4) with the given masking."""
    cfg = ModelConfig(
        encoder=enc,
        decoder=DecoderConfig(dim=192, depth=4, heads=6),
        adapters=(
            (
                "image",
                AdapterConfig(token_kind="continuous", token_dim=768, position_dim=2, position_kind="grid"),
            ),
        ),
        masking=(("image", masking),),
    )
    model = MaskedModel(cfg).train()
    g = torch.Generator().manual_seed(0)

    def loss():
        out = model(batch, generator=g, progress=1.0)
        err = ((out.pred - batch.tokens / 255.0) ** 2).mean(-1)
        sel = out.target_mask if out.target_mask.any() else ~batch.padding
        total = err[sel].mean()
        if out.log_prob is not None:
            total = total - 1e-4 * (out.log_prob[out.mask] * err.detach()[out.mask]).mean()
        return total

    return train_step(model, loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = preset(args.preset)
    b, n = args.batch, 196
    res: dict = {"preset": args.preset, "dim": enc.dim, "depth": enc.depth, "heads": enc.heads}
    res.update(batch=b, tokens=n, threads=args.threads, torch=torch.__version__)

    # 1. encoder step vs peers, and the encoder-only MAE saving (49 visible tokens vs 196)
    x = torch.randn(b, n, enc.dim)
    x_vis = torch.randn(b, n // 4, enc.dim)
    ours = Ours(enc.dim, enc.depth, enc.heads)
    peer = torch_peer(enc.dim, enc.depth, enc.heads)
    tp = timm_peer(enc.dim, enc.depth, enc.heads)
    steps = {
        "ours": train_step(ours, lambda: ours(x).square().mean()),
        "ours_vis": train_step(ours, lambda: ours(x_vis).square().mean()),
        "torch": train_step(peer, lambda: peer(x).square().mean()),
    }
    if tp is not None:
        steps["timm"] = train_step(tp, lambda: tp(x).square().mean())
    t = interleaved(steps, args.steps)
    res["encoder_step_s"] = round(t["ours"], 4)
    res["torch_encoder_step_s"] = round(t["torch"], 4)
    res["encoder_vs_torch"] = round(t["torch"] / t["ours"], 3)
    if tp is not None:
        res["timm_encoder_step_s"] = round(t["timm"], 4)
        res["encoder_vs_timm"] = round(t["timm"] / t["ours"], 3)
    else:
        res["encoder_vs_timm"] = None  # timm not installed (pip install maskloom[bench])
    res["encoder_mae_speedup"] = round(t["ours_vis"] / t["ours"], 3)

    # 2. CPU efficiency: analytic FLOP/s of the step / measured GEMM FLOP/s (measured right after)
    gemm = gemm_flops()
    achieved = 3 * encoder_flops(b, n, enc.dim, enc.depth) / t["ours"]
    res["gemm_gflops"] = round(gemm / 1e9, 2)
    res["encoder_step_gflops"] = round(achieved / 1e9, 2)
    res["cpu_efficiency"] = round(achieved / gemm, 3)

    # 3. full model: MAE speed-up and masking overheads, interleaved
    batch = image_batch(b)
    kinds = {
        "0pct": MaskingConfig(kind="random", ratio=0.0),
        "75pct": MaskingConfig(kind="random", ratio=0.75),
        "learned": MaskingConfig(kind="learned", ratio=0.75),
        "adaptive": MaskingConfig(kind="adaptive", ratio=0.75),
    }
    t = interleaved({k: model_step(enc, m, batch) for k, m in kinds.items()}, args.steps)
    for k, v in t.items():
        res[f"model_step_{k}_s"] = round(v, 4)
    res["mae_speedup"] = round(t["75pct"] / t["0pct"], 3)
    res["learned_overhead"] = round(t["learned"] / t["75pct"] - 1.0, 3)
    res["adaptive_overhead"] = round(t["adaptive"] / t["75pct"] - 1.0, 3)
    res["targets"] = {
        "encoder_vs_torch": ">= 1.0",
        "encoder_vs_timm": ">= 1.0",
        "mae_speedup": "<= 0.4",
        "learned_overhead": "<= 0.2",
        "adaptive_overhead": "<= 0.2",
        "cpu_efficiency": ">= 0.6",
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
