"""Position encodings computed from each token's coordinates.

- ``sincos_nd``: MAE's fixed 2-D sin-cos table (He et al., 2022, ``get_2d_sincos_pos_embed``)
  generalised to any number of axes and computed on the fly from the coordinates, so there is no
  maximum length: the width is split evenly over the axes, each axis gets the 1-D encoding of
  Vaswani et al. (2017) of its coordinate.
- ``MLPPositions``: a two-layer MLP of the coordinates, as Point-MAE (Pang et al., 2022) embeds
  group centres; also used for Laplacian eigenvector PEs (Dwivedi et al., 2020).
- ``FourierPositions``: random Fourier features (Tancik et al., 2020) followed by a Linear.
- ``random_sign_flip``: Laplacian eigenvectors are defined up to sign; flip each one at random per
  sample in training (Dwivedi et al., 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from maskloom.backbone.linear import Linear


def sincos_1d(pos: Tensor, dim: int, *, base: float = 10000.0) -> Tensor:
    """(...,) coordinates -> (..., dim) [sin(pos * w_i), cos(pos * w_i)], w_i = base^(-i / (dim/2))."""
    assert dim % 2 == 0, "sincos_1d needs an even width"
    half = dim // 2
    omega = torch.arange(half, device=pos.device, dtype=torch.float32) / half
    omega = base**-omega  # (dim/2,)
    angles = pos.float().unsqueeze(-1) * omega  # (..., dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_nd(positions: Tensor, dim: int) -> Tensor:
    """N-D sin-cos encoding of (B, L, P) coordinates -> (B, L, dim).

    Each of the P axes gets ``2 * (dim // (2P))`` channels (MAE: half the width for rows, half for
    columns); the few channels left over when ``dim`` is not a multiple of 2P are zero.
    """
    p = positions.shape[-1]
    per_axis = 2 * (dim // (2 * p))
    if per_axis == 0:
        raise ValueError(f"sincos_nd: width {dim} too small for {p} position axes")
    parts = [sincos_1d(positions[..., a], per_axis) for a in range(p)]  # P x (B, L, per_axis)
    out = torch.cat(parts, dim=-1)
    if out.shape[-1] < dim:
        out = nn.functional.pad(out, (0, dim - out.shape[-1]))
    return out


class SinCosPositions(nn.Module):
    """Fixed N-D sin-cos encoding (no parameters)."""

    def __init__(self, position_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        sincos_nd(torch.zeros(1, 1, position_dim), dim)  # fail early if dim is too small

    def forward(self, positions: Tensor) -> Tensor:
        """(B, L, P) -> (B, L, dim)."""
        return sincos_nd(positions, self.dim)


class MLPPositions(nn.Module):
    """Linear -> GELU -> Linear of the coordinates (Point-MAE's centre embedding)."""

    def __init__(self, position_dim: int, dim: int, *, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(Linear(position_dim, hidden), nn.GELU(), Linear(hidden, dim))

    def forward(self, positions: Tensor) -> Tensor:
        """(B, L, P) -> (B, L, dim)."""
        return self.net(positions.float())


class FourierPositions(nn.Module):
    """[sin(2 pi x B), cos(2 pi x B)] with fixed Gaussian B (P, hidden), then a Linear to dim."""

    def __init__(self, position_dim: int, dim: int, *, hidden: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)  # fixed, and saved with the weights anyway
        self.register_buffer("freqs", torch.randn(position_dim, hidden, generator=g) * scale)
        self.proj = Linear(2 * hidden, dim)

    def forward(self, positions: Tensor) -> Tensor:
        """(B, L, P) -> (B, L, dim)."""
        angles = 2 * math.pi * positions.float() @ self.freqs  # (B, L, hidden)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


def build_position_encoder(
    kind: str, position_dim: int, dim: int, *, hidden: int = 128, scale: float = 1.0
) -> nn.Module:
    """``sincos`` | ``mlp`` | ``fourier`` encoder mapping (B, L, P) coordinates to (B, L, dim)."""
    if kind == "sincos":
        return SinCosPositions(position_dim, dim)
    if kind == "mlp":
        return MLPPositions(position_dim, dim, hidden=hidden)
    if kind == "fourier":
        return FourierPositions(position_dim, dim, hidden=hidden, scale=scale)
    raise ValueError(f"unknown position encoding {kind!r}; known: sincos, mlp, fourier")


def random_sign_flip(
    positions: Tensor, generator: torch.Generator | None = None, segments: Tensor | None = None
) -> Tensor:
    """(B, L, P) -> (B, L, P) with each of the P axes (eigenvectors) multiplied by +-1 per sample
    (per row, or per sample of a packed batch's ``segments`` (B, L), -1 on padding)."""
    b, _, p = positions.shape
    device = generator.device if generator is not None else positions.device
    if segments is None:
        flips = torch.randint(0, 2, (b, 1, p), generator=generator, device=device).to(positions.device)
    else:
        n = int(segments.max()) + 1 if segments.numel() else 0
        per = torch.randint(0, 2, (max(n, 1), p), generator=generator, device=device).to(positions.device)
        flips = per[segments.clamp(min=0)]  # (B, L, P); padding takes sample 0's (its positions are 0)
    return positions * (flips * 2 - 1).to(positions.dtype)
