"""`maskloom inspect TABLE`: schema, counts, token-length histogram and errors of a token table.

``--render N --out DIR`` rebuilds the table's tokenizer (with its artifacts), detokenizes the first
N samples and draws each with the tokenizer's ``render`` (image grid, video frames, spectrogram,
point-cloud scatter, graph drawing, series plot); text samples are printed instead.

The pieces (:func:`table_summary`, :func:`length_histogram`, :func:`error_summary`,
:func:`render_samples`) are plain functions returning data, so they can be tested and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maskloom._paths import make_out_dir
from maskloom.tables import META_KEY, TableError, TokenTable, arrow_to_records, from_storage, open_shard
from maskloom.tokenizers.base import Record

HELP = "schema, counts, length histogram and errors of a token table; render samples"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def length_histogram(lengths: np.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    """Integer-width histogram of token counts: [(lo, hi, count)], ``lo..hi`` inclusive.

    The range min..max is cut into at most ``bins`` bins of equal integer width
    ``ceil((max - min + 1) / bins)``; empty bins are kept so the bars read as a distribution.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return []
    lo, hi = int(lengths.min()), int(lengths.max())
    width = math.ceil((hi - lo + 1) / max(1, bins))
    counts = np.bincount((lengths - lo) // width)
    return [(lo + k * width, lo + (k + 1) * width - 1, int(c)) for k, c in enumerate(counts)]


def format_histogram(hist: list[tuple[int, int, int]], width: int = 40) -> list[str]:
    """Text bars, one line per bin: ``   lo-hi   | ####   count``."""
    if not hist:
        return ["  (no rows)"]
    top = max(c for _, _, c in hist) or 1
    span = max(len(f"{lo}-{hi}") for lo, hi, _ in hist)
    out = []
    for lo, hi, c in hist:
        bar = "#" * (round(c / top * width) if c else 0)
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        out.append(f"  {label:>{span}} | {bar:<{width}} {c}")
    return out


def error_summary(table: TokenTable, examples: int = 3) -> dict[str, Any]:
    """{"total": n, "by_kind": {kind: count} (most frequent first), "examples": [{source, kind, message}]}."""
    errs = table.errors()
    kinds = errs.column("kind").to_pylist() if errs.num_rows else []
    by_kind: dict[str, int] = {}
    for k in kinds:
        by_kind[k] = by_kind.get(k, 0) + 1
    by_kind = dict(sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])))
    ex = errs.slice(0, examples).to_pylist() if errs.num_rows else []
    return {"total": errs.num_rows, "by_kind": by_kind, "examples": ex}


def table_summary(table: TokenTable, lengths: np.ndarray | None = None) -> dict[str, Any]:
    """Schema, counts and length statistics of a table (lengths from list offsets, no token decoding).

    ``lengths``: the (N,) token counts if already known (``loader.table_lengths``).
    """
    from maskloom.pipelines.loader import table_lengths

    meta, man = table.meta, table.manifest
    lengths = table_lengths(table) if lengths is None else np.asarray(lengths)
    labels = pc.fill_null(table.read(columns=["label"]).column("label"), -1).to_numpy()
    names = table.label_names
    label_counts: dict[str, int] = {}
    for v, c in zip(*np.unique(labels, return_counts=True)):
        v = int(v)
        key = "none" if v < 0 else names[v] if names and v < len(names) else str(v)
        label_counts[key] = int(c)
    # the table-level facts are the manifest's metadata (tables.table_meta), as written
    facts = {k: v for k, v in meta.items() if k != "schema_version"}
    return {
        "directory": table.directory,
        **facts,
        "label_names": names,
        "inputs": int(man.totals["inputs"]),
        "rows": int(man.totals["rows"]),
        "tokens": int(lengths.sum()),
        "errors": int(man.totals["errors"]),
        "bytes": int(sum(int(s["bytes"]) for s in man.shards)),
        "shards": len(man.shards),
        "length": {
            "min": int(lengths.min()) if lengths.size else 0,
            "mean": round(float(lengths.mean()), 2) if lengths.size else 0.0,
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "labels": label_counts,
        # parts of written inputs their tokenizer skipped (tar samples, JSONL lines): see preprocess
        "skipped_parts": man.extra.get("skipped_parts", {"inputs": 0, "counts": {}, "examples": []}),
    }


def first_records(table: TokenTable, n: int) -> list[Record]:
    """The first ``n`` records in manifest order, reading only the row groups needed."""
    out: list[Record] = []
    for path in table.shard_paths():
        pf = open_shard(path)
        md = pf.schema_arrow.metadata
        for g in range(pf.metadata.num_row_groups):
            if len(out) >= n:
                return out
            t = pf.read_row_group(g)
            if META_KEY not in (t.schema.metadata or {}):
                t = t.replace_schema_metadata(md)
            t = from_storage(t, table.spec)
            out.extend(arrow_to_records(t.slice(0, n - len(out))))
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] or "sample"


def render_samples(table: TokenTable, n: int, out: str) -> list[dict[str, Any]]:
    """Detokenize the first ``n`` samples and draw them as PNGs under ``out``.

    Returns one dict per sample: {"id", "path"} for a PNG, {"id", "text"} for text (the text modality,
    or a tokenizer without ``render``), or {"id", "error"} when detokenizing/drawing failed.
    """
    tok = table.tokenizer()
    make_out_dir(out)
    results: list[dict[str, Any]] = []
    for i, rec in enumerate(first_records(table, n)):
        try:
            raw = tok.detokenize(rec)
            if table.modality == "text":
                results.append({"id": rec.id, "text": raw if isinstance(raw, str) else str(raw)})
                continue
            path = os.path.join(out, f"{i:03d}-{_safe(rec.id)}.png")
            try:
                tok.render(raw, path)
            except NotImplementedError:
                results.append({"id": rec.id, "text": raw if isinstance(raw, str) else repr(raw)})
                continue
            results.append({"id": rec.id, "path": path})
        except Exception as e:  # one bad sample must not hide the others
            results.append({"id": rec.id, "error": f"{type(e).__name__}: {e}"})
    return results


# ---------------------------------------------------------------------------------------------
# text report
# ---------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def format_summary(s: dict[str, Any], hist: list[tuple[int, int, int]], errors: dict[str, Any]) -> list[str]:
    """The report ``maskloom inspect`` prints."""
    if s["token_kind"] == "discrete":
        tokens = f"discrete ids, vocab {s['vocab_size']}"
    else:
        shape = f", token shape {tuple(s['token_shape'])}" if s["token_shape"] else ""
        tokens = f"continuous, dim {s['token_dim']} x {s['token_dtype']}{shape}"
    names = s["label_names"]
    lines = [
        f"token table {s['directory']}",
        f"  modality    {s['modality']}",
        f"  tokenizer   {s['tokenizer']} v{s['tokenizer_version']} (fingerprint {s['fingerprint']})",
        f"  config      {json.dumps(s['config'], sort_keys=True)}",
        f"  tokens      {tokens}",
        f"  positions   {s['position_kind']} on ({', '.join(s['position_axes'])})",
        f"  label names {', '.join(names) if names else '-'}",
        "counts",
        f"  inputs {s['inputs']}  rows {s['rows']}  tokens {s['tokens']}  errors {s['errors']}  "
        f"bytes {s['bytes']} ({_size(s['bytes'])})  shards {s['shards']}",
    ]
    if s["labels"]:
        lines.append("  labels  " + ", ".join(f"{k}: {v}" for k, v in s["labels"].items()))
    ln = s["length"]
    lines.append(f"token length per row (min {ln['min']}, mean {ln['mean']}, max {ln['max']})")
    lines.extend(format_histogram(hist))
    if errors["total"] == 0:
        lines.append("errors: none")
    else:
        lines.append(
            f"errors: {errors['total']} (" + ", ".join(f"{k} {v}" for k, v in errors["by_kind"].items()) + ")"
        )
        for e in errors["examples"]:
            lines.append(f"  {e['kind']}: {e['source']}: {e['message']}")
    parts = s.get("skipped_parts") or {}
    if parts.get("inputs"):
        from maskloom.pipelines.preprocess import count_parts

        counts = ", ".join(count_parts(n, what) for what, n in parts["counts"].items())
        lines.append(f"skipped inside {parts['inputs']} written input(s): {counts}")
        lines.extend(f"  {e}" for e in parts["examples"])
    return lines


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", metavar="TABLE", help="token table directory (with _manifest.json)")
    parser.add_argument(
        "--render",
        type=int,
        default=0,
        metavar="N",
        help="detokenize the first N samples and draw them as PNGs (text is printed)",
    )
    parser.add_argument("--out", metavar="DIR", help="directory for the --render PNGs")
    parser.add_argument(
        "--bins", type=int, default=10, help="bins of the token-length histogram (default 10)"
    )
    parser.add_argument("--examples", type=int, default=3, help="error examples to show (default 3)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object instead")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="first check every shard against the manifest (size, SHA-256); exit 1 on a mismatch",
    )


def _fail(msg: str) -> int:
    print(f"maskloom inspect: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.render < 0:
        return _fail(f"--render must be >= 0, got {args.render}")
    if args.render and not args.out:
        return _fail("--render needs --out DIR for the PNGs")
    if args.bins < 1:
        return _fail(f"--bins must be >= 1, got {args.bins}")
    from maskloom.pipelines.loader import table_lengths

    try:
        table = TokenTable(args.table)
        if args.verify:
            problems = table.verify()
            for p in problems:
                print(f"maskloom inspect: damaged: {p}", file=sys.stderr)
            mb = sum(s["bytes"] for s in table.manifest.shards) / 1e6
            if problems:
                print(f"maskloom inspect: {len(problems)} of {len(table.manifest.shards)} shards do not match "
                      "the manifest; rebuild the table (maskloom preprocess ... --overwrite)", file=sys.stderr)  # fmt: skip
                return 1
            print(
                f"verified {len(table.manifest.shards)} shards ({mb:.1f} MB) against the manifest: all match"
            )
        lengths = table_lengths(table)
        summary = table_summary(table, lengths)
        errors = error_summary(table, max(0, args.examples))
    except (TableError, OSError, pa.ArrowException) as e:
        return _fail(str(e))
    hist = length_histogram(lengths, args.bins)
    if args.json:
        print(json.dumps({**summary, "histogram": hist, "error_summary": errors}, sort_keys=True))
    else:
        print("\n".join(format_summary(summary, hist, errors)))
    if not args.render:
        return 0
    try:
        results = render_samples(table, args.render, args.out)
    except KeyError as e:  # RegistryError: the table's tokenizer is not installed
        return _fail(f"{args.table}: cannot rebuild tokenizer {table.meta['tokenizer']!r}: {e}")
    except OSError as e:
        return _fail(f"{args.out}: {e}")
    failed = 0
    for r in results:
        if "path" in r:
            print(f"rendered {r['id']} -> {r['path']}")
        elif "text" in r:
            print(f"--- {r['id']}\n{r['text']}")
        else:
            failed += 1
            print(f"cannot render {r['id']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
