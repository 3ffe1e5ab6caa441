"""`maskloom eval RUN --tables T [T ...] [--out JSON]`: probe a trained run's frozen features.

Labelled tables: linear probe (logistic regression) and kNN accuracy of the pretrained encoder,
side by side with a random-init encoder of the same config and with mean-pooled raw tokens.
Unlabelled time-series tables (made with a window/stride from readable CSV/Parquet files): a
ridge forecasting head at ``--horizon`` steps (MSE/MAE). See ``maskloom.recipes.evaluate``.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "linear-probe / kNN / forecasting evaluation of a trained run"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory written by `maskloom train --out RUN`")
    parser.add_argument(
        "--tables",
        nargs="+",
        required=True,
        metavar="T",
        help="token table directories (labelled tables are probed, unlabelled time series forecast)",
    )
    parser.add_argument("--out", metavar="JSON", help="also write the results to this JSON file")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    parser.add_argument("--k", type=int, default=20, help="neighbours of the kNN classifier (default 20)")
    parser.add_argument("--horizon", type=int, default=96, help="forecasting horizon in steps (default 96)")
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-validation folds when the sources have no train/test split (default 5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the hash train/test split (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _error(msg: str) -> int:
    print(f"maskloom eval: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from maskloom._paths import make_out_dir
    from maskloom.recipes.evaluate import EvalError, evaluate_run, format_results, write_json

    if args.out:  # before the evaluation, not after it
        if os.path.isdir(args.out):
            return _error(f"{args.out}: is a directory; --out names the JSON file to write")
        make_out_dir(os.path.dirname(os.path.abspath(args.out)))  # OutDirError: one line from the cli
    try:
        results = evaluate_run(
            args.run,
            args.tables,
            device=args.device,
            batch_size=args.batch_size,
            seed=args.seed,
            k=args.k,
            horizon=args.horizon,
            folds=args.folds,
        )
    except EvalError as e:
        return _error(str(e))
    print(format_results(results))
    if args.out:
        try:
            write_json(results, args.out)
        except OSError as e:
            return _error(f"{args.out}: cannot write: {e}")
        print(f"\nwrote {args.out}")
    return 0
