"""Text tokenizer: a byte-level BPE vocabulary trained locally on the corpus.

Byte-pair encoding (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword
Units") over bytes rather than characters, as in GPT-2 (Radford et al., 2019): every string is a
byte sequence, the 256 byte symbols are always in the vocabulary, so encoding never needs [UNK]
and decoding is lossless. The vocabulary is trained with Hugging Face ``tokenizers`` on the
corpus being tokenized — never downloaded. Tokens are discrete ids with one ``index`` coordinate,
the input of MAE-LM style masked language modelling (Meng et al., 2024, "Representation
Deficiency in Masked Language Modeling").

Inputs (``read``, ``iter_records``):

* ``.txt``: the whole file is one document, or one document per line / per blank-line-separated
  paragraph (``Config.split``);
* ``.jsonl`` and ``.json`` (read as JSON Lines: C4 ships ``c4-train.00000-of-01024.json.gz`` so): one
  JSON object per line (lines end at ``\n`` or ``\r\n`` only, so U+2028/U+2029/U+0085 inside strings
  are fine), text in ``Config.text_field``, optional label in ``Config.label_field``. A label is a
  string, a number or a boolean: numbers are named by their value (``1`` and ``1.0`` are the class
  ``"1"``, ``0.5`` is ``"0.5"``), booleans ``"true"`` / ``"false"``; ``null`` or an absent key is no
  label; an array, an object, ``NaN`` or ``Infinity`` makes its line unusable. A line that is no
  usable record (not JSON, not an object, no string text field, such a label) is skipped with a
  warning naming the first three, unless most lines are (then the first one's problem is the file's
  error row). A ``\\ud83d``-style escape of half a UTF-16 surrogate pair with no other half (an emoji
  cut by a truncating scraper) is valid JSON but not text: it is replaced by U+FFFD, as most
  pipelines do, and a warning counts the lines. A file whose first non-blank line opens a JSON array
  (``[``) or an object written over several lines (a lone ``{``) is one JSON document, not JSON Lines:
  its error row (``unsupported``) says that only JSON Lines is read;
* ``.csv`` / ``.tsv``: a header row, text in ``Config.text_column``, optional label in
  ``Config.label_column`` (column names match case-insensitively, so the SMS Spam Collection's
  ``Label<TAB>SMS`` works with ``text_column="sms"``). Fields may be of any size (Python's csv
  module stops at 128 KiB by default);
* ``.parquet`` (Hugging Face datasets ship ``train-00000-of-00042.parquet``): text in
  ``Config.text_column``, optional label in ``Config.label_column`` (matched as for CSV), read
  ``ENCODE_BATCH`` rows at a time. A missing text column is a ``config`` error listing the columns, a
  text column that does not hold strings ``invalid``; a null text is an empty document; labels are
  named as JSON label values, a null is no label, a value that names no class makes the file
  ``invalid``. A file of at least twice ``TextTokenizer.PART_BYTES`` (64 MiB) in several row groups
  is read in parts of whole row groups (:meth:`TextTokenizer.split_input`), each an input of the
  pipeline, with the records (and ids) of the whole file; the vocabulary is fitted on the parts as
  on separate sources;
* compressed: every format but Parquet (which compresses inside) also as ``.gz``, ``.bz2``, ``.xz``,
  ``.zst`` or ``.lz4`` (``pile_00.jsonl.zst``, ``notes.txt.gz``, ``sms.tsv.xz``), decompressed as it is
  read (pyarrow; ``lzma`` for xz; concatenated gzip members and zstd frames are one stream). A
  truncated or damaged stream is a ``corrupt`` error row naming the codec's error and how many bytes
  of text came before it.

Text is UTF-8 (a leading byte order mark is dropped): a byte that is not makes the file ``corrupt``
("not UTF-8 text (invalid start byte at byte 5,289,250)", an offset in the decompressed text), and
so do NUL bytes ("contains NUL bytes; not a text file").

Streaming (``iter_records``, what the preprocessing pipeline calls): a file is decoded ``READ_BYTES``
(1 MiB) at a time, cut into documents as it is read, encoded ``ENCODE_BATCH`` documents (at most
``ENCODE_BATCH_CHARS`` characters) per call, and its records are yielded as they are made, so memory
holds a batch, not the file: a 150 MB JSONL of 1.37 M short messages (8,000-id vocabulary, 2 cores)
peaked at 65 MB RSS and took 24 s, where ``tokenize(read(...))``, which holds the file, its documents
and every record, peaked at 2.1 GB and took 31 s. The records are those of ``tokenize(read(source))``
(ids, labels, meta, order); what is only known at the end of a file (most JSONL lines unusable, a
truncated stream, no text at all) raises there, after records were yielded (the pipeline keeps none
of them then); a label that fit() did not see raises at its document. One document is always read
whole: a ``.txt`` file with ``split="document"`` (the file is the document, held in memory), a JSONL
line, a CSV row, a Parquet row.

Training the vocabulary: fit() trains on at most ``Config.fit_max_bytes`` (256 MiB; 0: no limit)
bytes of document text, spread over the corpus: sources are visited in an evenly spaced order
(van der Corput: 0, n/2, n/4, 3n/4, ...), in turns; in each turn every source not yet read to its
end gives its next whole documents until it has given an equal share of the budget left, and at
least ``MIN_FIT_SHARE`` (1 MiB); only the document that meets the end of the budget is cut. A
corpus smaller than the budget is so read whole and gives the vocabulary it always did (the BPE
trainer does not depend on the order of its texts); 14 GB in 1,024 shards trains on about 1 MiB from
each of 256 shards spread across the corpus. A line logs what trained it ("text fit: trained the
vocabulary on 268.4 MB of text (fit_max_bytes) from 256 of 1,024 source(s) (14.2 GB on disk)"). The
110 MB of text of the 150 MB JSONL above trained in 17 s at 55 MB RSS (reading the whole file first,
as fit did before: 16 s, 794 MB), so the default bounds the driver's training at about 40 s on 2
cores, however large the corpus. Labels are the exception: every class name must be known, so once
the budget is spent a labelled corpus (a label was read, or the label field or column exists) is
read to its end for its labels only (documents only, no training or encoding: the 150 MB JSONL in
2.3 s; a 32 MiB budget on it took 7.7 s in all); an unlabelled corpus, or one with
``Config.labels`` given, is not read further.

Words that are too long: the trainer's cost for one pre-tokenizer "word" (a run of letters, of
digits, of other symbols or of whitespace) grows with the square of its length (400,000 letters
without a break took 117 s, 5 MB hours), so a word longer than ``MAX_TRAIN_WORD`` characters (a DNA
line, a minified or base64 blob; never a word of normal text) reaches the trainer in pieces of that
length, and at most ``MAX_TRAIN_LONG_CHARS`` characters of such words per document (a warning counts
them). Encoding is not affected: every byte of every document is tokenised.

The raw form is a list of ``(document, label or None)``. Long documents are cut into chunks of at
most ``Config.max_length`` tokens (with ``Config.overlap`` tokens shared by neighbours); each chunk
is one record with id ``<source>#<doc>-<chunk>``, ``doc`` counting the file's documents from 0
(empty ones, which are skipped with a warning, included; JSONL lines that are blank or skipped and
empty CSV rows are not documents).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from maskloom.tokenizers.base import (
    COMPRESSIONS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    make_part,
    open_compressed,
    read_stream_block,
    register_tokenizer,
    report_skipped,
    split_part,
)

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]")
"""Special tokens, given ids 0..4 in this order by the trainer."""
VOCAB_FILE = "bpe.json"
LABELS_FILE = "labels.json"

Doc = tuple[str, Any]
"""One document of a file: ``(text, label or None)``."""
Raw = list[Doc]
"""The raw form: one ``(document, label or None)`` per document of a file."""

READ_BYTES = 1 << 20
"""Bytes of a (decompressed) file decoded per step while reading it."""
FORMATS: dict[str, str] = {
    ".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"
}  # fmt: skip
"""Text formats by extension (``.json`` is read as JSON Lines, as C4 ships it)."""
MIN_FIT_SHARE = 1 << 20
"""Fewest bytes of text a source gives the BPE trainer per turn (unless the budget ends first)."""

MAX_TRAIN_WORD = 1024
"""Longest pre-tokenizer word (characters) the BPE trainer sees whole; longer ones go in pieces."""
MAX_TRAIN_LONG_CHARS = 1 << 20
"""Characters of such long words per document that the trainer sees; the rest is not trained on."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_WORD + 1},}}|\s{{{MAX_TRAIN_WORD + 1},}}")
# UTF-8 bytes -> b" " for an ASCII whitespace character (as str.isspace), b"x" for any other byte: a
# run of more than MAX_TRAIN_WORD characters of either kind is a run of as many equal bytes here.
_SPACE_MASK = bytes(32 if b in b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f" else 120 for b in range(256))
_MASK_RUNS = (b"x" * (MAX_TRAIN_WORD + 1), b" " * (MAX_TRAIN_WORD + 1))

_CSV_LIMIT_LOCK = threading.Lock()
_csv_limit_users = 0
_csv_limit_saved = 0


@contextlib.contextmanager
def _csv_fields_unlimited() -> Iterator[None]:
    """Lift the csv module's field size limit (a process-wide setting, 128 KiB by default) while
    reading; a field is a document, held whole anyway, so the limit protects nothing here. Readers in
    several threads share one lift: the first sets it, the last restores the previous value."""
    global _csv_limit_users, _csv_limit_saved
    with _CSV_LIMIT_LOCK:
        if _csv_limit_users == 0:
            _csv_limit_saved = csv.field_size_limit(2**31 - 1)  # a C long on every platform
        _csv_limit_users += 1
    try:
        yield
    finally:
        with _CSV_LIMIT_LOCK:
            _csv_limit_users -= 1
            if _csv_limit_users == 0:
                csv.field_size_limit(_csv_limit_saved)


def _replace_surrogates(text: str) -> tuple[str, int]:
    """``text`` with each lone UTF-16 surrogate (from a JSON ``\\ud83d`` escape) replaced by U+FFFD,
    and how many there were."""
    return _SURROGATE.subn("\ufffd", text)


def _json_label(value: Any) -> str | None:
    """The class name of a JSON label value; ValueError (the reason) for one that names no class."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("is NaN" if math.isnan(value) else f"is {'-' if value < 0 else ''}Infinity")
        # a number is a class by its value: 1 and 1.0 (pandas writes integer columns with a gap so)
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    kind = "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else "a value"
    raise ValueError(f"is {kind} ({json.dumps(value)[:60]})")


def _long_words(text: str, pretok: Any) -> list[tuple[int, int]]:
    """(start, stop) of the byte-level pre-tokenizer's words in ``text`` longer than MAX_TRAIN_WORD
    characters, in order. Normal text has none and costs one pass over its UTF-8 bytes."""
    if len(text) <= MAX_TRAIN_WORD:
        return []
    mask = text.encode("utf-8", "surrogatepass").translate(_SPACE_MASK)
    if not any(run in mask for run in _MASK_RUNS):
        return []
    spans: list[tuple[int, int]] = []
    for m in _LONG_RUN.finditer(text):  # long runs of non-space or of space characters
        a, b = m.span()
        if text[a].isspace():
            # the pre-tokenizer keeps a run's last space for the word that follows it
            stop = b if b == len(text) else b - 1
            if stop - a > MAX_TRAIN_WORD:
                spans.append((a, stop))
            continue
        # a non-space run holds whole words (a CJK paragraph holds many) and the first may take the
        # space before it: split the run as the pre-tokenizer does
        w0 = a - 1 if a > 0 else 0
        spans.extend(
            (w0 + s, w0 + e) for _, (s, e) in pretok.pre_tokenize_str(text[w0:b]) if e - s > MAX_TRAIN_WORD
        )
    return spans


def _training_texts(text: str, spans: list[tuple[int, int]]) -> Iterator[str]:
    """``text`` as the trainer sees it: cut before and after each long word (word boundaries, so the
    other words are unchanged), the long words in pieces of MAX_TRAIN_WORD characters, at most
    MAX_TRAIN_LONG_CHARS of them."""
    pos, budget = 0, MAX_TRAIN_LONG_CHARS
    for s, e in spans:
        if s > pos:
            yield text[pos:s]
        take = min(e - s, budget)
        budget -= take
        for i in range(s, s + take, MAX_TRAIN_WORD):
            yield text[i : min(i + MAX_TRAIN_WORD, s + take)]
        pos = e
    if pos < len(text):
        yield text[pos:]


def _source_format(source: str) -> tuple[str, str | None]:
    """The format (a FORMATS value) and codec (a COMPRESSIONS value or None) of ``source`` by its name;
    TokenizeError(unsupported) for any other name."""
    root, ext = os.path.splitext(source.lower())
    codec = COMPRESSIONS.get(ext)
    inner = os.path.splitext(root)[1] if codec is not None else ext
    fmt = FORMATS.get(inner)
    if fmt is None or (fmt == "parquet" and codec is not None):
        shown = inner + ext if codec is not None else ext
        raise TokenizeError(
            source,
            "unsupported",
            f"extension {shown or '(none)'!r}; text reads {', '.join(f for f in FORMATS if f != '.parquet')} "
            f"(also compressed: {', '.join(COMPRESSIONS)}) and .parquet",
        )
    return fmt, codec


def _text_chunks(source: str, codec: str | None) -> Iterator[str]:
    """The UTF-8 text of ``source`` (decompressed), about READ_BYTES at a time, as ``open(source,
    encoding="utf-8-sig", newline="")`` reads it: a leading byte order mark dropped, line ends kept.
    A chunk never ends in "\\r" unless it is the last (so "\\r\\n" is never cut). Bytes that are not
    UTF-8 or NUL bytes are TokenizeError(corrupt)."""
    with open_compressed(source, codec) as f:
        offset, data, carry, at_start = 0, b"", "", True  # offset: bytes of the stream before `data`
        while True:
            block = read_stream_block(f, source, codec, offset + len(data), READ_BYTES)
            final = not block
            data += block
            if at_start:
                if len(data) < len(codecs.BOM_UTF8) and not final:
                    continue
                at_start = False
                if data.startswith(codecs.BOM_UTF8):
                    data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            try:
                text, used = codecs.utf_8_decode(data, "strict", final)  # keeps a cut character's bytes
            except UnicodeDecodeError as e:
                raise TokenizeError(
                    source, "corrupt", f"not UTF-8 text ({e.reason} at byte {offset + e.start})"
                ) from None
            if "\x00" in text:
                raise TokenizeError(source, "corrupt", "contains NUL bytes; not a text file")
            offset, data = offset + used, data[used:]
            text, carry = carry + text, ""
            if not final and text.endswith("\r"):
                text, carry = text[:-1], "\r"
            if text:
                yield text
            if final:
                return


def _split_newlines(chunks: Iterable[str], keepends: bool = False) -> Iterator[str]:
    """``"".join(chunks).split("\\n")``, lazily. With ``keepends``, the lines as ``io.StringIO``
    iterates them: each with its "\\n", and no empty last one."""
    end = "\n" if keepends else ""
    pending: list[str] = []  # the start of a line that goes on in the next chunk
    for chunk in chunks:
        *lines, rest = chunk.split("\n")
        if lines:
            pending.append(lines[0])
            yield "".join(pending) + end
            for line in lines[1:]:
                yield line + end
            pending = []
        if rest:
            pending.append(rest)
    last = "".join(pending)
    if last or not keepends:
        yield last


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines cuts


def _split_lines(chunks: Iterable[str]) -> Iterator[str]:
    """``"".join(chunks).splitlines()``, lazily (chunks from _text_chunks never cut a "\\r\\n")."""
    pending: list[str] = []
    for chunk in chunks:
        for line in chunk.splitlines(keepends=True):
            pending.append(line)
            if line[-1] in _LINE_BREAKS:  # else the chunk's last line, which goes on in the next
                line = "".join(pending)
                pending = []
                yield line[: -2 if line.endswith("\r\n") else -1]
    if pending:
        yield "".join(pending)


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n")


def _split_paragraphs(chunks: Iterable[str]) -> Iterator[str]:
    """``_PARAGRAPH_BREAK.split("".join(chunks))``, lazily."""
    pending: list[str] = []
    tail = ""  # a break that may go on in the next chunk: "\n" and spaces, at the end of the text so far
    for chunk in chunks:
        text, pos = tail + chunk, 0
        for m in _PARAGRAPH_BREAK.finditer(text):
            pending.append(text[pos : m.start()])
            yield "".join(pending)
            pending, pos = [], m.end()
        rest = text[pos:]
        cut = len(rest.rstrip(" \t\r"))
        cut = cut - 1 if rest[:cut].endswith("\n") else len(rest)
        pending.append(rest[:cut])
        tail = rest[cut:]
    pending.append(tail)
    yield "".join(pending)


def _json_document_start(line: str) -> str | None:
    """What a JSON Lines file's first non-blank line is when it starts one JSON document instead: an
    array (no JSON Lines record is one), or an object written over several lines (a lone "{")."""
    s = line.strip()
    if s.startswith("["):
        return "a JSON array"
    return "a JSON object written over several lines" if s == "{" else None


def _column_index(names: list[str], want: str | None) -> int | None:
    """Index of column ``want`` in ``names``, matched case-insensitively and without surrounding spaces."""
    if want is None:
        return None
    low = [n.strip().lower() for n in names]
    return low.index(want.lower()) if want.lower() in low else None


def _is_text_type(t: Any) -> bool:
    """Whether an Arrow column of type ``t`` holds texts (strings, or only nulls)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
    )


def _spread(n: int) -> list[int]:
    """0 .. n-1 in van der Corput order, every prefix spread evenly over the range: 0 4 2 6 1 5 3 7."""
    bits = max(1, (n - 1).bit_length())
    order = (int(f"{i:0{bits}b}"[::-1], 2) for i in range(1 << bits))
    return [i for i in order if i < n]


def _size(n: float) -> str:
    """A byte count for people: "512 bytes", "980.0 kB", "256.0 MB", "14.2 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} bytes"


@dataclass
class _ReadNotes:
    """What reading sources found besides their documents (fit() asks)."""

    label_field: bool = False
    """A JSONL line had the label field, or a CSV/TSV/Parquet file the label column."""


class _UnusableLine(Exception):
    """A JSONL line that is no usable record: ``args`` are the error kind and the reason."""


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Configuration of the text tokenizer."""

    vocab_size: int = 8000
    """Target BPE vocabulary size (an upper bound: a small corpus may give fewer merges)."""
    min_frequency: int = 2
    """A pair must occur at least this often in the corpus to become a merge."""
    max_length: int = 512
    """Most tokens in one record; longer documents are cut into several chunks."""
    overlap: int = 0
    """Tokens shared by consecutive chunks of one long document (0 <= overlap < max_length)."""
    split: Literal["document", "lines", "paragraphs"] = "document"
    """How a .txt file is cut into documents: the whole file, one per line, or per blank-line paragraph."""
    text_field: str = "text"
    """JSONL: key of the text."""
    label_field: str | None = "label"
    """JSONL: key of the optional label (absent keys mean no label); None ignores labels."""
    text_column: str = "text"
    """CSV/TSV/Parquet: name of the text column (case-insensitive)."""
    label_column: str | None = "label"
    """CSV/TSV/Parquet: name of the optional label column (case-insensitive); None ignores labels."""
    labels: tuple[str, ...] | None = None
    """Class names in index order; None takes the sorted distinct labels seen by fit()."""
    vocab_path: str | None = None
    """Path of an existing ``bpe.json`` to reuse; then fit() learns no vocabulary (labels only)."""
    fit_max_bytes: int = 256 << 20
    """Most bytes of document text the BPE vocabulary is trained on, spread over the sources (see
    the module docstring); 0 trains on all of it."""

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {self.vocab_size}"
            )
        if self.min_frequency < 0:
            raise ValueError(f"min_frequency must be >= 0, got {self.min_frequency}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not 0 <= self.overlap < self.max_length:
            raise ValueError(
                f"overlap must satisfy 0 <= overlap < max_length ({self.max_length}), got {self.overlap}"
            )
        if self.fit_max_bytes < 0:
            raise ValueError(f"fit_max_bytes must be >= 0 (0: no limit), got {self.fit_max_bytes}")
        if self.split not in ("document", "lines", "paragraphs"):
            raise ValueError(f"split must be 'document', 'lines' or 'paragraphs', got {self.split!r}")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))  # from JSON: a list
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")


def _sort_labels(names: set[str]) -> tuple[str, ...]:
    """Deterministic label order, as in maskloom.pipelines.sources: numeric when every name is an
    integer ("2" before "10"), else lexicographic."""
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _new_bpe():
    """An untrained byte-level BPE pipeline: no normaliser (lossless), ByteLevel pre-tokenizer and decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class _FitReader:
    """What fit() reads of ``sources``: the texts that train the vocabulary, at most ``budget`` bytes
    of document text spread over the sources, then (when asked) the labels of the rest.

    Sources are visited in :func:`_spread` order, in turns: in each turn every source not read to its
    end gives its next documents, whole, until it has given an equal share of the budget left (at
    least MIN_FIT_SHARE), so a corpus smaller than the budget is read whole (the BPE trainer does not
    depend on the order of its texts) and a larger one is sampled from sources across it. Only the
    document that meets the end of the budget is cut. A source that fails is skipped from then on."""

    def __init__(self, tok: TextTokenizer, sources: list[str], budget: float) -> None:
        self.tok = tok
        self.order = [sources[i] for i in _spread(len(sources))]
        self.budget = budget
        self.taken = 0  # bytes of text given to the trainer
        self.read_docs: dict[str, int] = {}  # documents of a source read so far
        self.done: set[str] = set()  # sources read to their end, or that failed
        self.trained: set[str] = set()  # sources that gave the trainer text
        self.labels: set[str] = set()
        self.notes = _ReadNotes()
        self.skipped: list[str] = []  # the errors of the sources that failed
        self.long_docs: list[tuple[str, int]] = []  # (source, characters in long words) per such document
        self._pretok = _new_bpe().pre_tokenizer

    def texts(self) -> Iterator[str]:
        """The trainer's input, a turn over the sources at a time, until the budget is spent."""
        turn = self.order
        while turn and self.taken < self.budget:
            share = max(MIN_FIT_SHARE, (self.budget - self.taken) / len(turn))
            for src in turn:
                if self.taken >= self.budget:
                    return
                yield from self._take(src, share)
            turn = [s for s in turn if s not in self.done]

    def _take(self, src: str, share: float) -> Iterator[str]:
        """The trainer's texts from ``src``'s next documents, until they hold ``share`` bytes."""
        start, given = self.read_docs.get(src, 0), 0
        with contextlib.closing(self._read(src)) as docs:
            for i, (text, label) in enumerate(itertools.islice(docs, start, None), start=start):
                self.read_docs[src] = i + 1
                if label is not None:
                    self.labels.add(str(label))
                if not text.strip():
                    continue
                text, size = self._within_budget(text)
                self.taken += size
                given += size
                self.trained.add(src)
                yield from self._for_trainer(src, text)
                if given >= share or self.taken >= self.budget:
                    return

    def scan_labels(self) -> None:
        """Collect the labels of the documents that texts() did not read."""
        for src in self.order:
            if src in self.done:
                continue
            with contextlib.closing(self._read(src)) as docs:
                for _, label in itertools.islice(docs, self.read_docs.get(src, 0), None):
                    if label is not None:
                        self.labels.add(str(label))

    def _read(self, src: str) -> Iterator[Doc]:
        """The documents of ``src``; at their end, or at an error, ``src`` is done. A source that fails
        is skipped from then on (the pipeline records its error later): one input never stops the fit."""
        try:
            yield from self.tok._documents(src, self.notes)
        except TokenizeError as e:
            self.skipped.append(f"{e}")
        except Exception as e:  # noqa: BLE001 - a reader's bug must not stop the whole job
            self.skipped.append(f"{src}: {type(e).__name__}: {e}")
        self.done.add(src)

    def _within_budget(self, text: str) -> tuple[str, int]:
        """``text``, cut to the budget left, and its size in UTF-8 bytes."""
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        room = self.budget - self.taken
        if size <= room:
            return text, size
        return text.encode("utf-8", "surrogatepass")[: int(room)].decode("utf-8", "ignore"), int(room)

    def _for_trainer(self, src: str, text: str) -> Iterator[str]:
        """``text`` as the trainer sees it: whole, or with its long words in pieces (_training_texts)."""
        spans = _long_words(text, self._pretok)
        if not spans:
            yield text
            return
        self.long_docs.append((src, sum(e - s for s, e in spans)))
        yield from _training_texts(text, spans)

    def summary(self, sources: list[str]) -> str:
        """One line: how much text trained the vocabulary, of what."""
        files = {split_part(s)[0] for s in sources}  # a big Parquet file's parts are one file
        disk = sum(os.path.getsize(s) for s in files if os.path.isfile(s))
        of = f"{len(sources):,} source(s) ({_size(disk)} on disk)"
        if self.taken < self.budget:
            return f"text fit: trained the vocabulary on all {_size(self.taken)} of text in {of}"
        return (
            f"text fit: trained the vocabulary on {_size(self.taken)} of text (fit_max_bytes) from "
            f"{len(self.trained):,} of {of}"
        )


@register_tokenizer("text")
class TextTokenizer(Tokenizer):
    """Byte-level BPE over text documents; one record per chunk of at most ``max_length`` ids."""

    Config: ClassVar[type] = TextConfig
    version: ClassVar[str] = "2"
    # 2: words over MAX_TRAIN_WORD characters reach the BPE trainer in pieces (a vocabulary trained on
    # documents that hold such words changes; others are unchanged); JSONL labels 1.0 and true are the
    # classes "1" and "true", no longer "1.0" and "True"; arrays, objects and NaN as labels are invalid
    extensions: ClassVar[tuple[str, ...]] = (
        *FORMATS,
        *(f + c for f in FORMATS if FORMATS[f] != "parquet" for c in COMPRESSIONS),
    )
    needs_fit: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._bpe = None  # tokenizers.Tokenizer, once fitted or loaded
        self._labels: tuple[str, ...] | None = self.config.labels
        if self.config.vocab_path is not None:
            self._bpe = self._load_vocab(self.config.vocab_path)

    # ---- vocabulary ---------------------------------------------------------------------------
    @staticmethod
    def _load_vocab(path: str):
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isfile(path):
            raise ValueError(f"text tokenizer: vocabulary file {path} does not exist")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust error type is not public
            raise ValueError(f"text tokenizer: {path} is not a tokenizers JSON vocabulary ({e})") from None
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"text tokenizer: vocabulary {path} lacks special token(s) {missing}")
        return tok

    @property
    def fitted(self) -> bool:
        return self._bpe is not None

    def _require_bpe(self):
        if self._bpe is None:
            raise RuntimeError(
                "text tokenizer has no vocabulary: call fit(sources), load_artifacts(dir) or set vocab_path"
            )
        return self._bpe

    def special_ids(self) -> dict[str, int]:
        """Ids of the special tokens, e.g. ``{"[PAD]": 0, "[MASK]": 1, ...}``."""
        bpe = self._require_bpe()
        return {t: int(bpe.token_to_id(t)) for t in SPECIAL_TOKENS}

    def fit(self, sources: Iterable[str]) -> None:
        """Collect the labels of ``sources`` and, unless ``vocab_path`` is set, train the BPE on at
        most ``fit_max_bytes`` of their text (see the module docstring and :class:`_FitReader`).

        The labels are those of every document: once the budget is spent, the rest of a labelled
        corpus (a label was read, or the label field or column exists) is read for its labels only;
        an unlabelled one is not read further. Sources that fail are skipped with a warning (the
        pipeline records their errors later): one input never stops the fit. Words longer than
        MAX_TRAIN_WORD characters are trained on in pieces (see the module docstring).
        """
        from tokenizers import pre_tokenizers, trainers

        sources = list(sources)
        train = self.config.vocab_path is None
        reader = _FitReader(self, sources, self.config.fit_max_bytes or math.inf)
        if train:
            bpe = _new_bpe()
            trainer = trainers.BpeTrainer(
                vocab_size=self.config.vocab_size,
                min_frequency=self.config.min_frequency,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: never [UNK]
                show_progress=False,
            )
            bpe.train_from_iterator(reader.texts(), trainer=trainer)
            self._bpe = bpe
            log.info("%s", reader.summary(sources))
        if self.config.labels is None and (not train or reader.labels or reader.notes.label_field):
            reader.scan_labels()
        if reader.skipped:
            log.warning(
                "text fit skipped %d unreadable source(s), e.g. %s", len(reader.skipped), reader.skipped[0]
            )
        if reader.long_docs:
            src, n = max(reader.long_docs, key=lambda d: d[1])
            capped = sum(max(0, n - MAX_TRAIN_LONG_CHARS) for _, n in reader.long_docs)
            log.warning(
                "text fit: %d document(s) hold words of over %d characters without a break (most: %d "
                "characters in %s); the vocabulary was trained on them in pieces of %d characters%s",
                len(reader.long_docs),
                MAX_TRAIN_WORD,
                n,
                src,
                MAX_TRAIN_WORD,
                f", and not on {capped} characters beyond {MAX_TRAIN_LONG_CHARS} per document"
                if capped
                else "",
            )
        if self.config.labels is None:
            self._labels = _sort_labels(reader.labels) if reader.labels else None
        log.info(
            "text vocabulary: %d ids; labels: %s",
            self._bpe.get_vocab_size() if self._bpe else 0,
            self._labels,
        )

    def save_artifacts(self, directory: str) -> list[str]:
        """Write ``bpe.json`` (and ``labels.json`` when labels were seen) under ``directory``."""
        if self._bpe is None:
            return []
        os.makedirs(directory, exist_ok=True)
        self._bpe.save(os.path.join(directory, VOCAB_FILE))
        written = [VOCAB_FILE]
        if self._labels is not None:
            with open(os.path.join(directory, LABELS_FILE), "w", encoding="utf-8") as f:
                json.dump(list(self._labels), f)
            written.append(LABELS_FILE)
        return written

    def load_artifacts(self, directory: str) -> None:
        """Restore the vocabulary (and label names) written by save_artifacts."""
        path = os.path.join(directory, VOCAB_FILE)
        if os.path.exists(path):
            self._bpe = self._load_vocab(path)
        elif self._bpe is None:
            raise ValueError(f"text tokenizer: no {VOCAB_FILE} in {directory}")
        lpath = os.path.join(directory, LABELS_FILE)
        if self.config.labels is None and os.path.exists(lpath):
            with open(lpath, encoding="utf-8") as f:
                self._labels = tuple(json.load(f))

    def label_names(self) -> tuple[str, ...] | None:
        return self._labels

    # ---- the contract -------------------------------------------------------------------------
    def spec(self) -> TableSpec:
        return TableSpec(
            modality=self.name,
            token_kind="discrete",
            token_dim=1,
            token_dtype="int32",
            position_axes=("index",),
            position_kind="grid",
            vocab_size=int(self._require_bpe().get_vocab_size()),
        )

    # ---- reading ------------------------------------------------------------------------------
    def read(self, source: str) -> Raw:
        """Decode a text file into ``[(document, label or None), ...]``: the whole file in memory (for
        ``inspect --render`` and tests); the pipeline streams it with :meth:`iter_records`."""
        return list(self._documents(source))

    def iter_records(self, source: str) -> Iterator[Record]:
        """The records of ``tokenize(read(source))``, made and yielded while the file is read: memory
        holds one batch of documents, whatever the file's size. What is only known at the end of the
        file (most JSONL lines unusable, a truncated stream, no text) raises there."""
        self._require_bpe()
        path, first = self._first_document(source)
        return self._records(self._documents(source), path, first)

    PART_BYTES: ClassVar[int] = 64 << 20
    """A Parquet file of at least twice this many bytes, in several row groups, is read in parts of
    whole row groups, about this many compressed bytes each (:meth:`split_input`), so that several
    workers share it. The pipeline's shards of big inputs hold 64 MB of them too."""

    def split_input(self, source: str) -> list[str] | None:
        """A big Parquet file's parts (``train.parquet#part:8:16/40``: row groups 8 to 15 of 40), of
        ``PART_BYTES`` or more each (a last part under half of it joins the one before); None for any
        other file, a small one, one of a single row group, or one whose footer does not read (its
        reading reports that). A part's records are the file's: ids ``<file>#<row>-<chunk>`` with the
        row counted in the whole file, ``source`` the file. One difference from reading the file
        whole: a part whose every document is empty is an error row (``empty``)."""
        if split_part(source)[1] is not None or not source.lower().endswith(".parquet"):
            return None
        try:
            if os.path.getsize(source) < 2 * self.PART_BYTES:
                return None
            import pyarrow.parquet as pq

            md = pq.read_metadata(source)
        except Exception:  # noqa: BLE001 - a file that does not read is the workers' error row
            return None
        n = md.num_row_groups
        sizes = [
            sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
            for g in range(n)
        ]
        parts: list[tuple[int, int]] = []
        start = acc = 0
        for g, size in enumerate(sizes):
            acc += size
            if acc >= self.PART_BYTES and g + 1 < n:
                parts.append((start, g + 1))
                start, acc = g + 1, 0
        if start < n:
            if parts and acc < self.PART_BYTES // 2:
                parts[-1] = (parts[-1][0], n)
            else:
                parts.append((start, n))
        return [make_part(source, a, b, n) for a, b in parts] if len(parts) > 1 else None

    def _first_document(self, source: str) -> tuple[str, int]:
        """(the file, the number of its first document) of an input: (``source``, 0) for a whole file,
        (the file, the rows of the row groups before it) for a part of a Parquet file."""
        path, part = split_part(source)
        if part is None:
            return source, 0
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            md = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise TokenizeError(source, "corrupt", f"not a readable Parquet file ({e})") from None
        return path, self._part_start(source, md, part)

    @staticmethod
    def _part_start(source: str, md: Any, part: tuple[int, int, int]) -> int:
        """Rows of the row groups before part ``part`` of a Parquet file (``md``: its metadata); the
        part's input ``source`` is TokenizeError(invalid) when the file's row groups are not those it
        was split into."""
        if md.num_row_groups != part[2]:
            raise TokenizeError(source, "invalid", f"the file has {md.num_row_groups} row groups, not the "
                                f"{part[2]} it was split into when the job was planned: it changed since")  # fmt: skip
        return sum(md.row_group(g).num_rows for g in range(part[0]))

    def _documents(self, source: str, notes: _ReadNotes | None = None) -> Iterator[Doc]:
        """The ``(text, label or None)`` of each document of ``source``, read incrementally: the one
        reader of every format. The file's name is checked now, its content as it is read. ``notes``
        learns whether the file has a label field. A part of a Parquet file (:meth:`split_input`)
        gives the documents of its row groups."""
        path, part = split_part(source)
        self.check_file(path)
        fmt, codec = _source_format(path)
        notes = notes if notes is not None else _ReadNotes()
        if part is not None and fmt != "parquet":
            raise TokenizeError(source, "unsupported", "only Parquet files are read in parts")
        if fmt == "parquet":
            return self._parquet_documents(path, notes, part, source)
        chunks = _text_chunks(source, codec)
        if fmt == "txt":
            return self._txt_documents(chunks)
        if fmt == "jsonl":
            return self._jsonl_documents(chunks, source, notes)
        return self._table_documents(chunks, source, "\t" if fmt == "tsv" else ",", notes)

    def _txt_documents(self, chunks: Iterator[str]) -> Iterator[Doc]:
        if self.config.split == "document":  # the whole file, by definition
            yield "".join(chunks), None
            return
        split = _split_lines if self.config.split == "lines" else _split_paragraphs
        for text in split(chunks):
            yield text, None

    def _jsonl_documents(self, chunks: Iterator[str], source: str, notes: _ReadNotes) -> Iterator[Doc]:
        """The (text, label) of each line. A line that is no usable record (not JSON, not an object,
        without a string text field, with a label that names no class) is skipped with a warning
        naming it, as long as most lines are usable: one damaged line of a 100,000-document shard
        does not cost the other 99,999. A file whose lines are mostly (or all) unusable is not what
        the config expects: the first line's problem is the file's error, raised at its end."""
        good = bad = fixed = first_fixed = 0
        first_bad: list[tuple[str, str]] = []  # (kind, reason) of the first lines skipped
        first = True
        # JSON Lines separates records by "\n" only (optionally "\r\n"): str.splitlines() would also cut
        # at U+2028, U+2029, U+0085, \x0b, \x0c, \x1c-\x1e, which json.dumps(ensure_ascii=False) leaves
        # unescaped inside strings.
        for n, line in enumerate(_split_newlines(chunks), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            if first and (what := _json_document_start(line)):
                raise TokenizeError(
                    source,
                    "unsupported",
                    f"line {n} starts {what}: the file is one JSON document, not JSON Lines; text reads "
                    "JSON Lines only (one object per line)",
                )
            first = False
            try:
                text, label = self._jsonl_record(line, n, notes)
            except _UnusableLine as e:
                bad += 1
                if len(first_bad) < 3:
                    first_bad.append(e.args)
                continue
            if "\\u" in line:  # only a JSON escape makes a lone surrogate: UTF-8 text has none
                text, k = _replace_surrogates(text)
                label, kl = _replace_surrogates(label) if label is not None else (None, 0)
                if k or kl:
                    fixed += 1
                    first_fixed = first_fixed or n
            good += 1
            yield text, label
        if bad:
            kind, reason = first_bad[0]
            if bad >= good:  # mostly unusable: the file, not a few lines, is at fault
                more = f" ({bad} of {bad + good} lines are unusable)" if bad > 1 else ""
                raise TokenizeError(source, kind, reason + more)
            log.warning("%s: skipped %d of %d lines that are no usable record: %s%s", source, bad, bad + good,
                        "; ".join(r for _, r in first_bad), f"; ... ({bad - 3} more)" if bad > 3 else "")  # fmt: skip
            report_skipped(source, "lines", bad, bad + good, f"{reason} ({kind})")
        if fixed:
            log.warning(
                "%s: replaced lone UTF-16 surrogate escape(s) (half an emoji) by U+FFFD on %d line(s), first line %d",
                source,
                fixed,
                first_fixed,
            )

    def _jsonl_record(self, line: str, n: int, notes: _ReadNotes) -> Doc:
        """The (text, label) of JSONL line ``n``; _UnusableLine(kind, reason) when it is no usable record."""
        key, lkey = self.config.text_field, self.config.label_field
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _UnusableLine("corrupt", f"line {n} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _UnusableLine("invalid", f"line {n} is a JSON {type(obj).__name__}, expected an object")
        if key not in obj:
            raise _UnusableLine(
                "config", f"line {n} has no text field {key!r} (keys: {sorted(obj)}); set text_field"
            )
        text = obj[key]
        if not isinstance(text, str):
            raise _UnusableLine(
                "invalid", f"line {n}: field {key!r} is a {type(text).__name__}, expected a string"
            )
        if lkey is None:
            return text, None
        notes.label_field = notes.label_field or lkey in obj
        try:
            return text, _json_label(obj.get(lkey))
        except ValueError as e:
            raise _UnusableLine("invalid", f"line {n}: label field {lkey!r} {e}; a label must be a string, a "
                                "number or a boolean") from None  # fmt: skip

    def _table_documents(
        self, chunks: Iterator[str], source: str, delimiter: str, notes: _ReadNotes
    ) -> Iterator[Doc]:
        # TSV files (e.g. the SMS Spam Collection) do not quote fields; CSV files may.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        lines = _split_newlines(chunks, keepends=True)
        try:
            with _csv_fields_unlimited():  # a 200 KiB cell is a valid field
                rows = csv.reader(lines, delimiter=delimiter, quoting=quoting)
                header = next(rows, None)
                if header is None:
                    raise TokenizeError(source, "empty", "no header row")
                ti = _column_index(header, self.config.text_column)
                if ti is None:
                    raise TokenizeError(
                        source,
                        "config",
                        f"no text column {self.config.text_column!r} in header {header}; set text_column",
                    )
                li = _column_index(header, self.config.label_column)
                notes.label_field = notes.label_field or li is not None
                for n, row in enumerate(rows, start=2):
                    if not row:
                        continue
                    if len(row) <= ti:
                        raise TokenizeError(
                            source, "invalid", f"row {n} has {len(row)} field(s), no text column {ti + 1}"
                        )
                    yield row[ti], row[li] if li is not None and li < len(row) and row[li] != "" else None
        except csv.Error as e:
            raise TokenizeError(
                source, "corrupt", f"not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})"
            ) from None

    def _parquet_documents(
        self, path: str, notes: _ReadNotes, part: tuple[int, int, int] | None = None, name: str = ""
    ) -> Iterator[Doc]:
        """The text (and label) column of a Parquet file (``part``: of its row groups a to b, of n),
        ENCODE_BATCH rows at a time. ``name``: the input's (the part's) in errors."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = name or path
        try:
            with open_compressed(path, None) as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                ti = _column_index(schema.names, self.config.text_column)
                if ti is None:
                    raise TokenizeError(
                        source,
                        "config",
                        f"no text column {self.config.text_column!r} in columns {schema.names}; set text_column",
                    )
                text_field = schema.field(ti)
                if not _is_text_type(text_field.type):
                    raise TokenizeError(
                        source,
                        "invalid",
                        f"text column {text_field.name!r} holds {text_field.type}, not strings",
                    )
                li = _column_index(schema.names, self.config.label_column)
                notes.label_field = notes.label_field or li is not None
                names = [schema.names[i] for i in (ti, li) if i is not None]
                row = 0
                groups = None
                if part is not None:
                    row = self._part_start(source, pf.metadata, part)
                    groups = list(range(part[0], part[1]))
                for batch in pf.iter_batches(batch_size=self.ENCODE_BATCH, columns=names, row_groups=groups):
                    texts = batch.column(0).to_pylist()
                    values = batch.column(1).to_pylist() if li is not None else [None] * len(texts)
                    for text, value in zip(texts, values):
                        row += 1
                        yield text or "", self._parquet_label(value, row, source, names[-1])
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise TokenizeError(source, "corrupt", f"not a readable Parquet file ({e})") from None

    @staticmethod
    def _parquet_label(value: Any, row: int, source: str, column: str) -> str | None:
        try:
            return _json_label(value)
        except ValueError as e:
            raise TokenizeError(source, "invalid", f"row {row}: label column {column!r} {e}; a label must be a "
                                "string, a number or a boolean") from None  # fmt: skip

    # ---- encoding -----------------------------------------------------------------------------
    def tokenize(self, raw: Raw | str, *, source: str = "") -> list[Record]:
        """Encode each document and cut it into chunks; one record per chunk.

        tokens: (L,) int32 ids with L <= max_length; positions: (L, 1) float32 index in the chunk.
        Empty documents are skipped (with a warning); a file with no text at all raises.
        """
        path, first = self._first_document(source) if source else (source, 0)
        return list(self._records([(raw, None)] if isinstance(raw, str) else raw, path, first))

    ENCODE_BATCH: ClassVar[int] = 1024
    """Documents encoded per call: a tokenizers ``Encoding`` holds each token's string as well as
    its id (~20 kB for a 150-word document), so a file of 100,000 documents encoded in one call
    held 2 GB; its ids are kept, the encodings dropped a batch at a time."""
    ENCODE_BATCH_CHARS: ClassVar[int] = 1 << 20
    """Characters of text after which a batch is encoded whatever its number of documents (a batch
    ends with the document that reaches it, so a longer document is encoded alone): long documents
    make big Encodings too."""

    def _records(self, docs: Iterable[Doc], source: str, first: int = 0) -> Iterator[Record]:
        """The records of ``docs``, a batch of documents (ENCODE_BATCH, ENCODE_BATCH_CHARS) encoded at a
        time; empty documents are skipped (they keep their number in the ids), with a warning at the end.
        ``first``: the number of the first document in its file (a part of a Parquet file's)."""
        bpe = self._require_bpe()
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which records do not keep
        encode = getattr(bpe, "encode_batch_fast", bpe.encode_batch)
        batch: list[tuple[int, str, int | None]] = []  # (doc, text, label index)
        chars = n_docs = n_empty = 0
        for doc, (text, label) in enumerate(docs, first):
            n_docs += 1
            if not (isinstance(text, str) and text.strip()):
                n_empty += 1
                continue
            batch.append((doc, text, self._label_index(label, source)))
            chars += len(text)
            if len(batch) >= self.ENCODE_BATCH or chars >= self.ENCODE_BATCH_CHARS:
                yield from self._batch_records(encode, batch, source)
                batch, chars = [], 0
        yield from self._batch_records(encode, batch, source)
        if n_empty == n_docs:
            raise TokenizeError(
                source, "empty", "no text" if n_docs <= 1 else f"all {n_docs} documents are empty"
            )
        if n_empty:
            log.warning("%s: skipped %d empty document(s) of %d", source, n_empty, n_docs)
            report_skipped(source, "empty documents", n_empty, n_docs, "an empty document")

    def _batch_records(
        self, encode: Any, batch: list[tuple[int, str, int | None]], source: str
    ) -> Iterator[Record]:
        """The records of a batch of documents, encoded in one call."""
        if not batch:
            return
        texts = [text for _, text, _ in batch]
        try:
            encodings = encode(texts, add_special_tokens=False)
        except TypeError:  # a lone surrogate (a str given to tokenize(), not read()): not UTF-8
            encodings = encode([_replace_surrogates(t)[0] for t in texts], add_special_tokens=False)
        all_ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        del encodings, texts
        L, step = self.config.max_length, self.config.max_length - self.config.overlap
        for (doc, _, label), ids in zip(batch, all_ids):
            n_chunks = 1 if len(ids) <= L else 1 + math.ceil((len(ids) - L) / step)
            for c in range(n_chunks):
                start = c * step
                chunk = ids[start : start + L]
                yield Record(
                    id=f"{source}#{doc}-{c}",
                    source=source,
                    tokens=chunk,
                    positions=np.arange(len(chunk), dtype=np.float32)[:, None],  # (L, 1)
                    label=label,
                    meta={"doc": doc, "chunk": c, "start": start, "doc_tokens": len(ids)},
                )

    def _label_index(self, label: Any, source: str) -> int | None:
        if label is None:
            return None
        names = self._labels or ()
        try:
            return names.index(str(label))
        except ValueError:
            raise TokenizeError(
                source, "invalid", f"label {label!r} is not one of the labels seen by fit {list(names)}"
            ) from None

    def detokenize(self, record: Record) -> str:
        """Decode a record's ids back to its text (exact for byte-level BPE, up to chunk cuts)."""
        ids = np.asarray(record.tokens).reshape(-1).tolist()
        return self._require_bpe().decode(ids, skip_special_tokens=False)

    def render(self, raw: Raw | str, path: str) -> None:
        """Draw the first document (first ~1500 characters) as a PNG."""
        import textwrap

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        text = raw if isinstance(raw, str) else (raw[0][0] if raw else "")
        body = "\n".join(textwrap.wrap(text[:1500], 90)) or "(empty)"
        fig = plt.figure(figsize=(8, 6))
        fig.text(0.02, 0.98, body, va="top", ha="left", family="monospace", fontsize=7)
        fig.savefig(path, dpi=100)
        plt.close(fig)
