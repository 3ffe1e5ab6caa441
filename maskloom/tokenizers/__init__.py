"""Modality tokenizers: one file per modality, all with the contract of :mod:`.base`.

The built-in modalities (``BUILTIN_MODALITIES``) are imported on first use through the registry
(``TOKENIZERS.get("audio")`` imports ``maskloom.tokenizers.audio``), so importing this package is
cheap and a worker that tokenizes images never loads torch for the audio tokenizer.
"""

from maskloom.tokenizers.base import (
    BUILTIN_MODALITIES,
    TOKENIZERS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    get_tokenizer,
    register_tokenizer,
)

__all__ = [
    "BUILTIN_MODALITIES",
    "TOKENIZERS",
    "Record",
    "TableSpec",
    "TokenizeError",
    "Tokenizer",
    "get_tokenizer",
    "register_tokenizer",
]
