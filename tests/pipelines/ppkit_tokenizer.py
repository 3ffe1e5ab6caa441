"""A tiny tokenizer for the preprocessing tests (imported by tests, subprocesses and Ray workers).

Inputs are text files of whitespace-separated numbers; each number becomes one 2-wide token
(value, 2 * value) at position (index). Hooks make it slow, fail, or kill its own process.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

import numpy as np

from maskloom.tokenizers.base import (
    TOKENIZERS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    register_tokenizer,
)

NAME = "ppkit_numbers"


@dataclass(frozen=True, kw_only=True)
class NumbersConfig:
    """Config of the test tokenizer."""

    scale: float = 1.0
    """Multiply every value (changes the fingerprint)."""
    delay: float = 0.0
    """Seconds to sleep per input (to kill a job midway)."""
    die_marker: str = ""
    """If set and this file does not exist: create it and kill this process (a dying worker)."""
    crash_on: str = ""
    """Raise a plain RuntimeError (a tokenizer bug) for sources containing this string."""
    hang_on: str = ""
    """Never return (a decoder hung in C) for sources containing this string."""
    segfault_on: str = ""
    """Kill this process with SIGSEGV (a decoder crashing in C) for sources containing this string."""
    stream_delay: float = 0.0
    """If set: ``iter_records`` streams one record per number, this many seconds apart (a big input
    whose records keep coming)."""


class NumbersTokenizer(Tokenizer):
    Config = NumbersConfig
    extensions = (".txt",)

    def spec(self) -> TableSpec:
        return TableSpec(
            modality=NAME,
            token_kind="continuous",
            token_dim=2,
            token_dtype="float32",
            position_axes=("index",),
            position_kind="grid",
        )

    def read(self, source: str):
        self.check_file(source)
        if self.config.delay:
            time.sleep(self.config.delay)
        if self.config.die_marker and not os.path.exists(self.config.die_marker):
            open(self.config.die_marker, "w").close()
            os._exit(1)
        if self.config.crash_on and self.config.crash_on in source:
            raise RuntimeError("boom")
        if self.config.hang_on and self.config.hang_on in source:
            time.sleep(3600)
        if self.config.segfault_on and self.config.segfault_on in source:
            ctypes.string_at(0)  # a real SIGSEGV, in this thread (os.kill would signal any thread)
        try:
            return np.array([float(x) for x in open(source).read().split()], np.float32)
        except ValueError as e:
            raise TokenizeError(source, "corrupt", f"not numbers ({e})") from None

    def tokenize(self, raw, *, source: str = "") -> list[Record]:
        v = raw * self.config.scale
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=np.stack([v, 2 * v], 1),
                positions=np.arange(len(v), dtype=np.float32)[:, None],
            )
        ]

    def iter_records(self, source: str):
        if not self.config.stream_delay:
            yield from super().iter_records(source)
            return
        for k, x in enumerate(self.read(source) * self.config.scale):
            time.sleep(self.config.stream_delay)
            yield Record(id=f"{source}#{k}", source=source, tokens=np.array([[x, 2 * x]], np.float32),
                         positions=np.zeros((1, 1), np.float32))  # fmt: skip

    def detokenize(self, record: Record):
        return record.tokens[:, 0] / self.config.scale


if NAME not in TOKENIZERS:
    register_tokenizer(NAME)(NumbersTokenizer)
