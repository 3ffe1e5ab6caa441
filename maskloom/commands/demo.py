"""`maskloom demo`: the main job, end to end on one machine.

    demo data (all seven modalities, real file formats)
      -> Ray preprocessing of every modality into token tables (embedded local Ray)
      -> `omni` pretraining: one backbone over all seven modalities, a few minutes on CPU
      -> evaluation: linear probe + kNN vs a random-init backbone and raw tokens; forecasting
      -> reconstructions and loss curves
      -> RUN/report.md

Every stage is resumable: a rerun finds finished tables and skips them (the preprocessing is
exactly-once) and continues the training run from its last checkpoint (a finished run is kept as
it is and evaluated again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HELP = "the main job: demo data -> Ray preprocessing -> omni pretraining -> evaluation -> report.md"

# The long multichannel series is tokenized a second time with overlapping windows for the
# forecasting evaluation (ETT-style: predict the next `horizon` steps from a lookback window).
FORECAST_TOKENIZER = {
    "window": 192,
    "stride": 24,
    "patch_len": 12,
    "patch_stride": 12,
    "channel_independent": True,
}
FORECAST_HORIZON = 48


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--per-class", type=int, default=48, help="demo samples per class, 4 classes (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data and the run (default 0)")
    p.add_argument(
        "--minutes",
        type=float,
        default=7.0,
        help="wall-clock cap of the pretraining (default 7: the whole job stays under 10 min; it stops "
        "early, with a checkpoint)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=2500,
        help="pretraining steps, the length of the LR schedule (default 2500: ~3.5 min on one CPU thread)",
    )
    p.add_argument("--recipe", default="omni", help="recipe to train (default omni)")
    p.add_argument("--workers", type=int, default=None, help="Ray preprocessing workers (default: CPUs)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set optim.batch_size=16 (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for pretraining (default 1, the robust choice: on 2 cores, 2 threads "
        "train 1.5x faster when the machine is idle but 2.3x slower when other work keeps a core busy)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted pretraining run (the default whenever OUT/run holds one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    from maskloom.recipes.recipe import RecipeError, load_recipe, parse_overrides

    if args.per_class < 2:
        print("maskloom demo: error: --per-class must be >= 2 (train/test split per class)", file=sys.stderr)
        return 2
    try:
        overrides = dict(parse_overrides(args.overrides)) if args.overrides else {}
        if args.steps is not None:
            overrides["optim.steps"] = args.steps
        recipe = load_recipe(args.recipe, overrides=overrides or None)
    except (RecipeError, ValueError) as e:
        print(f"maskloom demo: error: {e}", file=sys.stderr)
        return 2
    try:
        result = run_demo(
            args.out,
            recipe=recipe,
            per_class=args.per_class,
            seed=args.seed,
            minutes=args.minutes,
            workers=args.workers,
            address=args.address,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except KeyboardInterrupt:
        print("maskloom demo: interrupted; rerun it to continue", file=sys.stderr)
        return 130
    except _user_errors() as e:  # a user mistake (e.g. a run dir holding another run): one line
        print(f"maskloom demo: error: {e}", file=sys.stderr)
        return 2
    _say(f"report: {result['report']}")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    from maskloom.pipelines.preprocess import PreprocessError
    from maskloom.pipelines.ray_utils import RayConnectError
    from maskloom.pipelines.sources import SourceError
    from maskloom.recipes.evaluate import EvalError
    from maskloom.recipes.recipe import RecipeError
    from maskloom.recipes.train import TrainError
    from maskloom.recipes.visualize import ShowError

    return (
        PreprocessError,
        SourceError,
        EvalError,
        RecipeError,
        TrainError,
        ShowError,
        RayConnectError,
    )


def run_demo(
    out: str,
    *,
    recipe: Any,
    per_class: int = 48,
    seed: int = 0,
    minutes: float = 7.0,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the whole main job under ``out`` with ``recipe`` (a loaded Recipe, overrides applied); return a
    summary dict (also written as summary.json)."""
    from maskloom._paths import make_out_dir
    from maskloom.demo_data import MODALITIES, write_demo_data
    from maskloom.pipelines.ray_utils import init_ray, shutdown_ray

    t_start = time.perf_counter()
    make_out_dir(out, "demo directory")
    data_dir, tables_dir, run_dir = (os.path.join(out, d) for d in ("data", "tables", "run"))
    timings: dict[str, float] = {}

    # 1. demo data --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if os.path.exists(os.path.join(data_dir, "demo_data.json")) and _same_data(data_dir, seed, per_class):
        _say(f"[1/5] demo data: {data_dir} already written (seed {seed}, {per_class} per class)")
    else:
        write_demo_data(data_dir, seed=seed, per_class=per_class)
        _save_json(os.path.join(data_dir, "maskloom_demo_args.json"), {"seed": seed, "per_class": per_class})
        _say(f"[1/5] demo data: {len(MODALITIES)} modalities, {4 * per_class} samples each -> {data_dir}")
    timings["data"] = time.perf_counter() - t0

    # 2. preprocessing ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    started = init_ray(address)
    try:
        jobs = _preprocess_jobs(data_dir, recipe)
        tables: dict[str, str] = {}
        pre: dict[str, Any] = {}
        _say(f"[2/5] preprocessing {len(jobs)} tables with Ray")
        rebuilt = []
        for name, job in jobs.items():
            res, again = _preprocess(job, os.path.join(tables_dir, name), workers=workers, progress=progress)
            rebuilt += [name] if again else []
            tables[name] = res.out_dir
            pre[name] = res
            _say(f"      {name:<16} {res.summary()}")
    finally:
        shutdown_ray(started)
    timings["preprocess"] = time.perf_counter() - t0
    _say(_preprocess_table(pre))

    # 3. pretraining ------------------------------------------------------------------------------
    from maskloom.recipes.train import RunOptions, train

    t0 = time.perf_counter()
    train_tables = [p for n, p in tables.items() if n != "forecast"]
    if rebuilt and os.path.isdir(run_dir):  # trained on the tables before: kept aside, not resumed
        aside = _free_name(run_dir + ".old")
        os.rename(run_dir, aside)
        _say(f"      the run in {run_dir} was trained on the tables before {', '.join(rebuilt)} were rebuilt; "
             f"moved to {aside}, training afresh")  # fmt: skip
    _say(f"[3/5] pretraining {recipe.name!r} on {len(train_tables)} tables for <= {minutes:g} min")
    res = train(
        recipe,
        train_tables,
        run_dir,
        options=RunOptions(
            # a rerun continues the run in OUT/run, interrupted or finished (another recipe: an error)
            max_minutes=minutes,
            resume=os.path.isdir(run_dir),
            progress=progress,
            threads=threads,
        ),
    )
    timings["train"] = time.perf_counter() - t0
    if res.losses:
        _say(
            f"      {res.status}: step {res.step}/{res.total_steps}, {res.steps_per_second:.2f} steps/s, "
            f"{res.tokens_per_second:,.0f} tokens/s, final loss {res.losses[-1]:.4f}"
        )
    else:  # a rerun of a finished run: nothing to train
        last = _last_logged_loss(os.path.join(run_dir, "metrics.jsonl"))
        _say(
            f"      already trained: step {res.step}/{res.total_steps}"
            + (f", final loss {last:.4f}" if last is not None else "")
            + f" (in {run_dir})"
        )

    # 4. evaluation -------------------------------------------------------------------------------
    from maskloom.recipes.evaluate import evaluate_run, format_results, write_json

    t0 = time.perf_counter()
    _say("[4/5] evaluating: linear probe and kNN (pretrained vs random init vs raw tokens), forecasting")
    results = evaluate_run(run_dir, list(tables.values()), seed=seed, horizon=FORECAST_HORIZON)
    write_json(results, os.path.join(out, "eval.json"))
    _say(format_results(results))
    timings["eval"] = time.perf_counter() - t0

    # 5. pictures and the report ------------------------------------------------------------------
    from maskloom.recipes.visualize import loss_curve_png, show_run

    t0 = time.perf_counter()
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    pictures: dict[str, list[str]] = {}
    for name, path in tables.items():
        if name == "forecast":
            continue
        pictures[name] = show_run(run_dir, path, os.path.join(fig_dir, name), n=3, seed=seed)
    curve = loss_curve_png(os.path.join(run_dir, "metrics.jsonl"), os.path.join(fig_dir, "loss.png"))
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report = write_report(
        out,
        recipe=recipe,
        pre=pre,
        train_result=res,
        results=results,
        pictures=pictures,
        curve=curve,
        timings=timings,
    )
    beats = _wins(results)
    _say(f"[5/5] report: {report}")
    _say(
        f"demo finished in {timings['total'] / 60:.1f} min: pretrained beats random init on "
        f"{beats['wins']}/{beats['total']} labelled modalities by the linear probe "
        f"({', '.join(beats['won']) or 'none'}), {beats['knn_wins']}/{beats['total']} by kNN"
    )
    summary = {
        "report": report,
        "tables": tables,
        "timings": timings,
        "wins": beats,
        "train": {"status": res.status, "step": res.step, "steps_per_second": res.steps_per_second},
    }
    _save_json(os.path.join(out, "summary.json"), summary)
    return summary


# -------------------------------------------------------------------------------------------------
def _same_data(data_dir: str, seed: int, per_class: int) -> bool:
    try:
        with open(os.path.join(data_dir, "maskloom_demo_args.json")) as f:
            return json.load(f) == {"seed": seed, "per_class": per_class}
    except (OSError, ValueError):
        return False


def _save_json(path: str, doc: Any) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def _preprocess_jobs(data_dir: str, recipe: Any) -> dict[str, dict[str, Any]]:
    """One preprocessing job per modality of the demo data, with the recipe's tokenizer settings."""
    from maskloom.demo_data import MODALITIES

    jobs: dict[str, dict[str, Any]] = {}
    for m in MODALITIES:
        cfg = dict(recipe.for_modality(m).tokenizer)
        job: dict[str, Any] = {
            "modality": m,
            "config": cfg,
            "paths": [os.path.join(data_dir, m)],
            "labels": "folder",
            "as_one_source": False,
        }
        if m == "graph":  # a TU-format dataset folder is one source; labels come from its files
            job.update(paths=[os.path.join(data_dir, "graph", "DEMO")], labels="none", as_one_source=True)
        elif m == "text":  # one JSONL file with a label field
            job.update(labels="none")
        jobs[m] = job
    jobs["forecast"] = {
        "modality": "time_series",
        "config": dict(FORECAST_TOKENIZER),
        "paths": [os.path.join(data_dir, "time_series_long")],
        "labels": "none",
        "as_one_source": False,
    }
    return jobs


def _preprocess(job: dict[str, Any], out_dir: str, *, workers: int | None, progress: bool):
    """Preprocess one demo table; one left by another config or maskloom version (its tokenizer's
    config changed) is rebuilt: the demo owns OUT/tables. Returns (result, rebuilt?)."""
    from maskloom.pipelines.preprocess import TableConflictError, preprocess
    from maskloom.pipelines.sources import find_inputs
    from maskloom.tokenizers import TOKENIZERS

    exts = TOKENIZERS.get(job["modality"]).extensions
    inputs = find_inputs(
        job["paths"], extensions=exts, labels=job["labels"], as_one_source=job["as_one_source"]
    )
    try:
        res = preprocess(
            inputs, job["modality"], job["config"], out_dir, num_workers=workers, progress=progress
        )
        return res, False
    except TableConflictError:
        _say(f"      {os.path.basename(out_dir)}: built by another config or maskloom version; rebuilding it")
        res = preprocess(inputs, job["modality"], job["config"], out_dir, num_workers=workers, progress=progress,
                         overwrite=True)  # fmt: skip
        return res, True


def _free_name(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist."""
    k, out = 1, path
    while os.path.exists(out):
        k += 1
        out = f"{path}-{k}"
    return out


def _preprocess_table(pre: dict[str, Any]) -> str:
    lines = [
        f"      {'table':<12} {'inputs':>7} {'samples':>8} {'tokens':>9} {'errors':>6} {'MB':>7} {'s':>6}"
    ]
    for name, r in pre.items():
        lines.append(
            f"      {name:<12} {r.inputs:>7} {r.rows:>8} {r.tokens:>9} {r.errors:>6} "
            f"{r.bytes / 1e6:>7.2f} {r.seconds:>6.1f}"
        )
    return "\n".join(lines)


def _wins(results: dict[str, Any]) -> dict[str, Any]:
    """Labelled modalities where the pretrained backbone beats the random-init one: by the linear probe
    (``wins``/``won``, the headline figure) and by kNN (``knn_wins``/``knn_won``); strictly better only."""
    won, knn_won, total = [], [], 0
    for res in results["tables"].values():
        if res.get("kind") != "classification":
            continue
        total += 1
        p = res["probes"]
        if p["pretrained"]["linear"] > p["random_init"]["linear"]:
            won.append(res["modality"])
        if p["pretrained"]["knn"] > p["random_init"]["knn"]:
            knn_won.append(res["modality"])
    return {"wins": len(won), "total": total, "won": won, "knn_wins": len(knn_won), "knn_won": knn_won}


def write_report(
    out: str,
    *,
    recipe: Any,
    pre: dict[str, Any],
    train_result: Any,
    results: dict[str, Any],
    pictures: dict[str, list[str]],
    curve: str,
    timings: dict[str, float],
) -> str:
    """Write OUT/report.md: data and tables, training, probe accuracies vs baselines, pictures."""
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    L: list[str] = [f"# maskloom demo report — recipe `{recipe.name}`", ""]
    beats = _wins(results)
    L += [
        f"Pretrained beats the random-init backbone (linear probe) on **{beats['wins']}/{beats['total']}** "
        f"labelled modalities: {', '.join(beats['won']) or 'none'}; by kNN on "
        f"**{beats['knn_wins']}/{beats['total']}**: {', '.join(beats['knn_won']) or 'none'}.",
        "",
    ]
    L += [
        "## Token tables",
        "",
        "| table | modality | inputs | samples | tokens | errors | MB | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in pre.items():
        mod = results["tables"].get(r.out_dir, {}).get("modality", name)
        L.append(
            f"| {name} | {mod} | {r.inputs} | {r.rows} | {r.tokens} | {r.errors} | {r.bytes / 1e6:.2f} "
            f"| {r.seconds:.1f} |"
        )
    tr = train_result
    L += [
        "",
        "## Pretraining",
        "",
        f"{tr.status} at step {tr.step} of {tr.total_steps} in {tr.seconds / 60:.1f} min "
        f"({tr.steps_per_second:.2f} steps/s, {tr.tokens_per_second:,.0f} real tokens/s).",
        "",
        f"![loss curves]({rel(curve)})",
        "",
    ]
    L += [
        "## Linear probe and kNN accuracy",
        "",
        "Frozen features of the pretrained backbone against the same probes on a randomly initialised "
        "backbone of the same shape and on mean-pooled raw tokens.",
        "",
        "| modality | split (train/test) | pretrained linear | random-init linear | raw-token linear "
        "| pretrained kNN | random-init kNN | raw-token kNN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results["tables"].values():
        if res.get("kind") != "classification":
            continue
        p, s = res["probes"], res["split"]
        best = max(p["pretrained"]["linear"], p["random_init"]["linear"], p["raw_tokens"]["linear"])
        cell = lambda v, best=best: f"**{v:.3f}**" if v == best else f"{v:.3f}"  # noqa: E731
        L.append(
            f"| {res['modality']} | {s['train']}/{s['test']} | {cell(p['pretrained']['linear'])} | "
            f"{cell(p['random_init']['linear'])} | {cell(p['raw_tokens']['linear'])} | "
            f"{p['pretrained']['knn']:.3f} | {p['random_init']['knn']:.3f} | {p['raw_tokens']['knn']:.3f} |"
        )
    for res in results["tables"].values():
        if res.get("kind") == "forecast":
            f = res["forecast"]
            L += [
                "",
                f"## Forecasting (horizon {res['split']['horizon']}, chronological split)",
                "",
                "| features | MSE | MAE |",
                "|---|---|---|",
            ]
            for k, v in f.items():
                L.append(f"| {k} | {v['mse']:.4f} | {v['mae']:.4f} |")
    skipped = [(t, r) for t, r in results["tables"].items() if r.get("kind") == "skipped"]
    if skipped:
        L += ["", "Skipped: " + "; ".join(f"{os.path.basename(t)} ({r['reason']})" for t, r in skipped)]
    L += ["", "## Reconstructions", "", "Original / masked / reconstructed, per modality.", ""]
    for name, paths in pictures.items():
        L.append(f"### {name}")
        L.append("")
        for p in paths:
            if p.endswith(".png"):
                L.append(f"![{name}]({rel(p)})")
            else:
                L.append(f"- [{os.path.basename(p)}]({rel(p)})")
        L.append("")
    L += ["## Timings", "", " · ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L))
    return path


def _last_logged_loss(path: str) -> float | None:
    """The ``loss`` of the last line of a run's metrics.jsonl, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        return float(json.loads(lines[-1])["loss"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
