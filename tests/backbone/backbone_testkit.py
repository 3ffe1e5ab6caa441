"""Tiny synthetic batches and models for the backbone tests (no data files)."""

from __future__ import annotations

import itertools

import torch

from maskloom.backbone import (
    AdapterConfig,
    DecoderConfig,
    EncoderConfig,
    MaskedModel,
    MaskingConfig,
    ModelConfig,
)
from maskloom.batch import TokenBatch

# name -> (position_kind, position_dim, grid side); grid layouts enumerate a lattice
LAYOUTS = {
    "grid1d": ("grid", 1, 24),
    "grid2d": ("grid", 2, 5),
    "grid3d": ("grid", 3, 3),
    "continuous": ("continuous", 3, None),
    "spectral": ("spectral", 4, None),
}


def grid(side: int, dims: int) -> torch.Tensor:
    """(side**dims, dims) lattice coordinates in row-major order."""
    return torch.tensor(list(itertools.product(range(side), repeat=dims)), dtype=torch.float32)


def make_batch(
    layout: str = "grid2d",
    lengths: tuple[int, ...] = (20, 13, 6),
    *,
    token_dim: int = 6,
    discrete: bool = False,
    vocab: int = 11,
    seed: int = 0,
    modality: str = "m",
) -> TokenBatch:
    """A padded batch of len(lengths) samples; real tokens first, padding holds zeros."""
    kind, p, side = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    if kind == "grid":
        pos = grid(side, p)[:n].expand(b, n, p).clone()
    else:
        pos = torch.randn(b, n, p, generator=g)
    padding = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
    if discrete:
        tokens = torch.randint(0, vocab, (b, n), generator=g).masked_fill(padding, 0)
    else:
        tokens = torch.randn(b, n, token_dim, generator=g).masked_fill(padding[..., None], 0.0)
    pos = pos.masked_fill(padding[..., None], 0.0)
    return TokenBatch(tokens=tokens, positions=pos, padding=padding, modality=modality)


def make_model(
    layout: str = "grid2d",
    masking: MaskingConfig | None = None,
    *,
    decoder: str = "mae",
    fraction: float = 1.0,
    token_dim: int = 6,
    discrete: bool = False,
    vocab: int = 11,
    edge_bias: bool = False,
    drop_path: float = 0.0,
    seed: int = 0,
) -> MaskedModel:
    kind, p, _ = LAYOUTS[layout]
    torch.manual_seed(seed)
    adapter = AdapterConfig(
        token_kind="discrete" if discrete else "continuous",
        token_dim=1 if discrete else token_dim,
        vocab_size=vocab if discrete else None,
        position_dim=p,
        position_kind=kind,
    )
    cfg = ModelConfig(
        encoder=EncoderConfig(dim=32, depth=2, heads=4, edge_bias=edge_bias, drop_path=drop_path),
        decoder=DecoderConfig(kind=decoder, dim=16, depth=1, heads=2, reconstruct_fraction=fraction),
        adapters=(("m", adapter),),
        masking=(("m", masking or MaskingConfig()),),
    )
    return MaskedModel(cfg)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
