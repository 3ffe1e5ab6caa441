"""Quality figures on real data: linear probe / kNN after a few minutes of CPU pretraining.

For each dataset of ``/work/shared/data`` (issue 5, "Quality figures"): preprocess the raw files into
a token table (embedded Ray, one ``ray.init`` for all; a finished table is reused), pretrain the
matching built-in recipe shrunk to CPU size (``model.preset=tiny``, a small decoder, a higher
learning rate for the tiny model) for ``--minutes`` minutes, and evaluate with
:func:`maskloom.recipes.evaluate.evaluate_run`:

* classification (CIFAR-10 subset, spoken digits, MUTAG, ENZYMES, GunPoint): linear-probe and kNN
  accuracy of the pretrained encoder vs the same encoder at its random initialisation vs mean-pooled
  raw tokens;
* forecasting (ETTh1, horizon 96, lookback 336, patches of 16 every 8 as PatchTST/64): ridge head on
  the frozen per-patch features; MSE/MAE in the dataset-standardised space of the ETT benchmarks
  (PatchTST, Nie et al., ICLR 2023, reports MSE 0.370 with lookback 336, supervised, all windows).

The schedule is sized to the time budget: a short probe run measures steps/s, ``optim.steps`` is set
so that warm-up + cosine finish inside ``--minutes`` (``max_minutes`` stops it otherwise, reported as
``status``). Pretraining is self-supervised and never sees labels; it uses the train folder only for
CIFAR-10, the steps before the first test window for ETTh1, and the whole table (every sample,
labels unused, as GraphMAE and PatchTST's classification setting do) for the others.

Prints ONE JSON object (per-dataset figures, steps, minutes, settings); partial results are written
to ``OUT/results.json`` after each dataset. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from maskloom.pipelines.preprocess import preprocess
from maskloom.pipelines.sources import find_inputs
from maskloom.recipes.evaluate import evaluate_run
from maskloom.recipes.recipe import load_recipe
from maskloom.recipes.train import RunOptions, train
from maskloom.tables import TokenTable
from maskloom.tokenizers.base import TOKENIZERS

log = logging.getLogger("quality")

DATA = "/work/shared/data"
ETT_WINDOW, ETT_EVAL_STRIDE, ETT_PRETRAIN_STRIDE, ETT_HORIZON = 336, 48, 16, 96
ETT_TEST_FRACTION = 0.2  # evaluate_run's default chronological split

TINY_DECODER = {
    "model.decoder.dim": 128,
    "model.decoder.depth": 2,
    "model.decoder.heads": 4,
}

# name -> recipe, modality, inputs (eval table; "pretrain" = other inputs for pretraining), tokenizer
# config, find_inputs options and recipe overrides (beyond preset/decoder/lr/steps).
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "recipe": "mae-image",
        "modality": "image",
        "inputs": ["images/cifar10"],
        "pretrain": ["images/cifar10/train"],
        "find": {"labels": "folder"},
        "tokenizer": {"image_size": 32, "patch_size": 4},
        "batch_size": 128,
    },
    "fsdd": {
        "recipe": "audiomae",
        "modality": "audio",
        "inputs": ["audio/fsdd"],
        "find": {"labels": "regex", "label_regex": r"^(?P<label>\d+)_"},
        "tokenizer": {"sample_rate": 16000, "target_frames": 128},
        "batch_size": 64,
    },
    "mutag": {
        "recipe": "graphmae",
        "modality": "graph",
        "inputs": ["graphs/MUTAG"],
        "find": {"as_one_source": True},
        "tokenizer": {},
        "batch_size": 64,
        "overrides": {"model.decoder.depth": 1},
    },
    "gunpoint": {
        "recipe": "patchtst",
        "modality": "time_series",
        "inputs": ["time_series/ucr/GunPoint/GunPoint_TRAIN.ts", "time_series/ucr/GunPoint/GunPoint_TEST.ts"],
        "find": {},
        "tokenizer": {"patch_len": 8, "patch_stride": 8},
        "batch_size": 64,
    },
    "etth1": {
        "recipe": "patchtst",
        "modality": "time_series",
        "inputs": ["time_series/ETTh1.csv"],
        "find": {},
        "tokenizer": {"window": ETT_WINDOW, "stride": ETT_EVAL_STRIDE, "patch_len": 16, "patch_stride": 8},
        "batch_size": 128,
    },
    "enzymes": {
        "recipe": "graphmae",
        "modality": "graph",
        "inputs": ["graphs/ENZYMES"],
        "find": {"as_one_source": True},
        "tokenizer": {},
        "batch_size": 64,
        "overrides": {"model.decoder.depth": 1},
    },
}
DATASETS["sma-cifar10"] = {  # learned (SMA) masking on the same CIFAR tables
    **DATASETS["cifar10"],
    "recipe": "sma",
    "table": "cifar10",
    "overrides": {"modality.*.masking.num_queries": 32},
}
DEFAULT_DATASETS = ("cifar10", "fsdd", "mutag", "gunpoint", "etth1")


def _table_dir(out: str, name: str, part: str) -> str:
    return os.path.join(out, "tables", f"{name}-{part}")


def _ett_cut(n_rows: int) -> int:
    """First step of the ETTh1 test windows under evaluate_run's chronological split (windows every
    ``ETT_EVAL_STRIDE`` steps with a full horizon; the latest 20% of starts are test)."""
    starts = np.arange(0, n_rows - ETT_WINDOW + 1, ETT_EVAL_STRIDE)
    starts = starts[starts + ETT_WINDOW + ETT_HORIZON <= n_rows]
    return int(starts[starts.size - max(1, math.ceil(ETT_TEST_FRACTION * starts.size))])


def make_tables(name: str, spec: dict[str, Any], data: str, out: str) -> tuple[str, str, dict[str, Any]]:
    """(eval table, pretraining table, info) of one dataset; tables are built once and reused."""
    key = spec.get("table", name)
    cls = TOKENIZERS.get(spec["modality"])
    info: dict[str, Any] = {}
    eval_dir = _table_dir(out, key, "eval")
    found = find_inputs(
        [os.path.join(data, p) for p in spec["inputs"]], extensions=cls.extensions, **spec["find"]
    )
    r = preprocess(found, spec["modality"], spec["tokenizer"], eval_dir, progress=False)
    info["eval_table"] = {"rows": r.rows, "errors": r.errors, "seconds": round(r.seconds, 1)}
    pre_dir = eval_dir
    if "pretrain" in spec:
        pre_dir = _table_dir(out, key, "pretrain")
        found = find_inputs(
            [os.path.join(data, p) for p in spec["pretrain"]], extensions=cls.extensions, **spec["find"]
        )
        r = preprocess(found, spec["modality"], spec["tokenizer"], pre_dir, progress=False)
    elif name == "etth1":  # pretrain on the steps before the first test window only
        src = os.path.join(data, spec["inputs"][0])
        with open(src, encoding="utf-8") as f:
            lines = f.readlines()
        cut = _ett_cut(len(lines) - 1)
        csv_dir = os.path.join(out, "etth1-pretrain-csv")
        os.makedirs(csv_dir, exist_ok=True)
        head = os.path.join(csv_dir, "ETTh1_first.csv")
        with open(head, "w", encoding="utf-8") as f:
            f.writelines(lines[: cut + 1])
        pre_dir = _table_dir(out, key, "pretrain")
        cfg = {**spec["tokenizer"], "stride": ETT_PRETRAIN_STRIDE}
        r = preprocess(
            find_inputs([head], extensions=cls.extensions), "time_series", cfg, pre_dir, progress=False
        )
        info["pretrain_steps_of_series"] = cut
    if pre_dir != eval_dir:
        info["pretrain_table"] = {"rows": r.rows, "errors": r.errors, "seconds": round(r.seconds, 1)}
    return eval_dir, pre_dir, info


def overrides_for(spec: dict[str, Any], base_lr: float, steps: int, rows: int) -> dict[str, Any]:
    """Recipe overrides: CPU size, the learning rate and a schedule of ``steps`` optimiser steps.

    A recipe that counts epochs (``optim.steps`` cannot be set beside them) gets the fraction of
    epochs that makes ``steps`` (``ceil(epochs * rows / batch) == steps``)."""
    mod = "*" if spec["recipe"] == "sma" else spec["modality"]
    batch = spec["batch_size"]
    ov: dict[str, Any] = {
        "model.preset": "tiny",
        **TINY_DECODER,
        "optim.base_lr": base_lr,
        "optim.batch_size": batch,
        "optim.warmup_fraction": 0.05,
        "train.log_every": 25,
        "train.checkpoint_every": 10**9,
    }
    if load_recipe(spec["recipe"]).optim.epochs is not None:
        ov["optim.epochs"] = (steps - 0.5) * batch / rows
    else:
        ov["optim.steps"] = steps
    if mod != "*":
        ov.update({f"modality.{mod}.tokenizer.{k}": v for k, v in spec["tokenizer"].items()})
    ov.update(spec.get("overrides", {}))
    return ov


def pretrain(
    name: str, spec: dict[str, Any], table: str, out: str, *, minutes: float, base_lr: float, threads: int
) -> dict[str, Any]:
    """Probe steps/s, size the schedule to ``minutes``, train; returns what was run."""
    probe_dir = os.path.join(out, "runs", f"{name}-probe")
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe_steps = 30
    rows = TokenTable(table).num_rows
    rec = load_recipe(spec["recipe"], overrides=overrides_for(spec, base_lr, 10**6, rows))
    pr = train(
        rec, [table], probe_dir, options=RunOptions(max_steps=probe_steps, threads=threads, progress=False)
    )
    sps = pr.steps_per_second
    shutil.rmtree(probe_dir, ignore_errors=True)
    steps = max(50, int(sps * minutes * 60 * 0.85))
    run_dir = os.path.join(out, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    ov = overrides_for(spec, base_lr, steps, rows)
    rec = load_recipe(spec["recipe"], overrides=ov)
    res = train(
        rec, [table], run_dir, options=RunOptions(max_minutes=minutes, threads=threads, progress=False)
    )
    losses = res.losses
    k = max(1, len(losses) // 20)
    return {
        "run_dir": run_dir,
        "recipe": spec["recipe"],
        "overrides": {k_: v for k_, v in ov.items() if not k_.startswith("train.")},
        "probe_steps_per_s": round(sps, 2),
        "steps": res.step,
        "planned_steps": res.total_steps,
        "status": res.status,
        "minutes": round(res.seconds / 60, 2),
        "steps_per_s": round(res.steps_per_second, 2),
        "loss_first": round(float(np.mean(losses[:k])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-k:])), 4) if losses else None,
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The one table's evaluation, flattened (accuracies / forecast errors rounded)."""
    (r,) = result["tables"].values()
    out: dict[str, Any] = {"kind": r["kind"], "split": r.get("split")}
    if r["kind"] == "classification":
        out["probes"] = {n: {k: round(v, 4) for k, v in p.items()} for n, p in r["probes"].items()}
        pre, rnd = r["probes"]["pretrained"], r["probes"]["random_init"]
        out["linear_gain_vs_random"] = round(pre["linear"] - rnd["linear"], 4)
        out["knn_gain_vs_random"] = round(pre["knn"] - rnd["knn"], 4)
    elif r["kind"] == "forecast":
        out["forecast"] = {n: {k: round(v, 4) for k, v in m.items()} for n, m in r["forecast"].items()}
        out["reference_patchtst_mse_std"] = 0.370
    else:
        out["reason"] = r.get("reason")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--minutes", type=float, default=5.0, help="pretraining minutes per dataset (issue: <= 15)"
    )
    p.add_argument(
        "--datasets",
        default=",".join(DEFAULT_DATASETS),
        help=f"comma-separated subset of {', '.join(DATASETS)} (default: {','.join(DEFAULT_DATASETS)})",
    )
    p.add_argument("--out", default=None, help="scratch directory for tables and runs (default: a temp dir)")
    p.add_argument("--data", default=DATA, help="the shared data folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models here)")
    p.add_argument("--base-lr", type=float, default=5e-3, help="learning rate per 256 samples (tiny model)")
    p.add_argument("--workers", type=int, default=2, help="Ray tokenizer workers for preprocessing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    if not os.path.isdir(args.data):
        p.error(f"{args.data}: no such data folder (this benchmark needs the real datasets)")
    out = args.out or tempfile.mkdtemp(prefix="maskloom-quality-")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    # ---- preprocessing: one embedded Ray for every table
    from maskloom.pipelines.ray_utils import init_ray, shutdown_ray

    tables: dict[str, tuple[str, str, dict[str, Any]]] = {}
    t0 = time.perf_counter()
    started = init_ray(None, num_cpus=args.workers)
    try:
        for n in names:
            tables[n] = make_tables(n, DATASETS[n], args.data, out)
            log.info("%s: tables ready %s", n, tables[n][2])
    finally:
        shutdown_ray(started)
    prep_s = time.perf_counter() - t0

    report: dict[str, Any] = {
        "benchmark": "quality",
        "data": args.data,
        "out": out,
        "settings": {
            "minutes_per_dataset": args.minutes,
            "threads": args.threads,
            "base_lr_per_256": args.base_lr,
            "model": "tiny encoder (128-d, 4 blocks, 4 heads); decoder 128-d, 4 heads",
            "eval": "evaluate_run: logistic regression / cosine kNN (k=20) on frozen pooled features; "
            "ridge on flattened per-patch features for forecasting",
        },
        "preprocess_seconds": round(prep_s, 1),
        "datasets": {},
    }
    for n in names:
        spec = DATASETS[n]
        eval_dir, pre_dir, info = tables[n]
        entry: dict[str, Any] = {"tables": info}
        try:
            entry["train"] = pretrain(
                n, spec, pre_dir, out, minutes=args.minutes, base_lr=args.base_lr, threads=args.threads
            )
        except FloatingPointError as e:  # diverged: one retry at half the rate
            log.warning("%s: %s; retrying at base_lr %.1e", n, e, args.base_lr / 2)
            entry["diverged_at_base_lr"] = args.base_lr
            entry["train"] = pretrain(
                n, spec, pre_dir, out, minutes=args.minutes, base_lr=args.base_lr / 2, threads=args.threads
            )
        t0 = time.perf_counter()
        res = evaluate_run(entry["train"]["run_dir"], [eval_dir], batch_size=256, horizon=ETT_HORIZON)
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        entry["result"] = summarise(res)
        report["datasets"][n] = entry
        log.info("%s: %s", n, json.dumps(entry["result"]))
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    report["total_minutes"] = round((time.perf_counter() - t_all) / 60, 1)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
