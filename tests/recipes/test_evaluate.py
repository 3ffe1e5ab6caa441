"""Evaluation: probes on synthetic features, the split rule, forecasting, and `maskloom eval` end to end."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from maskloom import tables
from maskloom.cli import main
from maskloom.recipes import evaluate as E
from maskloom.recipes import train as T
from maskloom.recipes.recipe import loads_recipe
from maskloom.tokenizers.image import ImageTokenizer
from maskloom.tokenizers.time_series import TimeSeriesTokenizer

RECIPE = """
name = "tiny-image"
[model]
preset = "tiny"
encoder = { dim = 32, depth = 1, heads = 2 }
decoder = { dim = 32, depth = 1, heads = 2 }
[optim]
base_lr = 0.05
batch_size = 8
steps = 3
warmup_steps = 1
[train]
seed = 3
log_every = 1
checkpoint_every = 100
[modality.image]
masking = { kind = "random", ratio = 0.5 }
objective = { name = "mse", norm_pix = true }
[modality.time_series]
masking = { kind = "random", ratio = 0.4 }
objective = { name = "mse", norm_pix = false }
"""


def make_image_table(root, n_per_class=6, split_dirs=True):
    """Two classes of 16x16 images (reddish vs bluish, with noise), under train/ and test/ folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    tok = ImageTokenizer({"image_size": 16, "patch_size": 4})
    recs = []
    for c in range(2):
        for i in range(n_per_class):
            part = ("train" if i < n_per_class * 2 // 3 else "test") if split_dirs else "all"
            d = root / "images" / part
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([200, 40, 40] if c == 0 else [40, 40, 200], np.float64)
            img = np.clip(base + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            path = d / f"c{c}_{i}.png"
            Image.fromarray(img).save(path)
            rec = tok(str(path))[0]
            recs.append(dataclasses.replace(rec, label=c))
    return tables.write_table(str(root / "table_image"), recs, tok, label_names=["red", "blue"]).directory


def make_series_table(root, steps=400):
    """One 2-channel CSV series (sines), windows of 48 steps every 16, patches of 8."""
    t = np.arange(steps)
    a = np.sin(2 * np.pi * t / 24) + 0.01 * t
    b = np.cos(2 * np.pi * t / 12)
    path = root / "series.csv"
    path.write_text("date,a,b\n" + "\n".join(f"d{i},{x:.6f},{y:.6f}" for i, (x, y) in enumerate(zip(a, b))))
    tok = TimeSeriesTokenizer({"window": 48, "stride": 16, "patch_len": 8, "patch_stride": 8})
    recs = tok(str(path))
    return tables.write_table(str(root / "table_ts"), recs, tok).directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    img = make_image_table(root)
    ts = make_series_table(root)
    torch.set_num_threads(1)
    rec = loads_recipe(RECIPE, path="tiny.toml")
    T.train(rec, [img, ts], str(root / "run"), options=T.RunOptions(progress=False))
    return root, str(root / "run"), img, ts


# ---- probes -------------------------------------------------------------------------------------
def clusters(n=40, d=5, gap=10.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, d)) + gap * y[:, None]
    return x, y


def test_probes_separate_well_separated_clusters_exactly():
    x, y = clusters()
    assert E.linear_probe(x[:30], y[:30], x[30:], y[30:]) == 1.0
    assert E.knn_accuracy(x[:30], y[:30], x[30:], y[30:], k=5) == 1.0


def test_probes_on_random_labels_are_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8))
    y = rng.integers(0, 2, 600)
    lin = E.linear_probe(x[:400], y[:400], x[400:], y[400:])
    knn = E.knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=20)
    assert 0.38 < lin < 0.62 and 0.38 < knn < 0.62


def test_knn_uses_min_k_n_and_majority_vote():
    train_x = np.array([[1.0, 0.1], [1.0, 0.2], [-1.0, 0.0]])
    train_y = np.array([0, 0, 1])
    # k larger than the training set: all three vote, class 0 wins 2:1 even for a point near class 1
    assert E.knn_accuracy(train_x, train_y, np.array([[-1.0, 0.05]]), np.array([0]), k=50) == 1.0
    assert E.knn_accuracy(train_x, train_y, np.array([[-1.0, 0.05]]), np.array([1]), k=1) == 1.0


def test_linear_probe_single_class_training_set():
    assert E.linear_probe(np.zeros((3, 2)), np.array([1, 1, 1]), np.ones((2, 2)), np.array([1, 0])) == 0.5


def test_raw_token_features_discrete_is_mean_one_hot():
    from maskloom.batch import TokenBatch

    b = TokenBatch(
        tokens=torch.tensor([[1, 1, 3, 0]]),
        positions=torch.zeros(1, 4, 1),
        padding=torch.tensor([[False, False, False, True]]),
        modality="text",
    )
    assert E.raw_token_features(b, 5).tolist() == [
        [0.0, pytest.approx(2 / 3), 0.0, pytest.approx(1 / 3), 0.0]
    ]


# ---- split --------------------------------------------------------------------------------------
def test_split_by_source_words_after_common_prefix():
    srcs = [
        "/tmp/test_x0/cifar/train/a.jpg",
        "/tmp/test_x0/cifar/test/b.jpg",
        "/tmp/test_x0/cifar/train/c.jpg",
    ]
    tr, te, rule = E.split_indices(srcs, ["a", "b", "c"], np.array([0, 1, 0]))
    assert rule == "source" and tr.tolist() == [0, 2] and te.tolist() == [1]
    ucr = ["/d/GunPoint/GunPoint_TRAIN.tsv", "/d/GunPoint/GunPoint_TEST.tsv"]
    tr, te, rule = E.split_indices(ucr, ["x#0", "y#0"], np.array([0, 0]))
    assert rule == "source" and tr.tolist() == [0] and te.tolist() == [1]


def test_hash_split_is_deterministic_stratified_and_order_free():
    ids = [f"s{i}" for i in range(50)]
    labels = np.array([i % 3 for i in range(50)])
    srcs = [f"/tmp/test_dir/data/{i}.png" for i in range(50)]  # "test" only in the common prefix
    tr, te, rule = E.split_indices(srcs, ids, labels, seed=0)
    assert rule == "hash"
    assert sorted(tr.tolist() + te.tolist()) == list(range(50)) and not set(tr) & set(te)
    for c in range(3):
        n = int((labels == c).sum())
        assert int((labels[tr] == c).sum()) == round(0.7 * n)
    again = E.split_indices(srcs, ids, labels, seed=0)
    assert again[0].tolist() == tr.tolist()
    perm = np.random.default_rng(0).permutation(50)
    tr2, _, _ = E.split_indices([srcs[i] for i in perm], [ids[i] for i in perm], labels[perm], seed=0)
    assert sorted(ids[perm[i]] for i in tr2) == sorted(ids[i] for i in tr)
    assert E.split_indices(srcs, ids, labels, seed=1)[0].tolist() != tr.tolist()


def test_split_keeps_one_of_each_side_for_tiny_classes():
    tr, te, _ = E.split_indices(["a", "b"], ["a", "b"], np.array([0, 0]))
    assert tr.size == 1 and te.size == 1


# ---- forecasting --------------------------------------------------------------------------------
def test_chronological_split_leaves_a_gap():
    keys = [("s", 0)] * 10
    starts = np.arange(10) * 10
    tr, te, cut = E.chronological_split(keys, starts, np.full(10, 20), horizon=5, test_fraction=0.2)
    assert te.tolist() == [8, 9] and cut == {("s", 0): 80}
    assert tr.tolist() == list(range(6))  # start + 20 + 5 <= 80


def test_forecast_eval_perfect_linear_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = (x @ rng.normal(size=(6, 4))).reshape(80, 2, 2)
    res = E.forecast_eval({"pretrained": x}, y, y[:, 0, :], np.arange(60), np.arange(60, 80))
    assert res["pretrained"]["mse"] < 1e-3
    assert res["last_value"]["mse"] == pytest.approx(np.mean((y[60:, 1] - y[60:, 0]) ** 2) / 2)


# ---- end to end ---------------------------------------------------------------------------------
def test_evaluate_run_end_to_end(tiny_run):
    root, run, img, ts = tiny_run
    res = E.evaluate_run(run, [img, ts], batch_size=5, horizon=16)
    assert res["init_seed"] == 3
    r = res["tables"][img]
    assert r["kind"] == "classification" and r["modality"] == "image"
    assert r["split"] == {"rule": "source", "train": 8, "test": 4, "classes": 2, "k": 8}
    assert set(r["probes"]) == {"pretrained", "random_init", "raw_tokens"}
    assert r["probes"]["raw_tokens"]["linear"] == 1.0  # mean colour separates red from blue
    for p in r["probes"].values():
        assert 0.0 <= p["linear"] <= 1.0 and 0.0 <= p["knn"] <= 1.0
    f = res["tables"][ts]
    assert f["kind"] == "forecast", f
    assert set(f["forecast"]) == {"pretrained", "random_init", "raw_linear", "last_value"}
    assert f["split"]["horizon"] == 16 and f["split"]["test"] > 0 and f["split"]["train"] > 0
    # a noiseless periodic series: ridge on the raw window beats repeating the last value
    assert f["forecast"]["raw_linear"]["mse"] < f["forecast"]["last_value"]["mse"]
    assert all(np.isfinite(list(m.values())).all() for m in f["forecast"].values())
    again = E.evaluate_run(run, [img], batch_size=3)
    assert again["tables"][img]["probes"] == r["probes"]  # batch size does not change the outcome


def test_random_init_model_is_the_runs_starting_point(tiny_run):
    _, run, _, _ = tiny_run
    model = E.load_run_model(run)
    fresh = E.random_init_model(model, 3)
    torch.manual_seed(3)
    from maskloom.backbone import MaskedModel

    ref = MaskedModel(model.config)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.state_dict().values()))
    assert not all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
    )


def test_eval_cli_prints_tables_and_writes_json(tiny_run, tmp_path, capsys):
    root, run, img, ts = tiny_run
    out = tmp_path / "eval.json"
    code = main(["eval", run, "--tables", img, ts, "--horizon", "16", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for word in ("pretrained", "random-init", "raw-tokens", "linear", "kNN", "repeat-last", "MSE"):
        assert word in text
    doc = json.loads(out.read_text())
    assert doc["tables"][img]["kind"] == "classification"


def test_eval_cli_user_errors(tiny_run, tmp_path, capsys):
    root, run, img, _ = tiny_run
    assert main(["eval", str(tmp_path / "nope"), "--tables", img]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["eval", run, "--tables", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")  # --out under a file, or a directory: refused before evaluating
    assert main(["eval", run, "--tables", img, "--out", str(tmp_path / "f" / "r.json")]) == 2
    assert capsys.readouterr() == ("", f"maskloom eval: error: {tmp_path / 'f'}: exists and is not a directory; "
                                       "choose another --out\n")  # fmt: skip
    assert main(["eval", run, "--tables", img, "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"maskloom eval: error: {tmp_path}: is a directory; --out names the JSON file to write\n"
    )
    for device, reason in (
        ("nodev", "Expected one of cpu, cuda"),
        ("cuda", "CUDA is not available on this machine"),
    ):
        if device == "cuda" and torch.cuda.is_available():
            continue
        assert main(["eval", run, "--tables", img, "--device", device]) == 2
        err = capsys.readouterr().err  # the device named, not "model.safetensors: corrupt"
        assert err.startswith(f"maskloom eval: error: --device {device!r}: ") and reason in err


def test_unlabelled_non_series_table_is_skipped(tiny_run, tmp_path):
    root, run, img, _ = tiny_run
    recs = [dataclasses.replace(r, label=None) for r in tables.TokenTable(img).records()]
    tok = tables.TokenTable(img).tokenizer()
    plain = tables.write_table(str(tmp_path / "plain"), recs, tok).directory
    res = E.evaluate_run(run, [plain])
    assert res["tables"][plain] == {
        "modality": "image",
        "kind": "skipped",
        "reason": "the table has no labels",
    }


def test_a_table_of_one_class_is_skipped_not_scored_perfect(tiny_run, tmp_path):
    root, run, img, _ = tiny_run
    recs = [dataclasses.replace(r, label=0) for r in tables.TokenTable(img).records()]
    tok = tables.TokenTable(img).tokenizer()
    one = tables.write_table(str(tmp_path / "one"), recs, tok, label_names=["cat"]).directory
    res = E.evaluate_run(run, [one])
    assert res["tables"][one] == {
        "modality": "image",
        "kind": "skipped",
        "reason": "every labelled sample has the same class ('cat')",
    }


@pytest.mark.parametrize("n,f", [(50, 8), (12, 40)])  # primal and dual paths
def test_ridge_forecast_matches_sklearn_ridge(n, f):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x, xt = rng.normal(size=(n, f)) * 3 + 1, rng.normal(size=(7, f))
    y = x @ rng.normal(size=(f, 3)) + rng.normal(size=(n, 3)) + 5
    sc = StandardScaler().fit(x)
    ref = Ridge(alpha=3.0).fit(sc.transform(x), y).predict(sc.transform(xt))
    got = E.ridge_forecast(x, y, xt, alphas=(3.0,))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_ridge_forecast_picks_small_penalty_for_clean_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    y = x @ rng.normal(size=(5, 2))
    pred = E.ridge_forecast(x[:30], y[:30], x[30:])
    assert np.abs(pred - y[30:]).max() < 0.05  # alpha 1e-2 chosen, not 1e4


def test_fold_indices_stratified_and_location_independent():
    labels = np.array([0] * 10 + [1] * 5)
    srcs = [f"/data/a/{i}.png" for i in range(15)]
    ids = [f"{s}#0" for s in srcs]
    folds = E.fold_indices(srcs, ids, labels, folds=5, seed=0)
    assert len(folds) == 5
    tested = np.sort(np.concatenate([te for _, te in folds]))
    assert tested.tolist() == list(range(15))  # every sample tested exactly once
    for tr, te in folds:
        assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == 15
        assert np.bincount(labels[te], minlength=2).tolist() == [2, 1]  # stratified: 10/5 and 5/5 per fold
    moved = [s.replace("/data/a", "/elsewhere/b") for s in srcs]
    again = E.fold_indices(moved, [f"{s}#0" for s in moved], labels, folds=5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = E.fold_indices(srcs, ids, labels, folds=5, seed=1)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_windows_clips_and_chunks_of_one_sample_are_split_together():
    """Records cut from one recording, video or document (audio max_windows, video max_clips, text
    chunks) are one sample: never trained on and tested at once, which would flatter the probes.
    Records that are their own sample keep the folds and split they had."""
    ids = ["/d/r1.wav#0", "/d/r1.wav#1", "/d/v.mp4#2", "/d/v.mp4#5", "/d/t.jsonl#4-0", "/d/t.jsonl#4-1",
           "/d/s.csv#0-1-0", "/d/s.csv#0-0-0", "/d/s.csv#1-0-0", "/d/x.png#0"]  # fmt: skip
    metas = [{"window": 0, "offset": 0.0}, {"window": 1, "offset": 10.24}, {"clip": 2}, {"clip": 5},
             {"doc": 4, "chunk": 0}, {"doc": 4, "chunk": 1}, {"series": 0, "window": 96}, {"series": 0, "window": 96},
             {"series": 1, "window": 96}, {}]  # fmt: skip
    assert E.group_keys(ids, metas) == [
        "/d/r1.wav#0", "/d/r1.wav#0", "/d/v.mp4#2", "/d/v.mp4#2", "/d/t.jsonl#4-0", "/d/t.jsonl#4-0",
        "/d/s.csv#0-0-0", "/d/s.csv#0-0-0", "/d/s.csv#1-0-0", "/d/x.png#0"]  # fmt: skip
    # 12 recordings of 2 classes, 3 windows each
    srcs = [f"/data/r{r}.wav" for r in range(12) for _ in range(3)]
    ids = [f"/data/r{r}.wav#{w}" for r in range(12) for w in range(3)]
    labels = np.array([r % 2 for r in range(12) for _ in range(3)])
    groups = E.group_keys(ids, [{"window": w, "offset": w * 10.24} for _ in range(12) for w in range(3)])
    folds = E.fold_indices(srcs, ids, labels, folds=3, seed=0, groups=groups)
    assert len(folds) == 3
    for tr, te in folds:
        assert not {srcs[i] for i in tr} & {srcs[i] for i in te}  # no recording on both sides
        assert te.size == 12  # 2 recordings of each class, 3 windows each
    assert np.sort(np.concatenate([te for _, te in folds])).tolist() == list(range(36))
    tr, te, _ = E.split_indices(srcs, ids, labels, seed=0, groups=groups)
    assert not {srcs[i] for i in tr} & {srcs[i] for i in te} and tr.size == 24 and te.size == 12
    # without windows: the same folds and split as without groups
    one = [f"/data/a/{i}.png#0" for i in range(15)]
    lab = np.array([0] * 10 + [1] * 5)
    singles = E.group_keys(one, [{}] * 15)
    a = E.fold_indices([i[:-2] for i in one], one, lab, folds=5, seed=0)
    b = E.fold_indices([i[:-2] for i in one], one, lab, folds=5, seed=0, groups=singles)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    sa, sb = E.split_indices(one, one, lab, seed=3), E.split_indices(one, one, lab, seed=3, groups=singles)
    assert np.array_equal(sa[0], sb[0]) and np.array_equal(sa[1], sb[1])


def test_ridge_penalty_from_validation_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 2)) + 0.01 * rng.normal(size=(60, 2))
    fit, val = np.arange(40), np.arange(40, 50)
    # a clean linear target: the validation rows prefer the smallest penalty, like an unpenalised fit
    got = E.ridge_forecast(x[:50], y[:50], x[50:], alphas=(1e-3, 1e3), validation=(fit, val))
    want = E.ridge_forecast(x[:50], y[:50], x[50:], alphas=(1e-3,))
    assert np.allclose(got, want)
    # pure-noise targets: the validation rows prefer the large penalty (predict ~ the mean)
    noise = rng.normal(size=(60, 2))
    got = E.ridge_forecast(x[:50], noise[:50], x[50:], alphas=(1e-3, 1e5), validation=(fit, val))
    assert np.allclose(got, E.ridge_forecast(x[:50], noise[:50], x[50:], alphas=(1e5,)))
