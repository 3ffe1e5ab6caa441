"""The conformance kit (maskloom.testing.check_tokenizer) on every built-in tokenizer, with demo data.

One demo dataset (one file per class) is written for the whole session; each built-in tokenizer runs
the kit on it with a small configuration and a ``compare`` function that states its modality's
round-trip tolerance (issue 2, "Tests"):

    image        exact: detokenize gives the processed (resized + cropped) image
    video        exact: the processed frames
    audio        the filterbank of the real frames within float16 rounding of the normalised tokens
    point cloud  every detokenized point lies on an input point (up to float32 rounding)
    graph        exact node features and edges
    time series  the tokenised steps within 1e-4 relative to the series' scale
    text         the exact document string

Also: every built-in Config documents each field with a docstring (STYLE.md).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import inspect
import os
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from maskloom.demo_data import write_demo_data
from maskloom.testing import check_tokenizer
from maskloom.tokenizers import (
    TOKENIZERS,
    Record,
    TableSpec,
    TokenizeError,
    Tokenizer,
    get_tokenizer,
    register_tokenizer,
)

BUILTINS = ("image", "video", "audio", "point_cloud", "graph", "time_series", "text")
"""The seven built-in modalities of issue 2; each must have a case below."""


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The demo dataset, one sample per class (4 per modality), written once."""
    return write_demo_data(str(tmp_path_factory.mktemp("demo")), per_class=1, seed=0)


def _folder_sources(demo: dict[str, dict[str, Any]], modality: str) -> list[str]:
    return sorted(glob.glob(os.path.join(demo[modality]["path"], "*", "*")))


# ---------------------------------------------------------------------------------------------
# round-trip tolerances, one per modality: compare(raw, detokenized, record) asserts
# ---------------------------------------------------------------------------------------------
def _compare_image(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        expected, _ = tok.preprocess(raw)  # (S, S, 3) uint8: resized + centre-cropped
        assert out.dtype == np.uint8 and out.shape == expected.shape
        np.testing.assert_array_equal(out, expected, err_msg=rec.id)

    return compare


def _compare_video(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        expected, _ = tok.preprocess(raw)  # (T, S, S, 3) uint8 processed frames
        np.testing.assert_array_equal(out.frames, expected, err_msg=rec.id)
        assert out.frame_indices.tolist() == rec.meta["frame_indices"]

    return compare


def _compare_audio(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        fb = tok.fbank(raw.waveform).numpy()[: rec.meta["frames"]]  # (frames, mel) float32
        assert out.shape == fb.shape
        # tokens are float16 of x = (fb - mean) / (2 std): |error in x| <= |x| 2^-11, so the error in
        # fb is at most |fb - mean| 2^-11; 2^-10 leaves room for float32 arithmetic.
        bound = np.abs(fb - rec.meta["norm_mean"]) * 2.0**-10 + 1e-5
        err = np.abs(out - fb)
        assert (err <= bound).all(), f"{rec.id}: fbank error {err.max():.3g} beyond float16 rounding"

    return compare


def _compare_point_cloud(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        from scipy.spatial import cKDTree

        pts = np.asarray(raw, np.float64)[:, :3]
        assert out.shape == (tok.config.num_groups * tok.config.group_size, 3)
        dist, _ = cKDTree(pts).query(np.asarray(out, np.float64))
        tol = 1e-5 * max(1.0, rec.meta["scale"])  # float32 rounding of normalise + undo
        assert dist.max() <= tol, f"{rec.id}: a detokenized point is {dist.max():.3g} from every input point"

    return compare


def _compare_graph(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        g = raw.graphs[rec.meta["graph"]]
        np.testing.assert_array_equal(out.x, g.x, err_msg=rec.id)
        np.testing.assert_array_equal(out.edge_index, g.edge_index, err_msg=rec.id)
        assert out.label == g.label == rec.label

    return compare


def _compare_time_series(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        m = rec.meta
        x = raw.series[m["series"]][m["start"] : m["start"] + m["length"], m["channels"]]  # (length, 1)
        assert out.shape == x.shape
        scale = float(np.abs(x).max())
        np.testing.assert_allclose(out, x, rtol=0, atol=1e-4 * max(scale, 1e-12), err_msg=rec.id)

    return compare


def _compare_text(tok) -> Callable[[Any, Any, Record], None]:
    def compare(raw, out, rec):
        doc = raw[rec.meta["doc"]][0]
        assert rec.meta["doc_tokens"] <= tok.config.max_length, "demo documents fit in one chunk"
        assert out == doc

    return compare


# modality -> (small config, sources(demo), compare factory)
CASES: dict[str, tuple[dict[str, Any], Callable[[dict], list[str]], Callable]] = {
    "image": ({"image_size": 32}, lambda d: _folder_sources(d, "image"), _compare_image),
    "video": ({"num_frames": 4, "image_size": 32}, lambda d: _folder_sources(d, "video"), _compare_video),
    "audio": ({"target_frames": 128}, lambda d: _folder_sources(d, "audio"), _compare_audio),
    "point_cloud": (
        {"num_points": 256, "num_groups": 16, "group_size": 16},
        lambda d: _folder_sources(d, "point_cloud"),
        _compare_point_cloud,
    ),
    "graph": ({"pe_dim": 4}, lambda d: [d["graph"]["path"]], _compare_graph),
    "time_series": (
        {"window": 256, "stride": 256},
        lambda d: _folder_sources(d, "time_series") + [d["time_series_long"]["path"]],
        _compare_time_series,
    ),
    "text": ({"vocab_size": 300}, lambda d: [d["text"]["path"]], _compare_text),
}


EXACT_COUNTS: dict[str, tuple[int | None, int | None]] = {  # (records, tokens) known in advance
    "image": (4, 4 * 4),  # (32 / 16)^2 patches per image
    "video": (4, 4 * 2 * 2 * 2),  # (4 / 2) x (32 / 16)^2 tubelets per clip
    "audio": (4, 4 * 8 * 8),  # (128 / 16) x (128 / 16) patches per clip
    "point_cloud": (4, 4 * 16),  # num_groups per cloud
    "graph": (4, None),  # one record per graph of the TU dataset (node counts are random)
}


def test_every_builtin_has_a_conformance_case():
    registered = set(TOKENIZERS.names())
    missing = set(BUILTINS) - registered
    assert not missing, f"built-in tokenizer(s) not registered: {sorted(missing)}"
    assert set(CASES) == set(BUILTINS), f"conformance cases {sorted(CASES)} != built-ins {sorted(BUILTINS)}"
    # a tokenizer class defined inside maskloom.tokenizers is a built-in and needs a case here
    builtin_classes = {
        n for n in registered if TOKENIZERS.get(n).__module__.startswith("maskloom.tokenizers.")
    }
    assert builtin_classes == set(BUILTINS), (
        f"built-ins without a conformance case: {builtin_classes - set(BUILTINS)}"
    )


@pytest.mark.parametrize("name", [n for n in TOKENIZERS.names() if n in BUILTINS])
def test_conformance_kit(name, demo):
    config, sources_of, compare_of = CASES[name]
    tok = get_tokenizer(name, config)
    sources = sources_of(demo)
    assert sources, f"no demo files for {name}"
    report = check_tokenizer(tok, sources, compare=compare_of(tok))
    assert report["sources"] == len(sources)
    records, tokens = EXACT_COUNTS.get(name, (None, None))
    assert report["records"] == records if records is not None else report["records"] >= len(sources)
    assert report["tokens"] == tokens if tokens is not None else report["tokens"] >= report["records"]


# ---------------------------------------------------------------------------------------------
# config docstrings
# ---------------------------------------------------------------------------------------------
def _undocumented_fields(cls: type) -> list[str]:
    """Fields of dataclass ``cls`` whose annotated assignment is not followed by a string literal."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    documented = set()
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                documented.add(stmt.target.id)
    return [f.name for f in dataclasses.fields(cls) if f.name not in documented]


@pytest.mark.parametrize("name", BUILTINS)
def test_every_config_field_has_a_docstring(name):
    cls = TOKENIZERS.get(name).Config
    assert _undocumented_fields(cls) == [], f"{name} tokenizer: {cls.__qualname__} fields without a docstring"


def test_docstring_check_catches_a_missing_docstring():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Cfg:
        a: int = 1
        """documented"""
        b: int = 2
        c: int = 3
        """documented"""

    assert _undocumented_fields(Cfg) == ["b"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _IntsConfig:
    width: int = 1
    """Unused."""


class _Ints(Tokenizer):
    """Whitespace-separated integers, one record per file (a minimal tokenizer for the kit's tests)."""

    Config = _IntsConfig
    extensions = (".ints",)

    def spec(self):
        return TableSpec(modality="kit_ints", token_kind="discrete", token_dim=1, token_dtype="int32",
                         vocab_size=100, position_axes=("index",), position_kind="grid")  # fmt: skip

    def read(self, source):
        self.check_file(source)
        try:
            return np.array([int(x) for x in open(source, "rb").read().split()], np.int32)
        except ValueError as e:
            raise TokenizeError(source, "corrupt", str(e)) from None

    def tokenize(self, raw, *, source=""):
        return [Record(id=f"{source}#0", source=source, tokens=raw,
                       positions=np.arange(len(raw), dtype=np.float32)[:, None])]  # fmt: skip

    def detokenize(self, record):
        return record.tokens


if "kit_ints" not in TOKENIZERS.names():  # tables name their modality, which must be registered
    register_tokenizer("kit_ints")(_Ints)


class _ShortStream(_Ints):
    def iter_records(self, source):
        rec = self(source)[0]
        yield dataclasses.replace(rec, tokens=rec.tokens[:1], positions=rec.positions[:1])


class _LeakyStream(_Ints):
    def iter_records(self, source):
        yield from self.tokenize(np.array([int(x) for x in open(source, "rb").read().split()], np.int32),
                                 source=source)  # fmt: skip


def test_the_kit_checks_the_record_stream_against_tokenize(tmp_path):
    """Rule 9: iter_records must give tokenize(read())'s records; rule 8 holds for the stream too."""
    p = tmp_path / "a.ints"
    p.write_text("1 2 3")
    assert check_tokenizer(_Ints(), [str(p)]) == {"sources": 1, "records": 1, "tokens": 3}
    with pytest.raises(AssertionError, match="iter_records gives other records than tokenize"):
        check_tokenizer(_ShortStream(), [str(p)])
    with pytest.raises(
        AssertionError, match=r"a missing file \(.*\) raised by iter_records FileNotFoundError"
    ):
        check_tokenizer(_LeakyStream(), [str(p)])
