"""Conformance kit for tokenizers: ``check_tokenizer`` runs the contract every tokenizer must keep.

Every built-in tokenizer passes it (tests/test_conformance.py); a new modality runs it in its own
tests::

    from maskloom.testing import check_tokenizer
    def test_my_tokenizer(tmp_path):
        check_tokenizer(MyTokenizer(), [str(tmp_path / "a.xyz"), ...])

It raises ``AssertionError`` with a message naming the failing rule and source, and returns a small
report (records and tokens seen) when every rule holds.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from maskloom import tables
from maskloom.tokenizers.base import Record, TableSpec, TokenizeError, Tokenizer


def write_tar(path: str | os.PathLike[str], members: Sequence[tuple[str, bytes]], mode: str = "w") -> str:
    """Write a tar at ``path`` holding ``members`` ((name, bytes), in order: a WebDataset shard is
    ``[("k0.jpg", ...), ("k0.cls", b"3"), ("k1.jpg", ...), ...]``); ``mode`` ``"w:gz"`` gzips it.
    For tests of tokenizers that read tar shards. Returns the path as a string."""
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _same_record(a: Record, b: Record) -> bool:
    return (
        a.id == b.id
        and a.source == b.source
        and a.label == b.label
        and a.tokens.dtype == b.tokens.dtype
        and np.array_equal(a.tokens, b.tokens)
        and np.array_equal(a.positions, b.positions)
        and (
            (a.edges is None and b.edges is None)
            or (a.edges is not None and b.edges is not None and np.array_equal(a.edges, b.edges))
        )
        and tables.json.dumps(a.meta, sort_keys=True, default=tables._json_default)
        == tables.json.dumps(b.meta, sort_keys=True, default=tables._json_default)
    )


def check_tokenizer(
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    compare: Callable[[Any, Any, Record], None] | None = None,
    check_bad_inputs: bool = True,
) -> dict[str, int]:
    """Check ``tokenizer`` against the Tokenizer contract on real input files ``sources``.

    Rules checked:
      1. it is a registered-style Tokenizer with a frozen, keyword-only Config dataclass;
      2. fit (when needed) + save_artifacts/load_artifacts restore an equivalent tokenizer;
      3. spec() is a TableSpec whose modality is the tokenizer's name;
      4. every source gives >= 1 record, each valid for the spec; ids are unique across sources;
      5. tokenizing is deterministic, and survives pickling the tokenizer (Ray ships it to workers);
      6. records survive the Arrow table round trip unchanged, and the table validates;
      7. detokenize works on every record; ``compare(raw, detokenized, record)`` (when given)
         asserts the modality's round-trip tolerance;
      8. bad inputs (a missing path, an empty file and a garbage file per extension) raise
         TokenizeError — never another exception — from ``__call__`` and from ``iter_records``;
      9. ``iter_records`` (the stream the pipeline reads) gives the records ``tokenize(read())`` does.
    """
    cls = type(tokenizer)
    assert isinstance(tokenizer, Tokenizer), f"{cls.__name__} is not a maskloom Tokenizer"
    assert tokenizer.name, f"{cls.__name__} has no registered name (use @register_tokenizer)"
    cfg = cls.Config
    assert dataclasses.is_dataclass(cfg), f"{cls.__name__}.Config must be a dataclass"
    params = cfg.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen, f"{cls.__name__}.Config must be frozen"
    assert all(f.kw_only for f in dataclasses.fields(cfg)), f"{cls.__name__}.Config must be keyword-only"
    assert sources, "check_tokenizer needs at least one source"

    if tokenizer.needs_fit:
        tokenizer.fit(list(sources))
    with tempfile.TemporaryDirectory() as art:
        tokenizer.save_artifacts(art)
        restored = cls(tokenizer.config)
        restored.load_artifacts(art)
    spec = tokenizer.spec()
    assert isinstance(spec, TableSpec), f"{cls.__name__}.spec() must return a TableSpec"
    assert spec.modality == tokenizer.name, (
        f"spec().modality {spec.modality!r} != tokenizer name {tokenizer.name!r}"
    )
    assert restored.spec() == spec, "spec() differs after save_artifacts/load_artifacts"
    assert restored.fingerprint() == tokenizer.fingerprint(), "fingerprint differs for the same config"

    clone = pickle.loads(pickle.dumps(tokenizer))
    all_records: list[Record] = []
    for src in sources:
        raw = tokenizer.read(src)
        recs = tokenizer.tokenize(raw, source=src)
        assert isinstance(recs, list) and recs, f"{src}: tokenize returned no records"
        for r in recs:
            assert isinstance(r, Record), f"{src}: tokenize must return Record objects"
            assert r.source == src, f"{src}: record source is {r.source!r}"
            try:
                # a record that vouches for its values (Record.finite) is checked without the voucher
                tables.validate_record(dataclasses.replace(r, finite=False), spec)
            except tables.TableError as e:
                raise AssertionError(f"{src}: {e}") from None
        again = tokenizer(src)
        assert len(again) == len(recs) and all(map(_same_record, recs, again)), (
            f"{src}: tokenize is not deterministic"
        )
        streamed = list(tokenizer.iter_records(src))
        assert len(streamed) == len(recs) and all(map(_same_record, recs, streamed)), (
            f"{src}: iter_records gives other records than tokenize(read())"
        )
        for name, other in (("a pickled copy", clone), ("a restored copy", restored)):
            recs2 = other(src)
            assert len(recs2) == len(recs) and all(map(_same_record, recs, recs2)), (
                f"{src}: {name} of the tokenizer gives different records"
            )
        for r in recs:
            out = tokenizer.detokenize(r)
            assert out is not None, f"{src}: detokenize returned None"
            if compare is not None:
                compare(raw, out, r)
        all_records.extend(recs)

    ids = [r.id for r in all_records]
    assert len(set(ids)) == len(ids), "record ids are not unique across sources"
    meta = tables.table_meta(
        spec,
        tokenizer=tokenizer.name,
        tokenizer_version=tokenizer.version,
        config=tokenizer.config_dict(),
        fingerprint=tokenizer.fingerprint(),
        label_names=tokenizer.label_names(),
    )
    table = tables.records_to_arrow(all_records, spec, meta)
    tables.validate_table(table, where=f"{tokenizer.name} table")
    back = tables.arrow_to_records(table)
    assert all(map(_same_record, all_records, back)), "records change through the Arrow round trip"

    if check_bad_inputs:
        _check_bad_inputs(tokenizer)
    return {
        "sources": len(sources),
        "records": len(all_records),
        "tokens": sum(r.num_tokens for r in all_records),
    }


def _expect_tokenize_error(tokenizer: Tokenizer, path: str, what: str) -> None:
    for how, run in (("", tokenizer), (" by iter_records", lambda p: list(tokenizer.iter_records(p)))):
        try:
            run(path)
        except TokenizeError as e:
            assert e.source, f"{what}: TokenizeError{how} without a source"
            continue
        except Exception as e:  # noqa: BLE001 - the point is to catch the wrong kind of error
            raise AssertionError(
                f"{what} ({path}) raised{how} {type(e).__name__}: {e}, not TokenizeError"
            ) from e
        raise AssertionError(f"{what} ({path}) was accepted{how}; expected TokenizeError")


def _check_bad_inputs(tokenizer: Tokenizer) -> None:
    with tempfile.TemporaryDirectory() as d:
        ext = tokenizer.extensions[0] if tokenizer.extensions else ".dat"
        _expect_tokenize_error(tokenizer, os.path.join(d, f"does-not-exist{ext}"), "a missing file")
        for ext in tokenizer.extensions or (".dat",):
            empty = os.path.join(d, f"empty{ext}")
            open(empty, "wb").close()
            _expect_tokenize_error(tokenizer, empty, "an empty file")
            garbage = os.path.join(d, f"garbage{ext}")
            with open(garbage, "wb") as f:
                f.write(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
            _expect_tokenize_error(tokenizer, garbage, "a garbage file")
