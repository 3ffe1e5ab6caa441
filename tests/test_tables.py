"""Token-table schema: writing, reading, and every validation error with its message."""

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskloom import tables
from maskloom.tokenizers.base import Record, TableSpec, Tokenizer, register_tokenizer


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
    with pytest.raises(tables.TableError, match="schema version 99 but this maskloom reads version 1"):
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


def test_atomic_shard_write_leaves_no_temp(tmp_path):
    tok = ToyTokenizer()
    info = tables.write_shard(
        str(tmp_path / "part-00000.parquet"), tables.records_to_arrow([rec(0)], tok.spec())
    )
    assert info["rows"] == 1 and len(info["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


def test_fingerprint_depends_on_config():
    assert ToyTokenizer().fingerprint() == ToyTokenizer({"dim": 3}).fingerprint()
    assert ToyTokenizer().fingerprint() != ToyTokenizer({"dim": 4}).fingerprint()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dims'\]"):
        ToyTokenizer({"dims": 3})
