"""Property: random valid inputs always give valid token tables (issue 2, "Tests").

For every modality, hypothesis draws a random input, writes it to a real file (image formats and
modes, WAV/FLAC at several rates and channel counts, .npy/.xyz clouds with NaNs, CSV/Parquet series
with NaNs, edge lists and TU folders, UTF-8 text, tiny videos) and tokenizes it. The outcome is
either

* a ``TokenizeError`` whose kind is one of ``TokenizeError.KINDS``, whose source is the file, and
  which the input's documented rules call for (e.g. ``empty`` for zero-length audio), or
* records that pass ``tables.records_to_arrow`` + ``tables.validate_table``, come back unchanged
  from ``tables.arrow_to_records``, and detokenize within the modality's round-trip tolerance.

Any other exception fails the test. Examples are derandomised (stable in CI) and few per modality,
so the file runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial import cKDTree

from maskloom import tables
from maskloom.testing import _same_record
from maskloom.tokenizers import Record, TokenizeError, Tokenizer, get_tokenizer


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _outcome(tok: Tokenizer, path: str, allowed: set[str] | None) -> list[Record] | None:
    """Tokenize ``path``; ``allowed``: the error kinds the input calls for (None: it must succeed).

    Returns the records (after checking the table round trip), or None after an allowed error.
    """
    try:
        records = tok(path)
    except TokenizeError as e:
        assert e.kind in TokenizeError.KINDS, e
        assert e.source == path, f"error source {e.source!r} is not the file {path!r}"
        assert allowed is not None, f"a valid input was rejected: {e}"
        assert e.kind in allowed, f"error kind {e.kind!r} not among {sorted(allowed)}: {e}"
        return None
    assert records, f"{path}: no records and no error"
    spec = tok.spec()
    meta = tables.table_meta(
        spec,
        tokenizer=tok.name,
        tokenizer_version=tok.version,
        config=tok.config_dict(),
        fingerprint=tok.fingerprint(),
        label_names=tok.label_names(),
    )
    table = tables.records_to_arrow(records, spec, meta)
    assert tables.validate_table(table, where=path)["modality"] == tok.name
    back = tables.arrow_to_records(table)
    assert len(back) == len(records) and all(map(_same_record, records, back)), (
        "Arrow round trip changed records"
    )
    return records


def _must_fail(tok: Tokenizer, path: str, kinds: set[str]) -> None:
    """The input calls for one of ``kinds``: accepting it fails the test."""
    assert _outcome(tok, path, kinds) is None, f"{path} was accepted; expected TokenizeError({sorted(kinds)})"


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
IMAGE_FORMATS = {
    "L": ("png", "tiff", "bmp", "jpeg"),
    "RGB": ("png", "tiff", "bmp", "jpeg", "webp"),
    "RGBA": ("png", "tiff", "webp"),
    "P": ("png", "tiff", "bmp"),
    "I;16": ("png", "tiff"),
}
EXT = {"png": ".png", "tiff": ".tif", "bmp": ".bmp", "jpeg": ".jpg", "webp": ".webp"}


@st.composite
def images(draw) -> tuple[Image.Image, str, dict[str, Any]]:
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    mode = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
    fmt = draw(st.sampled_from(IMAGE_FORMATS[mode]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    save: dict[str, Any] = {}
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.new("P", (w, h))
        img.putdata(rng.integers(0, 16, h * w).tolist())
        img.putpalette(rng.integers(0, 256, 16 * 3).tolist())
        if fmt == "png" and draw(st.booleans()):
            save["transparency"] = 0
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr)
    assert img.mode == mode
    return img, fmt, save


@_settings(25)
@given(images(), st.sampled_from([16, 32]))
def test_random_images_give_valid_tables(case, size):
    img, fmt, save = case
    tok = get_tokenizer("image", {"image_size": size, "patch_size": 16})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img" + EXT[fmt])
        img.save(path, format=fmt.upper(), **save)
        (rec,) = _outcome(tok, path, None)
        assert rec.tokens.shape == ((size // 16) ** 2, 16 * 16 * 3)
        expected, _ = tok.preprocess(tok.read(path))
        np.testing.assert_array_equal(tok.detokenize(rec), expected)


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------
@_settings(20)
@given(
    seconds=st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
    rate=st.sampled_from([8000, 16000, 44100]),
    channels=st.sampled_from([1, 2]),
    fmt=st.sampled_from(["wav", "flac"]),
    silent=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_audio_gives_valid_tables(seconds, rate, channels, fmt, silent, seed):
    n = int(seconds * rate)
    wave = np.zeros((n, channels), np.float32)
    if not silent:
        wave = np.random.default_rng(seed).uniform(-0.9, 0.9, (n, channels)).astype(np.float32)
    tok = get_tokenizer("audio", {"target_frames": 128})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"clip.{fmt}")
        sf.write(path, wave, rate, format=fmt.upper())
        if n == 0:
            _must_fail(tok, path, {"empty"})  # documented: zero-length audio is rejected as empty
            return
        (rec,) = _outcome(tok, path, None)
        assert rec.tokens.shape == (8 * 8, 256)
        fb = tok.fbank(tok.read(path).waveform).numpy()[: rec.meta["frames"]]
        out = tok.detokenize(rec)
        assert (np.abs(out - fb) <= np.abs(fb - rec.meta["norm_mean"]) * 2.0**-10 + 1e-5).all()


# ---------------------------------------------------------------------------------------------
# point cloud
# ---------------------------------------------------------------------------------------------
@_settings(25)
@given(
    n=st.integers(1, 300),
    nan_fraction=st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.95, 1.0]),
    lattice=st.booleans(),
    fmt=st.sampled_from(["npy", "xyz"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_point_clouds_give_valid_tables(n, nan_fraction, lattice, fmt, seed):
    rng = np.random.default_rng(seed)
    if lattice:  # many duplicate points: FPS and kNN on ties
        pts = rng.integers(-2, 3, (n, 3)).astype(np.float32)
    else:
        pts = (rng.normal(size=(n, 3)) * rng.uniform(0.01, 100) + rng.normal(0, 50, 3)).astype(np.float32)
    pts[rng.uniform(size=n) < nan_fraction, rng.integers(0, 3)] = np.nan
    valid = int(np.isfinite(pts).all(axis=1).sum())
    tok = get_tokenizer("point_cloud", {"num_points": 256, "num_groups": 16, "group_size": 16})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"cloud.{fmt}")
        if fmt == "npy":
            np.save(path, pts)
        else:
            np.savetxt(path, pts, fmt="%.9g")
        if valid < 16:  # documented: all-NaN is invalid, fewer valid points than a group too_small
            _must_fail(tok, path, {"invalid" if valid == 0 else "too_small"})
            return
        kept = pts[np.isfinite(pts).all(axis=1)]
        if (kept.max(axis=0) == kept.min(axis=0)).all():  # documented: identical points are invalid
            _must_fail(tok, path, {"invalid"})
            return
        (rec,) = _outcome(tok, path, None)
        assert rec.tokens.shape == (16, 16 * 3) and rec.meta["num_valid_points"] == valid
        finite = pts[np.isfinite(pts).all(axis=1)].astype(np.float64)
        dist, _ = cKDTree(finite).query(tok.detokenize(rec).astype(np.float64))
        assert dist.max() <= 1e-5 * max(1.0, rec.meta["scale"]), "a detokenized point is not an input point"


# ---------------------------------------------------------------------------------------------
# time series
# ---------------------------------------------------------------------------------------------
@_settings(25)
@given(
    steps=st.integers(1, 300),
    channels=st.integers(1, 4),
    nan_fraction=st.sampled_from([0.0, 0.0, 0.05, 0.4, 0.7, 1.0]),
    window=st.sampled_from([None, 64]),
    fmt=st.sampled_from(["csv", "parquet"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_series_give_valid_tables(steps, channels, nan_fraction, window, fmt, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, channels)) * 10.0 ** rng.uniform(-3, 6, channels) + rng.normal(
        0, 100, channels
    )
    x[rng.uniform(size=x.shape) < nan_fraction] = np.nan
    x = x.astype(np.float32)
    tok = get_tokenizer("time_series", {"window": window, "stride": 32})
    names = [f"c{i}" for i in range(channels)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"series.{fmt}")
        if fmt == "csv":
            rows = [",".join("nan" if np.isnan(v) else repr(float(v)) for v in row) for row in x]
            with open(path, "w") as f:
                f.write(",".join(names) + "\n" + "\n".join(rows) + "\n")
        else:
            pq.write_table(pa.table({n: x[:, i] for i, n in enumerate(names)}), path)
        need = window or 12
        if steps < need:  # documented: shorter than a sample is too_small (all-NaN: invalid)
            _must_fail(tok, path, {"too_small", "invalid"})
            return
        clean = not np.isnan(x).any()
        records = _outcome(tok, path, None if clean else {"invalid", "too_small"})
        if records is None:
            return
        raw = tok.read(path).series[0]
        for rec in records:
            m = rec.meta
            if m["missing"] != [0]:
                continue
            want = raw[m["start"] : m["start"] + m["length"], m["channels"]]
            scale = max(float(np.abs(want).max()), 1e-30)
            np.testing.assert_allclose(tok.detokenize(rec), want, rtol=0, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# graph
# ---------------------------------------------------------------------------------------------
@st.composite
def graphs(draw, max_nodes: int = 12, min_edges: int = 0) -> tuple[int, np.ndarray]:
    """(number of nodes, (E, 2) edges; self loops and duplicates allowed)."""
    n = draw(st.integers(1, max_nodes))
    e = draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=min_edges, max_size=3 * n)
    )
    return n, np.asarray(e, np.int64).reshape(-1, 2)


@_settings(20)
@given(graphs(min_edges=1), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_random_edge_lists_give_valid_tables(graph, dim, header, features, seed):
    n, edges = graph
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    tok = get_tokenizer("graph", {"pe_dim": 3, "subgraph_hops": 2, "subgraph_max_nodes": 6})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.csv")
        with open(path, "w") as f:
            f.write(("src,dst\n" if header else "") + "".join(f"{a},{b}\n" for a, b in edges))
        if features:
            np.save(os.path.join(d, "g.features.npy"), x)
        records = _outcome(tok, path, None)
        nodes = n if features else int(edges.max()) + 1
        assert sorted(r.meta["center_node"] for r in records) == list(range(nodes))
        for rec in records:
            assert rec.meta["nodes"][0] == rec.meta["center_node"] and len(rec.meta["nodes"]) <= 6
            want = x[rec.meta["nodes"]] if features else np.ones((len(rec.meta["nodes"]), 1), np.float32)
            np.testing.assert_array_equal(tok.detokenize(rec).x, want)


@_settings(20)
@given(st.lists(graphs(max_nodes=6), min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_random_tu_folders_give_valid_tables(gs, seed):
    tok = get_tokenizer("graph", {"pe_dim": 3})
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "R")
        os.makedirs(folder)
        a, ind, attrs, offset = [], [], [], 0
        for gi, (n, e) in enumerate(gs):
            both = np.concatenate([e, e[:, ::-1]])  # TU lists every edge in both directions
            a += [f"{s + offset + 1}, {t + offset + 1}" for s, t in both]
            ind += [str(gi + 1)] * n
            attrs.append(rng.normal(size=(n, 2)).round(3))
            offset += n
        x = np.concatenate(attrs).astype(np.float32)
        for name, lines in (
            ("A", a),
            ("graph_indicator", ind),
            ("graph_labels", [str(i % 2) for i in range(len(gs))]),
            ("node_attributes", [f"{u:.3f}, {v:.3f}" for u, v in x]),
        ):
            with open(os.path.join(folder, f"R_{name}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
        records = _outcome(tok, folder, None)
        assert [r.id for r in records] == [f"{folder}#{i}" for i in range(len(gs))]
        starts = np.cumsum([0] + [n for n, _ in gs])
        for i, rec in enumerate(records):
            np.testing.assert_array_equal(tok.detokenize(rec).x, x[starts[i] : starts[i + 1]])
            assert rec.label == i % 2


def _write_tu(folder: str, a_lines: list[str], nodes_per_graph: list[int]) -> str:
    os.makedirs(folder)
    ind = [str(g + 1) for g, n in enumerate(nodes_per_graph) for _ in range(n)]
    for name, lines in (
        ("A", a_lines),
        ("graph_indicator", ind),
        ("graph_labels", ["0"] * len(nodes_per_graph)),
    ):
        with open(os.path.join(folder, f"R_{name}.txt"), "w") as f:
            f.write("".join(line + "\n" for line in lines))
    return folder


@pytest.mark.parametrize(
    ("a_lines", "nodes"),
    [
        (["1, 1"], [1]),
        (["1, 2"], [2, 1]),
        ([], [1, 2]),
        (["1, 2", "2, 1", "2, 3", "3, 2"], [3]),
    ],
    ids=["one self loop", "one directed edge", "no edges", "one graph"],
)
def test_tu_folders_torch_geometric_cannot_read(a_lines, nodes):
    with tempfile.TemporaryDirectory() as d:
        folder = _write_tu(os.path.join(d, "R"), a_lines, nodes)
        records = _outcome(get_tokenizer("graph", {"pe_dim": 2}), folder, None)
        assert [r.meta["num_nodes"] for r in records] == nodes


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
_TEXT_TOK: dict[str, Tokenizer] = {}


def _text_tokenizer(max_length: int, overlap: int) -> Tokenizer:
    """One BPE per chunking config, trained once on a small mixed-script corpus."""
    key = f"{max_length}/{overlap}"
    if key not in _TEXT_TOK:
        tok = get_tokenizer(
            "text", {"vocab_size": 300, "min_frequency": 1, "max_length": max_length, "overlap": overlap}
        )
        with tempfile.TemporaryDirectory() as d:
            corpus = os.path.join(d, "corpus.txt")
            with open(corpus, "w", encoding="utf-8") as f:
                f.write(
                    "the quick brown fox jumps over the lazy dog. Grüße, café, naïve, 東京, Привет! 🙂\n" * 3
                )
            tok.fit([corpus])
        _TEXT_TOK[key] = tok
    return _TEXT_TOK[key]


def _join_chunks(records: list[Record]) -> list[int]:
    """The document's ids back from its (possibly overlapping) chunks."""
    ids: list[int] = []
    for rec in sorted(records, key=lambda r: r.meta["chunk"]):
        ids[rec.meta["start"] :] = rec.tokens.tolist()
    return ids


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)


@_settings(25)
@given(TEXT, st.sampled_from(["txt", "jsonl"]), st.sampled_from([(16, 0), (16, 5), (512, 0)]))
def test_random_text_gives_valid_tables(text, fmt, chunking):
    tok = _text_tokenizer(*chunking)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"doc.{fmt}")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text if fmt == "txt" else json.dumps({"text": text}) + "\n")  # JSON escapes \x00 etc.
        if fmt == "txt" and "\x00" in text:
            _must_fail(tok, path, {"corrupt"})  # documented: NUL bytes mean not a text file
            return
        if not text.strip():
            _must_fail(tok, path, {"empty"})  # documented: no text is empty
            return
        records = _outcome(tok, path, None)
        assert all(len(r.tokens) <= chunking[0] for r in records)
        assert tok._require_bpe().decode(_join_chunks(records), skip_special_tokens=False) == text
        if len(records) == 1:
            assert tok.detokenize(records[0]) == text


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_with_unicode_line_separators_inside_strings(sep):
    tok = _text_tokenizer(512, 0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "docs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": f"one{sep}two"}, ensure_ascii=False) + "\n")
        (rec,) = _outcome(tok, path, None)
        assert tok.detokenize(rec) == f"one{sep}two"


# ---------------------------------------------------------------------------------------------
# video (tiny clips; lossless ffv1 so the processed frames are known exactly)
# ---------------------------------------------------------------------------------------------
@_settings(8)
@given(
    frames=st.integers(1, 6),
    h=st.integers(4, 24).map(lambda v: 2 * v),
    w=st.integers(4, 24).map(lambda v: 2 * v),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_videos_give_valid_tables(frames, h, w, seed):
    clip = np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    tok = get_tokenizer("video", {"num_frames": 4, "image_size": 32})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mkv")
        with av.open(path, "w") as out:
            stream = out.add_stream("ffv1", rate=10)
            stream.height, stream.width, stream.pix_fmt = h, w, "bgr0"
            for f in clip:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())
        (rec,) = _outcome(tok, path, None)
        idx = (np.arange(4) * frames) // 4  # documented: uniform sampling of a short clip
        assert rec.meta["frame_indices"] == idx.tolist()
        expected, _ = tok.preprocess(clip[idx])
        np.testing.assert_array_equal(tok.detokenize(rec).frames, expected)
