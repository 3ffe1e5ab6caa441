"""Tests for the byte-level BPE text tokenizer (maskloom/tokenizers/text.py)."""

from __future__ import annotations

import json
import logging
import pickle
import re

import numpy as np
import pytest

from maskloom import tables
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
from maskloom.tokenizers.base import SkipReport, reporting_skips
from maskloom.tokenizers.text import SPECIAL_TOKENS, TextConfig, TextTokenizer

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven tired cats sleep under warm red blankets".split()
)


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=8)) + "." for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """A JSONL file with labels, a TXT file and a TSV file."""
    sents = _sentences(40)
    jl = tmp_path / "docs.jsonl"
    jl.write_text(
        "".join(json.dumps({"text": s, "label": "b" if i % 2 else "a"}) + "\n" for i, s in enumerate(sents))
    )
    txt = tmp_path / "story.txt"
    txt.write_text("\n".join(sents[:10]) + "\n")
    tsv = tmp_path / "sms.tsv"
    tsv.write_text(
        "Label\tSMS\n"
        + "".join(f"{'spam' if i % 3 == 0 else 'ham'}\t{s}\n" for i, s in enumerate(sents[:12]))
    )
    return {"jsonl": str(jl), "txt": str(txt), "tsv": str(tsv), "sents": sents}


def _fitted(paths, **cfg) -> TextTokenizer:
    tok = TextTokenizer(TextConfig(vocab_size=300, min_frequency=1, **cfg))
    tok.fit(paths)
    return tok


def test_registered():
    assert "text" in TOKENIZERS
    assert isinstance(get_tokenizer("text", {"vocab_size": 500}), TextTokenizer)
    assert TextTokenizer.needs_fit


def test_read_formats(corpus):
    tok = TextTokenizer(TextConfig(text_column="sms"))
    raw = tok.read(corpus["jsonl"])
    assert len(raw) == 40 and raw[0] == (corpus["sents"][0], "a") and raw[1][1] == "b"
    assert tok.read(corpus["txt"]) == [("\n".join(corpus["sents"][:10]) + "\n", None)]
    tsv = tok.read(corpus["tsv"])
    assert len(tsv) == 12 and tsv[0] == (corpus["sents"][0], "spam") and tsv[1][1] == "ham"


def test_read_txt_split_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one two\nthree\n\nfour five\n  \nsix\n")
    lines = TextTokenizer(TextConfig(split="lines")).read(str(p))
    assert [d for d, _ in lines] == ["one two", "three", "", "four five", "  ", "six"]
    paras = TextTokenizer(TextConfig(split="paragraphs")).read(str(p))
    assert [d for d, _ in paras] == ["one two\nthree", "four five", "six\n"]


def test_csv_quoted_fields(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('id,Text,topic\n1,"hello, world",x\n2,"say ""hi""",\n')
    raw = TextTokenizer(TextConfig(label_column="Topic")).read(str(p))
    assert raw == [("hello, world", "x"), ('say "hi"', None)]
    assert TextTokenizer().read(str(p)) == [("hello, world", None), ('say "hi"', None)]  # no 'label' column


def test_fit_spec_and_labels(corpus):
    tok = _fitted([corpus["jsonl"], corpus["txt"]])
    spec = tok.spec()
    assert spec.token_kind == "discrete" and spec.token_dtype == "int32" and spec.position_axes == ("index",)
    assert spec.vocab_size == tok._bpe.get_vocab_size() <= 300
    assert tok.label_names() == ("a", "b")
    assert tok.special_ids() == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    recs = tok(corpus["jsonl"])
    assert [r.label for r in recs[:4]] == [0, 1, 0, 1]
    assert [r.id for r in recs[:2]] == [f"{corpus['jsonl']}#0-0", f"{corpus['jsonl']}#1-0"]
    assert all(r.tokens.dtype == np.int32 and r.positions.shape == (r.num_tokens, 1) for r in recs)
    assert tok(corpus["txt"])[0].label is None


def test_numeric_labels_sorted_numerically(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(
        "".join(json.dumps({"text": f"doc {i}", "label": lab}) + "\n" for i, lab in enumerate([10, 2, 1, 2]))
    )
    tok = _fitted([str(p)])
    assert tok.label_names() == ("1", "2", "10")
    assert [r.label for r in tok(str(p))] == [2, 1, 0, 1]


def test_spec_before_fit_is_clear():
    with pytest.raises(RuntimeError, match="fit"):
        TextTokenizer().spec()


def test_round_trip_ascii_and_unicode(corpus, tmp_path):
    tok = _fitted([corpus["jsonl"]])
    for text in ["Hello,   world!\n\ttabs and  spaces ", "naïve café — 東京 🚀", corpus["sents"][3]]:
        (rec,) = tok.tokenize([(text, None)], source="s")
        assert tok.detokenize(rec) == text
    # a whole .txt file (never seen words, odd whitespace) round-trips exactly
    p = tmp_path / "odd.txt"
    p.write_text("Zyx qwv!!  ~^%$  \r\nend")
    (rec,) = tok(str(p))
    assert tok.detokenize(rec) == "Zyx qwv!!  ~^%$  \r\nend"
    assert (rec.tokens != tok.special_ids()["[UNK]"]).all()


@pytest.mark.parametrize(
    ("max_length", "overlap", "n_chunks"),
    [(64, 0, 4), (64, 16, 4), (64, 8, 4), (64, 32, 6), (200, 0, 1), (1, 0, 200)],
)
def test_chunking_exact_counts(max_length, overlap, n_chunks, corpus):
    base = _fitted([corpus["jsonl"]])
    tok = TextTokenizer(TextConfig(vocab_size=300, max_length=max_length, overlap=overlap))
    tok._bpe = base._bpe
    # a document of exactly 200 tokens
    text = base._bpe.decode(base._bpe.encode(" ".join(corpus["sents"])).ids[:200])
    n = len(base._bpe.encode(text).ids)
    assert n == 200
    recs = tok.tokenize([(text, None)], source="d")
    assert len(recs) == n_chunks
    assert [r.id for r in recs] == [f"d#0-{c}" for c in range(n_chunks)]
    assert all(r.num_tokens <= max_length for r in recs)
    full = base._bpe.encode(text).ids
    step = max_length - overlap
    for c, r in enumerate(recs):
        assert r.meta["start"] == c * step
        assert r.tokens.tolist() == full[c * step : c * step + max_length]
        assert r.positions[:, 0].tolist() == list(range(r.num_tokens))
    assert recs[-1].meta["start"] + recs[-1].num_tokens == 200
    if overlap == 0:
        assert "".join(tok.detokenize(r) for r in recs) == text


def test_save_load_and_vocab_reuse(corpus, tmp_path):
    tok = _fitted([corpus["jsonl"]])
    written = tok.save_artifacts(str(tmp_path / "art"))
    assert written == ["bpe.json", "labels.json"]
    restored = TextTokenizer(tok.config)
    restored.load_artifacts(str(tmp_path / "art"))
    assert restored.spec() == tok.spec() and restored.label_names() == ("a", "b")
    # reuse the vocabulary through vocab_path: fit learns labels only and ids are identical
    reuse = TextTokenizer(TextConfig(vocab_path=str(tmp_path / "art" / "bpe.json"), text_column="SMS"))
    reuse.fit([corpus["jsonl"], corpus["tsv"]])
    assert reuse.spec().vocab_size == tok.spec().vocab_size
    assert reuse.label_names() == ("a", "b", "ham", "spam")
    for a, b in zip(tok(corpus["txt"]), reuse(corpus["txt"])):
        assert np.array_equal(a.tokens, b.tokens)
    # without fit, vocab_path alone makes the tokenizer usable
    assert TextTokenizer(TextConfig(vocab_path=str(tmp_path / "art" / "bpe.json")))(corpus["txt"])


def test_fit_is_deterministic_and_pickles(corpus):
    a = _fitted([corpus["jsonl"], corpus["txt"]])
    b = _fitted([corpus["jsonl"], corpus["txt"]])
    assert a._bpe.to_str() == b._bpe.to_str()
    c = pickle.loads(pickle.dumps(a))
    for r1, r2 in zip(a(corpus["jsonl"]), c(corpus["jsonl"])):
        assert np.array_equal(r1.tokens, r2.tokens) and r1.label == r2.label


def test_write_table_round_trip(corpus, tmp_path):
    tok = _fitted([corpus["jsonl"]])
    recs = tok(corpus["jsonl"])
    table = tables.write_table(str(tmp_path / "table"), recs, tok)
    assert table.num_rows == 40 and table.label_names == ["a", "b"]
    again = table.tokenizer()
    back = table.records()
    assert [again.detokenize(r) for r in back] == corpus["sents"]


def test_empty_documents_skipped_with_warning(tmp_path, caplog):
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha beta", "", "   ", "gamma"]) + "\n")
    tok = _fitted([str(p)])
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        recs = tok(str(p))
    assert [r.id for r in recs] == [f"{p}#0-0", f"{p}#3-0"]
    assert "skipped 2 empty document(s) of 4" in caplog.text


def test_bad_inputs(corpus, tmp_path):
    tok = _fitted([corpus["jsonl"]])

    def kind(path) -> str:
        with pytest.raises(TokenizeError) as e:
            tok(str(path))
        assert e.value.source == str(path)
        return e.value.kind

    assert kind(tmp_path / "nope.txt") == "missing"
    (tmp_path / "zero.txt").write_bytes(b"")
    assert kind(tmp_path / "zero.txt") == "empty"
    (tmp_path / "blank.txt").write_text(" \n\n  ")
    assert kind(tmp_path / "blank.txt") == "empty"
    (tmp_path / "x.pdf").write_text("hello")
    assert kind(tmp_path / "x.pdf") == "unsupported"
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)))
    assert kind(tmp_path / "bin.txt") == "corrupt"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    assert kind(tmp_path / "bad.jsonl") == "corrupt"
    (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
    assert kind(tmp_path / "field.jsonl") == "config"
    (tmp_path / "type.jsonl").write_text('{"text": 3}\n')
    assert kind(tmp_path / "type.jsonl") == "invalid"
    (tmp_path / "col.csv").write_text("a,b\n1,2\n")
    assert kind(tmp_path / "col.csv") == "config"
    (tmp_path / "unseen.jsonl").write_text('{"text": "hi", "label": "zzz"}\n')
    assert kind(tmp_path / "unseen.jsonl") == "invalid"


def test_a_few_unusable_jsonl_lines_are_skipped_not_the_whole_file(tmp_path, caplog):
    """One damaged line of a big shard used to reject the file, and every good document with it."""
    good = [json.dumps({"text": f"document {i}", "label": "a"}) for i in range(6)]
    lines = [*good[:2], "{not json", *good[2:4], '{"text": 3}', '{"text": "x", "label": [1]}', *good[4:]]
    (tmp_path / "shard.jsonl").write_text("\n".join(lines) + "\n")
    tok = TextTokenizer(TextConfig())
    reports = []
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"), reporting_skips(reports.append):
        raw = tok.read(str(tmp_path / "shard.jsonl"))
    assert raw == [(f"document {i}", "a") for i in range(6)]
    assert reports == [  # what the pipeline counts in its summary and manifest
        SkipReport(str(tmp_path / "shard.jsonl"), "lines", 3, 9, "line 3 is not JSON (Expecting property name "
                   "enclosed in double quotes) (corrupt)")
    ]  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'shard.jsonl'}: skipped 3 of 9 lines that are no usable record: line 3 is not JSON "
        "(Expecting property name enclosed in double quotes); line 6: field 'text' is a int, expected a "
        "string; line 7: label field 'label' is an array ([1]); a label must be a string, a number or a boolean"
    ]
    # mostly unusable: the file is not what the config expects, and says so with its first problem
    (tmp_path / "other.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n{"text": "c"}\n')
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "other.jsonl"))
    assert (e.value.kind, e.value.reason) == (
        "config",
        "line 1 has no text field 'text' (keys: ['body']); set text_field (2 of 3 lines are unusable)",
    )


def test_bad_config():
    for cfg in [
        {"max_length": 0},
        {"overlap": 8, "max_length": 8},
        {"split": "words"},
        {"vocab_size": 100},
        {"nope": 1},
    ]:
        with pytest.raises(ValueError):
            TextTokenizer(cfg)
    with pytest.raises(ValueError, match="does not exist"):
        TextTokenizer({"vocab_path": "/nonexistent/bpe.json"})


def test_conformance(corpus):
    testing = pytest.importorskip("maskloom.testing")

    def compare(raw, out, rec):
        assert out == raw[rec.meta["doc"]][0]

    report = testing.check_tokenizer(
        TextTokenizer(TextConfig(vocab_size=400, min_frequency=1, text_column="sms")),
        [corpus["jsonl"], corpus["txt"], corpus["tsv"]],
        compare=compare,
    )
    assert report == {"sources": 3, "records": 53, "tokens": report["tokens"]}


def test_explicit_labels_and_render(corpus, tmp_path):
    tok = TextTokenizer({"vocab_size": 300, "labels": ["b", "a", "c"]})
    assert tok.config.labels == ("b", "a", "c")
    tok.fit([corpus["jsonl"]])
    assert tok.label_names() == ("b", "a", "c")
    assert [r.label for r in tok(corpus["jsonl"])[:2]] == [1, 0]
    tok.render(tok.read(corpus["txt"]), str(tmp_path / "doc.png"))
    assert (tmp_path / "doc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jsonl_records_split_on_newline_only(tmp_path):
    # U+2028/U+2029/U+0085 are left unescaped by json.dumps(ensure_ascii=False); \r\n endings are fine too
    texts = ["one\u2028two", "a\u2029b", "c\x85d", "e\x0cf"]
    p = tmp_path / "seps.jsonl"
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts) + "\n")
    assert TextTokenizer(TextConfig()).read(str(p)) == [(t, None) for t in texts]


def test_documents_encoded_a_batch_at_a_time_give_the_same_records(corpus, monkeypatch):
    """ENCODE_BATCH bounds the tokenizers Encodings alive at once (a 81 MB JSONL of 100,000
    documents peaked at 2.0 GB in one call, 0.53 GB in batches); the records are the same."""
    tok = _fitted([corpus["jsonl"]], max_length=6, overlap=2)
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 10**9)
    whole = tok(corpus["jsonl"])
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 3)  # 40 documents: 14 calls, the last of 1
    batched = tok(corpus["jsonl"])
    assert len(batched) == len(whole) > 40
    for a, b in zip(batched, whole):
        assert (a.id, a.label, a.meta) == (b.id, b.label, b.meta)
        assert np.array_equal(a.tokens, b.tokens) and a.tokens.dtype == np.int32


def test_a_lone_surrogate_escape_in_jsonl_becomes_u_fffd_with_a_warning(tmp_path, caplog):
    """'\\ud83d' without its other half is valid JSON (scrapers cut emoji so) but no UTF-8 text: it
    stopped the whole job in the driver's fit (UnicodeEncodeError in the BPE trainer)."""
    p = tmp_path / "s.jsonl"
    p.write_text(
        '{"text": "fine"}\n'
        '{"text": "truncated emoji \\ud83d here", "label": "x\\udc00"}\n'
        '{"text": "a whole one \\ud83d\\ude00 and C:\\\\users"}\n'
    )
    tok = TextTokenizer(TextConfig(vocab_size=300, min_frequency=1))
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        raw = tok.read(str(p))
    assert raw == [
        ("fine", None),
        ("truncated emoji \ufffd here", "x\ufffd"),
        ("a whole one \U0001f600 and C:\\users", None),
    ]
    assert "by U+FFFD on 1 line(s), first line 2" in caplog.text
    tok.fit([str(p)])
    assert tok.label_names() == ("x\ufffd",)
    recs = tok(str(p))
    assert [tok.detokenize(r) for r in recs] == [d for d, _ in raw] and recs[1].label == 0
    # a str given to tokenize() directly is encoded with the same replacement
    (rec,) = tok.tokenize([("half \ud83d", None)], source="m")
    assert tok.detokenize(rec) == "half \ufffd"


def test_fit_skips_a_source_whose_reader_fails_in_any_way(corpus, monkeypatch, caplog):
    tok = TextTokenizer(TextConfig(vocab_size=300, min_frequency=1))
    documents = TextTokenizer._documents

    def flaky(self, source, notes=None):
        if source == corpus["txt"]:
            raise RuntimeError("boom")
        return documents(self, source, notes)

    monkeypatch.setattr(TextTokenizer, "_documents", flaky)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        tok.fit([corpus["txt"], corpus["jsonl"]])
    assert tok.fitted and tok.label_names() == ("a", "b")
    assert f"skipped 1 unreadable source(s), e.g. {corpus['txt']}: RuntimeError: boom" in caplog.text


def test_jsonl_label_values(tmp_path):
    """A JSON label names its class by value: 1 and 1.0 are one class, booleans are spelled as in JSON."""
    p = tmp_path / "l.jsonl"
    labels = [1, "1", 1.0, 0.5, -2, True, False, None, "cat", 2.0**60]
    p.write_text("".join(json.dumps({"text": "hi", "label": lab}) + "\n" for lab in labels))
    raw = TextTokenizer().read(str(p))
    assert [lab for _, lab in raw] == [
        "1", "1", "1", "0.5", "-2", "true", "false", None, "cat", "1.152921504606847e+18"
    ]  # fmt: skip
    tok = _fitted([str(p)])
    assert tok.label_names() == ("-2", "0.5", "1", "1.152921504606847e+18", "cat", "false", "true")

    def reason(line: str) -> tuple[str, str]:
        q = tmp_path / "bad.jsonl"
        q.write_text('{"text": "ok", "label": "a"}\n' + line + "\n")
        with pytest.raises(TokenizeError) as e:
            TextTokenizer().read(str(q))
        return e.value.kind, e.value.reason

    tail = "; a label must be a string, a number or a boolean"
    assert reason('{"text": "x", "label": [1, 2]}') == (
        "invalid", "line 2: label field 'label' is an array ([1, 2])" + tail
    )  # fmt: skip
    assert reason('{"text": "x", "label": {"k": 1}}') == (
        "invalid", "line 2: label field 'label' is an object ({\"k\": 1})" + tail
    )  # fmt: skip
    assert reason('{"text": "x", "label": NaN}') == ("invalid", "line 2: label field 'label' is NaN" + tail)
    assert reason('{"text": "x", "label": -Infinity}') == (
        "invalid", "line 2: label field 'label' is -Infinity" + tail
    )  # fmt: skip
    # label_field=None ignores whatever is there
    (tmp_path / "any.jsonl").write_text('{"text": "x", "label": [1]}\n')
    assert TextTokenizer(TextConfig(label_field=None)).read(str(tmp_path / "any.jsonl")) == [("x", None)]


def test_csv_and_tsv_cells_over_128_kib(tmp_path):
    """Python's csv module refuses a field over 128 KiB by default ("field larger than field limit")."""
    import csv

    big = "word " * (200 * 1024 // 5)  # 200 KiB
    (tmp_path / "a.csv").write_text(f'text,label\n"{big}",a\nshort,b\n')
    (tmp_path / "a.tsv").write_text(f"label\ttext\na\t{big}\n")
    before = csv.field_size_limit()
    assert TextTokenizer().read(str(tmp_path / "a.csv")) == [(big, "a"), ("short", "b")]
    assert TextTokenizer().read(str(tmp_path / "a.tsv")) == [(big, "a")]
    assert csv.field_size_limit() == before  # the process-wide limit is restored


class _TrainSpy:
    """A tokenizers pipeline made by _new_bpe that records what its trainer is fed."""

    def __init__(self, tok, fed: list[str]) -> None:
        self._tok, self._fed = tok, fed

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def train_from_iterator(self, it, trainer):
        def spy():
            for s in it:
                self._fed.append(s)
                yield s

        self._tok.train_from_iterator(spy(), trainer=trainer)


@pytest.fixture
def train_spy(monkeypatch):
    """The texts the BPE trainer of the next fit() is fed, in order."""
    from maskloom.tokenizers import text

    fed: list[str] = []
    real = text._new_bpe
    monkeypatch.setattr(text, "_new_bpe", lambda: _TrainSpy(real(), fed))
    return fed


def test_words_longer_than_max_train_word_reach_the_trainer_in_pieces(tmp_path, train_spy, caplog):
    """A long run without a break (DNA, a minified blob) cost the BPE trainer the square of its length
    (400,000 letters: 117 s; 5 MB: hours) in the driver's fit. Such words are cut at word boundaries,
    the other words of the document are unchanged, and the text is still encoded whole."""
    from maskloom.tokenizers.text import MAX_TRAIN_WORD

    assert MAX_TRAIN_WORD == 1024
    head = "hello world " * 10
    doc = head + "x" * 3000 + "\n\n" + " " * 2000 + "tail, " + "7" * 1100 + "!"
    (tmp_path / "d.txt").write_text(doc)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        tok = _fitted([str(tmp_path / "d.txt")])
    assert train_spy == [
        head[:-1],  # the space before the long word goes with it, as the pre-tokenizer keeps it
        " " + "x" * 1023, "x" * 1024, "x" * 953,
        "\n\n" + " " * 1022, " " * 977,  # a whitespace run gives its last space to the next word
        " tail,",
        " " + "7" * 1023, "7" * 77,
        "!",
    ]  # fmt: skip
    assert "".join(train_spy) == doc
    assert (
        "1 document(s) hold words of over 1024 characters without a break (most: 6103 characters"
        in caplog.text
    )
    (rec,) = tok(str(tmp_path / "d.txt"))
    assert tok.detokenize(rec) == doc


def test_normal_text_reaches_the_trainer_whole(tmp_path, train_spy):
    """Text without a word over MAX_TRAIN_WORD characters (here a CJK paragraph of 1,500 characters
    without a space, whose words end at its punctuation) is fed to the trainer as it is."""
    rng = np.random.default_rng(0)
    cjk = "".join("".join(map(chr, rng.integers(0x4E00, 0x4E00 + 300, 29))) + "，" for _ in range(50))
    docs = [cjk, " ".join(_sentences(300)), "short"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    _fitted([str(tmp_path / "d.jsonl")])
    assert len(cjk) == 1500 and train_spy == docs


def test_long_words_are_trained_on_up_to_a_cap_per_document(tmp_path, train_spy, monkeypatch, caplog):
    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "MAX_TRAIN_LONG_CHARS", 2500)
    doc = "a" * 2000 + " " + "b" * 2000 + " c"
    (tmp_path / "d.txt").write_text(doc)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        tok = _fitted([str(tmp_path / "d.txt")])
    assert [len(s) for s in train_spy] == [1024, 976, 500, 2]  # 2,000 + 500 characters of long words
    assert train_spy[-1] == " c"
    assert "and not on 1501 characters beyond 2500 per document" in caplog.text
    (rec,) = tok(str(tmp_path / "d.txt"))
    assert tok.detokenize(rec) == doc  # encoding is not capped


# ---- streaming, compressed files, Parquet, a bounded fit ----------------------------------------


def _chunked_text(tmp_path, monkeypatch, content: str, read_bytes: int) -> list[str]:
    """The chunks _text_chunks makes of ``content`` (written as UTF-8) reading ``read_bytes`` at a time."""
    from maskloom.tokenizers import text

    p = tmp_path / f"c{read_bytes}.txt"
    p.write_bytes(content.encode("utf-8"))
    monkeypatch.setattr(text, "READ_BYTES", read_bytes)
    return list(text._text_chunks(str(p), None))


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5, 8, 1 << 20])
def test_incremental_splits_match_the_whole_string_ones(tmp_path, monkeypatch, read_bytes):
    """Documents are cut from chunks of the file as they are read; wherever a chunk ends (inside a
    "\\r\\n", a 4-byte character or a blank-line break), they are those the whole string gives."""
    import io

    from maskloom.tokenizers import text

    content = (
        "one\r\ntwo\rthree\n\nfour \u2028five\x0bsix\x85\n \t\r\n\nseven 東京 🚀\r\n\r\n"
        '"a,b",c\n\n  \n\nend\u2029tail\n\n\n'
    )
    chunks = _chunked_text(tmp_path, monkeypatch, "\ufeff" + content, read_bytes)
    assert "".join(chunks) == content  # the byte order mark dropped
    assert all(not c.endswith("\r") for c in chunks[:-1])
    assert list(text._split_newlines(chunks)) == content.split("\n")
    assert list(text._split_newlines(chunks, keepends=True)) == list(io.StringIO(content))
    assert list(text._split_lines(chunks)) == content.splitlines()
    assert list(text._split_paragraphs(chunks)) == re.split(r"\n[ \t\r]*\n", content)
    for cut in ("a\n", "a", "a\n\n", "\n", "a\r"):  # no last line, an empty last paragraph
        assert list(text._split_newlines([cut])) == cut.split("\n")
        assert list(text._split_lines([cut])) == cut.splitlines()
        assert list(text._split_paragraphs([cut])) == re.split(r"\n[ \t\r]*\n", cut)


def test_not_utf8_and_nul_bytes_are_found_wherever_they_are(tmp_path, monkeypatch):
    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "READ_BYTES", 4)
    tok = TextTokenizer()

    def reason(name: str, data: bytes) -> tuple[str, str]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / name))
        return e.value.kind, e.value.reason

    assert reason("a.txt", b"hello w\xc3orld") == (
        "corrupt",
        "not UTF-8 text (invalid continuation byte at byte 7)",
    )
    assert reason("b.txt", b"\xef\xbb\xbfhello \xff") == (
        "corrupt",
        "not UTF-8 text (invalid start byte at byte 9)",
    )
    assert reason("c.txt", "caf\u00e9".encode()[:-1]) == (
        "corrupt",
        "not UTF-8 text (unexpected end of data at byte 3)",
    )
    assert reason("d.jsonl", b'{"text": "a"}\n\x00\n') == ("corrupt", "contains NUL bytes; not a text file")


@pytest.fixture
def mixed(tmp_path):
    """Files exercising every rule that numbers documents: skipped and blank JSONL lines, empty
    documents, labels, CSV/TSV rows, and the three .txt split modes."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(60):
        if i % 17 == 5:
            lines.append("{broken")
        elif i % 13 == 4:
            lines.append("")
        elif i % 11 == 3:
            lines.append(json.dumps({"text": ""}))
        else:
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))
            lines.append(json.dumps({"text": words, "label": ["a", "b", None][i % 3]}))
    (tmp_path / "m.jsonl").write_text("\r\n".join(lines) + "\n")
    sents = _sentences(30, seed=2)
    (tmp_path / "m.csv").write_text(
        "id,Text,label\n"
        + "".join(f'{i},"{s}\nmore, {i}",{"ab"[i % 2]}\n' for i, s in enumerate(sents))
        + "\n"
    )
    (tmp_path / "m.tsv").write_text("label\ttext\n" + "".join(f"b\t{s}\n" for s in sents[:9]))
    (tmp_path / "m.txt").write_text(
        "\n\n".join(" ".join(sents[i : i + 3]) for i in range(0, 30, 3)) + "\n \n\n"
    )
    return tmp_path


@pytest.mark.parametrize("split", ["document", "lines", "paragraphs"])
def test_iter_records_gives_the_records_of_call_record_for_record(mixed, monkeypatch, split, caplog):
    from maskloom.tokenizers import text

    paths = [str(mixed / n) for n in ("m.jsonl", "m.csv", "m.tsv", "m.txt")]
    tok = _fitted(paths, max_length=6, overlap=2, split=split)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        whole = {p: tok(p) for p in paths}
    warnings = [r.getMessage() for r in caplog.records]
    caplog.clear()
    monkeypatch.setattr(text, "READ_BYTES", 7)  # documents cut across many reads
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 4)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        for p in paths:
            streamed = list(tok.iter_records(p))
            assert len(streamed) == len(whole[p]) > 20
            for a, b in zip(streamed, whole[p]):
                assert (a.id, a.source, a.label, a.meta) == (b.id, b.source, b.label, b.meta)
                assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.positions, b.positions)
    assert [r.getMessage() for r in caplog.records] == warnings
    # documents are numbered as before: a skipped or blank JSONL line is no document, an empty one is
    jl = paths[0]
    docs = sorted({r.meta["doc"] for r in whole[jl]})
    assert docs == [i for i in range(52) if i not in (3, 12, 21, 31, 40, 50)]
    broken = "is not JSON (Expecting property name enclosed in double quotes)"
    assert warnings[:2] == [
        f"{jl}: skipped 4 of 56 lines that are no usable record: line 6 {broken}; line 23 {broken}; "
        f"line 40 {broken}; ... (1 more)",
        f"{jl}: skipped 6 empty document(s) of 52",
    ]


def test_streaming_memory_is_bounded_by_a_batch(tmp_path):
    """A file is read, encoded and yielded a batch at a time: streaming ~19 MB of JSONL holds 5.3 MB
    of Python objects at its peak (tracemalloc), where its list of documents alone holds 25 MB, and
    the old path (the whole file read into one string, then every document and record listed) 60 MB."""
    import tracemalloc

    word = "abcdefghij" * 10
    p = tmp_path / "big.jsonl"
    with open(p, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": f"doc {i} " + " ".join([word] * 9), "label": "ab"[i % 2]}) + "\n")
    assert p.stat().st_size > 18_000_000
    (tmp_path / "fit.jsonl").write_text(
        "".join(json.dumps({"text": f"{word} doc {i}", "label": "ab"[i % 2]}) + "\n" for i in range(50))
    )
    tok = _fitted([str(tmp_path / "fit.jsonl")])
    bound = 10_000_000
    tracemalloc.start()
    try:
        n = sum(1 for _ in tok.iter_records(str(p)))
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        docs = len(tok.read(str(p)))
        listed = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == docs == 20_000
    assert streamed < bound < 2 * bound < listed


def test_an_error_found_at_the_end_comes_after_the_records(tmp_path, monkeypatch):
    """The records of a file that turns out mostly unusable were yielded before its error."""
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 1)
    p = tmp_path / "late.jsonl"
    p.write_text('{"text": "alpha"}\n{"text": "beta"}\n' + '{"body": "x"}\n' * 3)
    tok = _fitted([str(p)])
    got = []
    with pytest.raises(TokenizeError) as e:
        for r in tok.iter_records(str(p)):
            got.append(r.id)
    assert got == [f"{p}#0-0", f"{p}#1-0"]
    assert (e.value.kind, e.value.reason) == (
        "config",
        "line 3 has no text field 'text' (keys: ['body']); set text_field (3 of 5 lines are unusable)",
    )
    with pytest.raises(TokenizeError, match="3 of 5 lines"):
        tok(str(p))  # the list path raises it before any record, as before


def _compress(path, codec: str) -> str:
    """``path`` compressed with ``codec`` beside it (``<path>.<ext>``)."""
    import bz2
    import gzip
    import lzma

    import pyarrow as pa

    from maskloom.tokenizers.text import COMPRESSIONS

    ext = next(e for e, c in COMPRESSIONS.items() if c == codec)
    data = open(path, "rb").read()
    out = f"{path}{ext}"
    if codec in ("gzip", "bz2", "xz"):
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[codec]
        with opener(out, "wb", **({"compresslevel": 1} if codec == "bz2" else {})) as f:  # 100 kB blocks
            f.write(data)
    else:
        with pa.output_stream(out, compression=codec) as f:
            f.write(data)
    return out


@pytest.mark.parametrize("codec", ["gzip", "bz2", "xz", "zstd", "lz4"])
def test_compressed_files_read_as_their_plain_text(mixed, codec, monkeypatch):
    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "READ_BYTES", 64)
    tok = _fitted([str(mixed / "m.jsonl")], max_length=6, overlap=2, text_column="text")
    (mixed / "c4.json").write_text((mixed / "m.jsonl").read_text())  # C4: JSON Lines named .json(.gz)
    for name in ("m.jsonl", "c4.json", "m.csv", "m.tsv", "m.txt"):
        plain = str(mixed / name)
        packed = _compress(plain, codec)
        assert packed.lower().endswith(TextTokenizer.extensions)
        assert tok.read(packed) == tok.read(plain)
        a, b = list(tok.iter_records(packed)), tok(plain)
        assert [r.id for r in a] == [r.id.replace(plain, packed) for r in b]
        assert all(np.array_equal(x.tokens, y.tokens) and x.label == y.label for x, y in zip(a, b))


@pytest.mark.parametrize("codec", ["gzip", "bz2", "xz", "zstd", "lz4"])
def test_a_truncated_compressed_file_is_corrupt_even_after_records(tmp_path, codec, monkeypatch):
    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "READ_BYTES", 4096)
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 8)
    rng = np.random.default_rng(0)
    p = tmp_path / "t.jsonl"
    p.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=12))}) + "\n" for _ in range(4000))
    )
    packed = _compress(p, codec)
    data = open(packed, "rb").read()
    open(packed, "wb").write(data[: len(data) * 3 // 4])
    tok = _fitted([str(p)])
    got = 0
    with pytest.raises(TokenizeError) as e:
        for _ in tok.iter_records(packed):
            got += 1
    assert e.value.kind == "corrupt" and got > 100
    assert re.fullmatch(
        rf"damaged or truncated {codec} stream after [\d,]+ bytes of text \(.+\)", e.value.reason
    )
    # a file that is not compressed at all
    (tmp_path / "plain.txt.gz").write_text("hello\n")
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "plain.txt.gz"))
    assert (e.value.kind, e.value.reason) == (
        "corrupt",
        "not a readable gzip stream (zlib inflate failed: incorrect header check)",
    )


def test_names_text_does_not_read(tmp_path):
    tok = TextTokenizer()
    for name in ("a.gz", "a.parquet.gz", "a.pdf.zst"):
        (tmp_path / name).write_text("x")
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / name))
        assert e.value.kind == "unsupported"
    assert e.value.reason == (
        "extension '.pdf.zst'; text reads .txt, .jsonl, .json, .csv, .tsv "
        "(also compressed: .gz, .bz2, .xz, .zst, .lz4) and .parquet"
    )
    assert len(TextTokenizer.extensions) == 6 + 5 * 5 and ".jsonl.zst" in TextTokenizer.extensions


def test_a_json_document_is_not_json_lines(tmp_path):
    tok = TextTokenizer()

    def reason(content: str) -> tuple[str, str]:
        (tmp_path / "d.json").write_text(content)
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / "d.json"))
        return e.value.kind, e.value.reason

    tail = ": the file is one JSON document, not JSON Lines; text reads JSON Lines only (one object per line)"
    docs = [{"text": f"doc {i}"} for i in range(500)]
    assert reason(json.dumps(docs, indent=2)) == ("unsupported", "line 1 starts a JSON array" + tail)
    assert reason("\n" + json.dumps(docs)) == ("unsupported", "line 2 starts a JSON array" + tail)
    assert reason(json.dumps({"data": docs}, indent=1)) == (
        "unsupported", "line 1 starts a JSON object written over several lines" + tail
    )  # fmt: skip
    # one object on one line is a one-line JSON Lines file: its own problem is the error
    assert reason(json.dumps({"data": docs})) == (
        "config",
        "line 1 has no text field 'text' (keys: ['data']); set text_field",
    )


def _parquet(path, columns: dict, **kw) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **kw)
    return str(path)


def test_parquet_text_and_labels(tmp_path, monkeypatch, caplog):
    """A Hugging Face dataset shard: columns matched case-insensitively, null texts are empty
    documents, labels named by value as in JSONL, read a bounded batch of rows at a time."""
    texts = [f"row {i} " + " ".join(WORDS[i % 5 : i % 5 + 4]) for i in range(10)]
    texts[3], texts[6] = None, "  "
    labels = [1, 2, None, 3, 10, 1, 2, 2, None, 10]
    p = _parquet(
        tmp_path / "train-00000-of-00001.parquet",
        {"id": list(range(10)), "Text": texts, "LABEL": labels},
        row_group_size=3,
    )
    tok = TextTokenizer(TextConfig(vocab_size=300, min_frequency=1))
    assert tok.read(p) == [(t or "", None if v is None else str(v)) for t, v in zip(texts, labels)]
    tok.fit([p])
    assert tok.label_names() == ("1", "2", "3", "10")
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        recs = tok(p)
    assert [(r.meta["doc"], r.label) for r in recs] == [
        (0, 0),
        (1, 1),
        (2, None),
        (4, 3),
        (5, 0),
        (7, 1),
        (8, None),
        (9, 3),
    ]
    assert f"{p}: skipped 2 empty document(s) of 10" in caplog.text
    monkeypatch.setattr(TextTokenizer, "ENCODE_BATCH", 2)  # batches of 2 rows over row groups of 3
    streamed = list(tok.iter_records(p))
    assert [(r.id, r.label, r.meta) for r in streamed] == [(r.id, r.label, r.meta) for r in recs]
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(streamed, recs))
    # floats and booleans are labels by value, strings as they are
    q = _parquet(tmp_path / "n.parquet", {"text": ["a", "b", "c"], "label": [1.0, 0.5, None]})
    assert TextTokenizer().read(q) == [("a", "1"), ("b", "0.5"), ("c", None)]
    q = _parquet(tmp_path / "b.parquet", {"text": ["a", "b"], "label": [True, False]})
    assert TextTokenizer().read(q) == [("a", "true"), ("b", "false")]
    q = _parquet(tmp_path / "s.parquet", {"text": ["a", "b"], "label": ["spam", None]})
    assert TextTokenizer(TextConfig(label_column=None)).read(q) == [("a", None), ("b", None)]
    assert TextTokenizer().read(q) == [("a", "spam"), ("b", None)]


def _row_group_bytes(path) -> int:
    """Compressed bytes of all the row groups of a Parquet file (its footer not included)."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    return sum(md.row_group(g).column(c).total_compressed_size for g in range(md.num_row_groups)
               for c in range(md.num_columns))  # fmt: skip


def test_a_big_parquet_file_is_read_in_parts_with_the_records_of_the_whole(tmp_path, monkeypatch, caplog):
    """split_input cuts a big Parquet file at row groups; each part gives exactly the records the
    whole file gives for its rows (ids, labels, tokens, meta), streamed or read whole, and a label
    error names the row in the whole file."""
    from maskloom.tokenizers.base import split_part

    texts = [f"row {i} " + " ".join(WORDS[i % 7 : i % 7 + 5]) for i in range(40)]
    texts[13] = None  # an empty document keeps its number
    labels = ["a" if i % 3 else "b" for i in range(40)]
    p = _parquet(tmp_path / "big.parquet", {"text": texts, "label": labels}, row_group_size=5)  # 8 groups
    tok = TextTokenizer(TextConfig(vocab_size=300, min_frequency=1))
    tok.fit([p])
    whole = tok(p)
    assert tok.split_input(p) is None  # far below twice PART_BYTES
    mean = _row_group_bytes(p) / 8
    monkeypatch.setattr(TextTokenizer, "PART_BYTES", int(1.5 * mean))  # a part: 2 row groups
    parts = tok.split_input(p)
    assert [split_part(q) for q in parts] == [(p, (0, 2, 8)), (p, (2, 4, 8)), (p, (4, 6, 8)), (p, (6, 8, 8))]
    assert parts[1] == f"{p}#part:2:4/8"
    assert tok.split_input(parts[0]) is None  # a part is not split again
    streamed = [r for q in parts for r in tok.iter_records(q)]
    held = [r for q in parts for r in tok.tokenize(tok.read(q), source=q)]
    for got in (streamed, held):
        assert [(r.id, r.source, r.label, r.meta) for r in got] == [
            (r.id, r.source, r.label, r.meta) for r in whole
        ]
        assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(got, whole))
    assert [r.meta["doc"] for r in tok.iter_records(parts[1])] == list(range(10, 13)) + list(range(14, 20))
    # the last part joins the one before when it is under half of PART_BYTES: 9 groups in parts of 4
    nine = _parquet(tmp_path / "nine.parquet", {"text": texts[:36] + texts[:9]}, row_group_size=5)
    monkeypatch.setattr(TextTokenizer, "PART_BYTES", int(3.5 * _row_group_bytes(nine) / 9))
    assert [split_part(q)[1] for q in tok.split_input(nine)] == [(0, 4, 9), (4, 9, 9)]
    # a label error names its row in the whole file; a file that changed since it was split
    bad = _parquet(tmp_path / "bad.parquet", {"text": ["x"] * 8, "label": [1.0] * 7 + [float("nan")]},
                   row_group_size=2)  # fmt: skip
    with pytest.raises(TokenizeError) as e:
        tok.read(f"{bad}#part:2:4/4")
    assert e.value.reason.startswith("row 8: label column 'label' is NaN")
    with pytest.raises(TokenizeError) as e:
        list(tok.iter_records(f"{bad}#part:2:4/5"))
    assert (e.value.kind, e.value.source) == ("invalid", f"{bad}#part:2:4/5")
    assert "the file has 4 row groups, not the 5 it was split into" in e.value.reason
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "x.jsonl") + "#part:0:1/2")
    assert e.value.kind == "missing"  # the file named before the part
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "x.jsonl") + "#part:0:1/2")
    assert (e.value.kind, e.value.reason) == ("unsupported", "only Parquet files are read in parts")
    assert tok.split_input(str(tmp_path / "x.jsonl")) is None


def test_bad_parquet_files(tmp_path):
    tok = TextTokenizer()

    def error(path) -> tuple[str, str]:
        with pytest.raises(TokenizeError) as e:
            tok.read(str(path))
        return e.value.kind, e.value.reason

    assert error(_parquet(tmp_path / "a.parquet", {"body": ["x"], "label": ["y"]})) == (
        "config", "no text column 'text' in columns ['body', 'label']; set text_column"
    )  # fmt: skip
    assert error(_parquet(tmp_path / "b.parquet", {"text": [1, 2]})) == (
        "invalid", "text column 'text' holds int64, not strings"
    )  # fmt: skip
    assert error(_parquet(tmp_path / "c.parquet", {"text": ["a", "b"], "label": [1.0, float("nan")]})) == (
        "invalid", "row 2: label column 'label' is NaN; a label must be a string, a number or a boolean"
    )  # fmt: skip
    assert tok.read(_parquet(tmp_path / "d.parquet", {"text": [None, None]})) == [("", None), ("", None)]
    (tmp_path / "e.parquet").write_bytes(b"PAR1 not really")
    kind, reason = error(tmp_path / "e.parquet")
    assert kind == "corrupt" and reason.startswith("not a readable Parquet file (")
    good = open(_parquet(tmp_path / "f.parquet", {"text": ["a b c"] * 100}), "rb").read()
    (tmp_path / "g.parquet").write_bytes(good[:40] + good[-200:])
    assert error(tmp_path / "g.parquet")[0] == "corrupt"


def test_spread_order():
    from maskloom.tokenizers.text import _spread

    assert _spread(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert _spread(5) == [0, 4, 2, 1, 3]
    assert _spread(1) == [0] and _spread(0) == []
    assert sorted(_spread(1000)) == list(range(1000)) and _spread(1000)[:4] == [0, 512, 256, 768]


def test_fit_budget_leaves_the_vocabulary_of_a_smaller_corpus_unchanged(corpus, caplog):
    from tokenizers import pre_tokenizers, trainers

    from maskloom.tokenizers.text import _new_bpe

    paths = [corpus["jsonl"], corpus["txt"], corpus["tsv"]]
    cfg = {"vocab_size": 400, "min_frequency": 1, "text_column": "sms"}
    with caplog.at_level(logging.INFO, logger="maskloom.tokenizers.text"):
        budgeted = TextTokenizer(TextConfig(**cfg))
        budgeted.fit(paths)
    unlimited = TextTokenizer(TextConfig(**cfg, fit_max_bytes=0))
    unlimited.fit(paths)
    assert budgeted.config.fit_max_bytes == 256 << 20 and budgeted.label_names() == ("a", "b", "ham", "spam")
    assert budgeted._bpe.to_str() == unlimited._bpe.to_str()
    # what fit did before it had a budget: every document, in the order given, to the trainer
    reference = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    reference.train_from_iterator(
        [t for p in paths for t, _ in budgeted.read(p) if t.strip()], trainer=trainer
    )
    assert budgeted._bpe.to_str() == reference.to_str()
    assert (
        "text fit: trained the vocabulary on all 2.6 kB of text in 3 source(s) (3.8 kB on disk)"
        in caplog.text
    )


def _fixed_docs(path, name: str, n: int, labels=None) -> str:
    """A JSONL file of ``n`` documents of exactly 100 bytes of text ("<name> 0007 zzz...")."""
    with open(path, "w") as f:
        for i in range(n):
            row = {"text": f"{name} {i:04d} ".ljust(100, "z")}
            if labels is not None:
                row["label"] = labels(i)
            f.write(json.dumps(row) + "\n")
    return str(path)


def _doc(name: str, i: int) -> str:
    return f"{name} {i:04d} ".ljust(100, "z")


def test_fit_budget_is_shared_by_the_sources_in_turns(tmp_path, train_spy, monkeypatch, caplog):
    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "MIN_FIT_SHARE", 1)
    paths = [_fixed_docs(tmp_path / f"s{k}.jsonl", f"s{k}", 100) for k in range(4)]
    with caplog.at_level(logging.INFO, logger="maskloom.tokenizers.text"):
        _fitted(paths, fit_max_bytes=8000)
    # visited 0, 2, 1, 3; a share of 8000 / 4 bytes each: their first 20 documents
    assert train_spy == [_doc(f"s{k}", i) for k in (0, 2, 1, 3) for i in range(20)]
    assert (
        "text fit: trained the vocabulary on 8.0 kB of text (fit_max_bytes) from 4 of 4 source(s) (45.2 kB on disk)"
        in caplog.text
    )
    # a source smaller than its share leaves the rest to the others in the next turn; the document
    # that meets the end of the budget is cut
    train_spy.clear()
    small = _fixed_docs(tmp_path / "a.jsonl", "a", 5)
    _fitted([small, paths[0]], fit_max_bytes=3950)
    head = [_doc("a", i) for i in range(5)] + [_doc("s0", i) for i in range(34)]
    assert train_spy == [*head, _doc("s0", 34)[:50]]


def _count_documents(monkeypatch) -> list[int]:
    """How many documents fit() takes from the readers, as a one-item list."""
    documents = TextTokenizer._documents
    pulled = [0]

    def counting(self, source, notes=None):
        for doc in documents(self, source, notes):
            pulled[0] += 1
            yield doc

    monkeypatch.setattr(TextTokenizer, "_documents", counting)
    return pulled


def test_fit_learns_every_label_but_reads_an_unlabelled_corpus_only_to_the_budget(
    tmp_path, monkeypatch, train_spy
):
    pulled = _count_documents(monkeypatch)
    late = _fixed_docs(tmp_path / "late.jsonl", "d", 200, labels=lambda i: "late" if i == 199 else "a")
    tok = _fitted([late], fit_max_bytes=1000)
    assert tok.label_names() == ("a", "late") and sum(map(len, train_spy)) == 1000
    assert pulled[0] == 10 + 200  # 10 trained on; then the file again for its labels
    # a label field that is there but null in the sample is a labelled corpus too
    pulled[0] = 0
    nulls = _fixed_docs(tmp_path / "nulls.jsonl", "d", 200, labels=lambda i: "late" if i == 199 else None)
    assert _fitted([nulls], fit_max_bytes=1000).label_names() == ("late",) and pulled[0] == 210
    # no label field, or the labels given: nothing is read beyond the budget
    pulled[0] = 0
    plain = _fixed_docs(tmp_path / "plain.jsonl", "d", 200)
    assert _fitted([plain], fit_max_bytes=1000).label_names() is None and pulled[0] == 10
    pulled[0] = 0
    assert _fitted([late], fit_max_bytes=1000, labels=("a", "late", "b")).label_names() == ("a", "late", "b")
    assert pulled[0] == 10


def test_fit_max_bytes_must_not_be_negative():
    with pytest.raises(ValueError, match="fit_max_bytes must be >= 0"):
        TextConfig(fit_max_bytes=-1)
    assert TextTokenizer({"fit_max_bytes": 0}).fingerprint() != TextTokenizer().fingerprint()


def test_fit_skips_a_source_that_fails_after_documents(tmp_path, corpus, caplog, monkeypatch):
    """A truncated stream is found after its first documents were read: the fit goes on without it."""
    import gzip

    from maskloom.tokenizers import text

    monkeypatch.setattr(text, "READ_BYTES", 4096)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=20)), "label": "z"}) for _ in range(1000)]
    blob = gzip.compress("\n".join(lines).encode())
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        tok = _fitted([corpus["jsonl"], str(p)])
    assert tok.fitted and tok.label_names() == ("a", "b", "z")  # "z" was read before the damage
    assert (
        f"skipped 1 unreadable source(s), e.g. {p}: corrupt: damaged or truncated gzip stream after"
        in caplog.text
    )
