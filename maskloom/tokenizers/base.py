"""The tokenizer contract and the tokenizer registry.

A tokenizer turns one raw input (a file, or one sample inside a dataset file) into token records,
and back. It owns all domain knowledge of its modality; nothing else in maskloom knows what a
pixel, a mel bin or an atom is. The contract (DESIGN.md):

    read(source) -> raw             decode a file; bad input raises TokenizeError(source, kind, reason)
    tokenize(raw) -> [Record, ...]  one or more samples, each a sequence of tokens with coordinates
    detokenize(record) -> raw       invert tokenize (up to resampling/cropping)

plus ``spec()``, the table-level facts (token kind/width/dtype, position axes) that every record
it makes satisfies, and optional ``fit(sources)`` for tokenizers that learn from the corpus (a BPE
vocabulary, dataset statistics) with ``save_artifacts``/``load_artifacts`` to keep what they
learned beside the table.

Tokenizers do no Ray, no training and no printing: the pipelines call them.

A new modality is one file: subclass :class:`Tokenizer`, give it a frozen ``Config`` dataclass,
decorate it with ``@register_tokenizer("name")``. Another package can add one without touching
maskloom through the ``maskloom.tokenizers`` entry-point group (value: ``module:Class``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import io
import json
import logging
import lzma
import os
import stat
import tarfile
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import IO, Any, ClassVar, Literal, NamedTuple, Protocol, TypeVar

import numpy as np

from maskloom.registry import Registry

log = logging.getLogger(__name__)

TokenKind = Literal["continuous", "discrete"]
PositionKind = Literal["grid", "continuous", "spectral"]
TOKEN_DTYPES = ("uint8", "float16", "float32", "int32")


class TokenizeError(ValueError):
    """A raw input that cannot be tokenized: names the source, a short error kind and the reason.

    ``kind`` is one of a small vocabulary so that error tables can be summarised:
    ``missing`` (no such file), ``unreadable`` (this user may not read it), ``unsupported``
    (format/extension not handled), ``corrupt`` (decoder failed), ``empty`` (no content:
    zero-length audio, empty text, no nodes),
    ``too_small`` (fewer elements than one token needs), ``invalid`` (content violates the config,
    e.g. all-NaN series), ``config`` (the tokenizer config is wrong for this input), ``crashed``
    (a sample of a tar shard on which decoding killed the process twice: set by the pipeline,
    :class:`SampleGuard`).
    """

    KINDS = ("missing", "unreadable", "unsupported", "corrupt", "empty", "too_small", "invalid", "config",
             "crashed")  # fmt: skip

    def __init__(self, source: str, kind: str, reason: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"TokenizeError kind must be one of {self.KINDS}, got {kind!r}")
        self.source = str(source)
        self.kind = kind
        self.reason = reason
        super().__init__(f"{self.source}: {kind}: {reason}")

    def __reduce__(self):  # picklable across Ray/multiprocessing boundaries
        return (type(self), (self.source, self.kind, self.reason))


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """Table-level facts shared by every record of one tokenizer configuration."""

    modality: str
    """Registered modality (tokenizer) name."""
    token_kind: TokenKind
    """``continuous`` (vectors) or ``discrete`` (integer ids)."""
    token_dim: int
    """Width D of a continuous token (e.g. 16*16*3 = 768); 1 for discrete tokens."""
    token_dtype: str
    """Storage dtype of tokens: uint8 (pixels), float16, float32, or int32 (ids)."""
    position_axes: tuple[str, ...]
    """Names of the P coordinate axes, e.g. ("row", "col") or ("t", "row", "col")."""
    position_kind: PositionKind
    """grid (integer lattice), continuous (e.g. xyz centres), spectral (Laplacian eigenvectors)."""
    vocab_size: int | None = None
    """Number of ids for discrete tokens; None for continuous."""
    token_shape: tuple[int, ...] | None = None
    """Unflattened shape of one token, e.g. (16, 16, 3); informative, for visualisation."""

    def __post_init__(self) -> None:
        if self.token_kind not in ("continuous", "discrete"):
            raise ValueError(f"token_kind must be continuous or discrete, got {self.token_kind!r}")
        if self.position_kind not in ("grid", "continuous", "spectral"):
            raise ValueError(
                f"position_kind must be grid, continuous or spectral, got {self.position_kind!r}"
            )
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")
        if self.token_kind == "discrete" and (self.token_dtype != "int32" or self.token_dim != 1):
            raise ValueError("discrete tokens are stored as int32 with token_dim 1")
        if self.token_kind == "discrete" and not self.vocab_size:
            raise ValueError("discrete tokens need vocab_size")
        if self.token_dim < 1 or not self.position_axes:
            raise ValueError("token_dim must be >= 1 and position_axes non-empty")

    @property
    def position_dim(self) -> int:
        return len(self.position_axes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["position_axes"] = list(self.position_axes)
        d["token_shape"] = list(self.token_shape) if self.token_shape else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TableSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["position_axes"] = tuple(kw["position_axes"])
        if kw.get("token_shape") is not None:
            kw["token_shape"] = tuple(kw["token_shape"])
        return cls(**kw)


@dataclass
class Record:
    """One sample: a sequence of L tokens with coordinates.

    tokens:    (L, D) array of spec.token_dtype for continuous tokens, (L,) int32 for discrete.
    positions: (L, P) float32 coordinates on the modality's axes.
    edges:     (E, 2) int32 token-index pairs (graphs), or None.
    label:     class index, or None.
    meta:      JSON-serialisable dict with what detokenize needs (shape, sample rate, stats ...).
    id:        stable id, unique in a table: "<source>#<sub-index>" by convention.
    finite:    the producer vouches that ``tokens`` and ``positions`` hold no NaN or inf (it checked
               them while writing them, e.g. in a compiled kernel); ``validate_record`` then skips its
               own pass over them (26 us of a 1024-frame audio record's ~30). Never stored; leave it
               False unless that check really ran: the conformance kit tests the claim.
    """

    id: str
    source: str
    tokens: np.ndarray
    positions: np.ndarray
    edges: np.ndarray | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    finite: bool = field(default=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-friendly dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def config_from_dict(cls: type, d: Mapping[str, Any], *, where: str = "config") -> Any:
    """Build config dataclass ``cls`` from a dict, with a clear message for unknown keys or bad values.

    Lists become tuples where the field default is a tuple, so that configs stay hashable.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}"
        )
    kw: dict[str, Any] = {}
    for k, v in d.items():
        default = fields[k].default
        if isinstance(v, list) and (isinstance(default, tuple) or default is dataclasses.MISSING):
            v = tuple(v)
        kw[k] = v
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


class Tokenizer(ABC):
    """Base class of every modality tokenizer. Subclasses set ``name``, ``Config``, ``version``,
    ``extensions`` and implement ``spec``, ``read``, ``tokenize``, ``detokenize``.

    The base never mutates the caller's data, and a tokenizer instance is safe to reuse for many
    inputs (the pipelines build one per worker and call it for every file).
    """

    name: ClassVar[str] = ""
    """Registered modality name; set by @register_tokenizer."""
    Config: ClassVar[type]
    """Frozen, keyword-only config dataclass with a docstring per field."""
    version: ClassVar[str] = "1"
    """Bump when the output of the same config changes (part of a table's fingerprint)."""
    extensions: ClassVar[tuple[str, ...]] = ()
    """Lower-case file extensions (with dot) this tokenizer reads; used to discover inputs."""
    needs_fit: ClassVar[bool] = False
    """True when fit() must run on the corpus before tokenize() (e.g. a BPE vocabulary)."""
    folder_source: ClassVar[str] = ""
    """What a folder that is one source is, for a tokenizer that reads such folders (a TU graph
    dataset): the command suggests ``--as-one-source`` when a walk of one finds no files."""

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, Mapping):
            config = config_from_dict(self.Config, config, where=f"{self.name} tokenizer config")
        elif not isinstance(config, self.Config):
            raise TypeError(
                f"{self.name} tokenizer expects {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # ---- the contract -------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> TableSpec:
        """Table-level facts every record satisfies (may depend on the config and on fit())."""

    @abstractmethod
    def read(self, source: str) -> Any:
        """Decode one input file into the modality's raw form; raise TokenizeError on bad input."""

    @abstractmethod
    def tokenize(self, raw: Any, *, source: str = "") -> list[Record]:
        """Turn a raw input into records (one or more samples). ``source`` names the input in ids
        and in errors. Must be deterministic for a given config and raw input."""

    @abstractmethod
    def detokenize(self, record: Record) -> Any:
        """Invert tokenize for one record, back to the raw form (up to resampling/cropping)."""

    # ---- optional -----------------------------------------------------------------------------
    def fit(self, sources: Iterable[str]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Learn corpus-level state (vocabulary, statistics) from ``sources`` before tokenizing."""

    def save_artifacts(self, directory: str) -> list[str]:
        """Write what fit() learned under ``directory``; return the file names written."""
        return []

    def load_artifacts(self, directory: str) -> None:  # noqa: B027
        """Restore what save_artifacts() wrote (so a later table can reuse a vocabulary)."""

    def label_names(self) -> tuple[str, ...] | None:
        """Class names when the dataset files themselves carry labels (e.g. TU graphs); else None."""
        return None

    def companion_files(self, source: str) -> tuple[str, ...]:
        """Paths of the side files that ``read(source)`` may open besides ``source`` (every name it
        would try, whether or not it exists), e.g. the node-features file of a graph edge list. A
        folder walk or glob (``sources.find_inputs(..., companions=tok.companion_files)``) does not
        take a file that is a companion of another input as an input of its own. Default: none."""
        return ()

    def split_input(self, source: str) -> list[str] | None:
        """Parts of ``source`` that workers may tokenize apart, or None to read it whole (the default).

        A big file that is one input runs on one worker whatever the cluster: a text corpus shipped as
        one 5 GB Parquet file. A tokenizer that can read a file in parts returns their names,
        ``make_part(source, a, b, n)`` each (units ``a`` to ``b`` of the file's ``n``, in the
        tokenizer's own units: row groups for Parquet), and reads such a name as that part alone;
        every part then is an input of its own (a shard, an error row) while its records keep the
        ids and ``source`` of the whole file, so that the table holds the same records either way.
        The driver calls it on every input when it plans a job: it must be cheap for a file it
        does not split (no reading)."""
        return None

    def render(self, raw: Any, path: str) -> None:
        """Draw a raw sample to a PNG at ``path`` (used by ``maskloom inspect --render``)."""
        raise NotImplementedError(f"{self.name} tokenizer cannot render samples")

    # ---- helpers ------------------------------------------------------------------------------
    def __call__(self, source: str) -> list[Record]:
        """read + tokenize one file."""
        return self.tokenize(self.read(source), source=source)

    def iter_records(self, source: str) -> Iterator[Record]:
        """read + tokenize one file as a stream: the records :meth:`__call__` returns, in the same
        order, without holding them all at once. Default: ``iter(self(source))``.

        The preprocessing pipeline reads every input through this. A tokenizer whose inputs can be
        too big for their records to fit in memory (a multi-gigabyte JSONL shard of a text corpus:
        its records take ~20x its bytes as Python objects) yields them while it reads. It may raise
        :class:`TokenizeError` after it has yielded records (a file found to be mostly unusable at
        its end, a truncated compressed stream): the input is then an error row and none of its
        records is kept (the pipeline writes its shard again without them)."""
        return iter(self(source))

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def fingerprint(self) -> str:
        """Hash of tokenizer name, version and config: tables built with another value don't mix."""
        blob = json.dumps(
            {"name": self.name, "version": self.version, "config": self.config_dict()}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @staticmethod
    def check_file(source: str, *, pipes: bool = False) -> None:
        """Raise TokenizeError(missing/unsupported/unreadable/empty) for a path that does not exist,
        that is neither a file nor a folder (:func:`special_file`: a named pipe would block the read
        for ever), that this user may not read (a file owned by someone else on shared storage: not
        "corrupt", which the decoder's failure would say), or that has no bytes. ``pipes``: a named
        pipe is let through, for a reader that takes its input as a stream and never seeks (a tar
        archive, :func:`iter_tar_items`: a process may be writing one into the pipe). The
        preprocessing pipeline rejects pipes itself: it must be able to read an input again."""
        try:
            st = os.stat(source)  # one stat for all the checks below (symbolic links followed)
        except (OSError, ValueError):
            raise TokenizeError(source, "missing", "no such file or directory") from None
        if (what := _special_kind(st.st_mode)) and not (pipes and what == PIPE):
            raise TokenizeError(source, "unsupported", f"not a regular file: {what}")
        if not os.access(source, os.R_OK):
            raise TokenizeError(source, "unreadable", "permission denied: this user may not read it")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise TokenizeError(source, "empty", "file is empty (0 bytes)")


PIPE = "a named pipe"
""":func:`special_file`'s name for a named pipe (FIFO)."""
_SPECIAL_FILES = (
    (stat.S_ISFIFO, PIPE),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_file(path: str) -> str | None:
    """What ``path`` (symbolic links followed) is when it is neither a regular file nor a folder ("a
    named pipe", "a character device", "a block device", "a socket"), else None (a file, a folder, or
    nothing there). Reading one can block for ever (a pipe that no process writes to: a ``*.wav``
    left by a crashed recorder) or never end (a link to ``/dev/zero``); an input that is one is an
    error row (``unsupported``), not a hung job."""
    try:
        return _special_kind(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def _special_kind(mode: int) -> str | None:
    """:func:`special_file` of a file's ``st_mode``."""
    return next((what for test, what in _SPECIAL_FILES if test(mode)), None)


PART_SEPARATOR = "#part:"
"""Between a file's path and the units of it an input covers: ``train.parquet#part:8:16/40`` is row
groups 8 to 15 of the file's 40 (:meth:`Tokenizer.split_input`)."""


def make_part(source: str, a: int, b: int, n: int) -> str:
    """The name of the input that covers units ``a`` (included) to ``b`` (excluded) of the ``n`` of
    file ``source``: ``source#part:a:b/n``."""
    if not 0 <= a < b <= n:
        raise ValueError(f"a part needs 0 <= a < b <= n, got {a}, {b}, {n}")
    return f"{source}{PART_SEPARATOR}{a}:{b}/{n}"


def split_part(source: str) -> tuple[str, tuple[int, int, int] | None]:
    """(the file's path, (a, b, n)) of an input made by :func:`make_part`; (``source``, None) for any
    other (a whole file, or a name that merely contains the separator)."""
    path, sep, spec = source.rpartition(PART_SEPARATOR)
    if not sep:
        return source, None
    try:
        span, n = spec.split("/")
        a, b = span.split(":")
        part = int(a), int(b), int(n)
    except ValueError:
        return source, None
    return (
        (path, part)
        if 0 <= part[0] < part[1] <= part[2] and make_part(path, *part) == source
        else (source, None)
    )


def utf8_text(s: str) -> str:
    """``s`` itself when it is valid Unicode text; else with its undecodable bytes written as ``\\xNN``.

    File names on Linux are bytes, and Python carries bytes that are not UTF-8 as lone surrogates
    (``'caf\\udce9.wav'`` for Latin-1 ``café.wav``). Arrow strings, and so a token table's ``id`` and
    ``source`` columns, must be UTF-8: such a name is stored as ``'caf\\xe9.wav'``."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = s.encode("utf-8", "surrogateescape")  # the file name's own bytes
    except UnicodeEncodeError:  # a surrogate no file name decodes to (from JSON, say)
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def ffmpeg_reason(e: BaseException) -> str:
    """A PyAV (FFmpeg) error's reason without FFmpeg's copy of the path, which may be the temporary
    link :func:`utf8_path` made rather than the input."""
    return getattr(e, "strerror", None) or str(e)


def utf8_path(source: str) -> contextlib.AbstractContextManager[str]:
    """A path to ``source`` that C libraries taking UTF-8 paths can open (libsndfile, FFmpeg).

    ``source`` itself, unless its name holds bytes that are not UTF-8 (see :func:`utf8_text`): then,
    while the ``with`` block runs, a symlink to it in a new temporary directory, named ``input``
    plus its extension (which such libraries use to pick a format)::

        with utf8_path(source) as path:
            data, rate = soundfile.read(path)

    The common case is a ``nullcontext`` (0.5 instead of 1.1 us a file: it runs for every clip)."""
    if utf8_text(source) is source:
        return contextlib.nullcontext(source)
    return _utf8_link(source)


def path_or_file(file: str | IO[bytes]) -> contextlib.AbstractContextManager[Any]:
    """For decoders that take a path or a file object (a tar member's ``io.BytesIO``): a path as
    :func:`utf8_path` gives it, a file object as it is."""
    return utf8_path(file) if isinstance(file, str) else contextlib.nullcontext(file)


def rewound(file: Any) -> Any:
    """``file`` ready to be opened: a (seekable) file object back at its start (decoders read a file
    object from where it is, and some open it more than once: a header look, then the decode); a
    path as it is."""
    if not isinstance(file, (str, os.PathLike)):
        file.seek(0)
    return file


@contextlib.contextmanager
def _utf8_link(source: str) -> Iterator[str]:
    ext = os.path.splitext(source)[1]
    ext = ext if utf8_text(ext) is ext else ""
    with tempfile.TemporaryDirectory(prefix="maskloom-path-") as d:
        link = os.path.join(d, "input" + ext)
        os.symlink(os.path.abspath(source), link)
        yield link


# ---------------------------------------------------------------------------------------------
# WebDataset-style tar shards
# ---------------------------------------------------------------------------------------------
TAR_EXTENSIONS: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
"""Names of tar shards (matched at the end of the lower-case path: ``x.tar.gz`` is a tar, not a gz)."""

TAR_MEMBER_MAX_BYTES = 1 << 30
"""A tar member larger than this (1 GiB) is not read into memory (:attr:`TarSample.too_large`)."""


def is_tar_path(source: str) -> bool:
    """True when ``source`` is named as a tar shard (one of :data:`TAR_EXTENSIONS`)."""
    return os.fspath(source).lower().endswith(TAR_EXTENSIONS)


class TarSample(NamedTuple):
    """One sample of a WebDataset-style tar: the consecutive members that share a key.

    The key of member ``n01440764/abc.JPEG`` is ``n01440764/abc`` (its path up to the first ``.`` of
    its base name, directories included, a leading ``./`` dropped) and its extension ``jpeg`` (the rest,
    lower case: ``abc.seg.png`` has extension ``seg.png``; a base name without a dot, extension ``""``)."""

    key: str
    members: dict[str, bytes]
    """extension -> content of each member read."""
    names: dict[str, str]
    """extension -> the member's name as stored in the tar (every member, read or too large)."""
    too_large: dict[str, int]
    """extension -> size in bytes of each member larger than the bound, skipped unread."""


class _TarFile(tarfile.TarFile):
    """A TarFile that remembers why its last header could not be read (see :class:`_TarInfo`)."""

    stop: str | None = None


class _TarInfo(tarfile.TarInfo):
    """tarfile takes an archive that ends, or holds garbage, where a member's header should be for a
    complete one (only an all-zero block, the end-of-archive marker, is a proper end): this records
    such a header's problem on the :class:`_TarFile`, which raises it at the end."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            if isinstance(tarfile_, _TarFile):
                where = "ends" if isinstance(e, tarfile.EmptyHeaderError) else "ends inside a header"
                tarfile_.stop = (
                    f"the archive {where} at byte {tarfile_.offset:,} without its end-of-archive marker"
                )
            raise
        except tarfile.InvalidHeaderError as e:
            if isinstance(tarfile_, _TarFile):
                tarfile_.stop = f"invalid member header at byte {tarfile_.offset:,} ({e})"
            raise


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
"""What reading a damaged or truncated (possibly compressed) tar stream raises."""


def _tar_error_text(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__
    return f"{text}: {cause}" if cause is not None and str(cause) else text


def _tar_junk(name: str) -> bool:
    """A hidden file or folder (``.DS_Store``, macOS's ``._x`` resource forks) or under ``__MACOSX/``."""
    return any((p.startswith(".") and p not in (".", "..")) or p == "__MACOSX" for p in name.split("/"))


def iter_tar_samples(source: str, *, max_member_bytes: int | None = None) -> Iterator[TarSample]:
    """The samples of a WebDataset-style tar shard (``.tar``, ``.tar.gz``, ``.tgz``), in archive order.

    A sample is a run of consecutive members with the same key (see :class:`TarSample`); a member
    whose extension the current sample already has starts a new sample with the same key, so keys
    can repeat (a name stored twice, or a sample whose members are not consecutive): a consumer that
    makes ids of keys must check. Only regular files are members: directories, links and devices are
    skipped, and so are hidden files and folders (``.DS_Store``, ``._x``) and ``__MACOSX/``.

    The archive is read as a stream (``tarfile`` mode ``r|*``: gzip, bzip2 and xz detected from the
    bytes, never a seek, no listing of the archive first) and one sample is held at a time (the
    headers read are dropped: a stream's ``TarFile`` would keep them all); a member
    larger than ``max_member_bytes`` (default :data:`TAR_MEMBER_MAX_BYTES`) is skipped unread and
    listed in :attr:`TarSample.too_large`.

    Raises TokenizeError: ``missing`` / ``unreadable`` / ``empty`` (no bytes) as
    :meth:`Tokenizer.check_file`, ``corrupt`` "not a tar archive (...)" when the first header cannot
    be read, and ``corrupt`` "truncated or damaged tar archive: ... (after N samples)" when the
    archive (or its compressed stream) breaks later, after the samples before were yielded. An
    archive that ends where a header should be, without the end-of-archive marker, is such a
    truncated one.
    """
    source = os.fspath(source)
    Tokenizer.check_file(source, pipes=True)  # read as a stream: a pipe that a process writes to works
    if os.path.isdir(source):
        raise TokenizeError(source, "unsupported", "is a directory, not a tar archive")
    limit = TAR_MEMBER_MAX_BYTES if max_member_bytes is None else int(max_member_bytes)
    try:
        tf = _TarFile.open(source, mode="r|*", tarinfo=_TarInfo)
    except _TAR_ERRORS as e:
        raise TokenizeError(source, "corrupt", f"not a tar archive ({_tar_error_text(e)})") from None
    done = 0  # samples yielded
    with tf:
        try:
            sample: TarSample | None = None
            while (info := tf.next()) is not None:
                tf.members.clear()  # a stream's TarFile keeps every header it read: not here
                name = info.name
                while name.startswith("./"):
                    name = name[2:]
                name = name.lstrip("/")
                if not info.isreg() or not name or name.endswith("/") or _tar_junk(name):
                    continue  # (a regular file named "x/" is an old-style folder)
                base = name.rsplit("/", 1)[-1]
                dot = base.find(".")
                key, ext = (
                    (name, "") if dot < 0 else (name[: len(name) - len(base) + dot], base[dot + 1 :].lower())
                )
                if sample is not None and (key != sample.key or ext in sample.names):
                    yield sample
                    done += 1
                    sample = None
                if sample is None:
                    sample = TarSample(key, {}, {}, {})
                sample.names[ext] = info.name
                if info.size > limit:
                    sample.too_large[ext] = info.size  # next() reads past it, a block at a time
                else:
                    sample.members[ext] = tf.extractfile(info).read()
            if tf.stop is not None:
                raise tarfile.ReadError(tf.stop)
            if sample is not None:
                yield sample
        except _TAR_ERRORS as e:
            after = f"after {done:,} sample{'' if done == 1 else 's'}"
            raise TokenizeError(
                source, "corrupt", f"truncated or damaged tar archive: {_tar_error_text(e)} ({after})"
            ) from None


_Item = TypeVar("_Item")


class SampleGuard(Protocol):
    """What the pipeline keeps about the samples of one input that holds many (a tar shard), so that
    a decoder that kills its process (a segfault in C, the OOM killer) costs one sample, not the
    whole input (the pipeline's implementation keeps the position in its
    :class:`~maskloom.pipelines.preprocess.ShardAttempts` and
    :class:`~maskloom.pipelines.preprocess.InputWatchdog`).

    ``at(k)``: the process is now on sample ``k`` of the input (-1: on none), kept where the next try
    of the shard can read it if the process dies or hangs. ``skip``: {sample: (kind, reason)} of the
    samples not to read again (processes died on them, or they made no progress), each skipped as a
    sample that does not decode is."""

    skip: Mapping[int, tuple[str, str]]

    def at(self, sample: int) -> None: ...


_SAMPLE_GUARD: contextvars.ContextVar[SampleGuard | None] = contextvars.ContextVar("maskloom_sample_guard",
                                                                                 default=None)  # fmt: skip


@contextlib.contextmanager
def _context(var: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``var`` is ``value`` inside this block (in this thread or task), what it was after."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def guarded_samples(guard: SampleGuard | None) -> contextlib.AbstractContextManager[None]:
    """Tar readers (:func:`iter_tar_items`, :func:`tokenize_tar`) tell ``guard`` which sample they are
    on, and skip its ``skip`` samples, inside this block (in this thread or task)."""
    return _context(_SAMPLE_GUARD, guard)


def _enter_sample(source: str, index: int) -> None:
    """Sample ``index`` of ``source`` is next: TokenizeError with the guard's kind and reason when it is
    one of its ``skip`` samples (:class:`SampleGuard`), else it is the guard's position from now."""
    guard = _SAMPLE_GUARD.get()
    if guard is None:
        return
    bad = guard.skip.get(index)
    if bad is not None:
        raise TokenizeError(source, *bad)
    guard.at(index)


def _leave_samples() -> None:
    guard = _SAMPLE_GUARD.get()
    if guard is not None:
        guard.at(-1)


class SkipReport(NamedTuple):
    """Parts of one input that a tokenizer skipped while the input itself was written: samples of a
    tar shard, lines of a JSON Lines file, series of a time-series file. The input is accounted for
    (written), but these parts are not; the pipeline counts them in the summary line and the
    manifest (:func:`reporting_skips`)."""

    source: str
    what: str
    """What was skipped, plural: ``"samples"``, ``"lines"``, ``"series"``, ``"empty documents"``."""
    skipped: int
    total: int
    """How many such parts the input has, the skipped ones included."""
    example: str
    """The first one skipped and why (e.g. ``s2 (corrupt: not a PNG)``)."""


_SKIP_SINK: contextvars.ContextVar[Callable[[SkipReport], None] | None] = contextvars.ContextVar(
    "maskloom_skip_sink", default=None
)


def reporting_skips(sink: Callable[[SkipReport], None] | None) -> contextlib.AbstractContextManager[None]:
    """Inside this block (in this thread or task) tokenizers hand ``sink`` a :class:`SkipReport` for each
    input of which they skipped parts (:func:`report_skipped`), besides their warning."""
    return _context(_SKIP_SINK, sink)


def report_skipped(source: str, what: str, skipped: int, total: int, example: str) -> None:
    """Tell the pipeline (if it listens: :func:`reporting_skips`) that ``skipped`` of the ``total``
    ``what`` of ``source`` were skipped, the first as ``example``. Call it once per input, when the
    input is done and its own checks have passed (a tokenizer's warning names the same parts)."""
    sink = _SKIP_SINK.get()
    if sink is not None and skipped:
        sink(SkipReport(source, what, int(skipped), int(total), example))


class TarSkips:
    """The samples of one tar shard found unusable so far, and where the usable ones are: the
    counts behind :func:`iter_tar_items`' policy, kept across its stages (decoding a sample, then
    tokenizing it) so that one tar gives the same records, warning and error whichever way it is
    read: streamed (:func:`iter_tar_records`) or read whole then tokenized (:func:`read_tar`,
    :func:`tokenize_tar`)."""

    def __init__(self) -> None:
        self.good = self.bad = 0
        self.first: list[tuple[int, str, str, str]] = []
        """(index in the tar, key, kind, reason) of the first three unusable samples, in tar order."""
        self.indices: list[int] = []
        """Index in the tar of each sample found usable, in order."""

    def copy(self) -> TarSkips:
        out = TarSkips()
        out.good, out.bad, out.first, out.indices = self.good, self.bad, list(self.first), list(self.indices)
        return out

    def usable(self, index: int) -> None:
        self.good += 1
        self.indices.append(index)

    def skip(self, index: int, key: str, e: TokenizeError) -> None:
        self.bad += 1
        self.first.append((index, key, e.kind, e.reason))
        self.first.sort()
        del self.first[3:]

    def demote(self, position: int, key: str, e: TokenizeError) -> None:
        """The ``position``-th usable sample turned out unusable (it did not tokenize)."""
        self.good -= 1
        self.skip(self.indices[position], key, e)

    def check(self, source: str) -> None:
        """TokenizeError when the tar held no sample (``empty``), or when its unusable samples are at
        least as many as the usable ones: the tar, not a few samples, is at fault (the first one's
        kind, its reason ending "(N of M samples are unusable)")."""
        if not self.good + self.bad:
            raise TokenizeError(source, "empty", "the tar archive holds no samples")
        if self.bad and self.bad >= self.good:
            _, key, kind, reason = self.first[0]
            total = self.good + self.bad
            raise TokenizeError(
                source, kind, f"sample {key}: {reason} ({self.bad} of {total} samples are unusable)"
            )

    def finish(self, source: str, logger: logging.Logger | None = None) -> None:
        """:meth:`check`, then one warning counting the samples skipped and naming the first three."""
        self.check(source)
        if self.bad:
            (logger or log).warning("%s: skipped %d of %d samples: %s%s", source, self.bad, self.good + self.bad,
                                    "; ".join(f"{k} ({kd}: {r})" for _, k, kd, r in self.first),
                                    f"; ... ({self.bad - 3} more)" if self.bad > 3 else "")  # fmt: skip
            _, key, kind, reason = self.first[0]
            report_skipped(source, "samples", self.bad, self.good + self.bad, f"{key} ({kind}: {reason})")


def iter_tar_items(
    source: str,
    make: Callable[[TarSample], _Item],
    *,
    max_member_bytes: int | None = None,
    logger: logging.Logger | None = None,
    skips: TarSkips | None = None,
) -> Iterator[_Item]:
    """``make(sample)`` of each usable sample of tar shard ``source`` (:func:`iter_tar_samples`), as
    they are read: the policy every modality that reads WebDataset shards shares.

    A sample is not usable when its key was seen before in the tar (``invalid``: ids are made of keys
    and must be unique), when a member is larger than ``max_member_bytes`` (default
    :data:`TAR_MEMBER_MAX_BYTES`; ``invalid``, not read), or when ``make`` raises TokenizeError (its
    kind and reason: no member of the modality, a member that does not decode, a bad ``cls``, a
    cloud too small to tokenize). Such a sample is skipped, and one warning on ``logger`` (default
    base's) at the end of the tar counts them and names the first three. When they are at least as
    many as the usable ones, the tar is the error: the first one's kind, its reason ending "(N of M
    samples are unusable)", raised at the end (:meth:`TarSkips.finish`). A tar with no sample is
    ``empty``; the errors of :func:`iter_tar_samples` pass through. With ``skips`` the counts go there
    and the caller finishes them (nothing is warned or raised at the end here)."""
    limit = TAR_MEMBER_MAX_BYTES if max_member_bytes is None else int(max_member_bytes)
    own = skips is None
    skips = TarSkips() if skips is None else skips
    seen: set[str] = set()
    for index, sample in enumerate(iter_tar_samples(source, max_member_bytes=limit)):
        try:
            if sample.key in seen:
                raise TokenizeError(source, "invalid", "its key was seen before in the tar (a member name stored "
                                    "twice, or members of one sample not consecutive): ids must be unique")  # fmt: skip
            seen.add(sample.key)
            _enter_sample(source, index)  # before its members are decoded (a crash there is the sample's)
            if sample.too_large:
                ext, size = next(iter(sample.too_large.items()))
                raise TokenizeError(source, "invalid", f"member {sample.names[ext]} has {size:,} bytes, more "
                                    f"than the {limit:,} a tar member may have: not read")  # fmt: skip
            item = make(sample)
        except TokenizeError as e:
            skips.skip(index, sample.key, e)
            continue
        skips.usable(index)
        yield item
    _leave_samples()
    if own:
        skips.finish(source, logger)


def tar_member(sample: TarSample, extensions: Iterable[str]) -> str | None:
    """The first of ``extensions`` (lower case, without the dot, in their order) that ``sample`` has
    as a whole member extension (``png`` is not ``seg.png``), or None."""
    return next((e for e in extensions if e in sample.members), None)


def cls_label(data: bytes, name: str) -> int | None:
    """The class index a WebDataset ``.cls`` member holds (ASCII digits, whitespace around allowed);
    None for a negative one (unlabelled). TokenizeError(invalid) when it holds no integer."""
    try:
        value = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        shown = data[:40] + (b"..." if len(data) > 40 else b"")
        raise TokenizeError(
            name, "invalid", f"cls member {name} holds {shown!r}, not an integer class index"
        ) from None
    if value >= 2**63:
        raise TokenizeError(name, "invalid", f"cls member {name} holds {value}, beyond a 64-bit class index")
    return value if value >= 0 else None


def decode_tar_items(
    source: str,
    extensions: Iterable[str],
    what: str,
    decode: Callable[[Any, str, str], Any],
    make: Callable[[str, Any, int | None, str], _Item],
    *,
    max_member_bytes: int | None = None,
    logger: logging.Logger | None = None,
    skips: TarSkips | None = None,
) -> Iterator[_Item]:
    """The usable samples of tar shard ``source`` under :func:`iter_tar_items`' policy, each
    ``make(key, decoded, label, member name)``: its member of the first of ``extensions`` it has
    (:func:`tar_member`), ``decode(file, name, ext)`` from memory (``io.BytesIO``; ``name`` is
    ``<tar>#<member>``, ``ext`` with its dot), its ``cls`` label (:func:`tar_label`, checked before
    decoding). A sample without such a member is TokenizeError(unsupported) "no ``what`` member".
    ``skips``: as :func:`iter_tar_items`'."""

    def item(sample: TarSample) -> _Item:
        ext = tar_member(sample, extensions)
        if ext is None:
            raise TokenizeError(
                source, "unsupported", f"no {what} member ({', '.join(sample.names.values())})"
            )
        label = tar_label(sample)
        name = sample.names[ext]
        return make(
            sample.key, decode(io.BytesIO(sample.members[ext]), f"{source}#{name}", "." + ext), label, name
        )

    return iter_tar_items(source, item, max_member_bytes=max_member_bytes, logger=logger, skips=skips)


class TarItems(list):
    """A tar shard's usable samples, decoded, as a tokenizer's ``read`` returns them (each modality
    subclasses it: ``TarImages``, ``TarAudios``, ...), with the samples skipped while reading them
    (``skips``), which tokenizing the list counts on (:func:`tokenize_tar`)."""

    skips: TarSkips | None = None


_Items = TypeVar("_Items", bound=TarItems)


def read_tar(
    kind: type[_Items],
    source: str,
    extensions: Iterable[str],
    what: str,
    decode: Callable[[Any, str, str], Any],
    make: Callable[[str, Any, int | None, str], Any],
    *,
    max_member_bytes: int | None = None,
) -> _Items:
    """``kind`` (a :class:`TarItems` class) of the usable samples of tar shard ``source``, decoded as
    :func:`decode_tar_items` does. Raises as :meth:`TarSkips.check` when the tar is empty or mostly
    undecodable; otherwise warns of nothing yet: :func:`tokenize_tar` does, once it knows which
    samples tokenize too."""
    skips = TarSkips()
    items = kind(decode_tar_items(source, extensions, what, decode, make, max_member_bytes=max_member_bytes,
                                  skips=skips))  # fmt: skip
    skips.check(source)
    items.skips = skips
    return items


def tokenize_tar(
    source: str, items: TarItems, records: Callable[[Any], list[Any]], logger: logging.Logger | None = None
) -> list[Any]:
    """The records of a tar shard read whole (:func:`read_tar`): ``records(item)`` of each sample
    (each has a ``key``); a sample whose records raise TokenizeError is skipped under the tar's policy,
    counted with the samples skipped while reading (:meth:`TarSkips.finish`: one warning, or the tar's
    error when most are unusable), exactly as :func:`iter_tar_records` streams the same tar."""
    if items.skips is None:  # a list made by hand: every item usable, in order
        skips = TarSkips()
        for index in range(len(items)):
            skips.usable(index)
    else:
        skips = items.skips.copy()
    out: list[Any] = []
    for position, item in enumerate(items):
        try:
            _enter_sample(source, skips.indices[position])
            out.extend(records(item))
        except TokenizeError as e:
            skips.demote(position, item.key, e)
    _leave_samples()
    skips.finish(source, logger)
    return out


def iter_tar_records(
    source: str,
    extensions: Iterable[str],
    what: str,
    decode: Callable[[Any, str, str], Any],
    make: Callable[[str, Any, int | None, str], Any],
    records: Callable[[Any], list[Any]],
    *,
    max_member_bytes: int | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[Any]:
    """The records of tar shard ``source`` as it is read, one sample at a time: ``records(make(...))``
    of each usable sample (:func:`decode_tar_items`); a sample that does not decode *or* does not
    tokenize is skipped under the tar's policy (:func:`iter_tar_items`)."""
    for recs in decode_tar_items(source, extensions, what, decode, lambda *a: records(make(*a)),
                                 max_member_bytes=max_member_bytes, logger=logger):  # fmt: skip
        yield from recs


def tar_label(sample: TarSample) -> int | None:
    """The label of a tar sample: its ``cls`` member's class index (:func:`cls_label`), or None."""
    return cls_label(sample.members["cls"], sample.names["cls"]) if "cls" in sample.members else None


# ---------------------------------------------------------------------------------------------
# compressed streams (.gz, .bz2, .xz, .zst, .lz4)
# ---------------------------------------------------------------------------------------------
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".lz4": "lz4"}
"""Compressed-stream suffixes by codec (xz is read by ``lzma``, the others by pyarrow)."""

STREAM_BLOCK_BYTES = 1 << 16
"""Bytes of a (decompressed) stream that :func:`iter_stream_blocks` reads per step: a read that meets
a damaged or truncated part loses what it decompressed, so small reads place the error closely (and
cost nothing measurable: 2.6 MB of gzip'd CSV in 5.6 ms, 5.8 ms a MiB at a time)."""

STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, lzma.LZMAError)
"""What reading a damaged or truncated compressed stream raises (pyarrow: OSError, ArrowInvalid)."""


def split_compression(source: str) -> tuple[str, str | None]:
    """(``source`` without its compression suffix, the codec): ``("a/x.csv", "gzip")`` for
    ``a/x.csv.gz`` (suffixes of :data:`COMPRESSIONS`, any case); ``(source, None)`` for any other name.
    The caller decides which inner formats it reads compressed."""
    root, ext = os.path.splitext(source)
    codec = COMPRESSIONS.get(ext.lower())
    return (root, codec) if codec is not None else (source, None)


@contextlib.contextmanager
def open_compressed(source: str, codec: str | None) -> Iterator[Any]:
    """``source`` opened for reading bytes, decompressed as it is read when ``codec`` (a
    :data:`COMPRESSIONS` value) is set: concatenated gzip members and zstd frames are one stream.
    A file that cannot be opened is TokenizeError(missing); read it with :func:`read_stream_block`."""
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below, or by the stream that wraps it
    except OSError as e:
        raise TokenizeError(source, "missing", f"cannot open ({e.strerror})") from None
    with f:
        if codec is None:
            yield f
        elif codec == "xz":
            with lzma.open(f) as stream:
                yield stream
        else:
            import pyarrow as pa

            with pa.input_stream(f, compression=codec) as stream:  # a file object: any file name works
                yield stream


def stream_error(source: str, codec: str | None, offset: int, error: BaseException) -> TokenizeError:
    """The TokenizeError for a read of ``source`` that raised ``error`` after ``offset`` bytes
    (decompressed) were read: ``corrupt`` "damaged or truncated gzip stream after 1,234 bytes of text
    (...)", or "not a readable gzip stream (...)" when nothing could be read; for a file that is not
    compressed (``codec`` None) ``unreadable`` "read failed at byte N (...)"."""
    if codec is None:
        return TokenizeError(source, "unreadable", f"read failed at byte {offset:,} ({error})")
    where = (
        f"damaged or truncated {codec} stream after {offset:,} bytes of text"
        if offset
        else f"not a readable {codec} stream"
    )
    return TokenizeError(source, "corrupt", f"{where} ({error})")


def read_stream_block(f: Any, source: str, codec: str | None, offset: int, size: int) -> bytes:
    """The next ``size`` bytes of stream ``f`` (:func:`open_compressed`; b"" at its end); a damaged or
    truncated stream raises :func:`stream_error` (``offset``: the bytes read before this block)."""
    try:
        return f.read(size)
    except STREAM_ERRORS as e:
        raise stream_error(source, codec, offset, e) from None


def iter_stream_blocks(source: str, codec: str | None, size: int = STREAM_BLOCK_BYTES) -> Iterator[bytes]:
    """The (decompressed) bytes of ``source``, ``size`` at a time (never an empty block); the errors
    of :func:`open_compressed` and :func:`read_stream_block`."""
    with open_compressed(source, codec) as f:
        offset = 0
        while block := read_stream_block(f, source, codec, offset, size):
            offset += len(block)
            yield block


def read_compressed(source: str, codec: str | None) -> bytes:
    """All the (decompressed) bytes of ``source``: :func:`iter_stream_blocks` joined."""
    return b"".join(iter_stream_blocks(source, codec))


BUILTIN_MODALITIES = ("image", "video", "audio", "point_cloud", "graph", "time_series", "text")
"""The modalities maskloom ships; each is the module ``maskloom.tokenizers.<name>``, imported on first use."""


def _load_entry_points(reg: Registry[type[Tokenizer]]) -> None:
    """Register the tokenizers other packages declare in the ``maskloom.tokenizers`` entry-point group."""
    for ep in metadata.entry_points(group="maskloom.tokenizers"):
        if ep.name in reg._items or ep.name in BUILTIN_MODALITIES:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not break the built-ins
            log.warning("could not load tokenizer plug-in %r (%s): %s", ep.name, ep.value, e)
            continue
        try:
            _register(reg, ep.name, cls)
        except (TypeError, KeyError) as e:
            log.warning("tokenizer plug-in %r (%s) is not usable: %s", ep.name, ep.value, e)


TOKENIZERS: Registry[type[Tokenizer]] = Registry(
    "tokenizer", loader=_load_entry_points, lazy={m: f"maskloom.tokenizers.{m}" for m in BUILTIN_MODALITIES}
)


def _register(reg: Registry[type[Tokenizer]], name: str, cls: type[Tokenizer]) -> type[Tokenizer]:
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise TypeError(f"@register_tokenizer({name!r}) needs a Tokenizer subclass, got {cls!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"tokenizer {name!r} must define a dataclass Config")
    reg.add(name, cls)
    cls.name = name
    return cls


def register_tokenizer(name: str):
    """Class decorator: register a Tokenizer subclass under modality ``name`` (duplicates refused)."""
    return lambda cls: _register(TOKENIZERS, name, cls)


def get_tokenizer(name: str, config: Any = None) -> Tokenizer:
    """Instantiate the tokenizer registered as ``name`` with ``config`` (dataclass, dict or None)."""
    return TOKENIZERS.get(name)(config)
