"""Tests for the byte-level BPE text tokenizer (maskloom/tokenizers/text.py)."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from maskloom import tables
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
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
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.text"):
        raw = tok.read(str(tmp_path / "shard.jsonl"))
    assert raw == [(f"document {i}", "a") for i in range(6)]
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
    read = TextTokenizer.read

    def flaky(self, source):
        if source == corpus["txt"]:
            raise RuntimeError("boom")
        return read(self, source)

    monkeypatch.setattr(TextTokenizer, "read", flaky)
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
