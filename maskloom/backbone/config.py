"""Configuration of the masked transformer: adapters, masking, encoder, decoder, presets.

Every config is a frozen keyword-only dataclass with a docstring per field (torchtitan style);
variants are made with ``dataclasses.replace``. ``ModelConfig`` round-trips through JSON so that a
saved model (``model.safetensors`` + ``config.json``) can be rebuilt without unpickling anything.

Presets follow ViT (Dosovitskiy et al., 2021; "S/B/L" widths as in DeiT and MAE), plus a
CPU-friendly ``tiny`` for tests and laptops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the backbone never imports a modality; TableSpec is only a type here
    from maskloom.tokenizers.base import TableSpec

TOKEN_KINDS = ("continuous", "discrete")
POSITION_KINDS = ("grid", "continuous", "spectral")
POSITION_ENCODINGS = ("auto", "sincos", "mlp", "fourier")
MASKING_KINDS = ("random", "tube", "block", "learned", "adaptive")
DECODER_KINDS = ("mae", "cross")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {msg}")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """How one modality's tokens enter (and leave) the backbone. Built from a table's ``TableSpec``."""

    token_kind: str
    """``continuous`` (vectors through a Linear) or ``discrete`` (ids through an Embedding)."""
    token_dim: int
    """Width D of a continuous token; 1 for discrete tokens."""
    vocab_size: int | None = None
    """Number of ids for discrete tokens; None for continuous."""
    position_dim: int
    """Number P of coordinate axes."""
    position_kind: str
    """``grid`` (integer lattice), ``continuous`` (e.g. xyz centres) or ``spectral`` (Laplacian PE)."""
    input_norm: bool = True
    """Per-token LayerNorm (no affine) of continuous inputs before the Linear (uint8 pixels welcome)."""
    position_encoding: str = "auto"
    """``sincos`` (N-D sin-cos, MAE), ``mlp`` (Point-MAE), ``fourier`` (random Fourier features);
    ``auto`` = sincos for grid, mlp for continuous and spectral."""
    position_hidden: int = 128
    """Hidden width of the mlp position encoder / number of Fourier frequencies."""
    fourier_scale: float = 1.0
    """Standard deviation of the Fourier frequencies (in cycles per coordinate unit)."""
    sign_flip: bool = True
    """Spectral only: flip the sign of each eigenvector at random per sample in training (the
    Laplacian eigenvector sign is arbitrary; Dwivedi et al., 2020)."""

    def __post_init__(self) -> None:
        w = "AdapterConfig"
        _check(
            self.token_kind in TOKEN_KINDS,
            w,
            f"token_kind must be one of {TOKEN_KINDS}, got {self.token_kind!r}",
        )
        _check(
            self.position_kind in POSITION_KINDS,
            w,
            f"position_kind must be one of {POSITION_KINDS}, got {self.position_kind!r}",
        )
        _check(
            self.position_encoding in POSITION_ENCODINGS,
            w,
            f"position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}",
        )
        _check(self.token_dim >= 1, w, f"token_dim must be >= 1, got {self.token_dim}")
        _check(self.position_dim >= 1, w, f"position_dim must be >= 1, got {self.position_dim}")
        if self.token_kind == "discrete":
            _check(bool(self.vocab_size) and self.vocab_size > 0, w, "discrete tokens need vocab_size > 0")

    @classmethod
    def from_spec(cls, spec: TableSpec, **overrides: Any) -> AdapterConfig:
        """The adapter for a token table described by ``spec`` (overrides win)."""
        kw: dict[str, Any] = dict(
            token_kind=spec.token_kind,
            token_dim=spec.token_dim,
            vocab_size=spec.vocab_size,
            position_dim=len(spec.position_axes),
            position_kind=spec.position_kind,
        )
        kw.update(overrides)
        return cls(**kw)

    @property
    def out_dim(self) -> int:
        """Output width of the head: token_dim for continuous tokens, vocab_size for discrete."""
        return int(self.vocab_size) if self.token_kind == "discrete" else self.token_dim

    @property
    def resolved_position_encoding(self) -> str:
        if self.position_encoding != "auto":
            return self.position_encoding
        return "sincos" if self.position_kind == "grid" else "mlp"


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    """Which tokens of each sample are hidden from the encoder (mask True = removed, MAE)."""

    kind: str = "random"
    """random (MAE) | tube (VideoMAE) | block (contiguous boxes) | learned (SMA) | adaptive (AdaMAE)."""
    ratio: float = 0.75
    """Fraction of each sample's real (non-padding) tokens that is masked (tube: fraction of tubes)."""
    tube_axis: int = 0
    """tube: the position axis along which one mask is shared (e.g. 0 = time for (t, row, col))."""
    block_size: tuple[float, ...] | None = None
    """block: extent of one block per axis in position units (one value = every axis); None = a
    quarter of the sample's extent on each axis (at least 1)."""
    num_queries: int = 64
    """learned (SMA): number of latent queries of the first-layer cross-attention."""
    curriculum: float = 0.5
    """learned/adaptive: share of training over which the mask moves from random to learned (0 = no
    curriculum)."""
    sampler_depth: int = 2
    """adaptive (AdaMAE): transformer layers of the sampling network."""
    sampler_dim: int = 128
    """adaptive (AdaMAE): width of the sampling network."""

    def __post_init__(self) -> None:
        w = "MaskingConfig"
        _check(self.kind in MASKING_KINDS, w, f"kind must be one of {MASKING_KINDS}, got {self.kind!r}")
        _check(0.0 <= self.ratio < 1.0, w, f"ratio must be in [0, 1), got {self.ratio}")
        _check(self.tube_axis >= 0, w, f"tube_axis must be >= 0, got {self.tube_axis}")
        if self.block_size is not None:
            _check(
                all(s > 0 for s in self.block_size), w, f"block_size must be positive, got {self.block_size}"
            )
        _check(self.num_queries >= 1, w, f"num_queries must be >= 1, got {self.num_queries}")
        _check(0.0 <= self.curriculum <= 1.0, w, f"curriculum must be in [0, 1], got {self.curriculum}")
        _check(
            self.sampler_depth >= 1 and self.sampler_dim >= 8, w, "sampler_depth >= 1 and sampler_dim >= 8"
        )


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The pre-norm transformer encoder that sees visible tokens only."""

    dim: int
    """Token width."""
    depth: int
    """Number of blocks."""
    heads: int
    """Attention heads (dim must be divisible by heads)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of dim."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linearly increasing from 0 over the blocks)."""
    edge_bias: bool = False
    """Add a learned per-head scalar to the attention logits of token pairs joined by ``batch.edges``
    (graphs; Graphormer-style spatial bias restricted to adjacency)."""

    def __post_init__(self) -> None:
        w = "EncoderConfig"
        _check(self.dim > 0 and self.depth > 0 and self.heads > 0, w, "dim, depth and heads must be positive")
        _check(self.dim % self.heads == 0, w, f"dim {self.dim} not divisible by heads {self.heads}")
        _check(0.0 <= self.drop_path < 1.0, w, f"drop_path must be in [0, 1), got {self.drop_path}")


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The light decoder that predicts the hidden tokens (defaults: MAE's 512-d, 8 blocks, 16 heads)."""

    kind: str = "mae"
    """``mae`` (self-attention over visible + mask tokens) | ``cross`` (CrossMAE: queries at the
    positions to reconstruct cross-attend to encoder features only)."""
    dim: int = 512
    """Decoder width."""
    depth: int = 8
    """Decoder blocks."""
    heads: int = 16
    """Decoder attention heads."""
    mlp_ratio: float = 4.0
    """Hidden width of the decoder MLP as a multiple of dim."""
    reconstruct_fraction: float = 1.0
    """cross: fraction of the masked tokens that is reconstructed and scored (CrossMAE uses 0.25..1)."""

    def __post_init__(self) -> None:
        w = "DecoderConfig"
        _check(self.kind in DECODER_KINDS, w, f"kind must be one of {DECODER_KINDS}, got {self.kind!r}")
        _check(self.dim > 0 and self.depth > 0 and self.heads > 0, w, "dim, depth and heads must be positive")
        _check(self.dim % self.heads == 0, w, f"dim {self.dim} not divisible by heads {self.heads}")
        _check(
            0.0 < self.reconstruct_fraction <= 1.0,
            w,
            f"reconstruct_fraction must be in (0, 1], got {self.reconstruct_fraction}",
        )
        _check(
            self.kind == "cross" or self.reconstruct_fraction == 1.0,
            w,
            "reconstruct_fraction < 1 needs kind='cross'",
        )


PRESETS: dict[str, EncoderConfig] = {
    # tiny: 128-d, 4 blocks, 4 heads (~0.8M encoder parameters): tests, CPU demos.
    "tiny": EncoderConfig(dim=128, depth=4, heads=4),
    # small: ViT-S, 384-d, 12 blocks, 6 heads (~21M).
    "small": EncoderConfig(dim=384, depth=12, heads=6),
    # base: ViT-B, 768-d, 12 blocks, 12 heads (~85M).
    "base": EncoderConfig(dim=768, depth=12, heads=12),
    # large: ViT-L, 1024-d, 24 blocks, 16 heads (~303M).
    "large": EncoderConfig(dim=1024, depth=24, heads=16),
}


def preset(name: str) -> EncoderConfig:
    """The encoder preset ``name`` (tiny 128/4/4, small 384/12/6, base 768/12/12, large 1024/24/16)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown backbone preset {name!r}; known: {', '.join(PRESETS)}") from None


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The whole masked model: one encoder and decoder shared by every modality it has an adapter for."""

    encoder: EncoderConfig
    """The encoder (see ``PRESETS``)."""
    decoder: DecoderConfig = DecoderConfig()
    """The decoder."""
    adapters: tuple[tuple[str, AdapterConfig], ...]
    """(modality, adapter) pairs; one per modality the model accepts."""
    masking: tuple[tuple[str, MaskingConfig], ...] = ()
    """(modality, masking) pairs; a modality without an entry uses ``MaskingConfig()`` (random 75%)."""

    def __post_init__(self) -> None:
        names = [m for m, _ in self.adapters]
        _check(len(names) > 0, "ModelConfig", "needs at least one adapter")
        _check(len(set(names)) == len(names), "ModelConfig", f"duplicate adapter modality in {names}")
        unknown = sorted({m for m, _ in self.masking} - set(names))
        _check(not unknown, "ModelConfig", f"masking for modality without adapter: {unknown}")

    def adapter(self, modality: str) -> AdapterConfig:
        for m, a in self.adapters:
            if m == modality:
                return a
        raise KeyError(f"no adapter for modality {modality!r}; model has {[m for m, _ in self.adapters]}")

    def masking_for(self, modality: str) -> MaskingConfig:
        for m, c in self.masking:
            if m == modality:
                return c
        return MaskingConfig()

    def to_json(self) -> dict[str, Any]:
        return {
            "encoder": dataclasses.asdict(self.encoder),
            "decoder": dataclasses.asdict(self.decoder),
            "adapters": [[m, dataclasses.asdict(a)] for m, a in self.adapters],
            "masking": [[m, dataclasses.asdict(c)] for m, c in self.masking],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        w = "model config"
        if not isinstance(d, dict) or not {"encoder", "adapters"} <= set(d):
            raise ValueError(f"{w}: expected an object with 'encoder' and 'adapters'")
        return cls(
            encoder=_from_dict(EncoderConfig, d["encoder"], f"{w}.encoder"),
            decoder=_from_dict(DecoderConfig, d.get("decoder", {}), f"{w}.decoder"),
            adapters=tuple((m, _from_dict(AdapterConfig, a, f"{w}.adapters.{m}")) for m, a in d["adapters"]),
            masking=tuple(
                (m, _from_dict(MaskingConfig, c, f"{w}.masking.{m}")) for m, c in d.get("masking", [])
            ),
        )
