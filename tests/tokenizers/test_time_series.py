"""Time-series tokenizer: windows, RevIN, patches (PatchTST), missing values, UCR parsing, round trip."""

import dataclasses
import json
import logging
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskloom.testing import check_tokenizer
from maskloom.tokenizers import TOKENIZERS, TokenizeError, get_tokenizer
from maskloom.tokenizers.base import SkipReport, reporting_skips
from maskloom.tokenizers.time_series import (
    TimeSeries,
    TimeSeriesConfig,
    TimeSeriesTokenizer,
    fill_missing,
    num_patches,
    record_span,
    window_starts,
)


def _tok(**kw) -> TimeSeriesTokenizer:
    return TimeSeriesTokenizer(TimeSeriesConfig(**kw))


def _series(n: int = 100, channels: int = 2) -> np.ndarray:
    """(n, channels) float32: channel c is a sine of period 10 + 7c plus a ramp, distinct per step."""
    t = np.arange(n)[:, None]
    c = np.arange(channels)[None, :]
    return (np.sin(2 * np.pi * t / (10 + 7 * c)) * (c + 1) + 0.01 * t + 3 * c).astype(np.float32)


def _csv(path, x: np.ndarray, names=None, date=True) -> str:
    names = names or [f"ch{i}" for i in range(x.shape[1])]
    lines = [",".join((["date"] if date else []) + names)]
    for i, row in enumerate(x):
        vals = ["" if np.isnan(v) else repr(float(v)) for v in row]
        lines.append(",".join(([f"2020-01-01 {i % 24:02d}:00:00"] if date else []) + vals))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


UCR_TS = """# a hand-written UCR file
@problemName Toy
@timeStamps false
@missing true
@univariate true
@equalLength false
@classLabel true b a
@data
1,2,3,4,5,6,7,8:a
2,?,4,6,8,10,12,14,16,18:b
# a comment between series
0.5,0.25,0.125,0,0,0,0,1:a
"""


def test_registered_and_spec():
    assert TOKENIZERS.get("time_series") is TimeSeriesTokenizer
    spec = get_tokenizer("time_series").spec()
    assert (spec.modality, spec.token_kind, spec.token_dim, spec.token_dtype) == (
        "time_series",
        "continuous",
        12,
        "float32",
    )
    assert (
        spec.position_axes == ("channel", "patch")
        and spec.position_kind == "grid"
        and spec.token_shape == (12,)
    )
    assert get_tokenizer("time_series", {"patch_len": 16, "patch_stride": 8}).spec().token_dim == 16


def test_config_validation():
    with pytest.raises(ValueError, match="must not exceed patch_len"):
        TimeSeriesConfig(patch_len=8, patch_stride=12)
    with pytest.raises(ValueError, match="at least patch_len"):
        TimeSeriesConfig(window=10)
    with pytest.raises(ValueError, match="format"):
        TimeSeriesConfig(format="excel")
    with pytest.raises(ValueError, match="max_missing"):
        TimeSeriesConfig(max_missing=1.5)
    with pytest.raises(ValueError, match="columns"):
        TimeSeriesConfig(columns="OT")
    with pytest.raises(ValueError, match="unknown key"):
        get_tokenizer("time_series", {"context": 512})
    tok = get_tokenizer("time_series", {"columns": ["a", "b"], "class_labels": ["x"]})
    assert tok.config.columns == ("a", "b") and tok.config.class_labels == ("x",)
    hash(tok.config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TimeSeriesConfig().window = 3  # type: ignore[misc]


def test_window_and_patch_counts():
    assert window_starts(100, 48, 24).tolist() == [0, 24, 48]
    assert window_starts(47, 48, 24).tolist() == []
    assert window_starts(48, 48, 100).tolist() == [0]
    assert num_patches(512, 12, 12) == 42  # PatchTST self-supervised
    assert num_patches(336, 16, 8) == 41  # PatchTST supervised ETTh1


def test_csv_channel_independent_windows_revin_and_patches(tmp_path):
    x = _series(100, 2)
    tok = _tok(window=48, stride=24)
    raw = tok.read(_csv(tmp_path / "a.csv", x))
    assert raw.channels == ("ch0", "ch1") and not raw.labelled and raw.labels is None  # date column skipped
    np.testing.assert_array_equal(raw.values, x)
    recs = tok.tokenize(raw, source="a.csv")
    assert [r.id for r in recs] == [f"a.csv#s0-w{w}-c{c}" for w in range(3) for c in range(2)]
    for r in recs:
        w, c = r.meta["window_index"], r.meta["channels"][0]
        start = 24 * w
        assert r.meta["start"] == start and r.meta["length"] == 48 and record_span(r) == (start, start + 48)
        assert r.meta["channel_names"] == [f"ch{c}"] and r.meta["missing"] == [0] and r.label is None
        assert r.tokens.shape == (4, 12) and r.tokens.dtype == np.float32
        assert r.positions.tolist() == [
            [0, 0],
            [0, 1],
            [0, 2],
            [0, 3],
        ]  # channels share the channel coordinate
        seg = x[start : start + 48, c].astype(np.float64)
        mean, std = seg.mean(), np.sqrt(seg.var() + 1e-5)
        assert r.meta["mean"] == [pytest.approx(mean, rel=1e-12)] and r.meta["std"] == [
            pytest.approx(std, rel=1e-12)
        ]
        np.testing.assert_allclose(r.tokens, ((seg - mean) / std).reshape(4, 12), rtol=1e-6, atol=1e-6)


def test_patches_align_to_window_end(tmp_path):
    x = _series(60, 1)
    (rec,) = _tok(window=50, stride=50).tokenize(TimeSeries(series=[x], channels=("v",)), source="m")
    # 50 steps -> 4 patches of 12 = 48 steps: the first 2 steps of the window are dropped (PatchTST)
    assert rec.meta["start"] == 2 and rec.meta["length"] == 48 and rec.tokens.shape == (4, 12)
    np.testing.assert_allclose(_tok().detokenize(rec), x[2:50], rtol=1e-5)


def test_joint_mode(tmp_path):
    x = _series(100, 3)
    tok = _tok(window=48, stride=24, channel_independent=False)
    recs = tok(_csv(tmp_path / "j.csv", x))
    assert len(recs) == 3 and recs[0].id.endswith("#s0-w0")
    r = recs[1]
    assert r.tokens.shape == (12, 12)
    assert r.positions.tolist() == [[c, p] for c in range(3) for p in range(4)]  # channel-major
    assert r.meta["channels"] == [0, 1, 2] and len(r.meta["mean"]) == 3 and r.meta["missing"] == [0, 0, 0]
    out = tok.detokenize(r)
    assert out.shape == (48, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, x[24:72], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patch_len,patch_stride", [(12, 12), (16, 8), (5, 3)])
def test_round_trip_within_1e5_relative(patch_len, patch_stride):
    x = _series(200, 2) * 1000 + 5e4  # large offset: RevIN must handle it
    tok = _tok(window=64, stride=40, patch_len=patch_len, patch_stride=patch_stride)
    recs = tok.tokenize(TimeSeries(series=[x], channels=("a", "b")), source="m")
    for r in recs:
        s, e = record_span(r)
        np.testing.assert_allclose(tok.detokenize(r), x[s:e, r.meta["channels"]], rtol=1e-5)
    # detokenize places tokens by position: order does not matter
    r = recs[0]
    perm = np.random.default_rng(1).permutation(r.num_tokens)
    np.testing.assert_array_equal(
        tok.detokenize(dataclasses.replace(r, tokens=r.tokens[perm], positions=r.positions[perm])),
        tok.detokenize(r),
    )


def test_whole_series_window_and_too_small():
    x = _series(30, 1)
    (rec,) = _tok(window=None).tokenize(TimeSeries(series=[x], channels=("v",)), source="m")
    assert rec.tokens.shape == (2, 12) and rec.meta["start"] == 6
    with pytest.raises(TokenizeError) as e:
        _tok(window=48).tokenize(TimeSeries(series=[x], channels=("v",)), source="m")
    assert e.value.kind == "too_small" and "30 steps" in e.value.reason


def test_columns_parquet_and_tsv_table(tmp_path):
    x = _series(60, 3)
    tbl = pa.table(
        {
            "time": pa.array(np.arange(60).astype("datetime64[s]")),
            "a": x[:, 0],
            "b": x[:, 1],
            "c": x[:, 2].astype(np.float64),
            "name": ["s"] * 60,
        }
    )
    pq.write_table(tbl, tmp_path / "t.parquet")
    raw = _tok().read(str(tmp_path / "t.parquet"))
    assert raw.channels == ("a", "b", "c")
    np.testing.assert_array_equal(raw.values, x)
    raw = _tok(columns=("c", "a")).read(str(tmp_path / "t.parquet"))
    assert raw.channels == ("c", "a")
    np.testing.assert_array_equal(raw.values, x[:, [2, 0]])
    with pytest.raises(TokenizeError) as e:
        _tok(columns=("zz",)).read(str(tmp_path / "t.parquet"))
    assert e.value.kind == "config" and "zz" in e.value.reason
    with pytest.raises(TokenizeError) as e:
        _tok(columns=("name",)).read(str(tmp_path / "t.parquet"))
    assert e.value.kind == "config" and "not numeric" in e.value.reason
    (tmp_path / "h.tsv").write_text("when\tu\tv\nmon\t1\t2\ntue\t3\t4\n")
    raw = _tok().read(str(tmp_path / "h.tsv"))
    assert raw.channels == ("u", "v") and raw.values.tolist() == [[1, 2], [3, 4]] and not raw.labelled


def test_fill_missing_linear_inside_edge_fill_outside():
    x = np.array([[np.nan, 1], [1, np.nan], [np.nan, np.nan], [4, 4], [np.nan, np.inf]], np.float32)
    before = x.copy()
    filled, missing = fill_missing(x)
    assert filled.tolist() == [[1, 1], [1, 2], [2.5, 3], [4, 4], [4, 4]]
    assert missing.sum(axis=0).tolist() == [3, 3]
    np.testing.assert_array_equal(x, before)  # caller's data untouched
    allnan = fill_missing(np.full((3, 1), np.nan))[0]
    assert np.isnan(allnan).all()


def test_missing_value_policy(tmp_path, caplog):
    x = _series(100, 2)
    x[30, 0] = np.nan  # one interior gap: interpolated
    x[50:90, 1] = np.nan  # channel 1 windows 1 (24..71: 22 missing) and 2 (48..95: 40 missing)
    path = _csv(tmp_path / "gaps.csv", x)
    tok = _tok(window=48, stride=24)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        recs = tok(path)
    # 40/48 > 50% missing: window 2 of channel 1 is skipped; window 1 (22/48) is kept
    assert [r.id.split("#")[1] for r in recs] == ["s0-w0-c0", "s0-w0-c1", "s0-w1-c0", "s0-w1-c1", "s0-w2-c0"]
    assert "skipped 1 window" in caplog.text
    by_id = {r.id.split("#")[1]: r for r in recs}
    assert by_id["s0-w0-c0"].meta["missing"] == [1] and by_id["s0-w1-c1"].meta["missing"] == [22]
    out = tok.detokenize(by_id["s0-w1-c0"])  # steps 24..71, step 30 interpolated between 29 and 31
    assert out[6, 0] == pytest.approx((x[29, 0] + x[31, 0]) / 2, rel=1e-5)
    # joint mode drops the whole window when any channel is over the limit
    assert len(_tok(window=48, stride=24, channel_independent=False)(path)) == 2
    # a stricter limit drops more
    assert len(_tok(window=48, stride=24, max_missing=0.0)(path)) == 2
    # a channel with no value at all: the file is invalid
    y = _series(100, 2)
    y[:, 1] = np.nan
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(TimeSeries(series=[y], channels=("ch0", "ch1")), source="m")
    assert e.value.kind == "invalid" and "ch1" in e.value.reason
    # in a CSV an all-empty column is skipped with a warning, unless chosen in columns=
    dead = _csv(tmp_path / "deadch.csv", y)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        assert tok.read(dead).channels == ("ch0",)
    assert "skipping column(s) ['ch1']: no valid value at all (every cell empty, NaN or inf;" in caplog.text
    with pytest.raises(TokenizeError) as e:
        _tok(window=48, stride=24, columns=("ch0", "ch1"))(dead)
    assert e.value.kind == "invalid" and "ch1" in e.value.reason
    with pytest.raises(TokenizeError) as e:
        tok(_csv(tmp_path / "allnan.csv", np.full((100, 2), np.nan)))
    assert e.value.kind == "invalid"
    # every window over the limit
    z = _series(100, 1)
    z[10:95] = np.nan
    with pytest.raises(TokenizeError) as e:
        tok(_csv(tmp_path / "mostly.csv", z))
    assert e.value.kind == "invalid" and "missing" in e.value.reason


def test_ucr_ts_parsing(tmp_path):
    p = tmp_path / "Toy_TRAIN.ts"
    p.write_text(UCR_TS)
    tok = _tok()
    raw = tok.read(str(p))
    assert raw.labelled and raw.channels == ("dim_0",)
    assert raw.label_names == ("b", "a") and raw.labels == [1, 0, 1]  # index in @classLabel order
    assert [s.shape for s in raw.series] == [(8, 1), (10, 1), (8, 1)]
    assert raw.series[0][:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert np.isnan(raw.series[1][1, 0]) and raw.series[2][:4, 0].tolist() == [0.5, 0.25, 0.125, 0]
    recs = _tok(patch_len=4, patch_stride=4).tokenize(raw, source="toy")
    # each series is one window: 8 -> 2 patches, 10 -> 2 patches (steps 2..9), 8 -> 2 patches
    assert [(r.id, r.label, r.num_tokens, r.meta["start"]) for r in recs] == [
        ("toy#s0-w0-c0", 1, 2, 0),
        ("toy#s1-w0-c0", 0, 2, 2),
        ("toy#s2-w0-c0", 1, 2, 0),
    ]
    # the '?' at step 1 of series 1 is filled by interpolation (2 and 4 -> 3) but lies before the patches
    assert recs[1].meta["missing"] == [0]
    np.testing.assert_allclose(_tok().detokenize(recs[0])[:, 0], np.arange(1, 9), rtol=1e-5)
    # window_labelled cuts labelled series into windows too
    recs = _tok(window=4, stride=4, patch_len=4, patch_stride=4, window_labelled=True).tokenize(
        raw, source="toy"
    )
    assert [r.id.split("#")[1] for r in recs] == [
        "s0-w0-c0",
        "s0-w1-c0",
        "s1-w0-c0",
        "s1-w1-c0",
        "s2-w0-c0",
        "s2-w1-c0",
    ]


def test_ucr_ts_multivariate_and_errors(tmp_path):
    p = tmp_path / "mv.ts"
    p.write_text(
        "@problemName MV\n@univariate false\n@dimensions 2\n@classLabel true x y\n@data\n"
        "1,2,3,4:10,20,30,40:y\n5,6,7,8:50,60,70:x\n"
    )
    raw = _tok().read(str(p))
    assert raw.channels == ("dim_0", "dim_1") and raw.labels == [1, 0]
    assert raw.series[0].tolist() == [[1, 10], [2, 20], [3, 30], [4, 40]]
    assert np.isnan(raw.series[1][3, 1])  # a shorter dimension is NaN-padded (then edge-filled)
    recs = _tok(patch_len=2, patch_stride=2, channel_independent=False).tokenize(raw, source="mv")
    assert recs[1].tokens.shape == (4, 2) and recs[1].meta["missing"] == [0, 1]
    np.testing.assert_allclose(_tok().detokenize(recs[1]), [[5, 50], [6, 60], [7, 70], [8, 70]], rtol=1e-5)

    def err(text: str, kind: str, name: str = "bad.ts") -> TokenizeError:
        (tmp_path / name).write_text(text)
        with pytest.raises(TokenizeError) as e:
            _tok().read(str(tmp_path / name))
        assert e.value.kind == kind and name in str(e.value)
        return e.value

    err("@problemName X\n1,2,3\n", "corrupt")
    err("@problemName X\n@classLabel true 1 2\n", "corrupt")
    assert "@data" in err("@problemName X\n", "corrupt").reason
    err("@timeStamps true\n@data\n(0,1),(1,2):1\n", "unsupported")
    assert "'3'" in err("@classLabel true 1 2\n@data\n1,2,3:3\n", "invalid").reason
    assert "line 3" in err("@classLabel true 1 2\n@data\n1,x,3:1\n", "corrupt").reason
    err("@classLabel true 1 2\n@data\n1,2:3,4:1\n5,6:1\n", "corrupt")
    err("@classLabel true 1 2\n@data\n", "empty")


def test_ucr_tsv_labels_and_trailing_nan(tmp_path):
    p = tmp_path / "X_TEST.tsv"
    p.write_text("10\t1\t2\t3\tNaN\tNaN\n-1\t4\t5\t6\t7\t8\n2\t0\tNaN\t1\t1\t1\n")
    raw = _tok().read(str(p))
    assert raw.labelled and raw.label_names == ("-1", "2", "10") and raw.labels == [2, 0, 1]
    assert [s.shape for s in raw.series] == [(3, 1), (5, 1), (5, 1)]  # trailing NaNs trimmed
    assert np.isnan(raw.series[2][1, 0])  # an interior NaN stays missing


def test_ucr_series_too_short_is_skipped_among_good_ones(tmp_path, caplog):
    p = tmp_path / "short.tsv"
    p.write_text("1\t" + "\t".join(["1"] * 24) + "\n2\t1\t2\t3\n")
    reports = []
    with (
        caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"),
        reporting_skips(reports.append),
    ):
        recs = _tok()(str(p))
    assert reports == [
        SkipReport(str(p), "series", 1, 2, "series 1 (line 2) has 3 steps; a sample needs 12 (too_small)")
    ]
    assert [r.id.split("#")[1] for r in recs] == ["s0-w0-c0"]
    assert (
        f"{p}: skipped 1 of 2 series: too_small: series 1 (line 2) has 3 steps; a sample needs 12"
        in caplog.text
    )
    p.write_text("2\t1\t2\t3\n")
    with pytest.raises(TokenizeError) as e:
        _tok()(str(p))
    assert e.value.kind == "too_small"


def test_fit_learns_labels_across_files_and_config_overrides(tmp_path):
    (tmp_path / "A_TRAIN.tsv").write_text("3\t1\t2\n10\t2\t3\n3\t0\t0\n")
    (tmp_path / "A_TEST.tsv").write_text("1\t1\t2\n3\t2\t3\n")
    (tmp_path / "other.csv").write_text("v\n1\n2\n")
    train, test = str(tmp_path / "A_TRAIN.tsv"), str(tmp_path / "A_TEST.tsv")
    # each file alone: its own sorted labels -> "3" is 0 in TRAIN but 1 in TEST
    assert _tok().read(train).labels == [0, 1, 0] and _tok().read(test).labels == [0, 1]
    tok = _tok()
    assert tok.needs_fit and tok.label_names() is None
    tok.fit([train, test, str(tmp_path / "other.csv"), str(tmp_path / "gone.tsv")])
    assert tok.label_names() == ("1", "3", "10")  # numeric order of the union
    assert tok.read(train).labels == [1, 2, 1] and tok.read(test).labels == [0, 1]
    art = tmp_path / "art"
    assert tok.save_artifacts(str(art)) == ["time_series_labels.json"]
    assert json.loads((art / "time_series_labels.json").read_text()) == {"class_labels": ["1", "3", "10"]}
    again = _tok()
    again.load_artifacts(str(art))
    assert again.label_names() == ("1", "3", "10") and again.read(train).labels == [1, 2, 1]
    fixed = _tok(class_labels=("10", "3", "1"))
    assert not fixed.needs_fit
    fixed.fit([train, test])
    assert fixed.label_names() == ("10", "3", "1") and fixed.read(test).labels == [2, 1]
    with pytest.raises(TokenizeError) as e:
        _tok(class_labels=("1", "3")).read(train)
    assert e.value.kind == "invalid" and "'10'" in e.value.reason
    # table files only: nothing learned, nothing written
    tables_only = _tok()
    tables_only.fit([str(tmp_path / "other.csv")])
    assert tables_only.label_names() is None and tables_only.save_artifacts(str(tmp_path / "none")) == []
    # .ts files keep their @classLabel order, read from the header alone
    (tmp_path / "T_TRAIN.ts").write_text("@classLabel true b a\n@data\n1,2:a\n")
    (tmp_path / "T_TEST.ts").write_text("@classLabel true b a c\n@data\n1,2:c\n")
    ts = _tok()
    ts.fit([str(tmp_path / "T_TRAIN.ts"), str(tmp_path / "T_TEST.ts")])
    assert ts.label_names() == ("b", "a", "c")
    assert ts.read(str(tmp_path / "T_TRAIN.ts")).labels == [1]


def test_bad_inputs(tmp_path):
    tok = _tok()
    with pytest.raises(TokenizeError) as e:
        tok.read(str(tmp_path / "nope.csv"))
    assert e.value.kind == "missing"
    (tmp_path / "header.csv").write_text("date,v\n")
    (tmp_path / "text.csv").write_text("a,b\nx,y\n")
    (tmp_path / "bin.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "x.arff").write_text("@relation x\n")  # read since .arff is supported: no @data
    (tmp_path / "x.xlsx").write_text("@relation x\n")
    for name, kind in (
        ("header.csv", "empty"),
        ("text.csv", "invalid"),
        ("bin.parquet", "corrupt"),
        ("x.arff", "corrupt"),
        ("x.xlsx", "unsupported"),
    ):
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / name))
        assert e.value.kind == kind and name in str(e.value), name
    with pytest.raises(TokenizeError) as e:
        tok.tokenize(TimeSeries(series=[np.zeros((0, 2), np.float32)], channels=("a", "b")), source="m")
    assert e.value.kind == "empty"


def test_deterministic_pickle_and_no_mutation():
    x = _series(300, 2)
    x[5, 1] = np.nan
    raw = TimeSeries(series=[x.copy()], channels=("a", "b"))
    tok = _tok(window=96, stride=48)
    a = tok.tokenize(raw, source="m")
    b = pickle.loads(pickle.dumps(tok)).tokenize(raw, source="m")
    assert len(a) == len(b) == 5 * 2
    for r, s in zip(a, b):
        assert r.id == s.id and r.meta == s.meta
        np.testing.assert_array_equal(r.tokens, s.tokens)
    np.testing.assert_array_equal(raw.series[0], x)


def test_forecasting_helpers():
    x = _series(120, 2)
    raw = TimeSeries(series=[x], channels=("a", "b"))
    tok = _tok(window=48, stride=24)
    r = tok.tokenize(raw, source="m")[3]  # window 1, channel 1: steps 24..71
    assert record_span(r) == (24, 72) and r.meta["channels"] == [1]
    fut = tok.future(raw, r, 24)
    np.testing.assert_array_equal(fut, x[72:96, [1]])
    assert tok.future(raw, tok.tokenize(raw, source="m")[-1], 24).shape == (
        0,
        1,
    )  # last window ends the series
    z = tok.normalize(fut, r)
    np.testing.assert_allclose(z, (x[72:96, [1]] - r.meta["mean"][0]) / r.meta["std"][0], rtol=1e-5)
    np.testing.assert_allclose(tok.denormalize(z, r), fut, rtol=1e-5)


def test_conformance_kit(tmp_path):
    x = _series(150, 2)
    x[7, 0] = np.nan
    paths = [_csv(tmp_path / "a.csv", x)]
    pq.write_table(pa.table({"u": x[:80, 0], "v": x[:80, 1]}), tmp_path / "b.parquet")
    paths.append(str(tmp_path / "b.parquet"))
    (tmp_path / "c.ts").write_text(UCR_TS)
    paths.append(str(tmp_path / "c.ts"))
    (tmp_path / "d.tsv").write_text(
        "1\t" + "\t".join(map(str, range(30))) + "\n2\t" + "\t".join(["5"] * 30) + "\n"
    )
    paths.append(str(tmp_path / "d.tsv"))

    def compare(raw, out, rec):
        s, e = record_span(rec)
        filled, _ = fill_missing(raw.series[rec.meta["series"]])
        np.testing.assert_allclose(out, filled[s:e, rec.meta["channels"]], rtol=1e-5, atol=1e-6)

    for cfg in (
        {"window": 48, "stride": 24, "patch_len": 4, "patch_stride": 4},
        {"window": 48, "stride": 24, "patch_len": 8, "patch_stride": 4, "channel_independent": False},
    ):
        tok = TimeSeriesTokenizer(cfg)
        report = check_tokenizer(tok, paths, compare=compare)
        assert report["sources"] == 4 and report["records"] > 0


def test_render_writes_png(tmp_path):
    tok = _tok(window=48, stride=24)
    raw = TimeSeries(
        series=[_series(100, 2)], channels=("a", "b"), labels=[1], label_names=("x", "y"), labelled=True
    )
    tok.render(raw, str(tmp_path / "a.png"))
    tok.render(tok.detokenize(tok.tokenize(raw, source="m")[0]), str(tmp_path / "b.png"))
    tok.render(np.arange(10.0), str(tmp_path / "c.png"))
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_duplicate_column_names_are_invalid(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("date,a,b,a\n" + "".join(f"2020-01-0{i % 9 + 1},{i},{2 * i},{3 * i}\n" for i in range(20)))
    for tok in (_tok(), _tok(columns=("b",))):
        with pytest.raises(TokenizeError) as e:
            tok(str(p))
        assert e.value.kind == "invalid" and e.value.source == str(p) and "['a']" in e.value.reason
    pq.write_table(pa.table([pa.array(np.arange(20.0))] * 2, names=["x", "x"]), tmp_path / "dup.parquet")
    with pytest.raises(TokenizeError) as e:
        _tok()(str(tmp_path / "dup.parquet"))
    assert e.value.kind == "invalid" and "['x']" in e.value.reason


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_values_beyond_float32_are_missing_without_warning(tmp_path):
    p = tmp_path / "big.csv"
    p.write_text("a\n" + "".join(f"{v}\n" for v in [1.0, 1e300, 3.0, -1e39, 5.0, 6.0]))
    raw = _tok(window=None).read(str(p))
    assert raw.series[0][:, 0].tolist() == [1.0, np.inf, 3.0, -np.inf, 5.0, 6.0]
    (rec,) = _tok(window=None, patch_len=2, patch_stride=2)(str(p))
    assert rec.meta["missing"] == [2]
    out = _tok(window=None, patch_len=2, patch_stride=2).detokenize(rec)[:, 0]
    np.testing.assert_allclose(out, [1, 2, 3, 4, 5, 6], rtol=1e-5)  # interpolated like NaN
    u = tmp_path / "U_TEST.tsv"
    u.write_text("1\t1\t1e300\t3\t1e300\n")  # a trailing out-of-range value ends the series, like NaN
    assert _tok().read(str(u)).series[0][:, 0].tolist() == [1.0, np.inf, 3.0]
    ts = tmp_path / "big.ts"
    ts.write_text("@problemName B\n@classLabel true x\n@data\n1,1e300,3:4,5,6:x\n")
    assert _tok().read(str(ts)).series[0][:, 0].tolist() == [1.0, np.inf, 3.0]


def test_a_semicolon_separated_csv_is_named_as_such_and_a_bom_is_ignored(tmp_path):
    """A spreadsheet exported where the decimal mark is the comma separates fields with ';'; the
    error says so. A UTF-8 byte-order mark before the header does not reach the column names."""
    tok = get_tokenizer("time_series", {"window": None})
    semi = tmp_path / "semi.csv"
    semi.write_text("a;b\n" + "".join(f"{i};{2 * i}\n" for i in range(40)))
    with pytest.raises(TokenizeError) as e:
        tok(str(semi))
    assert (e.value.kind, e.value.reason) == (
        "invalid",
        "no numeric columns (columns: ['a;b']); the file looks ';'-separated, and .csv is read as "
        "comma-separated (.tsv: tabs)",
    )
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + ("temp\n" + "".join(f"{i / 10}\n" for i in range(40))).encode())
    assert tok(str(bom))[0].meta["channel_names"] == ["temp"]


def _table(path, header: str, rows: list[str]) -> str:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return str(path)


def _dated(rows: list[str]) -> list[str]:
    return [f"2020-01-01 {i % 24:02d}:00,{r}" for i, r in enumerate(rows)]


def test_a_question_mark_is_a_missing_value_in_a_table(tmp_path):
    """'?' (UCR's marker, as the docstring says) made Arrow read the whole column as text, and the
    channel was dropped."""
    rows = [f"{i},{2 * i}" for i in range(40)]
    rows[5] = "?,10"
    p = _table(tmp_path / "q.csv", "date,a,b", _dated(rows))
    raw = _tok(window=None).read(p)
    assert raw.channels == ("a", "b")
    a = raw.values[:, 0]
    assert np.isnan(a[5]) and np.isfinite(np.delete(a, 5)).all()
    assert [r.meta["missing"] for r in _tok(window=None)(p)] == [[1], [0]]


def test_a_mostly_numeric_column_with_stray_cells_is_a_channel(tmp_path, caplog):
    """One typo ('1.2.3') made Arrow read column b as text and b was dropped, logged at debug only."""
    rows = [f"{i},{2 * i}.5,{'on' if i % 2 else 'off'}" for i in range(40)]
    rows[7] = "7,1.2.3,on"
    rows[9] = "9, - ,off"
    p = _table(tmp_path / "typo.csv", "date,a,b,status", _dated(rows))
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        raw = _tok(window=None).read(p)
    assert raw.channels == ("a", "b")
    b = raw.values[:, 1]
    assert np.isnan(b[[7, 9]]).all() and b[8] == 16.5 and np.isfinite(np.delete(b, [7, 9])).all()
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"{p}: column 'b': 2 of 40 cells are not numbers (e.g. '1.2.3'): read as missing values",
        f"{p}: skipping non-numeric column(s) ['status']",  # named; the first column (date) is not
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        assert _tok(window=None, columns=("b",)).read(p).channels == ("b",)
    assert "2 of 40 cells are not numbers" in caplog.text
    with pytest.raises(TokenizeError) as e:
        _tok(window=None, columns=("a", "status")).read(p)
    assert (e.value.kind, e.value.reason) == ("config", "column(s) ['status'] are not numeric")
    # a column that is half text is not numeric: skipped with a warning
    half = _table(tmp_path / "half.csv", "a,b", [f"{i},{i if i % 2 else 'x'}" for i in range(40)])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        assert _tok(window=None).read(half).channels == ("a",)
    assert [r.getMessage() for r in caplog.records] == [f"{half}: skipping non-numeric column(s) ['b']"]


def test_date_columns_and_the_first_column_are_skipped_quietly(tmp_path, caplog):
    rows = [f"s{i},{i},2020-01-{i % 28 + 1:02d}T00:00:00,{i * 3}" for i in range(40)]
    p = _table(tmp_path / "d.csv", "id,a,when,b", rows)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        assert _tok(window=None).read(p).channels == ("a", "b")
    assert caplog.records == []


def test_a_column_without_a_finite_value_is_skipped_like_an_empty_one(tmp_path, caplog):
    """An all-inf column rejected the whole file while an all-empty one was skipped."""
    rows = [f"{i},inf,,{-i}" for i in range(40)]
    p = _table(tmp_path / "inf.csv", "a,inf,empty,b", rows)
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        raw = _tok(window=None).read(p)
    assert raw.channels == ("a", "b") and np.isfinite(raw.values).all()
    assert [r.getMessage() for r in caplog.records] == [
        f"{p}: skipping column(s) ['inf', 'empty']: no valid value at all (every cell empty, NaN or inf; "
        "choose them in columns= to be strict)"
    ]
    pq.write_table(
        pa.table({"a": pa.array([None] * 40, pa.float64()), "b": np.arange(40.0)}), tmp_path / "n.parquet"
    )
    assert _tok(window=None).read(str(tmp_path / "n.parquet")).channels == ("b",)
    with pytest.raises(TokenizeError) as e:  # chosen: strict
        _tok(window=None, columns=("a", "inf"))(p)
    assert (e.value.kind, e.value.reason) == ("invalid", "series 0: channel(s) ['inf'] have no valid value")
    every = _table(tmp_path / "every.csv", "x,y", ["inf,"] * 40)
    with pytest.raises(TokenizeError) as e:  # no column has a value: the file is invalid
        _tok(window=None)(every)
    assert (e.value.kind, e.value.reason) == (
        "invalid",
        "series 0: channel(s) ['x', 'y'] have no valid value",
    )


def test_a_table_without_a_header_row_keeps_its_first_row(tmp_path, caplog):
    """A header-less CSV lost its first row to the column names ('0.0000', '0.1257')."""
    x = _series(40, 2)
    p = _csv(tmp_path / "nohead.csv", x, date=False)
    p2 = tmp_path / "nohead2.csv"
    p2.write_text(open(p).read().split("\n", 1)[1])
    raw = _tok(window=None).read(str(p2))
    assert raw.channels == ("f0", "f1")
    np.testing.assert_array_equal(raw.values, x)
    # integers are names: 0,1,2,... as pandas writes unnamed columns (quietly), sensor ids and a
    # lone 0 with a warning
    named = _table(tmp_path / "pandas.csv", "0,1", [f"{i},{i * 2}" for i in range(40)])
    ids = _table(tmp_path / "ids.csv", "773869,767541,767542", [f"{i}.5,{i},{-i}" for i in range(40)])
    lone = _table(tmp_path / "lone.csv", "0", [str(i) for i in range(40)])
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        raw = _tok(window=None).read(named)
        assert raw.channels == ("0", "1") and raw.values.shape == (40, 2)
        raw = _tok(window=None).read(ids)
        assert raw.channels == ("773869", "767541", "767542") and raw.values.shape == (40, 3)
        assert _tok(window=None).read(lone).values.shape == (40, 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"{ids}: read the first row (773869, 767541, 767542) as column names; if the file has no header "
        "row, those values are not in the series",
        f"{lone}: read the first row (0) as column names; if the file has no header row, those values "
        "are not in the series",
    ]


def test_a_header_that_is_not_utf8_or_utf16_text_is_corrupt(tmp_path):
    """A Latin-1 header gave an `internal` error row: Arrow decodes the column names lazily."""
    p = tmp_path / "latin1.csv"
    p.write_bytes(
        "date,température,b\n".encode("latin-1") + b"".join(b"x,%d,%d\n" % (i, i) for i in range(40))
    )
    q = tmp_path / "utf16.csv"
    q.write_bytes(("a,b\n" + "1,2\n" * 40).encode("utf-16"))
    for path, reason in (
        (p, "header is not UTF-8 text (invalid continuation byte: byte 0xe9)"),
        (q, "UTF-16 text; save the table as UTF-8"),
    ):
        with pytest.raises(TokenizeError) as e:
            _tok(window=None)(str(path))
        assert (e.value.kind, e.value.reason, e.value.source) == ("corrupt", reason, str(path))


def test_unusable_ucr_lines_are_named_in_one_warning(tmp_path, caplog):
    good = "\t".join(["1"] + [str(i % 5) for i in range(30)])
    p = tmp_path / "U.tsv"
    p.write_text("\n".join([good, "2", good, "2\tNaN\tNaN", "1\t1\t2", good]) + "\n")
    with caplog.at_level(logging.WARNING, logger="maskloom.tokenizers.time_series"):
        recs = _tok()(str(p))
    assert [r.id.split("#")[1] for r in recs] == ["s0-w0-c0", "s2-w0-c0", "s5-w0-c0"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{p}: skipped 3 of 6 series: empty: series 1 (line 2) has no values; empty: series 3 (line 4) "
        "has no values; too_small: series 4 (line 5) has 2 steps; a sample needs 12"
    ]


def _same(a, b) -> bool:
    return (a.id, a.source, a.label, a.meta) == (b.id, b.source, b.label, b.meta) and all(
        np.array_equal(x, y) for x, y in ((a.tokens, b.tokens), (a.positions, b.positions))
    )


@pytest.mark.parametrize("joint", [False, True])
def test_the_record_stream_equals_tokenize_with_gaps_and_bad_series(tmp_path, joint):
    x = _series(700, 3)
    x[100:400, 1] = np.nan  # windows of channel 1 over this gap are skipped
    table = _csv(tmp_path / "gappy.csv", x)
    ucr = tmp_path / "mixed.tsv"
    ucr.write_text(
        "1\t" + "\t".join(map(str, range(30))) + "\n2\t1\t2\t3\n1\t" + "\t".join(["5"] * 30) + "\n"
    )
    tok = _tok(window=96, stride=5, max_missing=0.1, channel_independent=not joint)
    tok.fit([table, str(ucr)])
    for p in (table, str(ucr)):
        recs, streamed = tok(p), list(tok.iter_records(p))
        assert len(recs) == len(streamed) > 0 and all(map(_same, recs, streamed))
    # 121 windows; 76 of them (starts 15 to 390) hold over 10 % of channel 1's gap
    assert len(tok(table)) == (121 - 76 if joint else 3 * 121 - 76)
    with pytest.raises(TokenizeError) as e:
        list(tok.iter_records(_csv(tmp_path / "dead.csv", np.full((200, 1), np.nan, np.float32))))
    assert e.value.kind in ("invalid", "empty")


def test_a_long_series_at_stride_one_streams_in_bounded_memory(tmp_path):
    """6,000 steps x 12 channels, windows of 512 every step: 65,868 records whose patches alone take
    133 MB; the stream holds a chunk of windows at a time."""
    import tracemalloc

    path = tmp_path / "long.parquet"
    x = _series(6000, 12)
    pq.write_table(pa.table({f"c{i}": x[:, i] for i in range(12)}), path)
    tok = _tok(stride=1)
    tracemalloc.start()
    try:
        count = tokens = 0
        for r in tok.iter_records(str(path)):
            count += 1
            tokens += r.tokens.nbytes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 5489 * 12 and tokens == count * 42 * 12 * 4
    assert peak < 80e6 < tokens, f"peak {peak / 1e6:.0f} MB"


# ---- compressed files (.gz, .bz2, .xz, .zst, .lz4) and UCR/UEA .arff ----------------------------
CODECS = {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz", "zstd": ".zst", "lz4": ".lz4"}


def _compress(path, codec: str, keep: float = 1.0) -> str:
    """``path`` compressed with ``codec`` beside it (``<path>.<ext>``); ``keep`` < 1 cuts the
    compressed bytes to that fraction (a truncated download)."""
    import bz2
    import gzip
    import io
    import lzma

    data = open(path, "rb").read()
    if codec in ("gzip", "bz2", "xz"):
        buf = io.BytesIO()
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[codec]
        with opener(buf, "wb", **({"compresslevel": 1} if codec == "bz2" else {})) as f:  # 100 kB blocks
            f.write(data)
        packed = buf.getvalue()
    else:
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, codec) as f:
            f.write(data)
        packed = sink.getvalue().to_pybytes()
    out = f"{path}{CODECS[codec]}"
    with open(out, "wb") as f:
        f.write(packed[: int(len(packed) * keep)])
    return out


def _same_records(a: list, b: list, a_src: str, b_src: str) -> None:
    """Records equal in every field but the source (and the source inside the id)."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.source, y.source) == (a_src, b_src)
        assert x.id.replace(a_src, "", 1) == y.id.replace(b_src, "", 1)
        assert x.tokens.dtype == y.tokens.dtype and x.tokens.tobytes() == y.tokens.tobytes()
        assert x.positions.tobytes() == y.positions.tobytes()
        assert (x.label, x.meta) == (y.label, y.meta)


def _same_raw(a: TimeSeries, b: TimeSeries) -> None:
    assert (a.channels, a.labels, a.label_names, a.labelled) == (
        b.channels,
        b.labels,
        b.label_names,
        b.labelled,
    )
    assert len(a.series) == len(b.series)
    for x, y in zip(a.series, b.series):
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape and x.tobytes() == y.tobytes()


TOY_TS = """@problemName Toy
@missing true
@classLabel true b a
@data
1,2,3,4,5,6,7,8:a
2,?,4,6,8,10,12,14:b
0.5,0.25,0.125,0,0,0,0,1:a
"""
TOY_ARFF = """% the data of TOY_TS, as Weka writes it
@relation Toy

@attribute att0 numeric
@ATTRIBUTE att1 NUMERIC
@attribute 'att 2' real
@attribute att3 integer
@attribute att4 numeric
@attribute att5 numeric
@attribute att6 numeric
@attribute att7 numeric
@attribute target {b,a}

@data
1,2,3,4,5,6,7,8,a
2,?,4,6,8,10,12,14,'b'
% a comment between series
0.5, 0.25, 0.125, 0, 0, 0, 0, 1, a
"""
MV_TS = """@problemName MV
@univariate false
@dimensions 2
@classLabel true standing running
@data
1,2,3,4,5,6:10,20,30,?,50,60:running
6,5,4,3,2,1:-1,-2,-3,-4,-5,-6:standing
"""
MV_ARFF = """@relation MV
@attribute activity relational
  @attribute t0 numeric
  @attribute t1 numeric
  @attribute t2 numeric
  @attribute t3 numeric
  @attribute t4 numeric
  @attribute t5 numeric
@end activity
@attribute class {standing,running}
@data
'1,2,3,4,5,6\\n10,20,30,?,50,60',running
"6,5,4,3,2,1\\n-1,-2,-3,-4,-5,-6",'standing'
"""


def _files(tmp_path) -> dict[str, str]:
    """One small file of every format that is read compressed: tables (CSV, TSV) and labelled (UCR
    .tsv, .ts, .arff univariate and multivariate)."""
    x = _series(80, 2)
    x[[3, 40], [0, 1]] = np.nan
    (tmp_path / "table.tsv").write_text(
        "a\tb\n" + "".join(f"{u!r}\t{v!r}\n" for u, v in x.astype(float).tolist()).replace("nan", "")
    )
    (tmp_path / "UCR_TRAIN.tsv").write_text("2\t1\t2\t3\t4\tNaN\n1\t4\t?\t6\t7\t8\n10\t0\t1\t0\t1\t0\n")
    (tmp_path / "toy.ts").write_text(TOY_TS)
    (tmp_path / "toy.arff").write_text(TOY_ARFF)
    (tmp_path / "mv.arff").write_text(MV_ARFF)
    return {
        "table.csv": _csv(tmp_path / "table.csv", x),
        **{n: str(tmp_path / n) for n in ("table.tsv", "UCR_TRAIN.tsv", "toy.ts", "toy.arff", "mv.arff")},
    }


@pytest.mark.parametrize("codec", list(CODECS))
def test_compressed_files_read_as_their_plain_form(tmp_path, codec):
    files = _files(tmp_path)
    tok = _tok(window=32, stride=16, patch_len=4, patch_stride=4)
    for plain in files.values():
        packed = _compress(plain, codec)
        assert packed.lower().endswith(TimeSeriesTokenizer.extensions)
        _same_raw(tok.read(packed), tok.read(plain))
        _same_records(list(tok.iter_records(packed)), tok(plain), packed, plain)
    assert (
        tok.read(files["table.tsv"] + CODECS[codec]).labelled is False
    )  # a TSV table, sniffed in the stream
    assert tok.read(files["UCR_TRAIN.tsv"] + CODECS[codec]).label_names == ("1", "2", "10")
    # fit reads labels (headers, label fields) from compressed files as from plain ones
    fitted = [_tok(), _tok()]
    fitted[0].fit(files.values())
    fitted[1].fit(p + CODECS[codec] for p in files.values())
    assert (
        fitted[0].fitted_labels
        == fitted[1].fitted_labels
        == ("standing", "running", "b", "a", "1", "2", "10")  # sorted sources: mv.arff first
    )


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_truncated_compressed_file_is_corrupt_naming_it(tmp_path, codec):
    """A cut download is a clean TokenizeError naming the file, the codec and how far it got, for a
    table (read whole) and for a .ts (whose header fit() reads lazily: intact, so its labels are learned)."""
    x = np.round(_series(4000, 3), 3)
    table = _compress(_csv(tmp_path / "long.csv", x), codec, keep=0.75)  # ~190 kB of text
    rows = "".join(",".join(map(repr, r.tolist())) + ":a\n" for r in x.reshape(-1, 120))
    (tmp_path / "long.ts").write_text("@classLabel true a b\n@data\n" + rows)
    ts = _compress(tmp_path / "long.ts", codec, keep=0.75)
    tok = _tok()
    for path in (table, ts):
        with pytest.raises(TokenizeError) as e:
            list(tok.iter_records(path))
        assert e.value.kind == "corrupt" and e.value.source == path and path in str(e.value)
        assert re.fullmatch(
            rf"damaged or truncated {codec} stream after [\d,]+ bytes of text \(.+\)", e.value.reason
        ), e.value.reason
    tok.fit([ts])
    assert tok.fitted_labels == ("a", "b")


def test_compressed_names_garbage_and_empty_streams(tmp_path):
    import gzip

    tok = _tok()
    assert len(TimeSeriesTokenizer.extensions) == 5 + 4 * 5
    assert {".csv.gz", ".tsv.bz2", ".ts.xz", ".arff.zst", ".csv.lz4"} <= set(TimeSeriesTokenizer.extensions)
    assert ".parquet.gz" not in TimeSeriesTokenizer.extensions

    def err(name: str, data: bytes) -> TokenizeError:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizeError) as e:
            tok.read(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value)
        return e.value

    e = err("a.parquet.gz", gzip.compress(b"PAR1"))
    assert (e.kind, e.reason) == (
        "unsupported",
        "a compressed Parquet file: Parquet compresses inside; decompress it",
    )
    for name, shown in (
        ("a.gz", "'.gz'"),
        ("a.txt.zst", "'.txt.zst'"),
        ("a.xlsx", "'.xlsx'"),
        ("noext", "'(none)'"),
    ):
        e = err(name, b"x")
        assert (e.kind, e.reason) == (
            "unsupported",
            f"extension {shown}; time_series reads .csv, .tsv, .ts, .arff "
            "(also compressed: .gz, .bz2, .xz, .zst, .lz4) and .parquet",
        )
    e = err("plain.csv.gz", b"date,a\n2020-01-01,1\n")  # not compressed at all
    assert (e.kind, e.reason) == (
        "corrupt",
        "not a readable gzip stream (zlib inflate failed: incorrect header check)",
    )
    e = err("nothing.ts.gz", gzip.compress(b""))
    assert (e.kind, e.reason) == ("empty", "the gzip stream holds no data")
    e = err("latin1.ts.gz", gzip.compress("@problemName température\n".encode("latin-1")))
    assert e.kind == "corrupt" and e.reason.startswith("not UTF-8 text")
    e = err("utf16.csv.gz", gzip.compress("a,b\n1,2\n".encode("utf-16")))
    assert (e.kind, e.reason) == ("corrupt", "UTF-16 text; save the table as UTF-8")


def test_input_discovery_finds_compressed_and_arff_files(tmp_path):
    from maskloom.pipelines.sources import find_inputs

    for name in (
        "a.csv.gz",
        "b.TSV.ZST",
        "c.ts.xz",
        "d.arff",
        "e.arff.bz2",
        "f.parquet",
        "g.csv",
        "h.txt.gz",
    ):
        (tmp_path / name).write_bytes(b"x")
    found = find_inputs(str(tmp_path), extensions=TimeSeriesTokenizer.extensions)
    names = sorted(os.path.basename(i.source) for i in found.inputs)
    assert found.skipped == {".gz": 1}
    assert names == ["a.csv.gz", "b.TSV.ZST", "c.ts.xz", "d.arff", "e.arff.bz2", "f.parquet", "g.csv"]


def test_arff_univariate_equals_the_ts_of_the_same_data(tmp_path):
    ts, arff = tmp_path / "toy.ts", tmp_path / "toy.arff"
    ts.write_text(TOY_TS)
    arff.write_text(TOY_ARFF)
    tok = _tok(patch_len=4, patch_stride=2)
    raw = tok.read(str(arff))
    _same_raw(raw, tok.read(str(ts)))
    # the nominal attribute's declared order {b,a} gives the indices, as @classLabel does
    assert raw.label_names == ("b", "a") and raw.labels == [1, 0, 1] and raw.lines == [15, 16, 18]
    assert raw.series[0][:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    _same_records(tok(str(arff)), tok(str(ts)), str(arff), str(ts))
    # labels learned by fit() from the header only, and kept as the label artifact
    fitted = _tok()
    fitted.fit([str(arff)])
    assert fitted.fitted_labels == ("b", "a") and fitted.save_artifacts(str(tmp_path / "art"))
    loaded = _tok()
    loaded.load_artifacts(str(tmp_path / "art"))
    assert loaded.label_names() == ("b", "a")
    # an .arff without a nominal class attribute: unlabelled series
    arff.write_text("@relation u\n@attribute a numeric\n@attribute b numeric\n@data\n1,2\n3,4\n")
    raw = tok.read(str(arff))
    assert raw.labelled and raw.labels is None and raw.label_names is None
    assert [s[:, 0].tolist() for s in raw.series] == [[1, 2], [3, 4]]


def test_arff_multivariate_relational_equals_the_ts_of_the_same_data(tmp_path):
    ts, arff = tmp_path / "mv.ts", tmp_path / "mv.arff"
    ts.write_text(MV_TS)
    arff.write_text(MV_ARFF)
    raw = _tok().read(str(arff))
    _same_raw(raw, _tok().read(str(ts)))
    assert raw.channels == ("dim_0", "dim_1") and raw.labels == [1, 0]
    assert raw.label_names == ("standing", "running")
    assert raw.series[1].tolist() == [[6, -1], [5, -2], [4, -3], [3, -4], [2, -5], [1, -6]]
    for joint in (False, True):
        tok = _tok(patch_len=2, patch_stride=2, channel_independent=not joint)
        _same_records(tok(str(arff)), tok(str(ts)), str(arff), str(ts))


def test_arff_missing_values_are_filled_as_in_ts(tmp_path):
    p = tmp_path / "miss.arff"
    head = "@relation m\n" + "".join(f"@attribute t{i} numeric\n" for i in range(6)) + "@attribute c {x,y}\n"
    p.write_text(head + "@data\n1,?,3,?,?,6,x\n?,?,?,?,?,?,y\n2,4,6,8,10,12,y\n")
    tok = _tok(patch_len=3, patch_stride=3)
    raw = tok.read(str(p))
    assert np.isnan(raw.series[0][:, 0]).tolist() == [False, True, False, True, True, False]
    assert raw.series[1].shape == (0, 1) and raw.lines == [10, 11, 12]  # all missing: nothing left
    recs = tok(str(p))  # the all-missing series 1 (line 11) is skipped with a warning
    assert [(r.id.split("#")[1], r.label) for r in recs] == [("s0-w0-c0", 0), ("s2-w0-c0", 1)]
    assert recs[0].meta["missing"] == [3]
    np.testing.assert_allclose(tok.detokenize(recs[0])[:, 0], [1, 2, 3, 4, 5, 6], rtol=1e-5)  # interpolated
    ts = tmp_path / "miss.ts"
    ts.write_text("@classLabel true x y\n@data\n1,?,3,?,?,6:x\n?,?,?,?,?,?:y\n2,4,6,8,10,12:y\n")
    _same_records(recs, tok(str(ts)), str(p), str(ts))
    # unequal lengths: a series padded with '?' to the attribute count is the .ts's shorter series
    p.write_text(head + "@data\n1,2,3,4,?,?,x\n1,?,3,5,7,9,y\n")
    ts.write_text("@classLabel true x y\n@data\n1,2,3,4:x\n1,?,3,5,7,9:y\n")
    assert [len(x) for x in tok.read(str(p)).series] == [4, 6]
    _same_records(tok(str(p)), tok(str(ts)), str(p), str(ts))
    # a missing class value is no class name, as a '?' label in a .ts
    p.write_text(head + "@data\n2,4,6,8,10,12,?\n")
    with pytest.raises(TokenizeError) as e:
        tok(str(p))
    assert (e.value.kind, e.value.reason) == (
        "invalid",
        "class label(s) ['?'] not among the class names ['x', 'y']",
    )


def test_arff_unsupported_and_malformed_variants(tmp_path):
    attrs = "@relation r\n@attribute a numeric\n@attribute b numeric\n@attribute c {x,y}\n"

    def err(text: str, kind: str) -> str:
        p = tmp_path / "bad.arff"
        p.write_text(text)
        with pytest.raises(TokenizeError) as e:
            _tok().read(str(p))
        assert e.value.kind == kind and str(p) in str(e.value)
        return e.value.reason

    assert err(attrs + "@data\n{0 1.5, 2 x}\n", "unsupported") == (
        "line 6: sparse ARFF data ({index value, ...}); save it dense"
    )
    assert (
        err(attrs + "@data\n1,2,x,{0.5}\n", "unsupported")
        == "line 6: instance weights ({w} after the values)"
    )
    reads = "time_series reads numeric attributes (a series' steps), a relational attribute of numeric ones (UEA multivariate) and a nominal class"  # fmt: skip
    assert (
        err("@relation r\n@attribute s string\n@data\n'a'\n", "unsupported")
        == f"line 2: string attribute 's': {reads}"
    )
    assert err("@relation r\n@attribute 'when' date 'yyyy-MM-dd'\n@data\n", "unsupported") == (
        f"line 2: date attribute 'when': {reads}"
    )
    assert err(
        "@relation r\n@attribute k {p,q}\n@attribute a numeric\n@attribute c {x,y}\n@data\n", "unsupported"
    ) == ("line 2: nominal attribute 'k' is not the last: only the class (the last attribute) may be nominal")
    rel = "@relation r\n@attribute s relational\n@attribute t0 numeric\n"
    assert (
        err(rel + "@attribute t1 string\n@end s\n@data\n", "unsupported")
        == f"line 4: string attribute 't1': {reads}"
    )
    assert err(rel + "@attribute t1 {u,v}\n@end s\n@data\n", "unsupported") == (
        "line 4: attribute 't1' inside relational attribute 's' is nominal: only numeric ones (the steps of a channel) are read"
    )
    assert "beside the relational one" in err(rel + "@end s\n@attribute a numeric\n@data\n", "unsupported")
    # malformed: corrupt, naming the line
    assert err(attrs + "@data\n1,2,3,x\n", "corrupt") == "line 6: 4 values, the header declares 3 attributes"
    assert err(attrs + "@data\n1,zwei,x\n", "corrupt") == "line 6: non-numeric value"
    assert err(attrs + "@data\n1,2,'x\n", "corrupt") == "line 6: malformed quoted value at character 5"
    assert err(attrs, "corrupt") == "no @data line: not an ARFF file"
    assert (
        err("1,2,3\n", "corrupt") == "line 1: expected an @relation, @attribute or @data line before the data"
    )
    assert (
        err("@relation r\n@attribute a numerc\n@data\n", "corrupt")
        == "line 2: attribute 'a' has no known type ('numerc')"
    )
    assert err(rel + "@data\n", "corrupt") == "relational attribute 's' has no @end line"
    assert err(rel + "@end s\n@attribute c {x}\n@data\n'1\\n2,3',x\n", "corrupt") == (
        "line 7: channel 1 has 2 values, the relational attribute declares 1"
    )
    assert err(attrs + "@data\n", "empty") == "no series in the file"


def test_a_folder_of_the_ucr_archive_gives_each_series_once(tmp_path):
    """X_TRAIN.ts, .arff and .tsv side by side (as the archive ships them) are one dataset: a folder
    walk takes the .ts, or the .arff where there is no .ts; a file named explicitly is still read."""
    from maskloom.pipelines.sources import find_inputs

    for name in ("A_TRAIN.ts", "A_TRAIN.arff", "A_TRAIN.tsv", "B_TRAIN.arff.gz", "B_TRAIN.tsv", "C_TRAIN.tsv",
                 "D.ts.xz", "D.tsv.gz", "E.csv"):  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
    tok = TimeSeriesTokenizer()
    found = find_inputs(str(tmp_path), extensions=tok.extensions, companions=tok.companion_files)
    assert sorted(os.path.basename(i.source) for i in found.inputs) == [
        "A_TRAIN.ts", "B_TRAIN.arff.gz", "C_TRAIN.tsv", "D.ts.xz", "E.csv"
    ]  # fmt: skip
    named = find_inputs(
        str(tmp_path / "A_TRAIN.arff"), extensions=tok.extensions, companions=tok.companion_files
    )
    assert [os.path.basename(i.source) for i in named.inputs] == ["A_TRAIN.arff"]
