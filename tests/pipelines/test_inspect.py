"""`maskloom inspect`: summary values, histogram, error summary, CLI output, exit codes, rendering."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from maskloom import tables
from maskloom.cli import main
from maskloom.commands.inspect import error_summary, format_histogram, length_histogram, table_summary
from maskloom.tokenizers.base import TOKENIZERS, Record, TableSpec, Tokenizer, register_tokenizer


@register_tokenizer("inspect_test_seq")
class SeqTokenizer(Tokenizer):
    """Toy tokenizer: a raw sample is a 1-D float array cut into tokens of 2 values; renders a PNG."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        dim: int = 2
        """values per token"""

    def spec(self):
        return TableSpec(
            modality="inspect_test_seq",
            token_kind="continuous",
            token_dim=self.config.dim,
            token_dtype="float16",
            position_axes=("index",),
            position_kind="grid",
        )

    def label_names(self):
        return ("low", "high")

    def read(self, source):
        return np.load(source)

    def tokenize(self, raw, *, source=""):
        tok = np.asarray(raw, np.float16).reshape(-1, self.config.dim)
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=tok,
                positions=np.arange(len(tok), dtype=np.float32)[:, None],
            )
        ]

    def detokenize(self, record):
        return np.asarray(record.tokens, np.float32).reshape(-1)

    def render(self, raw, path):
        from PIL import Image

        img = np.tile((np.clip(raw, 0, 1) * 255).astype(np.uint8)[None, :], (4, 1))
        Image.fromarray(img).save(path)


def make_table(tmp_path, lengths=(1, 3, 3, 6), labels=(0, 1, None, 1), errors=()):
    tok = SeqTokenizer()
    recs = []
    for i, (n, lab) in enumerate(zip(lengths, labels)):
        (r,) = tok.tokenize(np.linspace(0, 1, 2 * n), source=f"x{i}.npy")
        r.label = lab
        recs.append(r)
    return tables.write_table(str(tmp_path / "t"), recs, tok, errors=list(errors), rows_per_shard=3)


ERRORS = [
    ("a.npy", "corrupt", "bad header"),
    ("b.npy", "empty", "0 bytes"),
    ("c.npy", "corrupt", "truncated"),
]


def test_length_histogram_exact():
    assert length_histogram(np.array([1, 3, 3, 6]), bins=3) == [(1, 2, 1), (3, 4, 2), (5, 6, 1)]
    assert length_histogram(np.array([4, 4]), bins=10) == [(4, 4, 2)]
    assert length_histogram(np.array([1, 10]), bins=10) == [
        (k, k, 1 if k in (1, 10) else 0) for k in range(1, 11)
    ]
    assert length_histogram(np.array([], np.int64)) == []
    assert format_histogram([(1, 2, 1), (3, 4, 2)], width=4) == ["  1-2 | ##   1", "  3-4 | #### 2"]


def test_summary_and_errors_exact(tmp_path):
    table = make_table(tmp_path, errors=ERRORS)
    s = table_summary(table)
    assert s["modality"] == "inspect_test_seq" and s["tokenizer"] == "inspect_test_seq"
    assert s["config"] == {"dim": 2}
    assert (s["token_kind"], s["token_dim"], s["token_dtype"]) == ("continuous", 2, "float16")
    assert s["position_axes"] == ["index"] and s["position_kind"] == "grid"
    assert s["label_names"] == ["low", "high"]
    assert (s["inputs"], s["rows"], s["tokens"], s["errors"], s["shards"]) == (7, 4, 13, 3, 2)
    assert s["bytes"] == sum(x["bytes"] for x in table.manifest.shards) > 0
    assert s["length"] == {"min": 1, "mean": 3.25, "max": 6}
    assert s["labels"] == {"none": 1, "low": 1, "high": 2}
    e = error_summary(table, examples=2)
    assert e["total"] == 3 and e["by_kind"] == {"corrupt": 2, "empty": 1}
    assert e["examples"] == [
        {"source": "a.npy", "kind": "corrupt", "message": "bad header"},
        {"source": "b.npy", "kind": "empty", "message": "0 bytes"},
    ]


def test_cli_prints_counts_histogram_and_errors(tmp_path, capsys):
    table = make_table(tmp_path, errors=ERRORS)
    assert main(["inspect", table.directory, "--bins", "3"]) == 0
    out = capsys.readouterr().out
    assert "modality    inspect_test_seq" in out
    assert "continuous, dim 2 x float16" in out and "grid on (index)" in out
    assert (
        f"inputs 7  rows 4  tokens 13  errors 3  bytes {sum(x['bytes'] for x in table.manifest.shards)}"
        in out
    )
    assert "shards 2" in out and "labels  none: 1, low: 1, high: 2" in out
    assert "token length per row (min 1, mean 3.25, max 6)" in out
    assert "  3-4 | " + "#" * 40 + " 2" in out
    assert "errors: 3 (corrupt 2, empty 1)" in out and "corrupt: a.npy: bad header" in out


def test_cli_json(tmp_path, capsys):
    table = make_table(tmp_path)
    assert main(["inspect", table.directory, "--json", "--bins", "6"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"] == 4 and d["tokens"] == 13 and d["errors"] == 0
    assert d["histogram"] == [[1, 1, 1], [2, 2, 0], [3, 3, 2], [4, 4, 0], [5, 5, 0], [6, 6, 1]]


def test_cli_bad_paths_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maskloom inspect: error: ") and "missing" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "_manifest.json" in capsys.readouterr().err
    table = make_table(tmp_path)
    assert main(["inspect", table.directory, "--render", "2"]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["inspect", table.directory, "--render", "2", "--out", str(tmp_path / "f" / "png")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"maskloom inspect: error: {tmp_path / 'f' / 'png'}: cannot create the output directory: Not a directory\n"
    )


def test_render_writes_pngs(tmp_path, capsys):
    from PIL import Image

    table = make_table(tmp_path)
    out = tmp_path / "png"
    assert main(["inspect", table.directory, "--render", "2", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000-x0.npy_0.png", "001-x1.npy_0.png"]
    assert Image.open(out / files[1]).size == (6, 4)  # 3 tokens x 2 values, 4 rows
    assert "rendered x1.npy#0 ->" in capsys.readouterr().out


@pytest.mark.skipif("image" not in TOKENIZERS, reason="image tokenizer not available")
def test_render_real_image_tokenizer(tmp_path):
    from PIL import Image

    from maskloom.commands.inspect import render_samples
    from maskloom.tokenizers.base import get_tokenizer

    tok = get_tokenizer("image", {"image_size": 32, "patch_size": 16})
    rng = np.random.default_rng(0)
    recs = [
        r
        for i in range(3)
        for r in tok.tokenize(rng.integers(0, 255, (40, 40, 3), np.uint8), source=f"i{i}.png")
    ]
    table = tables.write_table(str(tmp_path / "img"), recs, tok)
    res = render_samples(table, 2, str(tmp_path / "out"))
    assert [("path" in r) for r in res] == [True, True]
    assert Image.open(res[0]["path"]).size[:2] == (32, 32)
    assert table_summary(table)["tokens"] == 3 * 4


@pytest.mark.skipif("text" not in TOKENIZERS, reason="text tokenizer not available")
def test_render_text_prints_decoded_text(tmp_path, capsys):
    from maskloom.tokenizers.base import get_tokenizer

    src = tmp_path / "doc.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    tok = get_tokenizer("text", {"vocab_size": 300, "min_frequency": 1})
    tok.fit([str(src)])
    table = tables.write_table(str(tmp_path / "txt"), tok(str(src)), tok)
    out = tmp_path / "out"
    assert main(["inspect", table.directory, "--render", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the quick brown fox jumps over the lazy dog\nthe quick brown fox" in printed
    assert list(out.iterdir()) == []


def test_render_unknown_tokenizer_exit_2(tmp_path, capsys):
    table = make_table(tmp_path)
    man = json.loads((tmp_path / "t" / "_manifest.json").read_text())
    man["meta"]["tokenizer"] = "inspect_test_not_registered"
    (tmp_path / "t" / "_manifest.json").write_text(json.dumps(man))
    assert main(["inspect", table.directory, "--render", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot rebuild tokenizer 'inspect_test_not_registered'" in err[0]
