"""The token-table schema: one module, one comment per column; writing, reading, validating.

A token table is a directory (DESIGN.md):

    part-00000.parquet ...   shards (zstd), named deterministically from the shard index
    _manifest.json           schema version, modality, tokenizer name + config + version, config
                             fingerprint, per-shard {name, rows, bytes, sha256, inputs}, totals
                             {inputs, rows, errors}. Readers trust the manifest, never a glob.
    _errors.parquet          one row per rejected input: source, kind, message
    artifacts/               tokenizer artifacts (a BPE vocabulary, dataset statistics)

Every shard carries the table-level facts in its Parquet schema metadata under key ``maskloom``.

Storage (schema version 2; a deviation from DESIGN.md's *on-disk* types, not its logical schema):
every ``fixed_size_list<T, k>`` vector inside a list column (tokens, positions, edges) is written to
Parquet as ``fixed_size_binary(k * sizeof(T))`` holding the same bytes (little-endian, C order).
Parquet has no fixed-size-list type: it stores ``fixed_size_list`` as a nested list with a
repetition and a definition level for *every scalar*, so an image token of 768 bytes cost 768 pairs
of levels. For a 256-sample shard on one thread, writing took 0.43 s vs 0.068 s (CIFAR images at
224 px) and 0.27 s vs 0.021 s (FSDD audio), reading 7x longer, at the same zstd size. Every reader
here (:meth:`TokenTable.read`, :func:`read_shard`, the loader, ``inspect``) converts back without
copying (:func:`from_storage`), so Arrow tables handed to users have the logical types of
:func:`arrow_schema`. Other Parquet readers see the
binary column; ``token_dtype``/``token_dim`` in the ``maskloom`` metadata say how to view it
(numpy: ``np.frombuffer(b, dtype).reshape(-1, token_dim)``). Version-1 tables (nested-list storage)
read unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskloom._paths import url_note
from maskloom.tokenizers.base import TOKENIZERS, Record, TableSpec, utf8_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Schema versions this maskloom reads: 1 stored vectors as nested lists, 2 as fixed-size binary."""
META_KEY = b"maskloom"
MANIFEST = "_manifest.json"
ERRORS = "_errors.parquet"
ARTIFACTS = "artifacts"
COMMITS = "_commits"
"""Folder of a preprocessing job's commit records while it runs (removed once the manifest is written)."""
RUN_STATE = "_run.json"
"""The job's plan in :data:`COMMITS` ({fingerprint, inputs_digest, modality, shards, inputs, shard_size, ...})."""

_ARROW_DTYPES = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32(), "int32": pa.int32()}


class TableError(ValueError):
    """A token table (or the records for one) that breaks the schema; the message says where and why."""


def shard_name(index: int) -> str:
    """Deterministic shard file name for shard ``index``."""
    return f"part-{index:05d}.parquet"


def arrow_schema(spec: TableSpec, meta: dict[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of a table of ``spec``; ``meta`` goes in the schema metadata under ``maskloom``."""
    if spec.token_kind == "discrete":
        token_type = pa.large_list(pa.int32())
    else:
        token_type = pa.large_list(pa.list_(_ARROW_DTYPES[spec.token_dtype], spec.token_dim))
    fields = [
        pa.field(
            "id", pa.string(), nullable=False
        ),  # stable sample id (source + sub-index), unique in the table
        pa.field("source", pa.string(), nullable=False),  # where the sample came from (input path)
        pa.field(
            "modality", pa.dictionary(pa.int8(), pa.string()), nullable=False
        ),  # registered modality name
        pa.field("tokens", token_type, nullable=False),  # per-token payload: (L, D) vectors or (L,) ids
        pa.field(
            "positions", pa.large_list(pa.list_(pa.float32(), spec.position_dim)), nullable=False
        ),  # (L, P) coordinates
        pa.field(
            "edges", pa.large_list(pa.list_(pa.int32(), 2)), nullable=True
        ),  # (E, 2) token-index pairs (graphs)
        pa.field("label", pa.int64(), nullable=True),  # class index, for probes and fine-tuning
        pa.field(
            "meta", pa.string(), nullable=False
        ),  # JSON: what detokenize needs (shape, sample rate, stats)
    ]
    md = {META_KEY: json.dumps(meta, sort_keys=True).encode()} if meta is not None else None
    return pa.schema(fields, metadata=md)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),  # the rejected input
        pa.field("kind", pa.string()),  # TokenizeError kind: missing, unreadable, unsupported, corrupt, ...
        pa.field("message", pa.string()),  # the reason, for people
    ]
)


def table_meta(
    spec: TableSpec,
    *,
    tokenizer: str,
    tokenizer_version: str,
    config: dict[str, Any],
    fingerprint: str,
    label_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The table-level facts stored in every shard's schema metadata and in the manifest."""
    return {
        "schema_version": SCHEMA_VERSION,
        "modality": spec.modality,
        "tokenizer": tokenizer,
        "tokenizer_version": tokenizer_version,
        "config": config,
        "fingerprint": fingerprint,
        "token_kind": spec.token_kind,
        "token_dim": spec.token_dim,
        "token_dtype": spec.token_dtype,
        "token_shape": list(spec.token_shape) if spec.token_shape else None,
        "vocab_size": spec.vocab_size,
        "position_axes": list(spec.position_axes),
        "position_kind": spec.position_kind,
        "label_names": list(label_names) if label_names is not None else None,
    }


def spec_from_meta(meta: dict[str, Any]) -> TableSpec:
    return TableSpec.from_json(meta)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``, fast for float16: numpy has no vectorised float16 isfinite
    (124 us for one 512 x 256 audio record, most of its validation). A float16 is finite exactly when
    its exponent bits are not all ones: as uint16, the non-finite patterns are 0x7C00-0x7FFF (+inf,
    NaN) and 0xFC00-0xFFFF (-inf, -NaN). Read as int16 the first range holds the largest values, read
    as uint16 the second, so two max reductions answer it without a temporary array (5.3 us hot,
    10.5 us cold for one audio record; masking the sign bit first took 6.4 and 14.5)."""
    if values.dtype == np.float16:
        bits = np.ascontiguousarray(values).view(np.uint16)
        return not bits.size or (int(bits.view(np.int16).max()) < 0x7C00 and int(bits.max()) < 0xFC00)
    return bool(np.isfinite(values).all())


def validate_record(rec: Record, spec: TableSpec) -> None:
    """Raise TableError naming the record and the problem if ``rec`` does not satisfy ``spec``.

    The NaN/inf scans of tokens and positions are skipped for a record whose producer vouches for
    them (``Record.finite``)."""
    where = f"record {rec.id!r} (source {rec.source!r})"
    tok = np.asarray(rec.tokens)
    pos = np.asarray(rec.positions)
    if spec.token_kind == "discrete":
        if tok.ndim != 1:
            raise TableError(f"{where}: discrete tokens must be a 1-D array of ids, got shape {tok.shape}")
        if tok.size and (tok.min() < 0 or (spec.vocab_size and tok.max() >= spec.vocab_size)):
            raise TableError(
                f"{where}: token ids must lie in [0, {spec.vocab_size}), got [{tok.min()}, {tok.max()}]"
            )
    else:
        if tok.ndim != 2 or tok.shape[1] != spec.token_dim:
            raise TableError(f"{where}: tokens must have shape (L, {spec.token_dim}), got {tok.shape}")
        if tok.dtype.kind == "f" and not rec.finite and not all_finite(tok):
            raise TableError(f"{where}: tokens contain non-finite values (NaN or inf)")
    if pos.ndim != 2 or pos.shape[1] != spec.position_dim:
        raise TableError(
            f"{where}: positions must have shape (L, {spec.position_dim}) for axes {spec.position_axes}, got {pos.shape}"
        )
    if pos.shape[0] != tok.shape[0]:
        raise TableError(f"{where}: {tok.shape[0]} tokens but {pos.shape[0]} positions")
    if not rec.finite and not all_finite(pos):
        raise TableError(f"{where}: positions contain non-finite values (NaN or inf)")
    if tok.shape[0] == 0:
        raise TableError(f"{where}: a record needs at least one token")
    if rec.edges is not None:
        e = np.asarray(rec.edges)
        if e.ndim != 2 or e.shape[1] != 2:
            raise TableError(f"{where}: edges must have shape (E, 2), got {e.shape}")
        if e.size and (e.min() < 0 or e.max() >= tok.shape[0]):
            raise TableError(
                f"{where}: edge endpoints must lie in [0, {tok.shape[0]}), got [{e.min()}, {e.max()}]"
            )


def validate_table(table: pa.Table, *, where: str = "table") -> dict[str, Any]:
    """Validate an Arrow table against its own ``maskloom`` schema metadata; return that metadata.

    Checks: schema version, known modality, column types (token and position widths), per-row
    token/position length agreement, finite values, edge ranges, unique ids.
    """
    md = table.schema.metadata or {}
    if META_KEY not in md:
        raise TableError(f"{where}: no 'maskloom' schema metadata; not a token table")
    meta = json.loads(md[META_KEY])
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise TableError(
            f"{where}: schema version {meta.get('schema_version')!r} but this maskloom reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    table = from_storage(table)
    modality = meta.get("modality")
    if modality not in TOKENIZERS:
        raise TableError(
            f"{where}: unknown modality {modality!r}; registered: {', '.join(TOKENIZERS.names())}"
        )
    spec = spec_from_meta(meta)
    expected = arrow_schema(spec)
    for f in expected:
        if f.name not in table.schema.names:
            raise TableError(f"{where}: missing column {f.name!r}")
        got = table.schema.field(f.name).type
        if got != f.type:
            raise TableError(
                f"{where}: column {f.name!r} has type {got}, expected {f.type} (token_dim/position axes)"
            )
    if table.num_rows == 0:
        return meta
    tok, pos = table.column("tokens").combine_chunks(), table.column("positions").combine_chunks()
    tok_len = np.diff(tok.offsets.to_numpy())
    pos_len = np.diff(pos.offsets.to_numpy())
    ids = table.column("id").to_pylist()
    bad = np.nonzero(tok_len != pos_len)[0]
    if bad.size:
        i = int(bad[0])
        raise TableError(f"{where}: row {ids[i]!r}: {tok_len[i]} tokens but {pos_len[i]} positions")
    empty = np.nonzero(tok_len == 0)[0]
    if empty.size:
        raise TableError(f"{where}: row {ids[int(empty[0])]!r} has no tokens")
    values = tok.values if spec.token_kind == "discrete" else tok.values.values
    vals = values.to_numpy(zero_copy_only=False)
    if vals.dtype.kind == "f" and not all_finite(vals):
        row_of = np.repeat(
            np.arange(len(tok_len)), tok_len * (1 if spec.token_kind == "discrete" else spec.token_dim)
        )
        nonfinite = np.nonzero(~np.isfinite(vals))[0]
        if nonfinite.size:
            raise TableError(
                f"{where}: row {ids[int(row_of[nonfinite[0]])]!r}: tokens contain non-finite values"
            )
    elif spec.token_kind == "discrete" and vals.size:
        if vals.min() < 0 or (spec.vocab_size and vals.max() >= spec.vocab_size):
            raise TableError(f"{where}: token ids outside [0, {spec.vocab_size})")
    pvals = pos.values.values.to_numpy(zero_copy_only=False)
    if not all_finite(pvals):
        row_of = np.repeat(np.arange(len(pos_len)), pos_len * spec.position_dim)
        i = int(row_of[np.nonzero(~np.isfinite(pvals))[0][0]])
        raise TableError(f"{where}: row {ids[i]!r}: positions contain non-finite values")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))  # type: ignore[func-returns-value]
        raise TableError(f"{where}: duplicate id {dup!r}")
    return meta


# ---------------------------------------------------------------------------------------------
# records <-> arrow
# ---------------------------------------------------------------------------------------------
def _offsets(lengths: Sequence[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), pa.int64())


def records_to_arrow(
    records: Sequence[Record],
    spec: TableSpec,
    meta: dict[str, Any] | None = None,
    *,
    validate: bool = True,
    scratch: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    """Pack records into one Arrow table of the token-table schema (vectorised, no per-token Python).

    Every record is validated first (``validate_record``), so a bad record raises TableError naming it;
    ``validate=False`` is for callers that have validated each record already (the pipeline does, to
    turn a bad record into an error row of its input).

    ``scratch``: a dict the caller keeps between calls; the tokens are then concatenated into a buffer
    kept in it (grown as needed) instead of a new array, and the returned table *shares that buffer*:
    use it (write it) before the next call with the same ``scratch``. A fresh 32 MB array is new
    memory the kernel faults in and zeroes page by page (glibc maps allocations of 32 MiB and more
    afresh every time): concatenating 1024-frame audio tokens took 37.5 us per clip into new memory
    and 18 us into a reused buffer.
    """
    if validate:
        for r in records:
            validate_record(r, spec)
    schema = arrow_schema(spec, meta)
    n = len(records)
    lengths = [r.num_tokens for r in records]
    np_dtype = np.dtype(spec.token_dtype)
    if n:
        parts = [np.asarray(r.tokens, dtype=np_dtype).reshape(-1) for r in records]
        if scratch is None:
            flat_tok = np.concatenate(parts)
        else:
            size = sum(p.size for p in parts)
            buf = scratch.get("tokens")
            if buf is None or buf.dtype != np_dtype or buf.size < size:
                buf = scratch["tokens"] = np.empty(
                    max(size, int(1.25 * (0 if buf is None else buf.size))), np_dtype
                )
            flat_tok = np.concatenate(parts, out=buf[:size])
        flat_pos = np.concatenate([np.asarray(r.positions, dtype=np.float32).reshape(-1) for r in records])
    else:
        flat_tok = np.zeros(0, np_dtype)
        flat_pos = np.zeros(0, np.float32)
    if spec.token_kind == "discrete":
        tokens = pa.LargeListArray.from_arrays(_offsets(lengths), pa.array(flat_tok, pa.int32()))
    else:
        inner = pa.FixedSizeListArray.from_arrays(
            pa.array(flat_tok, _ARROW_DTYPES[spec.token_dtype]), spec.token_dim
        )
        tokens = pa.LargeListArray.from_arrays(_offsets(lengths), inner)
    positions = pa.LargeListArray.from_arrays(
        _offsets(lengths),
        pa.FixedSizeListArray.from_arrays(pa.array(flat_pos, pa.float32()), spec.position_dim),
    )
    # edges: null for records without edges
    has_edges = [r.edges is not None for r in records]
    if any(has_edges):
        elens = [0 if r.edges is None else int(np.asarray(r.edges).shape[0]) for r in records]
        flat_e = np.concatenate(
            [np.asarray(r.edges, np.int32).reshape(-1) for r in records if r.edges is not None]
            or [np.zeros(0, np.int32)]
        )
        mask = pa.array([not h for h in has_edges])
        edges = pa.LargeListArray.from_arrays(
            _offsets(elens), pa.FixedSizeListArray.from_arrays(pa.array(flat_e, pa.int32()), 2), mask=mask
        )
    else:
        edges = pa.nulls(n, schema.field("edges").type)
    modality = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([spec.modality]))
    cols = [
        _text_array([r.id for r in records]),
        _text_array([r.source for r in records]),
        modality,
        tokens,
        positions,
        edges,
        pa.array([r.label for r in records], pa.int64()),
        pa.array([json.dumps(r.meta, sort_keys=True, default=_json_default) for r in records], pa.string()),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"meta value of type {type(o).__name__} is not JSON-serialisable")


def arrow_to_records(table: pa.Table) -> list[Record]:
    """Unpack an Arrow token table (logical or storage types) into records (for detokenize, inspection
    and tests)."""
    meta = json.loads((table.schema.metadata or {})[META_KEY])
    spec = spec_from_meta(meta)
    table = from_storage(table, spec)
    out = []
    d = table.to_pydict()
    for i in range(table.num_rows):
        tok = np.asarray(d["tokens"][i], dtype=np.dtype(spec.token_dtype))
        if spec.token_kind == "continuous":
            tok = tok.reshape(-1, spec.token_dim)
        pos = np.asarray(d["positions"][i], np.float32).reshape(-1, spec.position_dim)
        e = d["edges"][i]
        edges = None if e is None else np.asarray(e, np.int32).reshape(-1, 2)
        out.append(
            Record(
                id=d["id"][i],
                source=d["source"][i],
                tokens=tok,
                positions=pos,
                edges=edges,
                label=d["label"][i],
                meta=json.loads(d["meta"][i]),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# files: shards, errors, manifest
# ---------------------------------------------------------------------------------------------
DIR_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Errors of ``fsync`` on a directory that mean the filesystem does not sync directories (some network
and FUSE filesystems), not that a write failed."""
_unsynced_dirs: set[str] = set()


def _fsync_dir(path: str) -> None:
    """Make a rename in directory ``path`` durable. On a filesystem that cannot sync a directory (an
    error in :data:`DIR_SYNC_UNSUPPORTED`) the rename is as durable as that filesystem makes it: one
    warning per directory and process, and the write goes on, where failing would fail every shard of
    a job whose table lives there. Any other error (EIO: the disk) is raised."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in DIR_SYNC_UNSUPPORTED:
            raise
        if path not in _unsynced_dirs:
            _unsynced_dirs.add(path)
            log.warning("%s: its filesystem cannot sync a directory (%s); renames there are as durable as "
                        "that filesystem makes them", path, e.strerror or e)  # fmt: skip
    finally:
        os.close(fd)


TEMP_PREFIX = ".tmp-"
"""Start of the names of files being written (readers and the table's tidying skip or remove them)."""


def new_temp_file(directory: str, suffix: str = "") -> tuple[int, str]:
    """A new file ``<directory>/.tmp-<random><suffix>`` opened for writing: (its descriptor, its path).

    Made with the permissions ``open()`` gives a new file (0o666 less the umask: 0o644 under the usual
    umask 022), not ``tempfile.mkstemp``'s 0o600: the file is renamed into the table as a shard, a
    manifest or a commit record, and a table of 0o600 files could be read only by the user who wrote
    it, not by a training job that runs as another user or by a team sharing a dataset folder on a
    cluster's storage."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    raise FileExistsError(f"{directory}: no free temporary file name after 100 tries")  # pragma: no cover


def atomic_write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename: readers never see a partial file.

    ``durable=False`` leaves out both fsyncs: the file still appears whole or not at all to anyone who
    outlives the writing *process* (the page cache keeps it), though not a crash of the machine; for
    bookkeeping that guards against the process dying, where an fsync is most of the cost."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = new_temp_file(d, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(d)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _vectors_to_binary(arr: pa.Array) -> pa.Array:
    """list<fixed_size_list<T, k>> (large or not) -> the same list of fixed_size_binary(k * width(T)),
    sharing the value buffer (no copy); other arrays are returned as they are."""
    if not (pa.types.is_large_list(arr.type) or pa.types.is_list(arr.type)):
        return arr
    inner = arr.values  # the whole child array; the offsets below index into it
    if not pa.types.is_fixed_size_list(inner.type):
        return arr
    k, width = inner.type.list_size, inner.type.value_type.bit_width // 8
    flat = inner.flatten()  # the child's values, sliced to the child's rows (zero-copy)
    if flat.null_count:
        raise TableError("vector values must not be null")
    data = flat.buffers()[1].slice(flat.offset * width, len(flat) * width)
    binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(k * width), len(inner), [None, data])
    return _relist(arr, binary)


def _binary_to_vectors(arr: pa.Array, value_type: pa.DataType) -> pa.Array:
    """Inverse of :func:`_vectors_to_binary`: list<fixed_size_binary> -> list<fixed_size_list<T, k>>
    with T = ``value_type`` and k = byte width / width(T), sharing the buffer."""
    inner = arr.values
    width = value_type.bit_width // 8
    if inner.type.byte_width % width:
        raise TableError(
            f"binary-stored vectors of {inner.type.byte_width} bytes are not {value_type} vectors"
        )
    k = inner.type.byte_width // width
    data = inner.buffers()[1].slice(inner.offset * inner.type.byte_width, len(inner) * inner.type.byte_width)
    flat = pa.Array.from_buffers(value_type, len(inner) * k, [None, data])
    vectors = pa.FixedSizeListArray.from_arrays(flat, k)
    return _relist(arr, vectors)


def _relist(arr: pa.Array, child: pa.Array) -> pa.Array:
    """A list array with the offsets and nulls of ``arr`` (a list array) over ``child`` (a new array of
    the same length as ``arr.values``)."""
    cls = pa.LargeListArray if pa.types.is_large_list(arr.type) else pa.ListArray
    offsets = arr.offsets
    if not arr.null_count:
        return cls.from_arrays(offsets, child)
    # Arrow takes a null mask only with an unsliced offsets array: a fresh one, from 0
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    offsets = pc.subtract(offsets, pa.scalar(first, offsets.type))
    child = child.slice(first, last - first)
    return cls.from_arrays(offsets, child, mask=arr.is_null())


def _map_columns(table: pa.Table, fn: Any) -> pa.Table:
    """``table`` with ``fn(name, array) -> array`` applied to every chunk of every column (an empty
    column is mapped through one empty chunk, so that its type changes too)."""
    cols, fields, changed = [], [], False
    for f, col in zip(table.schema, table.columns):
        old = col.chunks or [pa.array([], type=col.type)]
        new = [fn(f.name, c) for c in old]
        if any(n is not o for n, o in zip(new, old)):
            col = pa.chunked_array(new if col.chunks else [], type=new[0].type)
            f = pa.field(f.name, col.type, nullable=f.nullable, metadata=f.metadata)
            changed = True
        cols.append(col)
        fields.append(f)
    if not changed:
        return table
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=table.schema.metadata))


VECTOR_COLUMNS = ("tokens", "positions", "edges")
"""List columns whose fixed-size vectors are stored as fixed-size binary."""


def _binary_vectors(t: pa.DataType) -> bool:
    """Whether ``t`` is a list of fixed-size binary values (the storage form of a vector column)."""
    return (pa.types.is_large_list(t) or pa.types.is_list(t)) and pa.types.is_fixed_size_binary(t.value_type)


def to_storage(table: pa.Table) -> pa.Table:
    """The table as written to Parquet: every list of fixed-size vectors becomes a list of fixed-size
    binary values holding the same bytes (see the module docstring); zero-copy."""
    return _map_columns(table, lambda name, a: _vectors_to_binary(a))


def from_storage(table: pa.Table, spec: TableSpec | None = None) -> pa.Table:
    """The logical token-table types (:func:`arrow_schema`) of a table read from Parquet: list columns
    of fixed-size binary values become lists of fixed-size vectors again, zero-copy. The value types
    come from ``spec`` or else from the table's ``maskloom`` metadata. Tables already in the logical
    types (and version-1 shards) come back unchanged."""
    if not any(
        _binary_vectors(table.schema.field(n).type) for n in VECTOR_COLUMNS if n in table.column_names
    ):
        return table
    if spec is None:
        md = table.schema.metadata or {}
        if META_KEY not in md:
            raise TableError("a table with binary-stored vectors but no 'maskloom' metadata to decode them")
        spec = spec_from_meta(json.loads(md[META_KEY]))
    value_types = {
        "tokens": _ARROW_DTYPES[spec.token_dtype],
        "positions": pa.float32(),
        "edges": pa.int32(),
    }

    def convert(name: str, arr: pa.Array) -> pa.Array:
        if name in value_types and _binary_vectors(arr.type):
            return _binary_to_vectors(arr, value_types[name])
        return arr

    return _map_columns(table, convert)


def vector_values(arr: pa.Array, dtype: Any, width: int | None) -> np.ndarray:
    """The child array of a list column as numpy without a copy: (n, width) for vectors (stored as
    fixed-size binary, or as fixed-size lists in version-1 tables), (n,) for scalars (ids). The
    loader's hot path: no Arrow arrays are rebuilt, unlike :func:`from_storage`."""
    if pa.types.is_fixed_size_binary(arr.type):
        w = arr.type.byte_width
        out = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * w, offset=arr.offset * w)
        return out.view(dtype).reshape(len(arr), -1)
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return arr.to_numpy(zero_copy_only=False)


DAMAGED_HINT = "`maskloom inspect TABLE --verify` checks every shard against the manifest"


def permission_hint(table: str) -> str:
    """What to do about a table file this user may not read."""
    return (
        "this user may not read it (a table written before 2026-12-05 is readable by its writer only: "
        f"`chmod -R a+rX {table}`, run by its writer)"
    )


def shard_error(path: str, e: BaseException, where: str = "") -> TableError:
    """The TableError of a shard that cannot be read: names the file (and ``where`` in it) and how
    to check the table, instead of Arrow's bare message ("Parquet magic bytes not found ...")."""
    if isinstance(e, FileNotFoundError) or not os.path.exists(path):
        return TableError(f"{path}: shard listed in the manifest is missing; {DAMAGED_HINT}")
    if isinstance(e, PermissionError):
        return TableError(f"{path}: permission denied: {permission_hint(os.path.dirname(path))}")
    reason = " ".join(str(e).split())  # Arrow's messages span lines; ours is one
    return TableError(f"{path}: cannot read shard{where} ({reason}); {DAMAGED_HINT}")


def open_shard(path: str) -> pq.ParquetFile:
    """``pq.ParquetFile`` of a shard; TableError naming it when it is missing or damaged."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise shard_error(path, e) from None


def read_shard(path: str, columns: Sequence[str] | None = None, *, spec: TableSpec | None = None) -> pa.Table:
    """One shard file in the logical token-table types (whatever schema version wrote it)."""
    try:
        t = pq.read_table(path, columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as e:
        raise shard_error(path, e) from None
    return from_storage(t, spec)


def row_group_rows(table: pa.Table, target_bytes: int = 32 << 20) -> int:
    """Rows per Parquet row group so that a group holds about ``target_bytes`` (tensor-sized reads)."""
    if table.num_rows == 0:
        return 1
    per_row = max(1, table.nbytes // table.num_rows)
    return int(max(1, min(table.num_rows, math.ceil(target_bytes / per_row))))


PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "use_dictionary": ["modality"]}
"""How shards are written. Dictionary encoding only where values repeat (modality); on token payloads
it costs much write time (audio ~2x) for no size gain."""


def write_shard(path: str, table: pa.Table) -> dict[str, Any]:
    """Write one shard atomically (temp name + rename); return {name, rows, bytes, sha256}."""
    tmp = _temp_beside(path)
    try:
        pq.write_table(to_storage(table), tmp, row_group_size=row_group_rows(table), **PARQUET_OPTIONS)
        return _publish(tmp, path, table.num_rows)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _temp_beside(path: str) -> str:
    """A new empty temp file in ``path``'s directory (created), named ``.tmp-*`` (readers skip those)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = new_temp_file(d, ".parquet")
    os.close(fd)
    return tmp


HASH_CHUNK = 1 << 20
"""Bytes read at a time when a finished shard is hashed."""


def sha256_file(f: io.RawIOBase | io.BufferedIOBase, chunk: int = HASH_CHUNK) -> str:
    """SHA-256 of an open binary file from its current position, read ``chunk`` bytes at a time into
    one reused buffer: memory stays at one chunk whatever the file's size (a whole video shard can be
    gigabytes), and 1 MB reads are faster than one read of the whole file (a 115 MB image shard: 0.057
    s instead of 0.10 s, no 115 MB allocation to fault in)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def _publish(tmp: str, path: str, rows: int) -> dict[str, Any]:
    """Hash and fsync the finished temp file, rename it to ``path``, fsync the directory."""
    with open(tmp, "rb", buffering=0) as f:
        digest = sha256_file(f)
        os.fsync(f.fileno())
    size = os.path.getsize(tmp)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"name": os.path.basename(path), "rows": rows, "bytes": size, "sha256": digest}


class ShardWriter:
    """One shard written as its records arrive, a row group at a time, and published atomically.

    The streaming form of :func:`write_shard`: records are packed and written whenever the pending
    ones hold ``row_group_bytes`` of tokens, positions and edges, so a shard holds at most one row
    group in memory whatever its number of inputs (a 256-clip audio shard held 64 MB of records plus
    their Arrow copy; a 256-clip video shard 1.2 GB). Small records are packed into Arrow every
    ``pack_records`` records while a row group fills: as Python objects a short text's record
    (26 ids) takes ~2.8 kB for ~210 bytes of tokens and positions, so the worker's shard path held
    0.44 GB for a row group of them, and holds 0.17 GB packed (``benchmarks/text_stream.py``). The
    file exists only under a ``.tmp-`` name
    until :meth:`close`, which renames it to ``path`` (nothing when no record was added); leaving
    ``with`` without ``close()`` (an exception), or :meth:`abort`, removes it. Records must be valid
    already.
    """

    def __init__(
        self,
        path: str,
        spec: TableSpec,
        meta: dict[str, Any] | None = None,
        *,
        row_group_bytes: int = 32 << 20,
        pack_records: int = 4096,
    ) -> None:
        self.path = path
        self.spec = spec
        self.meta = meta
        self.row_group_bytes = row_group_bytes
        self.pack_records = pack_records
        self.rows = 0
        """Rows written to the file so far."""
        self.seconds = 0.0
        """Time spent packing and writing (the records' own production is the caller's)."""
        self._packed: list[pa.Table] = []  # the row group's first records, packed (storage types)
        self._packed_rows = 0
        self._pending: list[Record] = []  # ... and its records since
        self._pending_bytes = 0  # tokens, positions and edges of both
        self._scratch: dict[str, np.ndarray] = {}  # the row groups' token buffer, reused
        self._tmp: str | None = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, records: Iterable[Record]) -> None:
        for r in records:
            self._pending.append(r)
            self._pending_bytes += (
                r.tokens.nbytes + r.positions.nbytes + (0 if r.edges is None else r.edges.nbytes)
            )
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()
        elif len(self._pending) >= self.pack_records:
            t0 = time.perf_counter()
            self._packed.append(self._pack(self._pending, scratch=None))  # kept: a buffer of its own
            self._packed_rows += len(self._pending)
            self._pending = []
            self.seconds += time.perf_counter() - t0

    def _pack(self, records: list[Record], scratch: dict[str, np.ndarray] | None) -> pa.Table:
        return to_storage(records_to_arrow(records, self.spec, self.meta, validate=False, scratch=scratch))

    @property
    def records(self) -> int:
        """Records added and kept so far: written, packed or pending (a rollback takes its own off)."""
        return self.rows + self._packed_rows + len(self._pending)

    def mark(self) -> tuple[int, int, int]:
        """Where the records added so far end, for :meth:`rollback`."""
        return (self.rows, self._packed_rows + len(self._pending), self._pending_bytes)

    def rollback(self, mark: tuple[int, int, int]) -> bool:
        """Drop the records added since ``mark`` (one input's, found bad part-way through its stream).
        False, dropping nothing, when some of them are in the file already (a row group was written
        since): the caller must then write the shard again without them."""
        rows, keep, pending_bytes = mark
        if self.rows != rows:
            return False
        packed: list[pa.Table] = []
        for t in self._packed:  # the first `keep` unwritten records: packed ones first, then pending
            if keep <= 0:
                break
            packed.append(t if t.num_rows <= keep else t.slice(0, keep))
            keep -= packed[-1].num_rows
        self._packed, self._packed_rows = packed, sum(t.num_rows for t in packed)
        del self._pending[max(0, keep) :]
        self._pending_bytes = pending_bytes
        return True

    def _flush(self) -> None:
        if not self._pending and not self._packed:
            return
        t0 = time.perf_counter()
        parts = self._packed + ([self._pack(self._pending, self._scratch)] if self._pending else [])
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        if self._writer is None:
            self._tmp = _temp_beside(self.path)
            self._writer = pq.ParquetWriter(self._tmp, table.schema, **PARQUET_OPTIONS)
        self._writer.write_table(table, row_group_size=table.num_rows)  # one row group
        self.rows += table.num_rows
        self._packed, self._packed_rows, self._pending, self._pending_bytes = [], 0, [], 0
        self.seconds += time.perf_counter() - t0

    def close(self) -> dict[str, Any] | None:
        """Write what is pending and publish the file: {name, rows, bytes, sha256}, or None (no rows)."""
        try:
            self._flush()
            if self._writer is None:
                return None
            t0 = time.perf_counter()
            self._writer.close()
            self._writer = None
            info = _publish(self._tmp, self.path, self.rows)  # type: ignore[arg-type]
            self._tmp = None
            self.seconds += time.perf_counter() - t0
            return info
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the shard: close and remove the temp file."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - already failing; the file goes anyway
                pass
            self._writer = None
        if self._tmp is not None and os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._tmp = None
        self._packed, self._packed_rows, self._pending = [], 0, []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # nothing after close(); otherwise (an error, no close) the shard is dropped


def errors_to_arrow(errors: Iterable[tuple[str, str, str]]) -> pa.Table:
    rows = list(errors)
    return pa.Table.from_arrays([_text_array([r[j] for r in rows]) for j in range(3)], schema=ERRORS_SCHEMA)


def _text_array(values: list[str]) -> pa.Array:
    """An Arrow string array of ``values``; a file name that is not UTF-8 (Linux allows any bytes)
    goes in with those bytes written as ``\\xNN`` (:func:`~maskloom.tokenizers.base.utf8_text`)
    instead of failing the whole shard."""
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        return pa.array([utf8_text(v) for v in values], pa.string())


@dataclass
class Manifest:
    """The table's index: readers open exactly the shards it lists."""

    meta: dict[str, Any]
    shards: list[dict[str, Any]] = field(default_factory=list)  # {name, rows, bytes, sha256, inputs}
    totals: dict[str, int] = field(default_factory=lambda: {"inputs": 0, "rows": 0, "errors": 0})
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. run statistics

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "modality": self.meta["modality"],
            "tokenizer": {
                "name": self.meta["tokenizer"],
                "version": self.meta["tokenizer_version"],
                "config": self.meta["config"],
            },
            "fingerprint": self.meta["fingerprint"],
            "meta": self.meta,
            "shards": self.shards,
            "totals": self.totals,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(meta=d["meta"], shards=d["shards"], totals=d["totals"], extra=d.get("extra", {}))


def write_manifest(directory: str, manifest: Manifest) -> None:
    atomic_write_bytes(os.path.join(directory, MANIFEST), json.dumps(manifest.to_json(), indent=1).encode())


def partial_job_note(directory: str) -> str | None:
    """What a folder holding a preprocessing job that has not finished (a plan in ``_commits/``, no
    manifest yet: the job is running, or was cut short) has done so far, and how to finish it; None
    for any other folder. A table is only readable once its manifest is written."""
    try:
        with open(os.path.join(directory, COMMITS, RUN_STATE), encoding="utf-8") as f:
            state = json.load(f)
        done = sum(
            1
            for n in os.listdir(os.path.join(directory, COMMITS))
            if n.endswith(".json") and not n.startswith("_")
        )
        shards, inputs, modality = int(state["shards"]), int(state["inputs"]), state["modality"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return (
        f"{directory}: a preprocessing job ({modality}, {inputs:,} inputs) that has not finished: {done:,} of its "
        f"{shards:,} shards committed; run `maskloom preprocess` again on the same inputs and config to finish it (a table "
        "is readable once its manifest is written)"
    )


def read_manifest(directory: str) -> Manifest:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise TableError(
            url_note(directory, "a token table directory") or f"{directory}: no such token table directory"
        )
    if not os.path.exists(path):
        raise TableError(
            partial_job_note(directory) or f"{directory}: no {MANIFEST}; not a finished token table"
        )
    try:
        with open(path, encoding="utf-8") as f:
            d = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: manifest is not valid JSON ({e})") from None
    except PermissionError:
        raise TableError(f"{path}: permission denied: {permission_hint(directory)}") from None
    except OSError as e:
        raise TableError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if d.get("schema_version") not in READABLE_VERSIONS:
        raise TableError(
            f"{path}: schema version {d.get('schema_version')!r}, this maskloom reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return Manifest.from_json(d)


class TokenTable:
    """A finished token table on disk, opened through its manifest."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.manifest = read_manifest(directory)
        self.meta = self.manifest.meta
        self.spec = spec_from_meta(self.meta)

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def num_rows(self) -> int:
        return int(self.manifest.totals["rows"])

    @property
    def label_names(self) -> list[str] | None:
        return self.meta.get("label_names")

    def shard_paths(self) -> list[str]:
        return [os.path.join(self.directory, s["name"]) for s in self.manifest.shards]

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All shards concatenated (in manifest order)."""
        parts = [read_shard(p, columns, spec=self.spec) for p in self.shard_paths()]
        if not parts:
            return arrow_schema(self.spec, self.meta).empty_table()
        return pa.concat_tables(parts)

    def records(self, limit: int | None = None) -> list[Record]:
        t = self.read()
        return arrow_to_records(t.slice(0, limit) if limit is not None else t)

    def errors(self) -> pa.Table:
        p = os.path.join(self.directory, ERRORS)
        if not os.path.exists(p):
            return ERRORS_SCHEMA.empty_table()
        try:
            return pq.read_table(p)
        except (OSError, pa.ArrowException) as e:
            raise TableError(f"{p}: cannot read the error table ({' '.join(str(e).split())})") from None

    def verify(self) -> list[str]:
        """Check every shard against the manifest (present, same size, same SHA-256: the bytes the
        writer hashed before publishing it); return one line per problem, [] for a sound table.
        Reads every byte: about disk speed (the hash runs at ~2 GB/s)."""
        problems = []
        for path, info in zip(self.shard_paths(), self.manifest.shards):
            try:
                size = os.path.getsize(path)
                if size != info["bytes"]:
                    problems.append(f"{path}: {size} bytes, the manifest lists {info['bytes']}")
                    continue
                with open(path, "rb", buffering=0) as f:
                    digest = sha256_file(f)
                if digest != info["sha256"]:
                    problems.append(
                        f"{path}: SHA-256 {digest[:16]}... differs from the manifest's {info['sha256'][:16]}..."
                    )
            except FileNotFoundError:
                problems.append(f"{path}: missing")
            except OSError as e:
                problems.append(f"{path}: {e.strerror or e}")
        return problems

    def artifacts_dir(self) -> str:
        return os.path.join(self.directory, ARTIFACTS)

    def tokenizer(self):
        """Rebuild the tokenizer that made this table (with its artifacts), e.g. to detokenize."""
        from maskloom.tokenizers.base import get_tokenizer

        tok = get_tokenizer(self.meta["tokenizer"], self.meta["config"])
        if os.path.isdir(self.artifacts_dir()):
            tok.load_artifacts(self.artifacts_dir())
        return tok


def write_table(
    directory: str,
    records: Sequence[Record],
    tokenizer: Any,
    *,
    errors: Iterable[tuple[str, str, str]] = (),
    inputs: int | None = None,
    rows_per_shard: int = 4096,
    label_names: Sequence[str] | None = None,
) -> TokenTable:
    """Write a whole token table in one process (tests, small jobs). The Ray pipeline writes the same
    layout shard by shard. ``tokenizer`` is the Tokenizer instance that made ``records``."""
    spec = tokenizer.spec()
    names = label_names if label_names is not None else tokenizer.label_names()
    meta = table_meta(
        spec,
        tokenizer=tokenizer.name,
        tokenizer_version=tokenizer.version,
        config=tokenizer.config_dict(),
        fingerprint=tokenizer.fingerprint(),
        label_names=names,
    )
    os.makedirs(directory, exist_ok=True)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))  # type: ignore[func-returns-value]
        raise TableError(f"{directory}: duplicate id {dup!r}")
    shards = []
    for k, start in enumerate(range(0, max(len(records), 1), rows_per_shard)):
        chunk = records[start : start + rows_per_shard]
        if not chunk and k > 0:
            break
        info = write_shard(os.path.join(directory, shard_name(k)), records_to_arrow(chunk, spec, meta))
        info["inputs"] = len({r.source for r in chunk})
        shards.append(info)
    errs = list(errors)
    atomic_write_bytes(os.path.join(directory, ERRORS), _parquet_bytes(errors_to_arrow(errs)))
    if tokenizer.save_artifacts is not None:
        tokenizer.save_artifacts(os.path.join(directory, ARTIFACTS))
    n_inputs = inputs if inputs is not None else len({r.source for r in records}) + len(errs)
    write_manifest(
        directory,
        Manifest(
            meta=meta, shards=shards, totals={"inputs": n_inputs, "rows": len(records), "errors": len(errs)}
        ),
    )
    return TokenTable(directory)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
