"""Training: golden loss curve, exact resume, checkpoints without pickle, the CLI, DDP and Ray Train."""

import json
import logging
import math
import os
import re
import shutil
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from maskloom import tables
from maskloom._paths import OutDirError
from maskloom.backbone import MaskedModel
from maskloom.cli import main
from maskloom.recipes import train as T
from maskloom.recipes.recipe import loads_recipe
from maskloom.tokenizers.base import Record, TableSpec, Tokenizer, register_tokenizer


@register_tokenizer("train_toy")
class ToyVectors(Tokenizer):
    """A 1-D sequence of 8-d float vectors (raw = the (L, 8) array itself)."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        dim: int = 8
        """token width"""

    def spec(self):
        return TableSpec(
            modality="train_toy",
            token_kind="continuous",
            token_dim=self.config.dim,
            token_dtype="float32",
            position_axes=("i",),
            position_kind="grid",
        )

    def read(self, source):
        return np.load(source)

    def tokenize(self, raw, *, source=""):
        raw = np.asarray(raw, np.float32)
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=raw,
                positions=np.arange(len(raw), dtype=np.float32)[:, None],
                label=int(raw[0, 0] > 0),
            )
        ]

    def detokenize(self, record):
        return record.tokens


@register_tokenizer("train_ids")
class ToyIds(Tokenizer):
    """A 1-D sequence of ids < 11."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        pass

    def spec(self):
        return TableSpec(
            modality="train_ids",
            token_kind="discrete",
            token_dim=1,
            token_dtype="int32",
            vocab_size=11,
            position_axes=("index",),
            position_kind="grid",
        )

    def read(self, source):
        return np.load(source)

    def tokenize(self, raw, *, source=""):
        raw = np.asarray(raw, np.int32)
        return [
            Record(
                id=f"{source}#0",
                source=source,
                tokens=raw,
                positions=np.arange(len(raw), dtype=np.float32)[:, None],
            )
        ]

    def detokenize(self, record):
        return record.tokens


def make_vectors(directory, n=24, seed=0):
    """Deterministic sequences: smooth sines (learnable structure), lengths 6..13."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        length = 6 + i % 8
        t = np.arange(length, dtype=np.float32)[:, None]
        freq = rng.uniform(0.2, 1.0, size=(1, 8)).astype(np.float32)
        phase = rng.uniform(0, 3, size=(1, 8)).astype(np.float32)
        recs.append(ToyVectors().tokenize(np.sin(t * freq + phase), source=f"s{i:03d}")[0])
    return tables.write_table(str(directory), recs, ToyVectors(), rows_per_shard=8).directory


def make_ids(directory, n=16):
    recs = [
        ToyIds().tokenize((np.arange(5 + i % 4) * (i % 3 + 1)) % 11, source=f"d{i:03d}")[0] for i in range(n)
    ]
    return tables.write_table(str(directory), recs, ToyIds()).directory


RECIPE = """
name = "toy"
[model]
preset = "tiny"
encoder = {{ dim = 32, depth = 2, heads = 2 }}
decoder = {{ dim = 32, depth = 1, heads = 2 }}
[optim]
base_lr = 0.1
batch_size = 4
steps = {steps}
warmup_steps = 2
clip_grad = 1.0
[train]
seed = 0
log_every = 1
checkpoint_every = {ckpt}
keep_checkpoints = 0
[modality.train_toy]
weight = 1.0
masking = {{ kind = "{kind}", ratio = 0.5 }}
objective = {{ name = "mse", norm_pix = false }}
{extra}
"""


def recipe(steps=8, ckpt=100, kind="random", extra=""):
    return loads_recipe(RECIPE.format(steps=steps, ckpt=ckpt, kind=kind, extra=extra), path="toy.toml")


def run(tmp_path, rec, tabs, name="run", **opts):
    return T.train(rec, tabs, str(tmp_path / name), options=T.RunOptions(progress=False, **opts))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_vectors(tmp_path_factory.mktemp("tables") / "toy")


# losses of the first 6 steps of `recipe()` on `make_vectors` (CPU, fp32); the rows of a batch are in
# table order since 2026-12-02 (the masks are drawn per batch slot, so the order changes the curve)
GOLDEN = [1.243951, 0.900013, 0.834519, 1.010064, 0.657018, 0.671559]


def test_golden_loss_curve(tmp_path, toy):
    res = run(tmp_path, recipe(steps=6), [toy])
    assert res.status == "finished" and res.step == 6 and res.total_steps == 6
    assert res.losses == pytest.approx(GOLDEN, rel=2e-3, abs=1e-4), res.losses
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "loss/train_toy", "lr", "tokens_per_s", "time"} <= set(lines[0])
    assert lines[0]["lr"] == pytest.approx(0.1 * 4 / 256 / 2)  # warm-up step 1 of 2, scaled by batch/256
    assert (tmp_path / "run" / "recipe.toml").read_text() == recipe(steps=6).to_toml()
    model = MaskedModel.load(str(tmp_path / "run" / "model"))
    assert model.config.encoder.dim == 32
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-6")


def test_logs_device_threads_and_cpu_matmul(tmp_path, toy, caplog):
    from maskloom.backbone.linear import cpu_matmul, using_cpu_matmul

    with caplog.at_level(logging.INFO, logger="maskloom.recipes.train"), using_cpu_matmul("blas"):
        run(tmp_path, recipe(steps=1), [toy])
    assert f"training on cpu, {torch.get_num_threads()} threads, large Linears on blas" in caplog.text
    assert cpu_matmul() in ("blas", "onednn")


def test_threads_apply_to_the_run_only(tmp_path, toy, caplog):
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="maskloom.recipes.train"):
        run(tmp_path, recipe(steps=1), [toy], threads=before + 1)
    assert f"training on cpu, {before + 1} threads" in caplog.text
    assert torch.get_num_threads() == before  # the caller's setting is back
    with pytest.raises(T.TrainError, match="threads must be >= 1"):
        run(tmp_path, recipe(steps=1), [toy], name="bad", threads=0)
    assert torch.get_num_threads() == before


def test_resume_reproduces_uninterrupted_run(tmp_path, toy):
    full = run(tmp_path, recipe(steps=10, ckpt=3), [toy], name="full")
    first = run(tmp_path, recipe(steps=10, ckpt=3), [toy], name="part", max_steps=7)
    assert first.status == "max_steps" and first.step == 7
    assert [s for s, _ in T.list_checkpoints(str(tmp_path / "part"))] == [3, 6, 7]
    second = run(tmp_path, recipe(steps=10, ckpt=3), [toy], name="part", resume=True)
    assert second.status == "finished" and len(second.losses) == 3
    assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == list(range(1, 11))
    a = MaskedModel.load(str(tmp_path / "full" / "model")).state_dict()
    b = MaskedModel.load(str(tmp_path / "part" / "model")).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_from_older_checkpoint_truncates_metrics(tmp_path, toy):
    first = run(tmp_path, recipe(steps=6, ckpt=2), [toy], name="r", max_steps=5)
    # drop the stop-time checkpoint: resume from step 4 must redo step 5 identically
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-5")
    second = run(tmp_path, recipe(steps=6, ckpt=2), [toy], name="r", resume=True)
    assert second.losses[0] == pytest.approx(first.losses[4], rel=1e-6)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_files_are_safetensors_and_json(tmp_path, toy):
    run(tmp_path, recipe(steps=2), [toy])
    ck = tmp_path / "run" / "checkpoints" / "step-2"
    assert sorted(os.listdir(ck)) == [
        "config.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng-rank0.json",
        "rng-rank0.safetensors",
        "state.json",
    ]
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 2 and state["loader"]["position"] == 2


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95))
    p.sum().backward()
    opt.step()
    tensors, doc = T.optimizer_to_files(opt)
    json.dumps(doc)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(T.optimizer_from_files(tensors, json.loads(json.dumps(doc))))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["betas"] == (0.9, 0.95) and s2["param_groups"][0]["lr"] == 0.1
    assert torch.equal(s1["state"][0]["exp_avg_sq"], s2["state"][0]["exp_avg_sq"])


def test_lr_schedule_and_param_groups():
    lrs = [T.lr_at(s, peak=1.0, total=10, warmup=2) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    no_decay, decay = T.param_groups(model, 0.05)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_epochs_resolve_steps(toy):
    r = loads_recipe(
        RECIPE.format(steps=1, ckpt=1, kind="random", extra="").replace("steps = 1", "epochs = 2")
    )
    assert T.total_steps(r, T.open_tables([toy])) == 12  # 2 * 24 rows / batch 4
    assert T.total_steps(r, T.open_tables([toy]), world_size=2) == 6


def test_two_modalities_and_adaptive_masking(tmp_path, toy):
    ids = make_ids(tmp_path / "ids")
    extra = (
        '[modality.train_ids]\nweight = 1.0\nmasking = { kind = "adaptive", ratio = 0.4 }\n'
        'objective = { name = "cross_entropy" }\n'
    )
    res = run(tmp_path, recipe(steps=8, extra=extra), [toy, ids])
    assert res.status == "finished" and all(math.isfinite(x) for x in res.losses)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    seen = {k for x in lines for k in x if k.startswith("loss/")}
    assert seen == {"loss/train_toy", "loss/train_ids"}
    model = MaskedModel.load(str(tmp_path / "run" / "model"))
    assert sorted(m for m, _ in model.config.adapters) == ["train_ids", "train_toy"]


def test_packed_training(tmp_path, toy, monkeypatch):
    seen = []
    forward = MaskedModel.forward

    def spy(self, batch, **kw):
        seen.append((batch.batch_size, batch.num_samples, batch.segments is not None))
        return forward(self, batch, **kw)

    monkeypatch.setattr(MaskedModel, "forward", spy)
    res = run(tmp_path, recipe(steps=4, extra="pack = 20"), [toy])
    assert res.status == "finished" and all(math.isfinite(x) for x in res.losses)
    # 4 sequences of 6..13 vectors per batch (bucketed), packed into rows of up to 20: the short
    # ones two to a row, the long ones (13 + 13 > 20) one to a row
    assert seen == [(2, 4, True), (2, 4, True), (4, 4, True), (4, 4, True)]
    assert "pack = 20" in (tmp_path / "run" / "recipe.toml").read_text()


def test_stop_flag_catches_sigterm():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's handler when an earlier test started Ray
    with T._StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_train_errors(tmp_path, toy):
    with pytest.raises(T.TrainError, match="no such token table directory"):
        run(tmp_path, recipe(), [str(tmp_path / "missing")])
    run(tmp_path, recipe(steps=1), [toy])
    with pytest.raises(T.TrainError, match="already holds a run; pass --resume"):
        run(tmp_path, recipe(steps=1), [toy])
    with pytest.raises(T.TrainError, match="trained with another recipe"):
        run(tmp_path, recipe(steps=2), [toy], resume=True)
    with pytest.raises(T.TrainError, match=r"/\.: listed twice in --tables \(also as .*toy\)"):
        run(tmp_path, recipe(steps=1), [toy, toy + "/."], name="twice")
    with pytest.raises(T.TrainError, match="--device 'nodev': Expected one of cpu, cuda"):
        run(tmp_path, recipe(steps=1), [toy], name="dev", device="nodev")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutDirError, match="file: exists and is not a directory; choose another --out"):
        run(tmp_path, recipe(steps=1), [toy], name="file")
    with pytest.raises(OutDirError, match="file/run: cannot create the run directory: Not a directory"):
        run(tmp_path, recipe(steps=1), [toy], name="file/run")
    assert (tmp_path / "file").read_text() == "x"


def test_cli_end_to_end(tmp_path, toy, capsys):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE.format(steps=50, ckpt=2, kind="random", extra=""))
    out = tmp_path / "cli"
    argv = [
        "train",
        str(path),
        "--tables",
        toy,
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--no-progress",
        "--set",
        "train.log_every=1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "max_steps at step 3/50" in printed and "--resume" in printed
    assert MaskedModel.load(str(out / "model")).config.decoder.dim == 32
    assert (
        main([*argv[:6], "--max-steps", "4", "--no-progress", "--set", "train.log_every=1", "--resume"]) == 0
    )
    assert len(open(out / "metrics.jsonl").readlines()) == 4
    assert main(["train", str(path), "--tables", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "maskloom train: error:" in capsys.readouterr().err
    assert (
        main(["train", str(path), "--tables", toy, "--out", str(tmp_path / "y"), "--set", "optim.stepz=3"])
        == 2
    )
    assert "optim.stepz: unknown key" in capsys.readouterr().err


def test_recipes_cli(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "MODALITY", "MASKING", "OBJECTIVE", "PRESET"]
    assert any(x.split()[:5] == ["mae-image", "image", "random", "0.75", "mse"] for x in lines)
    assert main(["recipes", "--show", "point-mae"]) == 0
    assert 'name = "point-mae"' in capsys.readouterr().out
    assert main(["recipes", "--show", "nope"]) == 2
    assert "no such built-in recipe" in capsys.readouterr().err


def _toy_recipe_file(tmp_path, steps=4):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE.format(steps=steps, ckpt=2, kind="random", extra=""))
    return str(path)


def test_ddp_two_processes_with_torchrun(tmp_path, toy):
    """torchrun -> env RANK/WORLD_SIZE -> gloo process group, DDP, rank-sharded loader, per-rank RNG."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    # the toy tokenizers live in this test module: register them in the workers through a tiny launcher
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_train  # registers train_toy\n"
        "from maskloom.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(launcher),
        "train",
        _toy_recipe_file(tmp_path),
        "--tables",
        toy,
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(math.isfinite(x["loss"]) for x in lines)
    # the learning rate scales with the world size (effective batch 2 x 4)
    assert lines[0]["lr"] == pytest.approx(0.1 * 8 / 256 / 2)
    ck = out / "checkpoints" / "step-4"
    assert (ck / "rng-rank0.safetensors").exists() and (ck / "rng-rank1.safetensors").exists()
    assert json.loads((ck / "state.json").read_text())["world_size"] == 2
    MaskedModel.load(str(out / "model"))


def test_ddp_ranks_that_do_not_see_the_run_directory_stop_every_rank_at_once(tmp_path, toy):
    """--out on each node's local disk: the ranks that do not see the directory rank 0 made are named
    by every rank, before the first step (not at the first checkpoint, with the others waiting)."""
    import socket
    import subprocess
    import sys

    out = tmp_path / "ddp"
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_train  # registers train_toy\n"
        "import maskloom.recipes.train as T\n"
        "if os.environ['RANK'] == '1':  # rank 1 is on a machine without rank 0's disk\n"
        "    T._sees_run_dir = lambda out: False\n"
        "from maskloom.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher),
           "train", _toy_recipe_file(tmp_path), "--tables", toy, "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode != 0
    host = socket.gethostname()
    for rank in (0, 1):  # both ranks say it
        msg = (
            f"{out}: rank 1 does not see the run directory that rank 0 made (this is rank {rank} on {host}): with "
            "workers on several machines, --out must be a folder on storage that every worker sees (a shared "
            "filesystem), not a node's local disk"
        )
        assert proc.stderr.count(msg) == 1, proc.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_ray_train_two_cpu_workers(tmp_path):
    """Ray Train TorchTrainer with two CPU workers (gloo) for a few steps, on a real image table
    (Ray workers only know the registered built-in tokenizers, not this module's toys)."""
    from maskloom.tokenizers import get_tokenizer

    tok = get_tokenizer("image", {"image_size": 16, "patch_size": 4})
    rng = np.random.default_rng(0)
    recs = [
        r
        for i in range(16)
        for r in tok.tokenize(rng.integers(0, 256, (16, 16, 3), np.uint8), source=f"i{i}")
    ]
    table = tables.write_table(str(tmp_path / "img"), recs, tok).directory
    path = tmp_path / "img.toml"
    path.write_text(RECIPE.format(steps=4, ckpt=2, kind="random", extra="").replace("train_toy", "image"))
    out = tmp_path / "ray"
    metrics = T.train_ray(str(path), [table], str(out), num_workers=2, options=T.RunOptions(progress=False))
    assert metrics["step"] == 4 and metrics["status"] == "finished" and math.isfinite(metrics["loss"])
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    ck = out / "checkpoints" / "step-4"
    assert (ck / "rng-rank1.safetensors").exists()
    MaskedModel.load(str(out / "model"))
    # user-side errors: one TrainError, the run directory's checked on the driver before any worker
    with pytest.raises(T.TrainError, match="already holds a run; pass --resume"):
        T.train_ray(str(path), [table], str(out), num_workers=2, options=T.RunOptions(progress=False))
    os.unlink(tables.TokenTable(table).shard_paths()[0])  # found missing by the workers' loaders
    with pytest.raises(T.TrainError) as e:
        T.train_ray(
            str(path), [table], str(tmp_path / "ray2"), num_workers=2, options=T.RunOptions(progress=False)
        )
    assert str(e.value).startswith(
        "a Ray Train worker stopped: "
    ) and "shard listed in the manifest is missing" in str(e.value)


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line_and_leaves_no_partial(
    tmp_path, toy, monkeypatch
):
    import errno

    real = T.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "save_file", full)
    with pytest.raises(T.TrainError) as e:
        run(tmp_path, recipe(steps=4, ckpt=2), [toy])
    assert str(e.value) == (
        f"{tmp_path / 'run' / 'checkpoints' / 'step-2'}: cannot write the checkpoint (No space left on device); "
        "earlier checkpoints are kept: free space (or fix the permissions), then continue with --resume"
    )
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # no half-written .step-2.tmp
    monkeypatch.setattr(T, "save_file", real)  # room again
    assert run(tmp_path, recipe(steps=4, ckpt=2), [toy], resume=True).step == 4


def test_resume_on_other_tables_is_refused_and_the_hint_keeps_the_set_values(tmp_path, toy, capsys):
    other = make_vectors(tmp_path / "other", n=24, seed=1)
    rec = _toy_recipe_file(tmp_path, steps=6)
    out = str(tmp_path / "r")
    base = ["train", rec, "--out", out, "--no-progress", "--set", "optim.warmup_steps=1"]
    assert main([*base, "--tables", toy, "--max-steps", "2"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        hint
        == f"resume with: maskloom train {rec} --tables {toy} --out {out} --set optim.warmup_steps=1 --resume"
    )
    assert main([*base, "--tables", other, "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"maskloom train: error: {out}: the run was trained on other tables ({os.path.abspath(toy)}); resume with "
        "the same --tables (in the same order), or choose a new --out\n"
    )
    moved = str(tmp_path / "moved")
    shutil.copytree(toy, moved)  # the same table elsewhere is the same table
    assert main([*base, "--tables", moved, "--resume"]) == 0


def test_a_diverging_run_ends_with_one_line(tmp_path, toy, capsys):
    rec = _toy_recipe_file(tmp_path, steps=20)
    argv = [
        "train",
        rec,
        "--tables",
        toy,
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
        "--set",
        "optim.base_lr=1e12",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r"maskloom train: failed: step \d+: the loss is (nan|inf) \(diverged; lower optim\.base_lr\); the run's last "
        r"checkpoint, if any, is kept",
        err[-1],
    ), err


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path, toy):
    """24 rows in batches of 4: step 6 ends epoch 0, and its checkpoint's loader state is (epoch 0,
    position 6 of 6). Resuming from it must start epoch 1 (it raised "the loader yielded no batch")."""
    full = run(tmp_path, recipe(steps=9), [toy], name="full")
    first = run(tmp_path, recipe(steps=9), [toy], name="part", max_steps=6)
    state = json.load(open(tmp_path / "part" / "checkpoints" / "step-6" / "state.json"))["loader"]
    assert (state["epoch"], state["position"]) == (0, 6)
    second = run(tmp_path, recipe(steps=9), [toy], name="part", resume=True)
    assert second.status == "finished" and len(second.losses) == 3
    assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
