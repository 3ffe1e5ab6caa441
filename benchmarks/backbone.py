"""Backbone speed figures (issue 4), as ratios measured in one run. Prints ONE JSON object.

Steps are timed *in rotation* (``interleaved``) and every figure is the median over rounds of the
per-round ratio (``ratio``), so the load of a shared machine drifts over both sides alike. All training steps use the same optimizer,
``torch.optim.AdamW`` with ``fused=True`` (one kernel per step instead of ~10 per parameter).

- encoder_vs_torch: a training step (forward + backward + AdamW) of maskloom's encoder blocks vs
  ``torch.nn.TransformerEncoder`` (pre-norm, GELU, no dropout) of the same width, depth and token
  count; ratio = peer time / ours (target >= 1.0). ``encoder_vs_timm`` does the same against timm's
  ViT ``Block``s when timm is importable (the ``bench`` extra). Ours runs as maskloom runs it: its
  Linears take oneDNN on an AVX-512 CPU that is not Intel's (``maskloom.backbone.linear``;
  ``cpu_matmul`` says which),
  the peers' run on the BLAS. ``*_same_kernels`` time our blocks with their Linears on the BLAS
  too, which isolates the rest of the block (attention layout, etc.) from the GEMM library.
- mae_speedup: full model step (embed, mask, encode, decode, MSE, backward, AdamW) at 75% masking
  divided by the step at 0% masking, 196 tokens, small preset (target <= 0.4). The decoder is a
  light one (192-d, 4 blocks) so that the figure measures the encoder's saving; MAE's 512-d x 8
  decoder costs more per token than a ViT-S encoder. ``encoder_mae_speedup`` is encoder only.
- masking overhead: learned (SMA) and adaptive (AdaMAE) vs random masking, same model (target <= 0.2).
- cpu_efficiency: achieved FLOP/s of the encoder training step divided by the FLOP/s of the
  model's own GEMMs run back to back in the same rotation (target >= 0.6), on whichever of the
  machine's two GEMM libraries runs them faster: the BLAS (``gemm_model``) or oneDNN
  (``gemm_model_onednn``: the same products as 1x1 convolutions, as our Linears run them).
  ``cpu_efficiency_vs_blas`` divides by the BLAS rate alone. FLOPs counted
  (``encoder_flops``): 2*m*n*k for the qkv, proj, fc1 and fc2 Linears and the two attention
  matmuls (QK^T, AV) of every block; a training step = 3x forward (backward = 2x). Not counted:
  LayerNorm, GELU, softmax, bias, residual adds, the loss and AdamW (all memory-bound).
  The reference (``gemm_model_gflops``) runs, in fp32 with the same thread count, exactly the
  Linear GEMMs of one block's training step with the step's shapes, m = batch * tokens:
  forward X W^T (m, k) x (k, n), backward dY W (m, n) x (n, k) and dY^T X (n, m) x (m, k), for
  (k, n) in {(D, 3D), (D, D), (D, 4D), (4D, D)}. ``gemm_largest_gflops`` is the forward of the
  largest one alone, and ``gemm_square_gflops`` a 1536^3 square GEMM (a peak the model's shapes
  cannot reach; ``cpu_efficiency_vs_square`` uses it, for comparison with earlier runs).

Token values do not change the timings, so the inputs are generated (no data files needed).
Usage: python benchmarks/backbone.py [--preset small] [--batch 16] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# OpenMP threads that spin while waiting at a barrier burn the CPU share of an oversubscribed
# machine (a shared 2-core box): let them sleep. Applies to the GEMM references and the steps alike;
# must be set before torch starts its OpenMP runtime; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from maskloom.backbone import AdapterConfig, DecoderConfig, MaskedModel, MaskingConfig, ModelConfig, preset
from maskloom.backbone.blocks import Block
from maskloom.backbone.linear import cpu_matmul, linear, using_cpu_matmul
from maskloom.batch import TokenBatch


def interleaved(steps: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each named step per round, running the steps in rotation so that a shared
    machine's load drifts over all of them alike (the ratios are what matter).

    Round r starts the rotation at step r (mod the number of steps): a step's time depends on the
    step before it (the allocator and the caches hold the previous step's buffers; a step after one
    of other shapes pays page faults for its own), so no step should always follow the same one.
    With ``rounds`` = a multiple of the number of steps every step follows every other equally often.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time[a] / time[b]: steps of one round ran back to back under about the
    same load, so pairing them cancels most of the drift of a shared machine."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def make_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CPU and CUDA since torch 2.4), else the multi-tensor one."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def train_step(module: nn.Module, make_loss):
    opt = make_optimizer(module.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        make_loss().backward()
        opt.step()

    return step


def blas_step(step):
    """``step`` with maskloom's Linears on ``F.linear`` (the BLAS), as timm's and torch's run."""

    def run() -> None:
        with using_cpu_matmul("blas"):
            step()

    return run


def gemm_square(n: int = 1536, repeat: int = 1):
    """``repeat`` square (n, n) x (n, n) fp32 GEMMs: -> (step, flops)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)

    def step() -> None:
        for _ in range(repeat):
            torch.mm(a, b, out=c)

    return step, 2 * n**3 * repeat


def linear_shapes(m: int, dim: int, mlp_ratio: float = 4.0) -> list[tuple[int, int, int]]:
    """(m, k, n) of the encoder block's Linears on m = batch * tokens rows: qkv, proj, fc1, fc2."""
    hidden = int(dim * mlp_ratio)
    return [(m, dim, 3 * dim), (m, dim, dim), (m, dim, hidden), (m, hidden, dim)]


def gemm_model(
    shapes: list[tuple[int, int, int]], *, backend: str = "blas", backward: bool = True, repeat: int = 1
):
    """The GEMMs of a block's Linears with the model's own shapes, back to back: -> (step, flops).

    Per (m, k, n): forward X W^T; with ``backward`` also dX = dY W and dW = dY^T X (autograd).
    They run exactly as maskloom's Linears run them (:func:`maskloom.backbone.linear.linear`, no
    bias), on ``backend``: ``blas`` (``F.linear``, as timm and torch run theirs) or ``onednn``."""
    calls, flops = [], 0
    for m, k, n in shapes:
        x = torch.randn(m, k, requires_grad=backward)
        calls.append((x, torch.randn(n, k, requires_grad=backward), torch.randn(m, n)))
        flops += 2 * m * k * n * (3 if backward else 1)

    def step() -> None:
        with using_cpu_matmul(backend), torch.set_grad_enabled(backward):
            for _ in range(repeat):
                for x, w, dy in calls:
                    y = linear(x, w)
                    if backward:
                        torch.autograd.grad(y, (x, w), dy)

    return step, flops * repeat


def encoder_flops(batch: int, tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs (2*m*n*k each) of the encoder blocks: per token qkv (3 D^2 MACs), proj
    (D^2) and the MLP (2 * hidden * D); per sample QK^T and AV (L^2 D MACs each)."""
    hidden = int(dim * mlp_ratio)
    per_token = 2 * (3 * dim * dim + dim * dim + 2 * hidden * dim)
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
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--steps", type=int, default=7, help="timed rounds of the rotation (7: each step starts one)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    enc = preset(args.preset)
    b, n = args.batch, 196
    res: dict = {"preset": args.preset, "dim": enc.dim, "depth": enc.depth, "heads": enc.heads}
    res.update(batch=b, tokens=n, threads=args.threads, torch=torch.__version__)
    res["omp_wait_policy"] = os.environ["OMP_WAIT_POLICY"]
    res["cpu_matmul"] = cpu_matmul()
    res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()

    # 1. encoder step vs peers, the encoder-only MAE saving (49 visible tokens vs 196), and the
    # GEMM references of the CPU efficiency figure, all in one rotation
    x = torch.randn(b, n, enc.dim)
    x_vis = torch.randn(b, n // 4, enc.dim)
    ours = Ours(enc.dim, enc.depth, enc.heads)
    peer = torch_peer(enc.dim, enc.depth, enc.heads)
    tp = timm_peer(enc.dim, enc.depth, enc.heads)
    shapes = linear_shapes(b * n, enc.dim, enc.mlp_ratio)
    gemms = {
        "gemm_model": gemm_model(shapes, repeat=2),
        "gemm_model_onednn": gemm_model(shapes, backend="onednn", repeat=4),
        "gemm_largest": gemm_model([max(shapes, key=lambda s: s[1] * s[2])], backward=False, repeat=6),
        "gemm_square": gemm_square(repeat=5),
    }
    steps = {
        "ours": train_step(ours, lambda: ours(x).square().mean()),
        "ours_vis": train_step(ours, lambda: ours(x_vis).square().mean()),
        "ours_blas": blas_step(train_step(ours, lambda: ours(x).square().mean())),
        "torch": train_step(peer, lambda: peer(x).square().mean()),
    }
    if tp is not None:
        steps["timm"] = train_step(tp, lambda: tp(x).square().mean())
    steps.update({k: step for k, (step, _) in gemms.items()})
    times = interleaved(steps, args.steps)
    t = {k: statistics.median(v) for k, v in times.items()}
    res["encoder_step_s"] = round(t["ours"], 4)
    res["torch_encoder_step_s"] = round(t["torch"], 4)
    res["encoder_vs_torch"] = round(ratio(times, "torch", "ours"), 3)
    if tp is not None:
        res["timm_encoder_step_s"] = round(t["timm"], 4)
        res["encoder_vs_timm"] = round(ratio(times, "timm", "ours"), 3)
        res["encoder_vs_timm_same_kernels"] = round(ratio(times, "timm", "ours_blas"), 3)
    else:
        res["encoder_vs_timm"] = None  # timm not installed (pip install maskloom[bench])
    res["encoder_blas_step_s"] = round(t["ours_blas"], 4)
    res["encoder_vs_torch_same_kernels"] = round(ratio(times, "torch", "ours_blas"), 3)
    res["encoder_mae_speedup"] = round(ratio(times, "ours_vis", "ours"), 3)

    # 2. CPU efficiency: analytic FLOP/s of the step / FLOP/s of the model's GEMMs (same rotation):
    # (F_step / t_step) / (F_gemm / t_gemm) = (F_step / F_gemm) * (t_gemm / t_step), paired per round
    step_flops = 3 * encoder_flops(b, n, enc.dim, enc.depth, enc.mlp_ratio)
    res["linear_shapes_mkn"] = shapes
    res["encoder_step_gflop"] = round(step_flops / 1e9, 2)
    res["encoder_step_gflops"] = round(step_flops / t["ours"] / 1e9, 2)
    for k, (_, flops) in gemms.items():
        res[f"{k}_gflops"] = round(flops / t[k] / 1e9, 2)
    eff = {k: step_flops / flops * ratio(times, k, "ours") for k, (_, flops) in gemms.items()}
    # the machine's GEMM rate is the faster of its two GEMM libraries on the model's shapes
    res["cpu_efficiency"] = round(min(eff["gemm_model"], eff["gemm_model_onednn"]), 3)
    res["cpu_efficiency_vs_blas"] = round(eff["gemm_model"], 3)
    res["cpu_efficiency_vs_largest"] = round(eff["gemm_largest"], 3)
    res["cpu_efficiency_vs_square"] = round(eff["gemm_square"], 3)

    # 3. full model: MAE speed-up and masking overheads, interleaved
    batch = image_batch(b)
    kinds = {
        "0pct": MaskingConfig(kind="random", ratio=0.0),
        "75pct": MaskingConfig(kind="random", ratio=0.75),
        "learned": MaskingConfig(kind="learned", ratio=0.75),
        "adaptive": MaskingConfig(kind="adaptive", ratio=0.75),
    }
    times = interleaved({k: model_step(enc, m, batch) for k, m in kinds.items()}, args.steps)
    for k, v in times.items():
        res[f"model_step_{k}_s"] = round(statistics.median(v), 4)
    res["mae_speedup"] = round(ratio(times, "75pct", "0pct"), 3)
    res["learned_overhead"] = round(ratio(times, "learned", "75pct") - 1.0, 3)
    res["adaptive_overhead"] = round(ratio(times, "adaptive", "75pct") - 1.0, 3)
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
