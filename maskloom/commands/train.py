"""`maskloom train RECIPE --tables T [T ...] --out RUN`: pretrain a masked model.

RECIPE is a built-in name (``maskloom recipes``) or a TOML file; ``--set KEY=VALUE`` overrides any
recipe key (``--set optim.steps=200 --set model.preset=tiny``). One process by default; several
through ``torchrun --nproc-per-node N -m maskloom.cli train ...`` (DDP), or on a Ray cluster with
``--num-workers N [--ray-address ADDR] [--use-gpu]`` (Ray Train TorchTrainer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from maskloom.pipelines.ray_utils import RayConnectError
from maskloom.recipes.recipe import RecipeError, parse_overrides

HELP = "pretrain a masked model with a recipe on token tables"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="built-in recipe name (see `maskloom recipes`) or a recipe .toml file")
    parser.add_argument("--tables", nargs="+", required=True, metavar="T", help="token table directories")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's; 1 is often fastest for tiny models on a busy CPU)",
    )
    parser.add_argument(
        "--out", required=True, metavar="RUN", help="run directory (metrics, checkpoints, model)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.steps=200 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in RUN")
    parser.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop (with a checkpoint) at global step N; the schedule keeps the recipe's length",
    )
    parser.add_argument(
        "--max-minutes", type=float, metavar="M", help="stop (with a checkpoint) after M minutes"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--loader-workers", type=int, default=0, metavar="N", help="loader worker processes")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: the recipe's train.compile)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray Train (a cluster, or a local Ray with --num-workers)")
    ray.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    ray.add_argument("--num-workers", type=int, metavar="N", help="Ray Train workers (one process each)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker")


def _error(msg: str) -> int:
    print(f"maskloom train: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from maskloom.recipes.train import RunOptions, TrainError, train, train_ray

    try:
        overrides = parse_overrides(args.overrides)
    except RecipeError as e:
        return _error(str(e))
    options = RunOptions(
        resume=args.resume,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        threads=args.threads,
        device=args.device,
        loader_workers=args.loader_workers,
        compile=args.compile,
        progress=not args.no_progress,
    )
    try:
        if args.ray_address or args.num_workers:
            metrics = train_ray(
                args.recipe,
                args.tables,
                args.out,
                num_workers=args.num_workers or 1,
                use_gpu=args.use_gpu,
                ray_address=args.ray_address,
                options=options,
                overrides=overrides,
            )
            print(f"{args.out}: Ray Train finished: {json.dumps(metrics, default=str)}")
            return 0
        result = train(args.recipe, args.tables, args.out, options=options, overrides=overrides)
    except (RecipeError, TrainError, RayConnectError) as e:
        return _error(str(e))
    except FloatingPointError as e:  # the loss diverged: the recipe's fault, not the code's
        print(f"maskloom train: failed: {e}; the run's last checkpoint, if any, is kept", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one summary, from rank 0
        return 0
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"{args.out}: {result.status} at step {result.step}/{result.total_steps}, loss {last}, "
        f"{result.steps_per_second:.2f} steps/s, {result.tokens_per_second:.0f} tokens/s"
    )
    if result.status != "finished":
        print(
            "resume with: "
            + shlex.join(
                [
                    "maskloom",
                    "train",
                    args.recipe,
                    "--tables",
                    *args.tables,
                    "--out",
                    args.out,
                    *[a for kv in args.overrides for a in ("--set", kv)],
                    "--resume",
                ]
            )  # fmt: skip
        )
    return 0
