"""`maskloom demo-data DIR`: write a small labelled demo dataset for all seven modalities."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "write a small labelled demo dataset for all seven modalities (images, video, audio, ...)"


def configure(parser: argparse.ArgumentParser) -> None:
    from maskloom.demo_data import MODALITIES

    parser.add_argument(
        "out_dir", metavar="DIR", help="output directory (new, empty, or an earlier demo-data directory)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same files (default 0)"
    )
    parser.add_argument(
        "--per-class", type=int, default=24, help="samples per class, 4 classes per modality (default 24)"
    )
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        default=None,
        metavar="M",
        help=f"write only these modalities (default: all of {', '.join(MODALITIES)})",
    )


def run(args: argparse.Namespace) -> int:
    from maskloom.demo_data import write_demo_data

    if args.per_class < 1:
        print(f"maskloom demo-data: error: --per-class must be >= 1, got {args.per_class}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        summary = write_demo_data(
            args.out_dir, seed=args.seed, per_class=args.per_class, modalities=args.modalities
        )
    except (FileExistsError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"maskloom demo-data: error: {e}", file=sys.stderr)
        return 2
    for m, s in summary.items():
        classes = f"{len(s['classes'])} classes ({', '.join(s['classes'])})" if s["classes"] else "no classes"
        print(f"{m:<17} {s['samples']:>5} samples  {s['files']:>5} files  {classes}  {s['path']}")
    print(f"wrote demo data to {args.out_dir} in {time.perf_counter() - t0:.1f} s")
    return 0
