"""Per-modality adapters: what the shared transformer needs to know about a modality, and no more.

An ``InputAdapter`` turns a batch's tokens and coordinates into (B, L, dim) vectors: a Linear of
the (optionally per-token normalised) token vector, or an Embedding of the id, plus a position
encoding of the coordinates (``positions.py``) and a learned modality embedding (as in 4M and
Perceiver-style multi-modal models, so one backbone can tell modalities apart). An
``OutputAdapter`` holds the decoder-side position encoding, modality embedding and the output
head (width ``token_dim`` or ``vocab_size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskloom.backbone.config import AdapterConfig
from maskloom.backbone.linear import Linear
from maskloom.backbone.positions import build_position_encoder, random_sign_flip


def _positions(cfg: AdapterConfig, dim: int) -> nn.Module:
    return build_position_encoder(
        cfg.resolved_position_encoding,
        cfg.position_dim,
        dim,
        hidden=cfg.position_hidden,
        scale=cfg.fourier_scale,
    )


def prepare_positions(
    cfg: AdapterConfig,
    positions: Tensor,
    *,
    training: bool,
    generator: torch.Generator | None,
    segments: Tensor | None = None,
) -> Tensor:
    """(B, L, P) coordinates as the position encoders see them (spectral: random sign flips in
    training, per sample: per ``segments`` entry of a packed batch)."""
    if positions.shape[-1] != cfg.position_dim:
        raise ValueError(f"batch has {positions.shape[-1]} position axes, adapter expects {cfg.position_dim}")
    positions = positions.float()
    if cfg.position_kind == "spectral" and cfg.sign_flip and training:
        positions = random_sign_flip(positions, generator, segments)
    return positions


class InputAdapter(nn.Module):
    """tokens (B, L, D) in any numeric dtype (uint8, float16, float32; cast here) or (B, L) ids,
    positions (B, L, P) -> (B, L, dim)."""

    def __init__(self, cfg: AdapterConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.token_kind == "discrete":
            self.embed: nn.Module = nn.Embedding(int(cfg.vocab_size), dim)
        else:
            self.embed = Linear(cfg.token_dim, dim)
        self.positions = _positions(cfg, dim)
        self.modality = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.modality, std=0.02)

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (B, L, D) or (B, L); positions (B, L, P) already prepared -> (B, L, dim)."""
        if self.cfg.token_kind == "discrete":
            if torch.is_floating_point(tokens):
                raise ValueError("adapter expects integer token ids, got floating-point tokens")
            if tokens.dim() == 3:  # (B, L, 1) ids
                tokens = tokens.squeeze(-1)
            x = self.embed(tokens.long())
        else:
            if tokens.dim() != 3 or tokens.shape[-1] != self.cfg.token_dim:
                raise ValueError(
                    f"adapter expects tokens (B, L, {self.cfg.token_dim}), got {tuple(tokens.shape)}"
                )
            t = tokens.float()
            if self.cfg.input_norm:
                t = F.layer_norm(t, t.shape[-1:])
            x = self.embed(t)
        return x + self.positions(positions) + self.modality


class OutputAdapter(nn.Module):
    """Decoder side of a modality: position encoding + modality embedding at decoder width, and a head."""

    def __init__(self, cfg: AdapterConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.positions = _positions(cfg, dim)
        self.modality = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.modality, std=0.02)
        self.head = Linear(dim, cfg.out_dim)

    def position_embedding(self, positions: Tensor) -> Tensor:
        """(B, L, P) prepared coordinates -> (B, L, dim) decoder position + modality embedding."""
        return self.positions(positions) + self.modality
