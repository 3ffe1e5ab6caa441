"""Reconstructions: exact de-normalisation, `maskloom show` picture sizes, every drawer, loss curves."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maskloom import tables
from maskloom.backbone import (
    AdapterConfig,
    DecoderConfig,
    EncoderConfig,
    MaskedModel,
    MaskingConfig,
    ModelConfig,
)
from maskloom.cli import main
from maskloom.recipes import train as T
from maskloom.recipes import visualize as V
from maskloom.recipes.objectives import build_objective, normalize_tokens
from maskloom.recipes.recipe import loads_recipe
from maskloom.tokenizers.audio import Audio, AudioTokenizer
from maskloom.tokenizers.base import Record
from maskloom.tokenizers.image import ImageTokenizer
from maskloom.tokenizers.point_cloud import PointCloudTokenizer
from maskloom.tokenizers.time_series import TimeSeriesTokenizer
from maskloom.tokenizers.video import Video, VideoTokenizer

RECIPE = """
name = "tiny-show"
[model]
preset = "tiny"
encoder = { dim = 32, depth = 1, heads = 2 }
decoder = { dim = 32, depth = 1, heads = 2 }
[optim]
base_lr = 0.05
batch_size = 4
steps = 2
warmup_steps = 1
[train]
log_every = 1
[modality.image]
masking = { kind = "random", ratio = 0.75 }
objective = { name = "mse", norm_pix = true }
[modality.time_series]
masking = { kind = "random", ratio = 0.4 }
objective = { name = "mse", norm_pix = false }
"""


def image_records(root, n=5, size=16):
    rng = np.random.default_rng(0)
    tok = ImageTokenizer({"image_size": size, "patch_size": 4})
    recs = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        recs.append(tok(str(path))[0])
    return recs, tok


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("showrun")
    recs, tok = image_records(root)
    img = tables.write_table(str(root / "img"), recs, tok).directory
    t = np.arange(200)
    (root / "s.csv").write_text("v\n" + "\n".join(f"{np.sin(x / 5):.5f}" for x in t))
    ts_tok = TimeSeriesTokenizer({"window": 48, "stride": 24, "patch_len": 8, "patch_stride": 8})
    ts = tables.write_table(str(root / "ts"), ts_tok(str(root / "s.csv")), ts_tok).directory
    torch.set_num_threads(1)
    T.train(
        loads_recipe(RECIPE, path="show.toml"),
        [img, ts],
        str(root / "run"),
        options=T.RunOptions(progress=False),
    )
    return root, str(root / "run"), img, ts


# ---- de-normalisation ---------------------------------------------------------------------------
def test_norm_pix_denormalisation_is_exact():
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, 256, (2, 6, 48)).astype(np.float32))  # (B, L, D) as loaded
    obj = build_objective("mse", {"norm_pix": True})
    pred = normalize_tokens(tokens)  # a perfect prediction in norm-pix space
    back = V.denormalize_prediction(obj, pred, tokens)
    assert np.array_equal(V.cast_tokens(back.numpy(), "uint8"), tokens.numpy().astype(np.uint8))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, [1, 4]] = True
    recs = [
        Record(
            id=f"r{b}",
            source="s",
            tokens=tokens[b].numpy().astype(np.uint8),
            positions=np.zeros((6, 2), np.float32),
        )
        for b in range(2)
    ]
    spec = ImageTokenizer({"image_size": 8, "patch_size": 4}).spec()
    spec = dataclasses.replace(spec, token_dim=48)
    out = V.reconstruct_records(recs, spec, back, mask, mask)
    for r, rec in zip(out, recs):
        assert np.array_equal(r.reconstructed.tokens, rec.tokens)  # exact after rounding
        assert (r.masked.tokens[[1, 4]] == 128).all() and np.array_equal(
            r.masked.tokens[[0, 2, 3, 5]], rec.tokens[[0, 2, 3, 5]]
        )
        assert r.original is rec and r.reconstructed.tokens is not rec.tokens


def test_unscored_masked_tokens_stay_neutral_and_values_are_clipped():
    rec = Record(
        id="r", source="s", tokens=np.full((3, 2), 10, np.uint8), positions=np.zeros((3, 1), np.float32)
    )
    spec = dataclasses.replace(ImageTokenizer().spec(), token_dim=2)
    pred = torch.tensor([[[300.0, -5.0], [300.0, -5.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    target = torch.tensor([[True, False, False]])
    r = V.reconstruct_records([rec], spec, pred, mask, target)[0]
    assert r.reconstructed.tokens.tolist() == [[255, 0], [128, 128], [10, 10]]


def test_sce_prediction_gets_the_true_norm_and_ids_are_argmax():
    sce = build_objective("sce")
    tokens = torch.tensor([[[3.0, 4.0]]])
    out = V.denormalize_prediction(sce, torch.tensor([[[0.0, 2.0]]]), tokens)
    assert out.tolist() == [[[0.0, 5.0]]]
    ce = build_objective("cross_entropy")
    ids = V.denormalize_prediction(ce, torch.tensor([[[0.1, 2.0, -1.0]]]), torch.tensor([[0]]))
    assert ids.tolist() == [[1]]


# ---- show on a trained run --------------------------------------------------------------------
def test_show_writes_images_of_the_expected_size(run, tmp_path):
    root, run_dir, img, _ = run
    paths = V.show_run(run_dir, img, str(tmp_path / "pics"), n=3, seed=1)
    assert [os.path.basename(p) for p in paths] == ["image-00.png", "image-01.png", "image-02.png"]
    z = V.zoom_for(16)
    assert z == 8
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (3 * 16 * z + 2 * V.GAP, 16 * z)
            a = np.asarray(im.convert("RGB"))
        # left panel is the original image, enlarged
        orig = ImageTokenizer({"image_size": 16, "patch_size": 4}).detokenize(
            tables.TokenTable(img).records()[paths.index(p)]
        )
        assert np.array_equal(a[: 16 * z : z, : 16 * z : z], orig)
    # the masked panel holds 75% grey patches; the masks are seeded
    again = V.show_run(run_dir, img, str(tmp_path / "again"), n=3, seed=1)
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(paths, again))


def test_show_reconstruction_keeps_visible_patches(run):
    root, run_dir, img, _ = run
    tt = tables.TokenTable(img)
    model = V.load_run_model(run_dir)
    recons = V.reconstruct_batch(model, tt, V.run_objective(run_dir, tt.spec), n=4, seed=0)
    assert len(recons) == 4
    for r in recons:
        assert r.mask.sum() == 12  # 75% of 16 patches
        assert np.array_equal(r.reconstructed.tokens[~r.mask], r.original.tokens[~r.mask])
        assert (r.masked.tokens[r.mask] == 128).all()
        assert r.reconstructed.tokens.dtype == np.uint8


def test_show_cli_time_series_and_loss_curve(run, tmp_path, capsys):
    root, run_dir, _, ts = run
    out = tmp_path / "ts"
    assert main(["show", run_dir, "--table", ts, "--n", "2", "--out", str(out), "--loss-curve"]) == 0
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == ["time_series-00.png", "time_series-01.png", "loss.png"]
    with Image.open(printed[0]) as im:
        assert im.size == (1000, 600)
    with Image.open(printed[-1]) as im:
        assert im.size == (900, 500)


def test_show_cli_user_errors(run, tmp_path, capsys):
    root, run_dir, img, _ = run
    assert main(["show", run_dir, "--table", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "maskloom show: error:" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "norun"), "--table", img, "--out", str(tmp_path / "o")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["show", run_dir, "--table", img, "--out", str(tmp_path / "f"), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"maskloom show: error: {tmp_path / 'f'}: exists and is not a directory; choose another --out\n"
    )


# ---- every drawer on synthetic reconstructions ---------------------------------------------------
def fake_recon(rec, spec, seed=0):
    """Half the tokens masked; predictions = the true tokens plus noise."""
    rng = np.random.default_rng(seed)
    n = rec.num_tokens
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: n // 2]] = True
    tok = np.asarray(rec.tokens, np.float32)
    pred = torch.from_numpy(tok + rng.normal(0, 0.1, tok.shape).astype(np.float32))[None]
    m = torch.from_numpy(mask)[None]
    return V.reconstruct_records([rec], spec, pred, m, m)[0]


def test_video_drawer_sheet_size(tmp_path):
    tok = VideoTokenizer(
        {"num_frames": 4, "frame_stride": 1, "image_size": 16, "patch_size": 8, "tubelet_size": 2}
    )
    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    rec = tok.tokenize(Video(frames=frames, fps=None, frame_indices=None, num_source_frames=4), source="v")[0]
    (p,) = V.draw_video(tok, fake_recon(rec, tok.spec()), str(tmp_path / "v"))
    z = V.zoom_for(16)
    with Image.open(p) as im:
        assert im.size == (4 * 16 * z + 3 * V.GAP, 3 * 16 * z + 2 * V.GAP)


def test_audio_point_cloud_and_generic_drawers(tmp_path):
    a_tok = AudioTokenizer({"target_frames": 64, "num_mel_bins": 32, "patch_size": 16})
    wav = np.sin(np.arange(8000) / 7.0).astype(np.float32)
    a_rec = a_tok.tokenize(Audio(waveform=wav, sample_rate=16000), source="a")[0]
    (p,) = V.draw_audio(a_tok, fake_recon(a_rec, a_tok.spec()), str(tmp_path / "a"))
    with Image.open(p) as im:
        assert im.size == (800, 700)
    pc_tok = PointCloudTokenizer({"num_points": 64, "num_groups": 8, "group_size": 8})
    pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    pc_rec = pc_tok.tokenize(pts, source="p")[0]
    (p,) = V.draw_point_cloud(pc_tok, fake_recon(pc_rec, pc_tok.spec()), str(tmp_path / "p"))
    with Image.open(p) as im:
        assert im.size == (1200, 400)
    (p,) = V.draw_tokens(pc_tok, fake_recon(pc_rec, pc_tok.spec()), str(tmp_path / "g"))
    with Image.open(p) as im:
        assert im.size == (1200, 400)


def test_text_drawer_marks_masked_tokens_and_predictions(tmp_path):
    from maskloom.tokenizers.text import TextTokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 20)
    tok = TextTokenizer({"vocab_size": 300, "min_frequency": 1})
    tok.fit([str(corpus)])
    rec = tok.tokenize([("the cat sat on the mat", None)], source="t")[0]
    n = rec.num_tokens
    mask = np.zeros(n, bool)
    mask[1] = True
    logits = torch.full((1, n, tok.spec().vocab_size), -5.0)
    logits[0, 1, int(rec.tokens[1])] = 5.0  # a correct prediction
    m = torch.from_numpy(mask)[None]
    pred = V.denormalize_prediction(
        build_objective("cross_entropy"), logits, torch.from_numpy(rec.tokens.astype(np.int64))[None]
    )
    r = V.reconstruct_records([rec], tok.spec(), pred, m, m)[0]
    original, masked, predicted = V.text_panels(tok, r)
    assert tok.detokenize(dataclasses.replace(rec, tokens=rec.tokens[1:2])) == " cat"  # one BPE token
    assert original == "the cat sat on the mat"
    assert masked == "the [ ] sat on the mat"
    assert predicted == "the [cat] sat on the mat"
    paths = V.draw_text(tok, r, str(tmp_path / "t"))
    assert [os.path.basename(p) for p in paths] == ["t.txt", "t.png"]
    assert "[ ]" in open(paths[0]).read()


def test_show_without_recipe_file_on_a_text_model(tmp_path):
    """A bare saved model (no recipe.toml): ids are drawn from the argmax of the logits."""
    from maskloom.tokenizers.text import TextTokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha beta gamma delta\nbeta gamma delta alpha\n" * 10)
    tok = TextTokenizer({"vocab_size": 280, "min_frequency": 1, "split": "lines"})
    tok.fit([str(corpus)])
    table = tables.write_table(str(tmp_path / "text"), tok(str(corpus))[:4], tok).directory
    spec = tables.TokenTable(table).spec
    cfg = ModelConfig(
        encoder=EncoderConfig(dim=16, depth=1, heads=2),
        decoder=DecoderConfig(dim=16, depth=1, heads=2),
        adapters=(("text", AdapterConfig.from_spec(spec)),),
        masking=(("text", MaskingConfig(ratio=0.5)),),
    )
    MaskedModel(cfg).save(str(tmp_path / "run" / "model"))
    paths = V.show_run(str(tmp_path / "run"), table, str(tmp_path / "out"), n=2)
    assert [os.path.basename(p) for p in paths] == [
        "text-00.txt",
        "text-00.png",
        "text-01.txt",
        "text-01.png",
    ]
    body = open(paths[0]).read()
    assert body.startswith("original:\n") and "[" in body.split("predicted:")[1]


def test_graph_drawer(tmp_path):
    from maskloom.tokenizers.graph import GraphTokenizer

    (tmp_path / "g.csv").write_text("\n".join(f"{i},{(i + 1) % 10}" for i in range(10)))
    np.save(tmp_path / "g.features.npy", np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))
    tok = GraphTokenizer({"pe_dim": 2})
    tok.fit([str(tmp_path / "g.csv")])
    rec = tok(str(tmp_path / "g.csv"))[0]
    r = fake_recon(rec, tok.spec())
    (p,) = V.DRAWERS["graph"](tok, r, str(tmp_path / "graph"))
    with Image.open(p) as im:
        assert im.size == (1200, 400)
    assert np.array_equal(r.masked.tokens[r.mask], np.zeros_like(rec.tokens[r.mask]))


def test_loss_curve_png_per_modality(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text(
        "\n".join(
            json.dumps({"step": s, "loss": 1.0 / s, f"loss/{mod}": 1.0 / s})
            for s, mod in zip(range(1, 7), ["image", "text"] * 3)
        )
        + "\nnot json\n"
    )
    p = V.loss_curve_png(str(m), str(tmp_path / "sub" / "loss.png"))
    with Image.open(p) as im:
        assert im.size == (900, 500)
