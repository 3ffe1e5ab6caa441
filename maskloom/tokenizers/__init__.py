"""Modality tokenizers: one file per modality, all with the contract of :mod:`.base`."""

# Built-in modalities register themselves on import. A module missing here (still being written)
# must not break the others.
import importlib as _importlib

from maskloom.tokenizers.base import (
    TOKENIZERS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    get_tokenizer,
    register_tokenizer,
)

for _m in ("image", "video", "audio", "point_cloud", "graph", "time_series", "text"):
    try:
        _importlib.import_module(f"maskloom.tokenizers.{_m}")
    except ModuleNotFoundError as _e:  # pragma: no cover
        if _e.name != f"maskloom.tokenizers.{_m}":
            raise

__all__ = ["TOKENIZERS", "Record", "TableSpec", "Tokenizer", "TokenizeError", "get_tokenizer", "register_tokenizer"]
