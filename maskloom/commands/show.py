"""`maskloom show RUN --table T [--n 8] --out DIR`: draw what a trained run reconstructs.

For the first N samples of the table: original / masked / reconstructed (the target normalisation
the run was trained with is undone), one PNG per sample (text: also a .txt). See
``maskloom.recipes.visualize``.
"""

from __future__ import annotations

import argparse
import sys

HELP = "draw original / masked / reconstructed samples of a trained run"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory written by `maskloom train --out RUN`")
    parser.add_argument("--table", required=True, metavar="T", help="token table to draw samples from")
    parser.add_argument("--n", type=int, default=8, help="number of samples (the table's first N; default 8)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the pictures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--loss-curve",
        action="store_true",
        help="also plot RUN/metrics.jsonl to DIR/loss.png (per-modality losses)",
    )


def _error(msg: str) -> int:
    print(f"maskloom show: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import os

    from maskloom.recipes.visualize import ShowError, loss_curve_png, show_run

    try:
        paths = show_run(args.run, args.table, args.out, n=args.n, seed=args.seed, device=args.device)
    except ShowError as e:
        return _error(str(e))
    if args.loss_curve:
        metrics = os.path.join(args.run, "metrics.jsonl")
        if not os.path.isfile(metrics):
            return _error(f"{metrics}: missing: the run has no metrics to plot")
        paths.append(loss_curve_png(metrics, os.path.join(args.out, "loss.png")))
    for p in paths:
        print(p)
    return 0
