"""The domain-agnostic masked transformer (DESIGN.md, "The backbone").

embed (adapters) -> mask (masking) -> encode visible tokens (blocks) -> decode (MAE or CrossMAE).
The backbone consumes :class:`maskloom.batch.TokenBatch` and never imports a modality.
"""

from maskloom.backbone.config import (
    MASKING_KINDS,
    PRESETS,
    AdapterConfig,
    DecoderConfig,
    EncoderConfig,
    MaskingConfig,
    ModelConfig,
    preset,
)
from maskloom.backbone.masking import block_mask, num_masked, random_mask, tube_mask
from maskloom.backbone.model import Features, MaskedModel, MaskedOutput

__all__ = [
    "MASKING_KINDS",
    "PRESETS",
    "AdapterConfig",
    "DecoderConfig",
    "EncoderConfig",
    "Features",
    "MaskedModel",
    "MaskedOutput",
    "MaskingConfig",
    "ModelConfig",
    "block_mask",
    "num_masked",
    "preset",
    "random_mask",
    "tube_mask",
]
