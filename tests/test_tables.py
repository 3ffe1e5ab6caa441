"""Token-table schema: writing, reading, and every validation error with its message."""

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskloom import tables
from maskloom.tokenizers.base import Record, TableSpec, TokenizeError, Tokenizer, register_tokenizer


@register_tokenizer("tables_toy")
class ToyTokenizer(Tokenizer):
    """Tokens are rows of a .npy file; positions their index."""

    extensions = (".npy",)

    @dataclass(frozen=True, kw_only=True)
    class Config:
        dim: int = 3
        """token width"""

    def spec(self):
        return TableSpec(
            modality="tables_toy",
            token_kind="continuous",
            token_dim=self.config.dim,
            token_dtype="float32",
            position_axes=("i",),
            position_kind="grid",
        )

    def read(self, source):
        return np.load(source)

    def tokenize(self, raw, *, source=""):
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=np.asarray(raw, np.float32),
                positions=np.arange(len(raw), dtype=np.float32)[:, None],
                meta={"n": len(raw)},
            )
        ]

    def detokenize(self, record):
        return record.tokens


def rec(i, n=2, dim=3, **kw):
    tok = kw.pop("tokens", np.full((n, dim), i, np.float32))
    pos = kw.pop("positions", np.arange(n, dtype=np.float32)[:, None])
    return Record(id=f"s{i}#0", source=f"s{i}", tokens=tok, positions=pos, **kw)


def test_write_read_roundtrip(tmp_path):
    tok = ToyTokenizer()
    recs = [rec(0, 2, label=1), rec(1, 3, edges=np.array([[0, 2]], np.int32)), rec(2, 1)]
    table = tables.write_table(
        str(tmp_path / "t"), recs, tok, errors=[("bad.npy", "corrupt", "boom")], rows_per_shard=2
    )
    assert [s["name"] for s in table.manifest.shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert [s["rows"] for s in table.manifest.shards] == [2, 1]
    assert table.manifest.totals == {"inputs": 4, "rows": 3, "errors": 1}
    assert table.num_rows == 3 and table.modality == "tables_toy"
    back = table.records()
    assert [r.id for r in back] == ["s0#0", "s1#0", "s2#0"]
    assert back[0].label == 1 and back[1].label is None
    assert back[0].edges is None and back[1].edges.tolist() == [[0, 2]]
    assert back[1].tokens.shape == (3, 3) and float(back[1].tokens[0, 0]) == 1.0
    assert table.errors().to_pylist() == [{"source": "bad.npy", "kind": "corrupt", "message": "boom"}]
    meta = tables.validate_table(table.read())
    assert meta["position_axes"] == ["i"] and meta["token_dim"] == 3
    # every shard carries the table metadata
    md = json.loads(pq.read_schema(table.shard_paths()[1]).metadata[b"maskloom"])
    assert md["fingerprint"] == tok.fingerprint()
    # the manifest is what readers trust: a stray parquet file is ignored
    pq.write_table(table.read(), tmp_path / "t" / "part-00099.parquet")
    assert tables.TokenTable(str(tmp_path / "t")).num_rows == 3


def test_discrete_tokens_schema():
    spec = TableSpec(
        modality="tables_toy",
        token_kind="discrete",
        token_dim=1,
        token_dtype="int32",
        vocab_size=10,
        position_axes=("index",),
        position_kind="grid",
    )
    r = Record(
        id="a", source="a", tokens=np.array([1, 2, 9], np.int32), positions=np.zeros((3, 1), np.float32)
    )
    t = tables.records_to_arrow([r], spec, {"x": 1})
    assert t.schema.field("tokens").type == pa.large_list(pa.int32())
    with pytest.raises(tables.TableError, match=r"token ids must lie in \[0, 10\)"):
        tables.validate_record(
            Record(
                id="b", source="b", tokens=np.array([10], np.int32), positions=np.zeros((1, 1), np.float32)
            ),
            spec,
        )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(positions=np.zeros((3, 1), np.float32)), r"'s0#0' \(source 's0'\): 2 tokens but 3 positions"),
        (dict(tokens=np.zeros((2, 4), np.float32)), r"tokens must have shape \(L, 3\), got \(2, 4\)"),
        (
            dict(positions=np.zeros((2, 2), np.float32)),
            r"positions must have shape \(L, 1\) for axes \('i',\)",
        ),
        (dict(tokens=np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)), "tokens contain non-finite values"),
        (dict(positions=np.array([[0], [np.inf]], np.float32)), "positions contain non-finite values"),
        (dict(edges=np.array([[0, 5]], np.int32)), r"edge endpoints must lie in \[0, 2\)"),
        (
            dict(tokens=np.zeros((0, 3), np.float32), positions=np.zeros((0, 1), np.float32)),
            "at least one token",
        ),
    ],
)
def test_validate_record_errors(bad, message):
    with pytest.raises(tables.TableError, match=message):
        tables.records_to_arrow([rec(0, **bad)], ToyTokenizer().spec())


def _table(recs, **meta_overrides):
    tok = ToyTokenizer()
    meta = tables.table_meta(
        tok.spec(), tokenizer="tables_toy", tokenizer_version="1", config={}, fingerprint="f"
    )
    meta.update(meta_overrides)
    return tables.records_to_arrow(recs, tok.spec(), meta)


def test_validate_table_errors():
    good = _table([rec(0), rec(1)])
    assert tables.validate_table(good)["modality"] == "tables_toy"
    with pytest.raises(tables.TableError, match="duplicate id 's0#0'"):
        tables.validate_table(_table([rec(0), rec(0)]))
    with pytest.raises(tables.TableError, match="unknown modality 'nope'"):
        tables.validate_table(_table([rec(0)], modality="nope"))
    with pytest.raises(tables.TableError, match="schema version 99 but this maskloom reads versions 1, 2"):
        tables.validate_table(_table([rec(0)], schema_version=99))
    with pytest.raises(tables.TableError, match="no 'maskloom' schema metadata"):
        tables.validate_table(good.replace_schema_metadata({}))
    # a table whose column width disagrees with its metadata (written by something else)
    wrong = _table([rec(0)], token_dim=4)
    with pytest.raises(tables.TableError, match="column 'tokens' has type"):
        tables.validate_table(wrong)
    # a length mismatch that bypassed record validation
    cols = good.columns
    pos = cols[4].combine_chunks()
    short = pa.LargeListArray.from_arrays(pa.array([0, 1, 3], pa.int64()), pos.values.slice(0, 3))
    broken = pa.Table.from_arrays([*cols[:4], short, *cols[5:]], schema=good.schema)
    with pytest.raises(tables.TableError, match="row 's0#0': 2 tokens but 1 positions"):
        tables.validate_table(broken)


def test_missing_and_unfinished_tables(tmp_path):
    with pytest.raises(tables.TableError, match="no such token table directory"):
        tables.TokenTable(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(tables.TableError, match="no _manifest.json; not a finished token table"):
        tables.TokenTable(str(tmp_path / "half"))


def test_a_table_this_user_may_not_read_says_so_and_how_to_fix_it(tmp_path, monkeypatch):
    """Permission denied on the manifest or a shard (a table another user wrote with 0600 files, as
    before 2026-12-05) is one line saying what to do, not a traceback or a "damaged shard" hint. The
    denial is patched in: the tests may run as root, whom no mode bit stops."""
    table = tables.write_table(str(tmp_path / "t"), [rec(0), rec(1)], ToyTokenizer(), rows_per_shard=1)
    d = str(tmp_path / "t")
    hint = (
        "this user may not read it (a table written before 2026-12-05 is readable by its writer only: "
        f"`chmod -R a+rX {d}`, run by its writer)"
    )
    real_open, real_pf = open, pq.ParquetFile

    def denied(path, *a, **kw):
        if str(path).endswith(tables.MANIFEST):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(tables, "open", denied, raising=False)
    with pytest.raises(tables.TableError) as e:
        tables.TokenTable(d)
    assert str(e.value) == f"{d}/_manifest.json: permission denied: {hint}"
    monkeypatch.undo()
    shard = table.shard_paths()[1]

    def denied_shard(path, *a, **kw):
        if str(path) == shard:
            raise PermissionError(13, "Permission denied", str(path))
        return real_pf(path, *a, **kw)

    monkeypatch.setattr(tables.pq, "ParquetFile", denied_shard)
    with pytest.raises(tables.TableError) as e:
        tables.open_shard(shard)
    assert str(e.value) == f"{shard}: permission denied: {hint}"


def test_atomic_shard_write_leaves_no_temp(tmp_path):
    tok = ToyTokenizer()
    info = tables.write_shard(
        str(tmp_path / "part-00000.parquet"), tables.records_to_arrow([rec(0)], tok.spec())
    )
    assert info["rows"] == 1 and len(info["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_published_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    """Shards, manifests and records are made as temp files and renamed: they get 0o666 less the
    umask, as open() gives, not tempfile.mkstemp's 0o600 (a table only its writer could read)."""
    tok = ToyTokenizer()
    spec = tok.spec()
    meta = tables.table_meta(spec, tokenizer="tables_toy", tokenizer_version="1", config={}, fingerprint="f")
    old = os.umask(umask)
    try:
        tables.write_shard(str(tmp_path / "a.parquet"), tables.records_to_arrow([rec(0)], spec))
        with tables.ShardWriter(str(tmp_path / "b.parquet"), spec, meta) as w:
            w.add([rec(1)])
            w.close()
        tables.atomic_write_bytes(str(tmp_path / "c.json"), b"{}")
        tables.atomic_write_bytes(str(tmp_path / "d.json"), b"{}", durable=False)
        fd, tmp = tables.new_temp_file(str(tmp_path), ".x")
        os.close(fd)
    finally:
        os.umask(old)
    assert os.path.basename(tmp).startswith(tables.TEMP_PREFIX) and tmp.endswith(".x")
    names = ["a.parquet", "b.parquet", "c.json", "d.json", os.path.basename(tmp)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in names} == {n: oct(mode) for n in names}


def test_a_filesystem_that_cannot_sync_directories_does_not_fail_the_writes(tmp_path, monkeypatch, caplog):
    """Some network and FUSE filesystems answer fsync on a directory with EINVAL: the renamed file is
    there, so the write goes on with one warning per directory; another error (EIO) still fails."""
    import errno
    import stat

    real = os.fsync
    err = {"no": errno.EINVAL}

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err["no"], os.strerror(err["no"]))
        real(fd)

    monkeypatch.setattr(tables.os, "fsync", fsync)
    monkeypatch.setattr(tables, "_unsynced_dirs", set())
    spec = ToyTokenizer().spec()
    with caplog.at_level("WARNING", logger="maskloom.tables"):
        tables.atomic_write_bytes(str(tmp_path / "a.json"), b"{}")
        tables.write_shard(str(tmp_path / "b.parquet"), tables.records_to_arrow([rec(0)], spec))
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert pq.ParquetFile(tmp_path / "b.parquet").metadata.num_rows == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: its filesystem cannot sync a directory (Invalid argument); renames there are as durable "
        "as that filesystem makes them"
    ]
    err["no"] = errno.EIO
    with pytest.raises(OSError) as e:
        tables.atomic_write_bytes(str(tmp_path / "c.json"), b"{}")
    assert e.value.errno == errno.EIO


def test_shard_writer_streams_row_groups_and_equals_write_shard(tmp_path):
    import hashlib

    tok = ToyTokenizer()
    spec = tok.spec()
    meta = tables.table_meta(spec, tokenizer="tables_toy", tokenizer_version="1", config={}, fingerprint="f")
    recs = [rec(i, n=1 + i % 4, label=i % 3) for i in range(25)]
    per = 3 * 4 + 4  # bytes of one token and its position (dim 3 float32, 1 float32 axis)
    path = tmp_path / "part-00001.parquet"
    with tables.ShardWriter(str(path), spec, meta, row_group_bytes=10 * per) as w:
        for k in range(0, 25, 2):
            w.add(recs[k : k + 2])
            if k == 0:  # nothing is published before close(): at most a .tmp- file
                assert all(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
        info = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00001.parquet"]
    assert info["rows"] == 25 and info["name"] == "part-00001.parquet"
    assert (
        info["bytes"] == path.stat().st_size
        and info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    groups = pq.ParquetFile(path).metadata.num_row_groups
    assert 4 <= groups <= 9  # ~10 tokens per group (61 tokens), flushed between adds of 2 records
    ref = tables.write_shard(str(tmp_path / "ref.parquet"), tables.records_to_arrow(recs, spec, meta))
    assert ref["rows"] == 25
    assert tables.read_shard(str(path)).equals(tables.read_shard(str(tmp_path / "ref.parquet")))


def test_records_to_arrow_reuses_a_scratch_buffer_for_the_tokens():
    """With ``scratch`` the tokens go into one kept buffer (grown when a call needs more), and the
    table equals the one packed without it."""
    spec = ToyTokenizer().spec()
    scratch: dict = {}
    small, big = [rec(i, n=2) for i in range(3)], [rec(i, n=4) for i in range(5)]
    t1 = tables.records_to_arrow(small, spec, scratch=scratch)
    assert t1.equals(tables.records_to_arrow(small, spec))
    buf = scratch["tokens"]
    assert buf.size == 3 * 2 * 3  # 3 records x 2 tokens x dim 3
    t2 = tables.records_to_arrow(big, spec, scratch=scratch)  # grows: 60 values
    assert scratch["tokens"] is not buf and scratch["tokens"].size == 60
    assert t2.equals(tables.records_to_arrow(big, spec))
    grown = scratch["tokens"]
    t3 = tables.records_to_arrow(small, spec, scratch=scratch)  # fits: the same buffer, overwritten
    assert scratch["tokens"] is grown and t3.equals(tables.records_to_arrow(small, spec))


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2500])
def test_sha256_file_reads_in_chunks_and_equals_whole_hash(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    reads = []

    class Spy(io.FileIO):
        def readinto(self, b):
            reads.append(len(b))
            return super().readinto(b)

    with Spy(tmp_path / "f", "rb") as f:
        assert tables.sha256_file(f, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert set(reads) == {1000} and len(reads) == -(-size // 1000) + 1  # one chunk at a time, then EOF


def test_shard_writer_publishes_nothing_on_error_or_without_rows(tmp_path):
    spec = ToyTokenizer().spec()
    with pytest.raises(RuntimeError, match="boom"):
        with tables.ShardWriter(str(tmp_path / "a.parquet"), spec, row_group_bytes=1) as w:
            w.add([rec(0), rec(1)])  # flushed: a temp file exists
            assert len(list(tmp_path.iterdir())) == 1
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with tables.ShardWriter(str(tmp_path / "b.parquet"), spec) as w:
        assert w.close() is None
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_depends_on_config():
    assert ToyTokenizer().fingerprint() == ToyTokenizer({"dim": 3}).fingerprint()
    assert ToyTokenizer().fingerprint() != ToyTokenizer({"dim": 4}).fingerprint()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dims'\]"):
        ToyTokenizer({"dims": 3})


def test_vectors_are_stored_as_fixed_size_binary_and_read_back_as_lists(tmp_path):
    tok = ToyTokenizer()
    tokens = np.arange(9, dtype=np.float32).reshape(3, 3)
    edges = np.array([[0, 2], [1, 1]], np.int32)
    recs = [rec(0, 2, label=1), rec(1, 3, tokens=tokens, edges=edges), rec(2, 1)]
    table = tables.write_table(str(tmp_path / "t"), recs, tok)
    raw = pq.read_table(table.shard_paths()[0])  # what another Parquet reader sees
    assert raw.schema.field("tokens").type == pa.large_list(pa.binary(3 * 4))  # 3 float32 per token
    assert raw.schema.field("positions").type == pa.large_list(pa.binary(4))
    assert raw.schema.field("edges").type == pa.large_list(pa.binary(8))
    vec = np.frombuffer(raw.column("tokens")[1].values[2].as_py(), np.float32)  # the documented recipe
    assert vec.tolist() == [6.0, 7.0, 8.0]
    logical = tables.records_to_arrow(recs, tok.spec(), table.meta)
    assert table.read().equals(logical)
    assert tables.read_shard(table.shard_paths()[0]).equals(logical)
    assert tables.validate_table(raw)["schema_version"] == tables.SCHEMA_VERSION == 2
    back = tables.arrow_to_records(raw)
    assert back[1].edges.tolist() == [[0, 2], [1, 1]] and back[0].edges is None
    np.testing.assert_array_equal(back[2].tokens, recs[2].tokens)


def test_storage_conversion_keeps_slices_nulls_and_empty_tables():
    spec = ToyTokenizer().spec()
    recs = [rec(i, i + 1, edges=np.array([[0, i]], np.int32) if i % 2 else None) for i in range(5)]
    t = tables.records_to_arrow(recs, spec, {"x": 1})
    for part in (t, t.slice(1, 3), t.slice(2, 2), t.slice(0, 0)):
        stored = tables.to_storage(part)
        assert pa.types.is_fixed_size_binary(stored.schema.field("tokens").type.value_type)
        back = tables.from_storage(stored, spec)
        assert back.schema == part.schema and back.equals(part)
        assert back.column("edges").null_count == part.column("edges").null_count
    assert tables.from_storage(t, spec) is t  # already logical: unchanged
    bad = tables.to_storage(t).set_column(
        3, "tokens", pa.array([[b"abcde"]] * 5, pa.large_list(pa.binary(5)))
    )
    with pytest.raises(tables.TableError, match="5 bytes are not float vectors"):
        tables.from_storage(bad, spec)


def test_version_1_tables_with_nested_list_storage_still_read(tmp_path):
    tok = ToyTokenizer()
    recs = [rec(0, 2, label=1), rec(1, 3)]
    table = tables.write_table(str(tmp_path / "t"), recs, tok)
    meta = {**table.meta, "schema_version": 1}
    v1 = tables.records_to_arrow(recs, tok.spec(), meta)  # logical types, written as nested lists
    pq.write_table(v1, table.shard_paths()[0], compression="zstd")
    man = json.loads((tmp_path / "t" / "_manifest.json").read_text())
    man["schema_version"] = 1
    (tmp_path / "t" / "_manifest.json").write_text(json.dumps(man))
    old = tables.TokenTable(str(tmp_path / "t"))
    assert pq.read_schema(old.shard_paths()[0]).field("tokens").type == v1.schema.field("tokens").type
    assert old.read().equals(v1)
    assert [r.id for r in old.records()] == ["s0#0", "s1#0"]
    from maskloom.pipelines.loader import TokenLoader

    (b,) = list(TokenLoader(old, batch_size=2, shuffle=False, bucket=False))  # the loader reads v1 too
    assert b.tokens.tolist() == [[[0.0] * 3, [0.0] * 3, [0.0] * 3], [[1.0] * 3] * 3]
    assert b.padding.tolist() == [[False, False, True], [False, False, False]]


def test_all_finite_matches_numpy_for_every_float16_bit_pattern():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65,536 values
    finite = np.isfinite(every)
    assert int(finite.sum()) == 65536 - 2 * 1024  # +-inf and the NaNs: exponent bits all ones
    for v, ok in zip(every, finite):  # every single value: both signs, subnormals, every inf/NaN pattern
        assert tables.all_finite(np.array([1.0, v], np.float16)) == bool(ok)
    assert tables.all_finite(every[finite]) and not tables.all_finite(every)
    assert tables.all_finite(np.array([65504.0, -65504.0, 6e-8], np.float16))  # max and a subnormal
    assert tables.all_finite(np.zeros((0, 4), np.float16))
    assert not tables.all_finite(np.array([[0, np.nan]], np.float32)) and tables.all_finite(np.ones(3))
    strided = np.full((4, 4), np.inf, np.float16)[:, :2]  # non-contiguous views are checked too
    assert not tables.all_finite(strided)


class Liar(ToyTokenizer):
    """Vouches for values it never checked."""

    def read(self, source):
        if not os.path.exists(source):
            raise TokenizeError(source, "missing", "no such file")
        try:
            return np.load(source)
        except (OSError, ValueError, EOFError) as e:
            raise TokenizeError(source, "corrupt", str(e)) from None

    def tokenize(self, raw, *, source=""):
        return [dataclasses.replace(r, finite=True) for r in super().tokenize(raw, source=source)]


def test_a_record_that_vouches_for_its_values_skips_the_nan_scans_and_the_kit_checks_the_claim(tmp_path):
    """``Record.finite``: the producer checked tokens and positions itself (a compiled kernel while
    writing them); validation then skips its own scans. The claim is not stored, and the conformance
    kit validates without it, so a tokenizer that vouches wrongly fails the kit."""
    from maskloom.testing import check_tokenizer

    spec = ToyTokenizer().spec()
    nan = np.array([[0, np.nan, 0], [0, 0, 0]], np.float32)
    tables.validate_record(rec(0, tokens=nan, finite=True), spec)  # trusted: not scanned
    with pytest.raises(tables.TableError, match="tokens contain non-finite values"):
        tables.validate_record(rec(0, tokens=nan), spec)
    assert "finite" not in repr(rec(0, finite=True))
    t = tables.records_to_arrow([rec(0, finite=True)], spec)
    assert "finite" not in t.column_names

    good, bad = str(tmp_path / "good.npy"), str(tmp_path / "bad.npy")
    np.save(good, np.ones((2, 3), np.float32))
    np.save(bad, nan)
    assert check_tokenizer(Liar(), [good])["records"] == 1
    with pytest.raises(AssertionError, match="bad.npy: .*tokens contain non-finite values"):
        check_tokenizer(Liar(), [bad])


def _zero_column_chunk(path: str, column: str, row_group: int = 0) -> None:
    """Overwrite one column chunk of a Parquet file with zeros, its footer intact: a shard damaged
    inside (the reader fails on that chunk's page header, deterministically)."""
    md = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(
        md.column(i) for i in range(md.num_columns) if md.column(i).path_in_schema.split(".")[0] == column
    )
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(chunk.total_compressed_size))


def test_verify_and_damaged_shards_are_named(tmp_path):
    tok = ToyTokenizer()
    table = tables.write_table(str(tmp_path / "t"), [rec(i, 40) for i in range(6)], tok, rows_per_shard=3)
    assert table.verify() == []
    p0, p1 = table.shard_paths()
    s0, s1 = table.manifest.shards
    _zero_column_chunk(p0, "tokens")  # same size, other bytes
    with open(p0, "rb") as f:
        now = hashlib.sha256(f.read()).hexdigest()
    with open(p1, "r+b") as f:
        f.truncate(100)
    assert table.verify() == [
        f"{p0}: SHA-256 {now[:16]}... differs from the manifest's {s0['sha256'][:16]}...",
        f"{p1}: 100 bytes, the manifest lists {s1['bytes']}",
    ]
    for read in (tables.open_shard, tables.read_shard):
        with pytest.raises(tables.TableError) as e:
            read(p1)
        msg = str(e.value)
        assert msg.startswith(f"{p1}: cannot read shard (") and msg.endswith("; " + tables.DAMAGED_HINT)
    with pytest.raises(tables.TableError, match=r"cannot read shard \("):
        tables.read_shard(p0)  # the footer reads; the zeroed chunk does not
    os.unlink(p1)
    assert table.verify()[1] == f"{p1}: missing"
    with pytest.raises(tables.TableError) as e:
        tables.open_shard(p1)
    assert str(e.value) == f"{p1}: shard listed in the manifest is missing; {tables.DAMAGED_HINT}"


def test_damaged_shard_inside_stops_the_loader_and_the_cli_with_its_name(tmp_path, capsys):
    from maskloom.cli import main
    from maskloom.pipelines.loader import LoaderConfig, TokenLoader

    tok = ToyTokenizer()
    table = tables.write_table(str(tmp_path / "t"), [rec(i, 40) for i in range(6)], tok, rows_per_shard=3)
    assert main(["inspect", table.directory, "--verify"]) == 0
    assert capsys.readouterr().out.startswith("verified 2 shards (0.0 MB) against the manifest: all match\n")
    p1 = table.shard_paths()[1]
    _zero_column_chunk(p1, "tokens")  # read by batches, not by the loader's length scan (positions)
    for workers in (0, 1):  # from a DataLoader worker too: the same one-line error, not its dump
        cfg = LoaderConfig(batch_size=3, cache=False, bucket=False, shuffle=False, num_workers=workers)
        with pytest.raises(tables.TableError) as e:
            list(TokenLoader([table], cfg))
        assert str(e.value).startswith(f"{p1}: cannot read shard, row group 0 (") and "\n" not in str(e.value)
    _zero_column_chunk(p1, "positions")  # the length column: the loader cannot even be built
    with pytest.raises(tables.TableError, match=r"part-00001.parquet: cannot read shard, row group 0 \("):
        TokenLoader([table], LoaderConfig(batch_size=6))
    assert main(["inspect", table.directory, "--verify"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"maskloom inspect: damaged: {p1}: SHA-256 ")
    assert err[1] == (
        "maskloom inspect: 1 of 2 shards do not match the manifest; rebuild the table (maskloom preprocess ... "
        "--overwrite)"
    )
    assert main(["inspect", table.directory]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"maskloom inspect: error: {p1}: cannot read shard, row group 0"
    )
