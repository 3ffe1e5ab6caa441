"""Tests for the demo-data generator (maskloom/demo_data.py) and `maskloom demo-data`."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from maskloom import demo_data
from maskloom.cli import main
from maskloom.demo_data import CLASSES, MODALITIES, write_demo_data

PER_CLASS = 2


def _digests(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != "demo_data.json":
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return str(out), write_demo_data(str(out), seed=0, per_class=PER_CLASS)


def test_summary_and_file_counts(demo):
    out, summary = demo
    assert list(summary) == [
        "image",
        "video",
        "audio",
        "point_cloud",
        "graph",
        "time_series",
        "time_series_long",
        "text",
    ]
    for m, ext in [
        ("image", ".png"),
        ("video", ".mp4"),
        ("audio", ".wav"),
        ("point_cloud", ".ply"),
        ("time_series", ".csv"),
    ]:
        assert summary[m]["files"] == summary[m]["samples"] == 4 * PER_CLASS
        assert summary[m]["classes"] == list(CLASSES[m])
        assert sorted(os.listdir(summary[m]["path"])) == sorted(CLASSES[m])
        for c in CLASSES[m]:
            assert sorted(os.listdir(os.path.join(out, m, c))) == [
                f"{c}_{i:04d}{ext}" for i in range(PER_CLASS)
            ]
    assert summary["graph"]["samples"] == 4 * PER_CLASS
    assert summary["text"]["path"] == os.path.join(out, "text", "docs.jsonl")
    marker = json.load(open(os.path.join(out, "demo_data.json")))
    assert (
        marker["modalities"]["image"]["seed"] == 0 and marker["modalities"]["image"]["per_class"] == PER_CLASS
    )


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    out, _ = demo
    write_demo_data(str(tmp_path / "a"), seed=0, per_class=PER_CLASS)
    write_demo_data(str(tmp_path / "b"), seed=1, per_class=PER_CLASS)
    ref, again, other = _digests(out), _digests(str(tmp_path / "a")), _digests(str(tmp_path / "b"))
    assert ref == again  # byte-identical, H.264 included
    assert ref.keys() == other.keys()
    same = {"graph/DEMO/classes.txt", "graph/DEMO/raw/DEMO_graph_labels.txt"}  # class order only
    assert {k for k in ref if ref[k] == other[k]} == same


def test_subset_and_larger_per_class_keep_files(demo, tmp_path):
    out, _ = demo
    s = write_demo_data(str(tmp_path / "c"), seed=0, per_class=PER_CLASS + 1, modalities=["audio", "image"])
    assert list(s) == ["image", "audio"]
    ref, sub = _digests(out), _digests(str(tmp_path / "c"))
    for k, v in sub.items():
        if k in ref:
            assert ref[k] == v, k
    assert len(sub) == 2 * 4 * (PER_CLASS + 1)


def test_images_decode(demo):
    from PIL import Image

    out, _ = demo
    with Image.open(os.path.join(out, "image", "circle", "circle_0000.png")) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        px = np.asarray(im)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 2  # shape + background + noise


def test_audio_decodes(demo):
    import soundfile as sf

    out, _ = demo
    for c in CLASSES["audio"]:
        wav, sr = sf.read(os.path.join(out, "audio", c, f"{c}_0001.wav"))
        assert sr == 16000 and wav.shape == (16000,) and 0.2 < np.abs(wav).max() <= 1.0


def test_audio_chirp_direction(demo):
    """A rising chirp's dominant frequency grows from the first to the last quarter; a falling one drops."""
    import soundfile as sf

    out, _ = demo

    def peak(x):
        return np.argmax(np.abs(np.fft.rfft(x)))

    up, _ = sf.read(os.path.join(out, "audio", "chirp_up", "chirp_up_0000.wav"))
    down, _ = sf.read(os.path.join(out, "audio", "chirp_down", "chirp_down_0000.wav"))
    assert peak(up[:4000]) < peak(up[-4000:])
    assert peak(down[:4000]) > peak(down[-4000:])


def test_video_decodes_with_decord_and_pyav(demo):
    import av
    import decord

    out, _ = demo
    path = os.path.join(out, "video", "circle", "circle_0000.mp4")
    vr = decord.VideoReader(path)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert frames.shape == (16, 64, 64, 3)
    with av.open(path) as c:
        assert sum(1 for _ in c.decode(video=0)) == 16
    # the object moves: consecutive frames differ, and the foreground area stays about the same
    assert np.abs(frames[0].astype(int) - frames[8]).mean() > 3
    for kind in ("circle", "square", "triangle", "stripes"):
        clip = demo_data._video(kind, np.random.default_rng(3))
        bg = clip[0, 0, 0]
        fg_share = (np.abs(clip.astype(int) - bg).sum(-1) > 0).mean(axis=(1, 2))  # (T,)
        assert fg_share.min() > 0.05 and fg_share.max() - fg_share.min() < 0.1, (kind, fg_share)
        assert (clip[0] != clip[-1]).any(), kind


def test_point_clouds_load_with_trimesh(demo):
    import trimesh

    out, _ = demo
    for c in CLASSES["point_cloud"]:
        pc = trimesh.load(os.path.join(out, "point_cloud", c, f"{c}_0000.ply"))
        assert np.asarray(pc.vertices).shape == (1024, 3) and np.isfinite(pc.vertices).all()


def test_sphere_points_lie_on_a_sphere(demo):
    import trimesh

    out, _ = demo
    v = np.asarray(trimesh.load(os.path.join(out, "point_cloud", "sphere", "sphere_0000.ply")).vertices)
    r = np.linalg.norm(v - v.mean(0), axis=1)
    assert r.std() / r.mean() < 0.15  # mild anisotropy + jitter only
    cube = np.asarray(trimesh.load(os.path.join(out, "point_cloud", "cube", "cube_0000.ply")).vertices)
    rc = np.linalg.norm(cube - cube.mean(0), axis=1)
    assert rc.std() / rc.mean() > r.std() / r.mean()


def test_tu_graph_files_consistent(demo):
    out, summary = demo
    raw = os.path.join(summary["graph"]["path"], "raw")
    assert sorted(os.listdir(raw)) == [
        "DEMO_A.txt",
        "DEMO_graph_indicator.txt",
        "DEMO_graph_labels.txt",
        "DEMO_node_attributes.txt",
    ]
    a = np.loadtxt(os.path.join(raw, "DEMO_A.txt"), delimiter=",", dtype=int)
    ind = np.loadtxt(os.path.join(raw, "DEMO_graph_indicator.txt"), dtype=int)
    labels = np.loadtxt(os.path.join(raw, "DEMO_graph_labels.txt"), dtype=int)
    attrs = np.loadtxt(os.path.join(raw, "DEMO_node_attributes.txt"), delimiter=",")
    n_graphs = 4 * PER_CLASS
    assert labels.tolist() == [0, 1, 2, 3] * PER_CLASS
    assert ind.min() == 1 and ind.max() == n_graphs and (np.diff(ind) >= 0).all()
    assert attrs.shape == (len(ind), 8) and (attrs.sum(1) == 1).all()
    assert a.min() >= 1 and a.max() <= len(ind)
    assert (ind[a[:, 0] - 1] == ind[a[:, 1] - 1]).all()  # no edge between graphs
    assert {tuple(e) for e in a} == {(j, i) for i, j in a}  # symmetric
    deg = np.bincount(a[:, 0] - 1, minlength=len(ind))
    assert (np.minimum(deg, 7) == attrs.argmax(1)).all()  # attribute = one-hot degree
    cycle_nodes = ind == 1  # graph 1 is a cycle: every degree 2
    assert (deg[cycle_nodes] == 2).all()


def test_time_series_files(demo):
    out, summary = demo
    x = np.loadtxt(os.path.join(out, "time_series", "square", "square_0000.csv"), delimiter=",", skiprows=1)
    assert x.shape == (512, 3) and np.isfinite(x).all()
    with open(summary["time_series_long"]["path"]) as f:
        header, first = f.readline().strip(), f.readline().strip()
    assert header == "date,load_a,load_b,load_c,OT" and first.startswith("2020-01-01 00:00:00,")
    long = np.loadtxt(summary["time_series_long"]["path"], delimiter=",", skiprows=1, usecols=(1, 2, 3, 4))
    assert long.shape == (4096, 4)


def test_text_jsonl(demo):
    out, summary = demo
    rows = [json.loads(line) for line in open(summary["text"]["path"])]
    assert [r["label"] for r in rows] == list(CLASSES["text"]) * PER_CLASS
    assert all(isinstance(r["text"], str) and r["text"].endswith(".") for r in rows)
    from maskloom.demo_data import _TOPIC_WORDS

    for r in rows:  # most words of a document come from its own topic's vocabulary
        words = {w.strip(".,").lower() for w in r["text"].split()}
        own = sum(len(words & set(_TOPIC_WORDS[r["label"]][p])) for p in ("noun", "verb", "adj"))
        others = max(
            sum(len(words & set(_TOPIC_WORDS[t][p])) for p in ("noun", "verb", "adj"))
            for t in _TOPIC_WORDS
            if t != r["label"]
        )
        assert own > others


def test_text_tokenizer_reads_demo_text(demo):
    from maskloom.tokenizers.text import TextTokenizer

    _, summary = demo
    tok = TextTokenizer({"vocab_size": 400})
    tok.fit([summary["text"]["path"]])
    assert tok.label_names() == ("cooking", "music", "space", "sports")
    recs = tok(summary["text"]["path"])
    assert len(recs) == 4 * PER_CLASS and [r.label for r in recs[:4]] == [3, 0, 2, 1]


def test_refuses_foreign_directory_and_bad_args(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by demo-data"):
        write_demo_data(str(tmp_path), per_class=1)
    with pytest.raises(ValueError, match="unknown modality"):
        write_demo_data(str(tmp_path / "new"), modalities=["smell"])
    with pytest.raises(ValueError, match="per_class"):
        write_demo_data(str(tmp_path / "new"), per_class=0)


def test_rewrite_replaces_old_files(tmp_path):
    write_demo_data(str(tmp_path), per_class=3, modalities=["image"])
    write_demo_data(str(tmp_path), per_class=1, modalities=["image"])
    assert len(os.listdir(tmp_path / "image" / "circle")) == 1


def test_cli(tmp_path, capsys):
    assert (
        main(
            [
                "demo-data",
                str(tmp_path / "d"),
                "--per-class",
                "1",
                "--modalities",
                "image",
                "graph",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("image") and "4 samples" in lines[0] and lines[1].startswith("graph")
    assert sorted(os.listdir(tmp_path / "d")) == ["demo_data.json", "graph", "image"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["demo-data", str(tmp_path / "busy")]) == 2
    assert "maskloom demo-data: error:" in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path / "e"), "--per-class", "0"]) == 2


def test_all_modalities_listed():
    assert set(MODALITIES) == set(CLASSES)


@pytest.mark.parametrize(
    ("modality", "pattern"),
    [
        ("image", "image/circle/circle_0000.png"),
        ("video", "video/square/square_0000.mp4"),
        ("audio", "audio/pulses/pulses_0000.wav"),
        ("point_cloud", "point_cloud/cube/cube_0000.ply"),
        ("time_series", "time_series/sine/sine_0000.csv"),
        ("time_series", "time_series_long/series.csv"),
        ("graph", "graph/DEMO"),
        ("text", "text/docs.jsonl"),
    ],
)
def test_registered_tokenizers_read_demo_data(demo, modality, pattern):
    """Every demo file tokenizes with its modality's default configuration (when that tokenizer exists)."""
    from maskloom.tokenizers import TOKENIZERS, get_tokenizer

    if modality not in TOKENIZERS:
        pytest.skip(f"no {modality} tokenizer registered")
    out, _ = demo
    path = os.path.join(out, pattern)
    tok = get_tokenizer(modality)
    if tok.needs_fit:
        tok.fit([path])
    records = tok(path)
    assert records and all(r.num_tokens > 0 for r in records)


def test_ar_noise_is_autocorrelated(demo):
    out, _ = demo
    ar = np.loadtxt(
        os.path.join(out, "time_series", "ar_noise", "ar_noise_0000.csv"), delimiter=",", skiprows=1
    )[:, 0]
    a = ar - ar.mean()
    assert np.dot(a[1:], a[:-1]) / np.dot(a, a) > 0.6  # phi in [0.8, 0.95]


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    from maskloom.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["demo-data", str(tmp_path / "f"), "--per-class", "2"]) == 2
    assert capsys.readouterr().err == (
        f"maskloom demo-data: error: {tmp_path / 'f'}: exists and is not a directory; choose another --out\n"
    )
