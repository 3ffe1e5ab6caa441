"""A tiny tokenizer for the preprocessing tests (imported by tests, subprocesses and Ray workers).

Inputs are text files of whitespace-separated numbers; each number becomes one 2-wide token
(value, 2 * value) at position (index). A tar shard of such ``.txt`` members gives one record per
sample, id ``<tar>#<key>`` (base's tar policy). Hooks make it slow, fail, or kill its own process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from maskloom.tokenizers.base import (
    TOKENIZERS,
    Record,
    TableSpec,
    TarItems,
    TokenizeError,
    Tokenizer,
    is_tar_path,
    iter_tar_records,
    read_tar,
    register_tokenizer,
    tokenize_tar,
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
    """Never return (a decoder hung in C) for sources (and tar members) containing this string."""
    segfault_on: str = ""
    """Kill this process with SIGSEGV (a decoder crashing in C) for sources (and tar members, named
    ``<tar>#<member>``) containing this string."""
    stream_delay: float = 0.0
    """If set: ``iter_records`` streams one record per number, this many seconds apart (a big input
    whose records keep coming)."""


class TarNumber(NamedTuple):
    key: str
    values: np.ndarray
    label: int | None
    member: str


class TarNumbers(TarItems):
    """``read`` of a tar shard: its usable samples."""


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
        if is_tar_path(source):
            return read_tar(TarNumbers, source, ("txt",), "numbers", self._decode, TarNumber)
        if self.config.delay:
            time.sleep(self.config.delay)
        if self.config.die_marker and not os.path.exists(self.config.die_marker):
            open(self.config.die_marker, "w").close()
            os._exit(1)
        if self.config.crash_on and self.config.crash_on in source:
            raise RuntimeError("boom")
        with open(source, "rb") as f:
            return self._decode(f, source, ".txt")

    def _decode(self, file, name: str, ext: str) -> np.ndarray:
        if self.config.hang_on and self.config.hang_on in name:
            time.sleep(3600)
        if self.config.segfault_on and self.config.segfault_on in name:
            ctypes.string_at(0)  # a real SIGSEGV, in this thread (os.kill would signal any thread)
        try:
            return np.array([float(x) for x in file.read().decode().split()], np.float32)
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizeError(name, "corrupt", f"not numbers ({e})") from None

    def _sample_records(self, source: str, s: TarNumber) -> list[Record]:
        return [
            dataclasses.replace(
                self.tokenize(s.values, source=source)[0], id=f"{source}#{s.key}", label=s.label
            )
        ]

    def tokenize(self, raw, *, source: str = "") -> list[Record]:
        if isinstance(raw, TarNumbers):
            return tokenize_tar(source, raw, functools.partial(self._sample_records, source))
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
        if is_tar_path(source):
            yield from iter_tar_records(source, ("txt",), "numbers", self._decode, TarNumber,
                                        functools.partial(self._sample_records, source))  # fmt: skip
            return
        if not self.config.stream_delay:
            yield from super().iter_records(source)
            return
        for k, x in enumerate(self.read(source) * self.config.scale):
            time.sleep(self.config.stream_delay)
            yield Record(id=f"{source}#{k}", source=source, tokens=np.array([[x, 2 * x]], np.float32),
                         positions=np.zeros((1, 1), np.float32))  # fmt: skip

    def detokenize(self, record: Record):
        return record.tokens[:, 0] / self.config.scale


class NumbersTarTokenizer(NumbersTokenizer):
    """The same, with tar shards found in folders too."""

    extensions = (".txt", ".tar")


TAR_NAME = "ppkit_numbers_tar"

if NAME not in TOKENIZERS:
    register_tokenizer(NAME)(NumbersTokenizer)
    register_tokenizer(TAR_NAME)(NumbersTarTokenizer)
