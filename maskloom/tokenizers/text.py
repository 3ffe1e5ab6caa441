"""Text tokenizer: a byte-level BPE vocabulary trained locally on the corpus.

Byte-pair encoding (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword
Units") over bytes rather than characters, as in GPT-2 (Radford et al., 2019): every string is a
byte sequence, the 256 byte symbols are always in the vocabulary, so encoding never needs [UNK]
and decoding is lossless. The vocabulary is trained with Hugging Face ``tokenizers`` on the
corpus being tokenized — never downloaded. Tokens are discrete ids with one ``index`` coordinate,
the input of MAE-LM style masked language modelling (Meng et al., 2024, "Representation
Deficiency in Masked Language Modeling").

Inputs (``read``):

* ``.txt``: the whole file is one document, or one document per line / per blank-line-separated
  paragraph (``Config.split``);
* ``.jsonl``: one JSON object per line (lines end at ``\n`` or ``\r\n`` only, so U+2028/U+2029/U+0085
  inside strings are fine), text in ``Config.text_field``, optional label in
  ``Config.label_field``. A label is a string, a number or a boolean: numbers are named by their
  value (``1`` and ``1.0`` are the class ``"1"``, ``0.5`` is ``"0.5"``), booleans ``"true"`` /
  ``"false"``; ``null`` or an absent key is no label; an array, an object, ``NaN`` or
  ``Infinity`` makes its line unusable. A line that is no usable record (not JSON, not an object,
  no string text field, such a label) is skipped with a warning naming it, unless most lines are
  (then the first one's problem is the file's error row). A ``\\ud83d``-style escape of half a UTF-16 surrogate
  pair with no other half (an emoji cut by a truncating scraper) is valid JSON but not text: it is
  replaced by U+FFFD, as most pipelines do, and a warning counts the lines;
* ``.csv`` / ``.tsv``: a header row, text in ``Config.text_column``, optional label in
  ``Config.label_column`` (column names match case-insensitively, so the SMS Spam Collection's
  ``Label<TAB>SMS`` works with ``text_column="sms"``). Fields may be of any size (Python's csv
  module stops at 128 KiB by default).

Training the vocabulary: the trainer's cost for one pre-tokenizer "word" (a run of letters, of
digits, of other symbols or of whitespace) grows with the square of its length (400,000 letters
without a break took 117 s, 5 MB hours), so a word longer than ``MAX_TRAIN_WORD`` characters (a DNA
line, a minified or base64 blob; never a word of normal text) reaches the trainer in pieces of that
length, and at most ``MAX_TRAIN_LONG_CHARS`` characters of such words per document (a warning counts
them). Encoding is not affected: every byte of every document is tokenised.

The raw form is a list of ``(document, label or None)``. Long documents are cut into chunks of at
most ``Config.max_length`` tokens (with ``Config.overlap`` tokens shared by neighbours); each chunk
is one record with id ``<source>#<doc>-<chunk>``.
"""

from __future__ import annotations

import contextlib
import csv
import io
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

from maskloom.tokenizers.base import Record, TableSpec, TokenizeError, Tokenizer, register_tokenizer

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]")
"""Special tokens, given ids 0..4 in this order by the trainer."""
VOCAB_FILE = "bpe.json"
LABELS_FILE = "labels.json"

Raw = list[tuple[str, Any]]
"""The raw form: one ``(document, label or None)`` per document of a file."""

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
    reading; the file is in memory already, so the limit protects nothing here. Readers in several
    threads share one lift: the first sets it, the last restores the previous value."""
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
    """CSV/TSV: header name of the text column (case-insensitive)."""
    label_column: str | None = "label"
    """CSV/TSV: header name of the optional label column (case-insensitive); None ignores labels."""
    labels: tuple[str, ...] | None = None
    """Class names in index order; None takes the sorted distinct labels seen by fit()."""
    vocab_path: str | None = None
    """Path of an existing ``bpe.json`` to reuse; then fit() learns no vocabulary (labels only)."""

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


@register_tokenizer("text")
class TextTokenizer(Tokenizer):
    """Byte-level BPE over text documents; one record per chunk of at most ``max_length`` ids."""

    Config: ClassVar[type] = TextConfig
    version: ClassVar[str] = "2"
    # 2: words over MAX_TRAIN_WORD characters reach the BPE trainer in pieces (a vocabulary trained on
    # documents that hold such words changes; others are unchanged); JSONL labels 1.0 and true are the
    # classes "1" and "true", no longer "1.0" and "True"; arrays, objects and NaN as labels are invalid
    extensions: ClassVar[tuple[str, ...]] = (".txt", ".jsonl", ".csv", ".tsv")
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
        """Collect the labels of ``sources`` and, unless ``vocab_path`` is set, train the BPE on them.

        Unreadable sources are skipped with a warning (the pipeline records their errors later), and
        so is a source whose reading fails in any other way: one input never stops the fit. Words
        longer than MAX_TRAIN_WORD characters are trained on in pieces (see the module docstring).
        """
        from tokenizers import pre_tokenizers, trainers

        seen: set[str] = set()
        skipped: list[str] = []
        long_docs: list[tuple[str, int]] = []  # (source, characters in long words) per such document
        pretok = _new_bpe().pre_tokenizer
        train = self.config.vocab_path is None

        def documents() -> Iterator[str]:
            for src in sources:
                try:
                    raw = self.read(src)
                except TokenizeError as e:
                    skipped.append(f"{e}")
                    continue
                except Exception as e:  # noqa: BLE001 - a reader's bug must not stop the whole job
                    skipped.append(f"{src}: {type(e).__name__}: {e}")
                    continue
                for text, label in raw:
                    if label is not None:
                        seen.add(str(label))
                    if not text.strip():
                        continue
                    spans = _long_words(text, pretok) if train else []
                    if not spans:
                        yield text
                        continue
                    long_docs.append((src, sum(e - s for s, e in spans)))
                    yield from _training_texts(text, spans)

        if self.config.vocab_path is not None:
            for _ in documents():
                pass
        else:
            bpe = _new_bpe()
            trainer = trainers.BpeTrainer(
                vocab_size=self.config.vocab_size,
                min_frequency=self.config.min_frequency,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: never [UNK]
                show_progress=False,
            )
            bpe.train_from_iterator(documents(), trainer=trainer)
            self._bpe = bpe
        if skipped:
            log.warning("text fit skipped %d unreadable source(s), e.g. %s", len(skipped), skipped[0])
        if long_docs:
            src, n = max(long_docs, key=lambda d: d[1])
            capped = sum(max(0, n - MAX_TRAIN_LONG_CHARS) for _, n in long_docs)
            log.warning(
                "text fit: %d document(s) hold words of over %d characters without a break (most: %d "
                "characters in %s); the vocabulary was trained on them in pieces of %d characters%s",
                len(long_docs),
                MAX_TRAIN_WORD,
                n,
                src,
                MAX_TRAIN_WORD,
                f", and not on {capped} characters beyond {MAX_TRAIN_LONG_CHARS} per document"
                if capped
                else "",
            )
        if self.config.labels is None:
            self._labels = _sort_labels(seen) if seen else None
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

    def read(self, source: str) -> Raw:
        """Decode a .txt/.jsonl/.csv/.tsv file into ``[(document, label or None), ...]``."""
        self.check_file(source)
        ext = os.path.splitext(source)[1].lower()
        if ext not in self.extensions:
            raise TokenizeError(
                source,
                "unsupported",
                f"extension {ext or '(none)'!r}; text reads {', '.join(self.extensions)}",
            )
        try:
            with open(source, encoding="utf-8-sig", newline="") as f:
                content = f.read()
        except UnicodeDecodeError as e:
            raise TokenizeError(source, "corrupt", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise TokenizeError(source, "missing", f"cannot open ({e.strerror})") from None
        if "\x00" in content:
            raise TokenizeError(source, "corrupt", "contains NUL bytes; not a text file")
        if ext == ".txt":
            return self._read_txt(content)
        if ext == ".jsonl":
            return self._read_jsonl(content, source)
        return self._read_table(content, source, "\t" if ext == ".tsv" else ",")

    def _read_txt(self, content: str) -> Raw:
        if self.config.split == "document":
            return [(content, None)]
        if self.config.split == "lines":
            return [(line, None) for line in content.splitlines()]
        return [(p, None) for p in re.split(r"\n[ \t\r]*\n", content)]

    def _read_jsonl(self, content: str, source: str) -> Raw:
        """The (text, label) of each line. A line that is no usable record (not JSON, not an object,
        without a string text field, with a label that names no class) is skipped with a warning
        naming it, as long as most lines are usable: one damaged line of a 100,000-document shard
        does not cost the other 99,999. A file whose lines are mostly (or all) unusable is not what
        the config expects: the first line's problem is the file's error."""
        key, lkey = self.config.text_field, self.config.label_field
        out: Raw = []
        bad: list[tuple[int, str, str]] = []  # (line, kind, reason) of the lines skipped
        fixed: list[int] = []  # lines whose lone surrogates were replaced
        # JSON Lines separates records by "\n" only (optionally "\r\n"): str.splitlines() would also cut
        # at U+2028, U+2029, U+0085, \x0b, \x0c, \x1c-\x1e, which json.dumps(ensure_ascii=False) leaves
        # unescaped inside strings.
        for n, line in enumerate(content.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((n, "corrupt", f"line {n} is not JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                bad.append((n, "invalid", f"line {n} is a JSON {type(obj).__name__}, expected an object"))
                continue
            if key not in obj:
                bad.append(
                    (n, "config", f"line {n} has no text field {key!r} (keys: {sorted(obj)}); set text_field")
                )
                continue
            text = obj[key]
            if not isinstance(text, str):
                bad.append(
                    (n, "invalid", f"line {n}: field {key!r} is a {type(text).__name__}, expected a string")
                )
                continue
            try:
                label = _json_label(obj.get(lkey)) if lkey is not None else None
            except ValueError as e:
                bad.append((n, "invalid", f"line {n}: label field {lkey!r} {e}; a label must be a string, a "
                            "number or a boolean"))  # fmt: skip
                continue
            if "\\u" in line:  # only a JSON escape makes a lone surrogate: UTF-8 text has none
                text, k = _replace_surrogates(text)
                label, kl = _replace_surrogates(label) if label is not None else (None, 0)
                if k or kl:
                    fixed.append(n)
            out.append((text, label))
        if bad:
            _, kind, reason = bad[0]
            if len(bad) >= len(out):  # mostly unusable: the file, not a few lines, is at fault
                more = f" ({len(bad)} of {len(bad) + len(out)} lines are unusable)" if len(bad) > 1 else ""
                raise TokenizeError(source, kind, reason + more)
            log.warning("%s: skipped %d of %d lines that are no usable record: %s%s", source, len(bad),
                        len(bad) + len(out), "; ".join(r for _, _, r in bad[:3]),
                        f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else "")  # fmt: skip
        if fixed:
            log.warning(
                "%s: replaced lone UTF-16 surrogate escape(s) (half an emoji) by U+FFFD on %d line(s), first line %d",
                source,
                len(fixed),
                fixed[0],
            )
        return out

    def _read_table(self, content: str, source: str, delimiter: str) -> Raw:
        # TSV files (e.g. the SMS Spam Collection) do not quote fields; CSV files may.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        try:
            with _csv_fields_unlimited():  # a 200 KiB cell is a valid field
                rows = list(csv.reader(io.StringIO(content), delimiter=delimiter, quoting=quoting))
        except csv.Error as e:
            raise TokenizeError(
                source, "corrupt", f"not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})"
            ) from None
        if not rows:
            raise TokenizeError(source, "empty", "no header row")
        header = [h.strip().lower() for h in rows[0]]
        want = self.config.text_column.lower()
        if want not in header:
            raise TokenizeError(
                source,
                "config",
                f"no text column {self.config.text_column!r} in header {rows[0]}; set text_column",
            )
        ti = header.index(want)
        lcol = self.config.label_column
        li = header.index(lcol.lower()) if lcol is not None and lcol.lower() in header else None
        out: Raw = []
        for n, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) <= ti:
                raise TokenizeError(
                    source, "invalid", f"row {n} has {len(row)} field(s), no text column {ti + 1}"
                )
            label = row[li] if li is not None and li < len(row) and row[li] != "" else None
            out.append((row[ti], label))
        return out

    def tokenize(self, raw: Raw | str, *, source: str = "") -> list[Record]:
        """Encode each document and cut it into chunks; one record per chunk.

        tokens: (L,) int32 ids with L <= max_length; positions: (L, 1) float32 index in the chunk.
        Empty documents are skipped (with a warning); a file with no text at all raises.
        """
        bpe = self._require_bpe()
        docs = [(raw, None)] if isinstance(raw, str) else list(raw)
        keep = [i for i, (text, _) in enumerate(docs) if isinstance(text, str) and text.strip()]
        if not keep:
            raise TokenizeError(
                source, "empty", "no text" if len(docs) <= 1 else f"all {len(docs)} documents are empty"
            )
        if len(keep) < len(docs):
            log.warning("%s: skipped %d empty document(s) of %d", source, len(docs) - len(keep), len(docs))
        labels = [self._label_index(docs[i][1], source) for i in keep]
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which records do not keep
        encode = getattr(bpe, "encode_batch_fast", bpe.encode_batch)
        L, step = self.config.max_length, self.config.max_length - self.config.overlap
        records: list[Record] = []
        for doc, label, ids in zip(keep, labels, self._encoded(encode, [docs[i][0] for i in keep])):
            n_chunks = 1 if len(ids) <= L else 1 + math.ceil((len(ids) - L) / step)
            for c in range(n_chunks):
                start = c * step
                chunk = ids[start : start + L]
                records.append(
                    Record(
                        id=f"{source}#{doc}-{c}",
                        source=source,
                        tokens=chunk,
                        positions=np.arange(len(chunk), dtype=np.float32)[:, None],  # (L, 1)
                        label=label,
                        meta={"doc": doc, "chunk": c, "start": start, "doc_tokens": len(ids)},
                    )
                )
        return records

    ENCODE_BATCH: ClassVar[int] = 1024
    """Documents encoded per call: a tokenizers ``Encoding`` holds each token's string as well as
    its id (~20 kB for a 150-word document), so a file of 100,000 documents encoded in one call
    held 2 GB; its ids are kept, the encodings dropped a batch at a time."""

    def _encoded(self, encode: Any, texts: list[str]) -> Iterator[np.ndarray]:
        """Each text's ids, (n,) int32, encoding ``ENCODE_BATCH`` texts per call."""
        for start in range(0, len(texts), self.ENCODE_BATCH):
            chunk = texts[start : start + self.ENCODE_BATCH]
            try:
                batch = encode(chunk, add_special_tokens=False)
            except TypeError:  # a lone surrogate (a str given to tokenize(), not read()): not UTF-8
                batch = encode([_replace_surrogates(t)[0] for t in chunk], add_special_tokens=False)
            yield from [np.asarray(e.ids, dtype=np.int32) for e in batch]

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
