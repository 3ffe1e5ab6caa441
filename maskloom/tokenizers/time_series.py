"""Time-series tokenizer: RevIN-normalised patches of one channel, as PatchTST.

Nie et al., "A Time Series is Worth 64 Words: Long-term Forecasting with Transformers" (ICLR 2023),
yuqinie98/PatchTST: each channel is its own univariate series (channel independence), normalised by
its own mean/std over the input window (RevIN: Kim et al., "Reversible Instance Normalization for
Accurate Time-Series Forecasting against Distribution Shift", ICLR 2022), and cut into patches of
``patch_len`` steps every ``patch_stride`` steps (self-supervised: 12 and 12, context 512 -> 42
patches). RevIN statistics go in the record's meta so that detokenize (and a forecaster) can undo
them.

Inputs and decisions (documented here once):

* Tables: CSV, TSV (with a header row) and Parquet. Every numeric column is a channel. A text column
  in which more than half of the non-empty cells are numbers is a channel too, its other cells
  (a typo such as ``1.2.3``, a marker such as ``-``) missing values, with a warning naming the
  column and counting them. Other columns are skipped: quietly a column of dates or times (as Arrow
  reads ``2016-07-01 00:00:00``) and the first column when it is not numeric (the time or index
  column: ``date`` in ETT, Weather, Electricity); any other (a name, a status, booleans) with a
  warning naming it. A column with no valid value (every cell empty, NaN or inf) is skipped with a
  warning, unless every column is so (``invalid``). ``Config.columns`` picks channels by name (a
  chosen column that is not numeric is a ``config`` error; one without a valid value makes the file
  ``invalid``). A CSV/TSV whose first row is all numbers, not all of them integers, has no header:
  that row is data, and the columns are named ``f0``, ``f1``, ... A first row of integers is read as
  column names (sensor ids such as METR-LA's ``773869``, years, pandas' unnamed ``0,1,2,...``),
  with a warning unless it is ``0,1,2,...`` or ``1,2,3,...`` over several columns. A header
  that is not UTF-8 (a Latin-1 ``température``) makes the file ``corrupt``, and so does UTF-16 text.
  One file is one series, cut into sliding windows of
  ``Config.window`` steps every ``Config.stride`` steps (a tail shorter than a window is dropped; a
  series shorter than one window is rejected as ``too_small``; ``window=None`` makes the whole series
  one window). The pipeline reads the windows as a stream (:meth:`TimeSeriesTokenizer.iter_records`),
  ~16 MB of steps at a time: at PatchTST's ``stride=1`` a series makes a window per step, and
  6,000 steps of 12 channels already hold 133 MB of patches, a year of 321 channels 17 GB (the
  series itself is read whole).
* UCR/UEA classification files: sktime ``.ts`` (``@`` header lines, then ``@data``; per line the
  dimensions are separated by ``:`` and their values by ``,``; ``?`` is missing; the class label is
  the last field; class names from ``@classLabel``), UCR ``.tsv`` (no header; label in the first
  column; trailing NaNs mark the end of a shorter series and are trimmed) and Weka ``.arff`` as the
  archive ships it beside them (``X_TRAIN.arff``): univariate, a numeric attribute per step (``numeric``,
  ``real``, ``integer``), or UEA multivariate, one ``relational`` attribute of numeric ones whose quoted
  value holds a row of steps per channel, the rows separated by ``\n``; then optionally a nominal class
  attribute (the last) whose declared values are the class names, as ``@classLabel``'s. An ``.arff``
  gives exactly the series, labels and records (but for source and id) of the ``.ts`` of the same data;
  ``?`` is missing as there, but steps missing (in every channel) at the end of a series are the
  padding of a shorter series to the attribute count, as unequal-length problems are written, and
  are cut, as UCR ``.tsv``'s trailing NaNs are (the archive's ``.ts`` holds such a series shorter). Sparse data (``{index value, ...}``), instance weights,
  ``string`` and ``date`` attributes, a nominal attribute that is not the last, and anything beside a
  relational attribute but the class are ``unsupported``; a line with another number of values than the
  header declares is ``corrupt``. Each line is one labelled
  series and, unless ``Config.window_labelled``, one window. A line that gives no usable series
  (only a label, too few steps, a channel without values) is skipped, with one warning per file
  naming its lines, unless no line is usable (the file is then rejected with the first reason). A ``.tsv`` file is read as UCR when its
  first line is all numbers, else as a table. Label indices follow ``Config.class_labels``, else the
  names learned by :meth:`TimeSeriesTokenizer.fit` (cheap: it reads headers/label fields only; so
  ``needs_fit`` is True unless ``class_labels`` is given), else the file's own ``@classLabel`` order
  (``.ts``), its class attribute's declared order (``.arff``) or its sorted labels (``.tsv``).
* Compressed files: every format but Parquet (which compresses inside) is also read as ``.gz``,
  ``.bz2``, ``.xz``, ``.zst`` or ``.lz4`` (``ETTh1.csv.gz``, ``X_TRAIN.ts.xz``, ``X_TRAIN.arff.zst``) and
  gives the records of the plain file (ids keep the file's own name). The stream is decompressed with
  the shared helpers of :mod:`maskloom.tokenizers.base` (pyarrow; ``lzma`` for xz): whole into memory
  for a read (ETTh1's 2.6 MB: 13 instead of 8 ms as ``.csv.gz``), as far as needed for fit() (a header,
  a label column) and the ``.tsv`` table-or-UCR test (the first line). A truncated or damaged stream is
  ``corrupt`` ("damaged or truncated gzip stream after 131,072 bytes of text (...)"), one holding
  nothing ``empty``, ``x.parquet.gz`` ``unsupported``.
* Patches are aligned to the *end* of each window, as PatchTST's ``create_patch``: with
  P = (window - patch_len) // patch_stride + 1 patches, the first
  window - ((P - 1) * patch_stride + patch_len) steps of a window are not tokenised. RevIN statistics
  are computed over the tokenised steps: ``std = sqrt(var + eps)`` (biased variance), as RevIN.
* Values are stored as float32: a value beyond its range (``|x| > 3.4e38``, e.g. ``1e300``) becomes
  inf and so counts as missing (no overflow warning).
* Column names of a table must be unique: a table with two columns of the same name raises
  ``TokenizeError(kind="invalid")`` naming them (rather than guessing which one ``columns=`` means or
  renaming them).
* Missing values (NaN, empty cells, ``?``, ``NA``, ``null`` and Arrow's other markers, inf) are filled per channel over the whole series by
  linear interpolation between the nearest valid steps, and by the nearest valid value at the ends.
  A window (channel-independent mode: a window of one channel; joint mode: a window in which any
  channel) with more than ``Config.max_missing`` of its steps missing is skipped with a logged
  warning. A channel with no valid value makes its series invalid: a table file (all its columns
  so, or one chosen in ``columns=``), or a UCR file whose every series is invalid, raises
  ``TokenizeError(kind="invalid")``; an invalid UCR series among valid ones is skipped with a warning. ``meta["missing"]`` counts the filled steps.
* Channel-independent mode (default, PatchTST): one record per (window, channel) with positions
  (0, patch) — channels share everything, the channel is in ``meta["channels"]``. Joint mode: one
  record per window with every channel's patches, channel-major, positions (channel, patch).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from einops import rearrange

from maskloom.tokenizers.base import (
    COMPRESSIONS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    open_compressed,
    read_compressed,
    read_stream_block,
    register_tokenizer,
    report_skipped,
    split_compression,
    utf8_path,
)

log = logging.getLogger(__name__)

LABELS_FILE = "time_series_labels.json"
COMPRESSIBLE = (".csv", ".tsv", ".ts", ".arff")
"""Formats also read compressed (``x.csv.gz``; :data:`~maskloom.tokenizers.base.COMPRESSIONS`): every
one but Parquet, which compresses inside."""


@dataclass(frozen=True, kw_only=True)
class TimeSeriesConfig:
    """Configuration of the time-series tokenizer (defaults: PatchTST self-supervised pretraining)."""

    window: int | None = 512
    """Steps per sample window (PatchTST context 512); None: the whole series is one window."""
    stride: int = 128
    """Steps between consecutive window starts (PatchTST slides by 1; 128 keeps tables small)."""
    patch_len: int = 12
    """Steps per patch (token width)."""
    patch_stride: int = 12
    """Steps between patch starts; at most patch_len (patches overlap when smaller)."""
    channel_independent: bool = True
    """True: one record per (window, channel), as PatchTST; False: one record per window, all channels."""
    columns: tuple[str, ...] | None = None
    """Table columns to use as channels, in this order; None: every numeric column."""
    format: Literal["auto", "table", "ucr"] = "auto"
    """"table": a CSV/TSV/Parquet series; "ucr": one labelled series per line; "auto": by extension/content."""
    window_labelled: bool = False
    """Also cut labelled (UCR) series into windows; default: each labelled series is one window."""
    class_labels: tuple[str, ...] | None = None
    """Class names of labelled files, in label-index order; None: learned by fit() or from each file."""
    max_missing: float = 0.5
    """A window with a larger fraction of missing (interpolated) steps is skipped."""
    eps: float = 1e-5
    """RevIN epsilon: std = sqrt(var + eps)."""

    def __post_init__(self) -> None:
        # lists from JSON/TOML configs become tuples so the config stays hashable
        for name in ("columns", "class_labels"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, str) or not all(isinstance(s, str) for s in v) or not v:
                    raise ValueError(f"{name} must be a non-empty list of strings or None, got {v!r}")
                object.__setattr__(self, name, tuple(v))
        if self.patch_len < 1 or self.patch_stride < 1:
            raise ValueError(
                f"patch_len and patch_stride must be >= 1, got {self.patch_len}, {self.patch_stride}"
            )
        if self.patch_stride > self.patch_len:
            raise ValueError(
                f"patch_stride ({self.patch_stride}) must not exceed patch_len ({self.patch_len}): steps would be lost"
            )
        if self.window is not None and self.window < self.patch_len:
            raise ValueError(f"window ({self.window}) must be at least patch_len ({self.patch_len})")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.format not in ("auto", "table", "ucr"):
            raise ValueError(f"format must be 'auto', 'table' or 'ucr', got {self.format!r}")
        if not 0.0 <= self.max_missing <= 1.0:
            raise ValueError(f"max_missing must lie in [0, 1], got {self.max_missing}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


@dataclass
class TimeSeries:
    """Decoded time series: one series (a table file) or many labelled series (a UCR file)."""

    series: list[np.ndarray]
    """One (T_i, C) float32 array per series; NaN marks a missing value."""
    channels: tuple[str, ...]
    """Names of the C channels."""
    labels: list[int] | None = None
    """Class index per series (UCR files), or None."""
    label_names: tuple[str, ...] | None = None
    """Class names that the label indices refer to, or None."""
    labelled: bool = False
    """True for UCR-style files: each series is one sample (one window unless window_labelled)."""
    lines: list[int] | None = None
    """Line of the file each series was read from (UCR files), for messages; or None."""

    @property
    def values(self) -> np.ndarray:
        """(T, C) values of a single-series input."""
        if len(self.series) != 1:
            raise ValueError(f"values: this input holds {len(self.series)} series; use .series")
        return self.series[0]


# ---------------------------------------------------------------------------------------------
# small pure functions (also used by the forecasting evaluation)
# ---------------------------------------------------------------------------------------------
def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Start indices of the full windows of ``window`` steps every ``stride`` steps in ``length`` steps."""
    if length < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, length - window + 1, stride, dtype=np.int64)


def num_patches(window: int, patch_len: int, patch_stride: int) -> int:
    """Patches in a window (PatchTST): (window - patch_len) // patch_stride + 1."""
    return (window - patch_len) // patch_stride + 1


def fill_missing(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill non-finite values per channel: linear interpolation inside, nearest value at the ends.

    x: (T, C). Returns (filled (T, C) float64, missing (T, C) bool). A channel with no finite value
    stays all-NaN (the caller rejects it). The input is not modified."""
    x = np.asarray(x, dtype=np.float64)
    missing = ~np.isfinite(x)
    out = np.where(missing, np.nan, x)
    t = np.arange(x.shape[0])
    for c in np.nonzero(missing.any(axis=0) & ~missing.all(axis=0))[0]:  # loop over channels, not steps
        ok = ~missing[:, c]
        out[:, c] = np.interp(t, t[ok], x[ok, c])  # np.interp holds the end values constant
    return out, missing


def record_span(record: Record) -> tuple[int, int]:
    """(start, stop) step indices, in its series, of the steps a record tokenised."""
    start = int(record.meta["start"])
    return start, start + int(record.meta["length"])


def _parse_float_fields(fields: Sequence[str]) -> np.ndarray:
    vals = [f.strip() for f in fields]
    vals = ["nan" if v in ("?", "", "NaN", "nan", "NA") else v for v in vals]
    return np.asarray(vals, dtype=np.float64)


def _to_float32(x: np.ndarray) -> np.ndarray:
    """float32 copy of ``x``; values beyond float32 range become +-inf (i.e. missing) silently."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float32)


def _sort_labels(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    try:
        return tuple(sorted(names, key=float))
    except ValueError:
        return tuple(sorted(names))


_NULL_VALUES = [*pacsv.ConvertOptions().null_values, "?"]
"""Cells Arrow reads as missing in a CSV/TSV table: its defaults ("", "NA", "NaN", "null", ...) and "?"."""
_NUMBER = r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)$"
"""A cell of a text column that counts as a number (as Arrow casts it to float64), after trimming."""


def _coerce_numeric(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, int, int, str | None]:
    """A text column as float64 with its non-number cells null: (values, numbers, non-numbers,
    the first non-number)."""
    text = pc.utf8_trim_whitespace(column)
    ok = pc.match_substring_regex(text, _NUMBER, ignore_case=True)  # null where the cell is null
    n_num = int(pc.sum(ok).as_py() or 0)
    n_bad = int(pc.sum(pc.invert(ok)).as_py() or 0)
    first = None
    if n_bad:
        first = text.filter(pc.invert(ok))[0].as_py()
    kept = pc.if_else(ok, text, pa.scalar(None, text.type))
    try:
        values = pc.cast(kept, pa.float64())
    except pa.ArrowInvalid:  # a spelling the pattern takes and Arrow does not: Python decides
        values = pa.chunked_array([pa.array([_float_or_none(v) for v in kept.to_pylist()], pa.float64())])
    return values, n_num, n_bad, first


def _float_or_none(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


_INTEGER = re.compile(r"[+-]?\d+")


def _is_number(s: str) -> bool:
    return _float_or_none(s) is not None


# ---------------------------------------------------------------------------------------------
# file names, compressed streams
# ---------------------------------------------------------------------------------------------
def _split_name(source: str) -> tuple[str, str | None]:
    """(the lower-case extension of ``source`` inside any compression suffix, the codec or None):
    ``(".csv", "gzip")`` for ``x.CSV.gz``, ``(".csv", None)`` for ``x.csv``."""
    root, codec = split_compression(source)
    return os.path.splitext(root)[1].lower(), codec


def _decompressed(source: str, codec: str) -> bytes:
    """The decompressed bytes of ``source``; a damaged or truncated stream is TokenizeError(corrupt)
    (:func:`~maskloom.tokenizers.base.stream_error`), one that holds nothing ``empty``."""
    data = read_compressed(source, codec)
    if not data:
        raise TokenizeError(source, "empty", f"the {codec} stream holds no data")
    return data


class _CheckedStream(io.RawIOBase):
    """A decompressing stream (:func:`~maskloom.tokenizers.base.open_compressed`) whose damaged or
    truncated data raises TokenizeError(corrupt) naming the codec and the offset, for io.TextIOWrapper."""

    def __init__(self, f: Any, source: str, codec: str) -> None:
        super().__init__()
        self._f, self._source, self._codec, self._offset = f, source, codec, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = read_stream_block(self._f, self._source, self._codec, self._offset, len(b))
        n = len(data)
        b[:n] = data
        self._offset += n
        return n


@contextlib.contextmanager
def _open_text(source: str) -> Iterator[io.TextIOBase]:
    """``source`` as text, as ``open(source, encoding="utf-8-sig")`` reads it, decompressed as it is
    read when its name says so (``x.ts.gz``), for reading a header or a column lazily. Text that is
    not UTF-8 is TokenizeError(corrupt), and so is a damaged or truncated compressed stream."""
    _, codec = _split_name(source)
    try:
        if codec is None:
            with open(source, encoding="utf-8-sig") as f:
                yield f
        else:
            with open_compressed(source, codec) as raw:
                buffered = io.BufferedReader(_CheckedStream(raw, source, codec), buffer_size=1 << 16)
                with io.TextIOWrapper(buffered, encoding="utf-8-sig") as f:
                    yield f
    except UnicodeDecodeError as e:
        raise TokenizeError(source, "corrupt", f"not UTF-8 text ({e})") from None


def _read_text(source: str) -> str:
    """The whole (decompressed) text of ``source``; TokenizeError(corrupt) when it is not UTF-8."""
    _, codec = _split_name(source)
    try:
        if codec is None:
            with open(source, encoding="utf-8-sig") as f:
                return f.read()
        return _decompressed(source, codec).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TokenizeError(source, "corrupt", f"not UTF-8 text ({e})") from None


# ---------------------------------------------------------------------------------------------
# ARFF (Weka; the UCR/UEA archive's X_TRAIN.arff)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ArffHeader:
    """What an ARFF header declares about the series of its data lines."""

    steps: int
    """Numeric attributes per channel: the top-level ones, or those inside the relational attribute."""
    relational: bool
    """True for UEA multivariate files: one relational attribute holds a series' channels, one per row."""
    class_names: tuple[str, ...] | None
    """The declared values of the nominal class attribute (the last), or None when there is none."""


_ARFF_NUMERIC = ("numeric", "real", "integer")
_ARFF_QUOTED = r"'[^'\\]*(?:\\.[^'\\]*)*'|\"[^\"\\]*(?:\\.[^\"\\]*)*\""
"""A value in single or double quotes, with backslash escapes inside."""
_ARFF_ATTRIBUTE = re.compile(rf"@attribute\s+({_ARFF_QUOTED}|[^\s{{]+)\s*(.*)$", re.IGNORECASE | re.DOTALL)
_ARFF_FIELD = re.compile(
    r"[ \t]*(?:'([^'\\]*(?:\\.[^'\\]*)*)'|\"([^\"\\]*(?:\\.[^\"\\]*)*)\"|([^,'\"]*))[ \t]*(,|$)", re.DOTALL
)
"""One comma-separated value of a data line (quoted or not) and the comma after it (or the end)."""
_ARFF_WEIGHT = re.compile(r",\s*\{[^'\"{}]*\}$")
"""An instance weight after a dense line's values (``..., class, {0.5}``)."""
_ARFF_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _arff_unescape(s: str) -> str:
    """The text of a quoted ARFF value: ``\\n`` a line end (between the channel rows of a relational
    value), ``\\t``, ``\\r``, any other escaped character itself."""
    if "\\" not in s:
        return s
    return re.sub(r"\\(.)", lambda m: _ARFF_ESCAPES.get(m.group(1), m.group(1)), s, flags=re.DOTALL)


def _arff_unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return _arff_unescape(s[1:-1])
    return s


def _arff_split(source: str, ln: int, s: str) -> list[str]:
    """The comma-separated values of ARFF line ``s``, quoted ones unquoted; unquoted values are not
    stripped (number parsing strips them)."""
    if "'" not in s and '"' not in s:
        return s.split(",")
    out: list[str] = []
    pos = 0
    while True:
        m = _ARFF_FIELD.match(s, pos)
        if m is None:
            raise TokenizeError(
                source, "corrupt", f"line {ln}: malformed quoted value at character {pos + 1}"
            )
        single, double, plain, sep = m.groups()
        if plain is not None:
            out.append(plain.strip())
        else:
            out.append(_arff_unescape(single if single is not None else double))
        if not sep:
            return out
        pos = m.end()


def _arff_type(source: str, ln: int, name: str, spec: str) -> tuple[str, tuple[str, ...] | None]:
    """(kind: numeric, nominal or relational; the declared values of a nominal attribute) of an
    ``@attribute`` line's type ``spec``; TokenizeError(unsupported) for string and date attributes."""
    if spec.startswith("{"):
        if not spec.endswith("}"):
            raise TokenizeError(source, "corrupt", f"line {ln}: attribute {name!r}: no closing '}}'")
        values = tuple(v.strip() for v in _arff_split(source, ln, spec[1:-1].strip()))
        if not spec[1:-1].strip() or "" in values:
            raise TokenizeError(source, "corrupt", f"line {ln}: attribute {name!r}: an empty nominal value")
        return "nominal", values
    word = spec.split(None, 1)[0].lower() if spec else ""
    if word in _ARFF_NUMERIC:
        return "numeric", None
    if word == "relational":
        return "relational", None
    if word in ("string", "date"):
        raise TokenizeError(
            source,
            "unsupported",
            f"line {ln}: {word} attribute {name!r}: time_series reads numeric attributes (a series' "
            "steps), a relational attribute of numeric ones (UEA multivariate) and a nominal class",
        )
    raise TokenizeError(source, "corrupt", f"line {ln}: attribute {name!r} has no known type ({spec[:40]!r})")


def _arff_header(source: str, lines: Iterator[tuple[int, str]]) -> _ArffHeader:
    """Parse the header of an ARFF file from its numbered lines, up to and including ``@data`` (the
    iterator is left at the first data line)."""
    top: list[tuple[str, str, int, tuple[str, ...] | None]] = []  # (name, kind, line, nominal values)
    relation: str | None = None  # the relational attribute being declared
    inner = 0  # numeric attributes inside it
    for ln, line in lines:
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        key = s[1:].split(None, 1)[0].lower() if s.startswith("@") and len(s) > 1 else ""
        if key == "relation":
            continue
        if key == "data":
            break
        if key == "end":
            if relation is None:
                raise TokenizeError(source, "corrupt", f"line {ln}: @end without a relational attribute")
            relation = None
            continue
        if key != "attribute":
            raise TokenizeError(
                source,
                "corrupt",
                f"line {ln}: expected an @relation, @attribute or @data line before the data",
            )
        m = _ARFF_ATTRIBUTE.match(s)
        if m is None or not m.group(2).strip():
            raise TokenizeError(source, "corrupt", f"line {ln}: an @attribute line needs a name and a type")
        name = _arff_unquote(m.group(1))
        kind, values = _arff_type(source, ln, name, m.group(2).strip())
        if relation is not None:
            if kind != "numeric":
                raise TokenizeError(
                    source,
                    "unsupported",
                    f"line {ln}: attribute {name!r} inside relational attribute {relation!r} is {kind}: "
                    "only numeric ones (the steps of a channel) are read",
                )
            inner += 1
            continue
        if kind == "relational":
            if any(k == "relational" for _, k, _, _ in top):
                raise TokenizeError(
                    source, "unsupported", f"line {ln}: a second relational attribute {name!r}"
                )
            relation = name
        top.append((name, kind, ln, values))
    else:
        raise TokenizeError(source, "corrupt", "no @data line: not an ARFF file")
    if relation is not None:
        raise TokenizeError(source, "corrupt", f"relational attribute {relation!r} has no @end line")
    class_names = top[-1][3] if top and top[-1][1] == "nominal" else None
    series = top[:-1] if class_names is not None else top
    nominal = next((a for a in series if a[1] == "nominal"), None)
    if nominal is not None:
        raise TokenizeError(
            source,
            "unsupported",
            f"line {nominal[2]}: nominal attribute {nominal[0]!r} is not the last: only the class "
            "(the last attribute) may be nominal",
        )
    if any(k == "relational" for _, k, _, _ in series):
        if len(series) > 1:
            raise TokenizeError(
                source,
                "unsupported",
                f"{len(series) - 1} attribute(s) beside the relational one (e.g. {series[-1][0]!r}): a "
                "UEA multivariate file has the relational attribute (the channels) and a nominal class only",
            )
        if not inner:
            raise TokenizeError(
                source, "corrupt", f"relational attribute {series[0][0]!r} declares no attributes"
            )
        return _ArffHeader(inner, True, class_names)
    if not series:
        raise TokenizeError(source, "corrupt", "no numeric attributes (the steps of a series) before @data")
    return _ArffHeader(len(series), False, class_names)


@register_tokenizer("time_series")
class TimeSeriesTokenizer(Tokenizer):
    """Series -> windows -> RevIN per (window, channel) -> patches of patch_len steps (PatchTST)."""

    Config = TimeSeriesConfig
    version = "2"
    # 2: "?" is a missing value in CSV/TSV tables, and a text column mostly of numbers is a channel
    # (both were skipped), so such tables give more records; a column with no finite value among
    # valid ones is skipped (its file was invalid); a CSV whose first row is numbers keeps it as data
    extensions = (
        ".csv",
        ".tsv",
        ".parquet",
        ".ts",
        ".arff",
        *(f + c for f in COMPRESSIBLE for c in COMPRESSIONS),
    )

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        # fit() learns the class names of labelled files (cheap; table files are not opened), so that
        # label indices agree across files and the table carries label names.
        self.needs_fit = self.config.class_labels is None
        self.fitted_labels: tuple[str, ...] | None = None
        """Class names learned by fit() / load_artifacts() from labelled files, or None."""

    # ---- contract -----------------------------------------------------------------------------
    def companion_files(self, source: str) -> tuple[str, ...]:
        """The same UCR/UEA data in the archive's other formats, beside a ``.ts`` (its ``.arff`` and
        ``.tsv``) or an ``.arff`` (its ``.tsv``), plain or compressed: the archive ships
        ``X_TRAIN.ts``, ``X_TRAIN.arff`` and ``X_TRAIN.tsv`` side by side, and a folder walk took all
        three, so each series was tokenized three times. Named explicitly, such a file is read all the
        same (``find_inputs``' rule for companions)."""
        root, _ = split_compression(source)
        stem, ext = os.path.splitext(root)
        others = {".ts": (".arff", ".tsv"), ".arff": (".tsv",)}.get(ext.lower(), ())
        return tuple(stem + o + c for o in others for c in ("", *COMPRESSIONS))

    def spec(self) -> TableSpec:
        return TableSpec(
            modality=self.name,
            token_kind="continuous",
            token_dim=self.config.patch_len,
            token_dtype="float32",
            position_axes=("channel", "patch"),
            position_kind="grid",
            token_shape=(self.config.patch_len,),
        )

    def label_names(self) -> tuple[str, ...] | None:
        return self.config.class_labels or self.fitted_labels

    def read(self, source: str) -> TimeSeries:
        """Decode a CSV/TSV/Parquet table (one series) or a UCR .ts/.tsv/.arff file (labelled series),
        the text formats also compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4``)."""
        self.check_file(source)
        fmt = self._format(source)
        if fmt == "ucr":
            names, series, labels, lines = self._read_ucr(source)
            if not series:
                raise TokenizeError(source, "empty", "no series in the file")
            names = self._label_list(source, names)
            index = {n: i for i, n in enumerate(names)} if names is not None else {}
            bad = sorted({lab for lab in labels if lab is not None and lab not in index})
            if bad:
                raise TokenizeError(
                    source, "invalid", f"class label(s) {bad} not among the class names {list(names or ())}"
                )
            ints = (
                [index[lab] for lab in labels]
                if names is not None and all(lab is not None for lab in labels)
                else None
            )
            width = max(s.shape[1] for s in series)
            channels = tuple(f"dim_{i}" for i in range(width))
            return TimeSeries(
                series=series, channels=channels, labels=ints, label_names=names, labelled=True, lines=lines
            )
        values, channels = self._read_table(source)
        return TimeSeries(series=[values], channels=channels)

    def tokenize(self, raw: TimeSeries, *, source: str = "") -> list[Record]:
        """Records of (P, patch_len) float32 tokens (channel-independent) or (C * P, patch_len) (joint),
        positions (channel, patch). meta: series, window, start, length, channels, mean, std, missing."""
        return list(self._records(raw, source))

    def iter_records(self, source: str) -> Iterator[Record]:
        """:meth:`tokenize`'s records as a stream, a chunk of windows at a time: a long series cut with
        a small ``stride`` (PatchTST's 1) makes hundreds of windows per step, and its patches alone would
        not fit in memory at once (a year of 321 channels at stride 1: 17 GB)."""
        return self._records(self.read(source), source)

    def _records(self, raw: TimeSeries, source: str) -> Iterator[Record]:
        src = source or "<memory>"
        errors: list[TokenizeError] = []
        produced = 0
        for si, x in enumerate(raw.series):
            try:
                for r in self._tokenize_series(raw, si, x, source, src):  # checks come before any record
                    produced += 1
                    yield r
            except TokenizeError as e:
                if len(raw.series) == 1:
                    raise
                errors.append(e)
        if errors and produced:
            log.warning(
                "%s: skipped %d of %d series: %s%s",
                src,
                len(errors),
                len(raw.series),
                "; ".join(f"{e.kind}: {e.reason}" for e in errors[:3]),
                f"; ... ({len(errors) - 3} more)" if len(errors) > 3 else "",
            )
            report_skipped(
                src, "series", len(errors), len(raw.series), f"{errors[0].reason} ({errors[0].kind})"
            )
        if not produced:
            if errors:
                e = errors[0]
                raise TokenizeError(
                    src, e.kind, f"no usable series ({len(errors)} rejected; first: {e.reason})"
                )
            raise TokenizeError(
                src, "invalid", f"every window has more than {self.config.max_missing:.0%} missing values"
            )

    def detokenize(self, record: Record) -> np.ndarray:
        """Undo patching and RevIN: (length, C) float32 values of the tokenised steps (C = 1 in
        channel-independent mode); overlapping patches are averaged."""
        m = record.meta
        pl, ps, n_p = int(m["patch_len"]), int(m["patch_stride"]), int(m["patches"])
        mean = np.asarray(m["mean"], dtype=np.float64)  # (C,)
        std = np.asarray(m["std"], dtype=np.float64)  # (C,)
        pos = np.asarray(record.positions).astype(np.int64)  # (L, 2) (channel, patch)
        tok = np.asarray(record.tokens, dtype=np.float64)  # (L, pl)
        n_c = mean.shape[0]
        grid = np.zeros((n_c, n_p, pl))
        grid[pos[:, 0], pos[:, 1]] = tok  # placed by position: order-independent
        length = (n_p - 1) * ps + pl
        idx = (np.arange(n_p)[:, None] * ps + np.arange(pl)).reshape(-1)  # (P * pl,) step of each value
        total = np.zeros((length, n_c))
        np.add.at(total, idx, rearrange(grid, "c p l -> (p l) c"))
        z = total / np.bincount(idx, minlength=length)[:, None]  # (length, C)
        return (z * std + mean).astype(np.float32)

    # ---- labels -------------------------------------------------------------------------------
    def fit(self, sources: Iterable[str]) -> None:
        """Learn the class names of labelled (UCR) files, so that label indices agree across files
        (e.g. TRAIN and TEST): the ``.ts`` ``@classLabel`` lists in order of appearance over the sorted
        sources (and the ``.arff`` nominal class attribute's declared values likewise), then the sorted
        labels of header-less files (``.tsv``) not already named. Cheap: reads headers and label fields
        only (compressed files are decompressed as far as that needs); table files are not opened."""
        if self.config.class_labels is not None:
            return
        declared: dict[str, None] = {}
        found: set[str] = set()
        for s in sorted(str(s) for s in sources):
            try:
                self.check_file(s)
                if self._format(s) != "ucr":
                    continue
                ext = _split_name(s)[0]
                if ext == ".ts":
                    declared.update(dict.fromkeys(self._ts_class_labels(s) or ()))
                elif ext == ".arff":
                    declared.update(dict.fromkeys(self._arff_class_labels(s) or ()))
                else:
                    found.update(self._label_fields(s))
            except (TokenizeError, OSError) as e:
                log.warning("time_series fit(): skipping %s", e)
        names = tuple(declared) + _sort_labels(found - set(declared))
        if names:
            self.fitted_labels = names
            log.info("time_series fit(): class names %s", list(names))

    @staticmethod
    def _ts_class_labels(source: str) -> tuple[str, ...] | None:
        """A ``.ts`` file's ``@classLabel`` names (None when it declares none), from its header only."""
        with _open_text(source) as f:
            for line in f:
                s = line.strip()
                if s.lower().startswith("@classlabel"):
                    spec = s.split()[1:]
                    return tuple(spec[1:]) if spec and spec[0].lower() == "true" else None
                if s.lower().startswith("@data"):
                    return None
        return None

    @staticmethod
    def _arff_class_labels(source: str) -> tuple[str, ...] | None:
        """An ``.arff`` file's nominal class values, as declared (None without a nominal class
        attribute), from its header only."""
        with _open_text(source) as f:
            return _arff_header(source, enumerate(f, 1)).class_names

    @staticmethod
    def _label_fields(source: str) -> set[str]:
        """The distinct labels (first field of each line) of a header-less UCR ``.tsv``/``.csv`` file."""
        delim = "\t" if _split_name(source)[0] == ".tsv" else ","
        with _open_text(source) as f:
            return {ln.split(delim, 1)[0].strip() for ln in f if ln.strip()}

    def save_artifacts(self, directory: str) -> list[str]:
        if self.fitted_labels is None:
            return []
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LABELS_FILE), "w", encoding="utf-8") as f:
            json.dump({"class_labels": list(self.fitted_labels)}, f, indent=1)
        return [LABELS_FILE]

    def load_artifacts(self, directory: str) -> None:
        path = os.path.join(directory, LABELS_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.fitted_labels = tuple(json.load(f)["class_labels"])

    # ---- forecasting helpers ------------------------------------------------------------------
    @staticmethod
    def normalize(values: np.ndarray, record: Record) -> np.ndarray:
        """Apply a record's RevIN statistics to raw values (H, C) of its channels (e.g. a horizon)."""
        mean, std = np.asarray(record.meta["mean"]), np.asarray(record.meta["std"])
        return ((np.asarray(values, dtype=np.float64) - mean) / std).astype(np.float32)

    @staticmethod
    def denormalize(values: np.ndarray, record: Record) -> np.ndarray:
        """Undo a record's RevIN statistics on normalised values (H, C) (e.g. a model's forecast)."""
        mean, std = np.asarray(record.meta["mean"]), np.asarray(record.meta["std"])
        return (np.asarray(values, dtype=np.float64) * std + mean).astype(np.float32)

    @staticmethod
    def future(raw: TimeSeries, record: Record, horizon: int) -> np.ndarray:
        """The raw values of the record's channels in the ``horizon`` steps after its window:
        (H', C) float32 with H' <= horizon (shorter at the end of the series)."""
        _, stop = record_span(record)
        x = raw.series[int(record.meta["series"])]
        return np.asarray(x[stop : stop + horizon][:, list(record.meta["channels"])], dtype=np.float32)

    # ---- rendering ----------------------------------------------------------------------------
    def render(self, raw: TimeSeries | np.ndarray, path: str) -> None:
        """Line plot PNG of a series (the first series of a UCR file) or of a (T, C) array."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if isinstance(raw, TimeSeries):
            x, names = raw.series[0], raw.channels
            title = None if raw.labels is None else f"label {raw.labels[0]}"
            if raw.labels is not None and raw.label_names is not None:
                title = f"label {raw.label_names[raw.labels[0]]}"
        else:
            x = np.asarray(raw, dtype=np.float32)
            x = x[:, None] if x.ndim == 1 else x
            names, title = tuple(f"ch{i}" for i in range(x.shape[1])), None
        fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
        for ci in range(x.shape[1]):
            ax.plot(x[:, ci], lw=0.8, label=names[ci] if ci < len(names) else f"ch{ci}")
        if x.shape[1] <= 10:
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("step")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    # ---- internals ----------------------------------------------------------------------------
    def _tokenize_series(
        self, raw: TimeSeries, si: int, x: np.ndarray, source: str, src: str
    ) -> Iterator[Record]:
        """The records of series ``si``, a chunk of windows at a time; its checks raise before any."""
        c = self.config
        x = np.asarray(x)
        name = f"series {si}" + (f" (line {raw.lines[si]})" if raw.lines is not None else "")
        if x.ndim == 2 and x.shape[0] == 0 and x.shape[1] > 0:
            raise TokenizeError(src, "empty", f"{name} has no values")
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise TokenizeError(src, "empty", f"{name} has shape {x.shape}; expected (T > 0, C > 0)")
        filled, missing = fill_missing(x)  # (T, C)
        dead = np.nonzero(missing.all(axis=0))[0]
        if dead.size:
            names = [raw.channels[i] if i < len(raw.channels) else str(i) for i in dead]
            raise TokenizeError(src, "invalid", f"{name}: channel(s) {names} have no valid value")
        n_t, n_c = x.shape
        window = c.window if (c.window is not None and (not raw.labelled or c.window_labelled)) else n_t
        if n_t < max(window, c.patch_len):
            raise TokenizeError(
                src, "too_small", f"{name} has {n_t} steps; a sample needs {max(window, c.patch_len)}"
            )
        n_p = num_patches(window, c.patch_len, c.patch_stride)
        length = (n_p - 1) * c.patch_stride + c.patch_len
        starts = window_starts(n_t, window, c.stride) + (window - length)  # (W,) first tokenised step
        miss_cum = np.concatenate([np.zeros((1, n_c), np.int64), np.cumsum(missing, axis=0)])  # (T + 1, C)
        miss = miss_cum[starts + length] - miss_cum[starts]  # (W, C) filled steps per window and channel
        ok = miss <= c.max_missing * length  # (W, C)
        skipped = int((~ok).sum()) if c.channel_independent else int((~ok.all(axis=1)).sum())
        if skipped:
            log.warning(
                "%s: series %d: skipped %d window(s) with more than %.0f%% missing values",
                src,
                si,
                skipped,
                100 * c.max_missing,
            )
        label = raw.labels[si] if raw.labels is not None else None
        base = {
            "series": si,
            "length": length,
            "patches": n_p,
            "patch_len": c.patch_len,
            "patch_stride": c.patch_stride,
            "window": window,
        }
        patch_pos = np.arange(n_p, dtype=np.float32)
        if c.channel_independent:
            pos = np.stack([np.zeros(n_p, np.float32), patch_pos], axis=1)  # (P, 2) channel 0: shared
        else:
            cc, pp = np.meshgrid(np.arange(n_c, dtype=np.float32), patch_pos, indexing="ij")
            pos = np.stack([cc.reshape(-1), pp.reshape(-1)], axis=1)  # (C * P, 2) channel-major
        for first, mean, std, patches in self._revin_patches(filled, starts, length, n_p):
            last = first + len(mean)
            if c.channel_independent:
                mean_l, std_l = mean.tolist(), std.tolist()
                miss_l, starts_l = miss[first:last].tolist(), starts[first:last].tolist()
                ws, chs = np.nonzero(ok[first:last])
                for w, ch in zip(ws.tolist(), chs.tolist()):
                    meta = {
                        **base,
                        "window_index": first + w,
                        "start": starts_l[w],
                        "channels": [ch],
                        "channel_names": [raw.channels[ch]],
                        "mean": [mean_l[w][ch]],
                        "std": [std_l[w][ch]],
                        "missing": [miss_l[w][ch]],
                    }
                    yield Record(
                        id=f"{source}#s{si}-w{first + w}-c{ch}",
                        source=source,
                        tokens=patches[w, ch],
                        positions=pos.copy(),
                        label=label,
                        meta=meta,
                    )
            else:
                for w in np.nonzero(ok[first:last].all(axis=1))[0].tolist():
                    meta = {
                        **base,
                        "window_index": first + w,
                        "start": int(starts[first + w]),
                        "channels": list(range(n_c)),
                        "channel_names": list(raw.channels),
                        "mean": mean[w].tolist(),
                        "std": std[w].tolist(),
                        "missing": miss[first + w].tolist(),
                    }
                    yield Record(
                        id=f"{source}#s{si}-w{first + w}",
                        source=source,
                        tokens=patches[w].reshape(n_c * n_p, c.patch_len),
                        positions=pos.copy(),
                        label=label,
                        meta=meta,
                    )

    def _revin_patches(
        self, filled: np.ndarray, starts: np.ndarray, length: int, n_p: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """RevIN per window and channel, then patches, a chunk of windows at a time: filled (T, C),
        starts (W,) -> (first window, mean (w, C), std (w, C) float64, patches (w, C, P, patch_len)
        float32) for about 16 MB of float64 steps per chunk, so that memory stays bounded for a
        stride of 1."""
        c = self.config
        n_w, n_c = starts.shape[0], filled.shape[1]
        pidx = np.arange(n_p)[:, None] * c.patch_stride + np.arange(c.patch_len)  # (P, pl) step in window
        chunk = max(1, (1 << 21) // (length * n_c))
        for a in range(0, n_w, chunk):
            seg = filled[starts[a : a + chunk, None] + np.arange(length)]  # (w, length, C)
            mean = seg.mean(axis=1)  # RevIN: per window and channel
            std = np.sqrt(seg.var(axis=1) + c.eps)  # biased variance, as RevIN
            z = (seg - mean[:, None, :]) / std[:, None, :]  # (w, length, C)
            patches = rearrange(z[:, pidx, :], "w p l c -> w c p l").astype(np.float32)  # (w, C, P, pl)
            yield a, mean, std, patches

    def _format(self, source: str) -> str:
        ext, codec = _split_name(source)
        if codec is not None and ext == ".parquet":
            raise TokenizeError(
                source, "unsupported", "a compressed Parquet file: Parquet compresses inside; decompress it"
            )
        if self.config.format != "auto":
            return self.config.format
        if ext in (".ts", ".arff"):
            return "ucr"
        if ext == ".tsv":
            with _open_text(source) as f:
                first = next((ln for ln in f if ln.strip()), "")
            fields = first.rstrip("\r\n").split("\t")
            return "ucr" if len(fields) > 1 and all(_is_number(v) for v in fields) else "table"
        if ext in (".csv", ".parquet"):
            return "table"
        shown = ext + next((e for e, c in COMPRESSIONS.items() if c == codec), "")
        raise TokenizeError(
            source,
            "unsupported",
            f"extension {shown or '(none)'!r}; time_series reads {', '.join(COMPRESSIBLE)} (also compressed: "
            f"{', '.join(COMPRESSIONS)}) and .parquet",
        )

    def _label_list(self, source: str, file_names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if self.config.class_labels is not None:
            return self.config.class_labels
        if self.fitted_labels is not None:
            return self.fitted_labels
        return file_names

    def _read_table(self, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
        ext, codec = _split_name(source)
        data = _decompressed(source, codec) if codec is not None else None  # (the table is read whole)
        if ext != ".parquet":
            if data is None:
                with open(source, "rb") as f:
                    head = f.read(2)
            else:
                head = data[:2]
            if head in (b"\xff\xfe", b"\xfe\xff"):
                raise TokenizeError(source, "corrupt", "UTF-16 text; save the table as UTF-8")
        table, names_all = self._load_table(source, ext, header=True, data=data)
        if ext != ".parquet" and all(_is_number(n) for n in names_all):
            n = len(names_all)
            if not all(_INTEGER.fullmatch(x.strip()) for x in names_all):
                # no header row: the first row is data (column names are not 0.5 or 1e3)
                table, names_all = self._load_table(source, ext, header=False, data=data)
                log.info("%s: the first row is all numbers, so data (no header): columns f0, f1, ...", source)
            elif names_all not in ([str(i) for i in range(n)], [str(i + 1) for i in range(n)]) or n == 1:
                # integers: names as often as data (sensor ids, years; pandas' unnamed 0, 1, ...)
                log.warning(
                    "%s: read the first row (%s) as column names; if the file has no header row, "
                    "those values are not in the series",
                    source,
                    ", ".join(names_all[:4]) + (", ..." if n > 4 else ""),
                )
        if table.num_rows == 0:
            raise TokenizeError(source, "empty", "table has no rows")
        dups = sorted({n for n in names_all if names_all.count(n) > 1})
        if dups:
            raise TokenizeError(
                source,
                "invalid",
                f"duplicate column name(s) {dups}: every column needs its own name (rename the copies)",
            )

        def numeric(t: pa.DataType) -> bool:
            return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)

        def temporal(t: pa.DataType) -> bool:
            return pa.types.is_temporal(t)  # timestamp, date, time, duration

        def as_float(n: str) -> pa.ChunkedArray | None:
            """Column ``n`` as float64, or None when it is not numeric; a text column more than half
            of whose non-empty cells are numbers is numeric, the rest missing (with a warning)."""
            col, t = table.column(n), table.schema.field(n).type
            if numeric(t) or pa.types.is_null(t):  # an all-empty column has Arrow type null
                return pc.cast(col, pa.float64())
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                return None
            values, n_num, n_bad, first = _coerce_numeric(col)
            if n_num <= n_bad:
                return None
            if n_bad:
                log.warning(
                    "%s: column %r: %d of %d cells are not numbers (e.g. %r): read as missing values",
                    source,
                    n,
                    n_bad,
                    n_num + n_bad,
                    first,
                )
            return values

        strict = self.config.columns is not None
        if strict:
            absent = [n for n in self.config.columns if n not in names_all]
            if absent:
                raise TokenizeError(
                    source, "config", f"column(s) {absent} not in the table; it has {names_all}"
                )
            names = list(self.config.columns)
            cols = {n: as_float(n) for n in names}
            wrong = [n for n in names if cols[n] is None]
            if wrong:
                raise TokenizeError(source, "config", f"column(s) {wrong} are not numeric")
        else:
            cols = {n: as_float(n) for n in names_all}
            names = [n for n in names_all if cols[n] is not None]
            other = [
                n
                for i, n in enumerate(names_all)
                if cols[n] is None and i > 0 and not temporal(table.schema.field(n).type)
            ]
            if other and names:
                log.warning("%s: skipping non-numeric column(s) %s", source, other)
            if not names:
                cols = names_all
                sep = next((c for c in ";|\t" if len(cols) == 1 and c in cols[0]), None)
                hint = (
                    f"; the file looks {sep!r}-separated, and .csv is read as comma-separated (.tsv: tabs)"
                    if sep
                    else ""
                )  # a spreadsheet's export in a locale whose decimal mark is the comma
                raise TokenizeError(source, "invalid", f"no numeric columns (columns: {cols[:10]}){hint}")
        values = _to_float32(
            np.stack([cols[n].to_numpy(zero_copy_only=False) for n in names], axis=1)
        )  # (T, C); nulls became NaN, beyond float32 inf
        if not strict:
            dead = ~np.isfinite(values).any(axis=0)
            if dead.any() and not dead.all():  # all dead: the series is invalid (tokenize says so)
                log.warning(
                    "%s: skipping column(s) %s: no valid value at all (every cell empty, NaN or inf; "
                    "choose them in columns= to be strict)",
                    source,
                    [n for n, d in zip(names, dead) if d],
                )
                names = [n for n, d in zip(names, dead) if not d]
                values = values[:, ~dead]
        return values, tuple(names)

    @staticmethod
    def _load_table(
        source: str, ext: str, *, header: bool, data: bytes | None = None
    ) -> tuple[pa.Table, list[str]]:
        """The table of a Parquet, CSV or TSV file and its column names (``f0``, ``f1``, ... without a
        header); ``data``: the decompressed bytes of a compressed CSV/TSV file, read instead of the
        file. TokenizeError(corrupt) when it cannot be read."""

        def read_csv(where: Any) -> pa.Table:
            return pacsv.read_csv(
                where,
                read_options=pacsv.ReadOptions(autogenerate_column_names=not header),
                parse_options=pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ","),
                convert_options=pacsv.ConvertOptions(null_values=_NULL_VALUES, strings_can_be_null=True),
            )

        try:
            if data is not None:
                table = read_csv(pa.BufferReader(data))
            else:
                with utf8_path(source) as path:  # Arrow takes UTF-8 paths
                    if ext == ".parquet":
                        with pq.ParquetFile(
                            path
                        ) as pf:  # unlike pq.read_table, keeps duplicate names (refused)
                            table = pf.read()
                    else:
                        table = read_csv(path)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise TokenizeError(source, "corrupt", f"cannot read table: {e}") from None
        try:
            names = table.column_names  # Arrow decodes the header's bytes here, not when reading
        except UnicodeDecodeError as e:
            raise TokenizeError(
                source, "corrupt", f"header is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})"
            ) from None
        return table, names

    def _read_ucr(
        self, source: str
    ) -> tuple[tuple[str, ...] | None, list[np.ndarray], list[str | None], list[int]]:
        """(class names from the header or None, series (T_i, C) float32, raw label strings, the line
        of each series)."""
        text = _read_text(source)
        ext = _split_name(source)[0]
        if ext == ".ts":
            return self._parse_ts(source, text)
        if ext == ".arff":
            return self._parse_arff(source, text)
        delim = "\t" if ext == ".tsv" else ","
        series: list[np.ndarray] = []
        labels: list[str | None] = []
        lines: list[int] = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split(delim)
            try:
                v = _to_float32(_parse_float_fields(fields[1:]))
            except ValueError:
                raise TokenizeError(source, "corrupt", f"line {ln}: non-numeric value") from None
            keep = np.nonzero(np.isfinite(v))[0]
            v = v[: keep[-1] + 1] if keep.size else v[:0]  # trailing NaNs: end of a shorter series
            labels.append(fields[0].strip())
            series.append(v[:, None])
            lines.append(ln)
        return _sort_labels(labels) if labels else None, series, labels, lines

    @staticmethod
    def _parse_ts(
        source: str, text: str
    ) -> tuple[tuple[str, ...] | None, list[np.ndarray], list[str | None], list[int]]:
        header: dict[str, str] = {}
        lines = text.splitlines()
        data_at = None
        for ln, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if not s.startswith("@"):
                raise TokenizeError(
                    source, "corrupt", f"line {ln + 1}: expected an @ header line before @data"
                )
            key, _, value = s[1:].partition(" ")
            if key.lower() == "data":
                data_at = ln + 1
                break
            header[key.lower()] = value.strip()
        if data_at is None:
            raise TokenizeError(source, "corrupt", "no @data line: not a sktime .ts file")
        if header.get("timestamps", "false").lower() == "true":
            raise TokenizeError(
                source, "unsupported", "time-stamped .ts data (@timeStamps true) is not supported"
            )
        class_spec = header.get("classlabel", "false").split()
        labelled = bool(class_spec) and class_spec[0].lower() == "true"
        names = tuple(class_spec[1:]) if labelled else None
        has_target = header.get("targetlabel", "false").split()[:1] == ["true"]
        series: list[np.ndarray] = []
        labels: list[str | None] = []
        lines_of: list[int] = []
        n_dims = None
        for ln, line in enumerate(lines[data_at:], data_at + 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            fields = s.split(":")
            label = None
            if labelled or has_target:  # the last field is the class label (or a regression target, dropped)
                if len(fields) < 2:
                    raise TokenizeError(source, "corrupt", f"line {ln}: no label after the values")
                last = fields.pop().strip()
                label = last if labelled else None
            if n_dims is None:
                n_dims = len(fields)
            elif len(fields) != n_dims:
                raise TokenizeError(
                    source, "corrupt", f"line {ln}: {len(fields)} dimensions, earlier lines have {n_dims}"
                )
            try:
                dims = [_to_float32(_parse_float_fields(d.split(","))) for d in fields]
            except ValueError:
                raise TokenizeError(source, "corrupt", f"line {ln}: non-numeric value") from None
            t = max(d.shape[0] for d in dims)
            x = np.full((t, len(dims)), np.nan, dtype=np.float32)  # dimensions of unequal length: NaN-padded
            for i, d in enumerate(dims):
                x[: d.shape[0], i] = d
            series.append(x)
            labels.append(label)
            lines_of.append(ln)
        return names, series, labels, lines_of

    @staticmethod
    def _parse_arff(
        source: str, text: str
    ) -> tuple[tuple[str, ...] | None, list[np.ndarray], list[str | None], list[int]]:
        """An ARFF file's series as :meth:`_parse_ts` gives those of the same data in a ``.ts`` file:
        univariate (numeric attributes, one per step) or UEA multivariate (a relational attribute whose
        quoted value holds one row of steps per channel, rows separated by ``\\n``), each optionally
        followed by a nominal class attribute (its declared values are the class names)."""
        numbered = enumerate(text.splitlines(), 1)
        header = _arff_header(source, numbered)  # leaves `numbered` at the first data line
        labelled = header.class_names is not None
        width = (1 if header.relational else header.steps) + labelled  # values per data line
        series: list[np.ndarray | None] = []
        labels: list[str | None] = []
        lines_of: list[int] = []
        n_dims = None
        for ln, line in numbered:
            s = line.strip()
            if not s or s.startswith("%"):
                continue
            if s.startswith("{"):
                raise TokenizeError(
                    source,
                    "unsupported",
                    f"line {ln}: sparse ARFF data ({{index value, ...}}); save it dense",
                )
            if _ARFF_WEIGHT.search(s):
                raise TokenizeError(
                    source, "unsupported", f"line {ln}: instance weights ({{w}} after the values)"
                )
            fields = _arff_split(source, ln, s)
            if len(fields) != width:
                raise TokenizeError(
                    source,
                    "corrupt",
                    f"line {ln}: {len(fields)} values, the header declares {width} attributes",
                )
            label = fields.pop().strip() if labelled else None
            if not header.relational:
                rows = [fields]
            elif fields[0].strip() == "?":  # no series at all: skipped, as a .ts line without values
                rows = None
            else:
                rows = [r.split(",") for r in fields[0].split("\n") if r.strip()]
                bad = next((i for i, r in enumerate(rows) if len(r) != header.steps), None)
                if bad is not None:
                    raise TokenizeError(
                        source,
                        "corrupt",
                        f"line {ln}: channel {bad} has {len(rows[bad])} values, the relational attribute "
                        f"declares {header.steps}",
                    )
                if n_dims is None:
                    n_dims = len(rows)
                elif len(rows) != n_dims:
                    raise TokenizeError(
                        source, "corrupt", f"line {ln}: {len(rows)} dimensions, earlier lines have {n_dims}"
                    )
            x = None
            if rows is not None:
                try:
                    dims = [_to_float32(_parse_float_fields(r)) for r in rows]  # as the .ts reader
                except ValueError:
                    raise TokenizeError(source, "corrupt", f"line {ln}: non-numeric value") from None
                x = np.stack(dims, axis=1)  # (T, C)
                # steps missing in every channel at the end: the padding of a shorter series to the
                # attribute count (unequal-length problems), cut as UCR .tsv's trailing NaNs are
                keep = np.nonzero(np.isfinite(x).any(axis=1))[0]
                x = x[: keep[-1] + 1] if keep.size else x[:0]
            series.append(x)
            labels.append(label)
            lines_of.append(ln)
        empty = np.zeros((0, n_dims or 1), dtype=np.float32)
        return header.class_names, [empty if x is None else x for x in series], labels, lines_of
