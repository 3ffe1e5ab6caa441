# ruff: noqa: E402
"""Text corpus files at scale: memory and time of streaming a big JSONL, printed as one JSON object.

A corpus file of ``--mb`` MB (default 150) is made from the shared data's real text (the SMS Spam
Collection's messages and Tiny Shakespeare's paragraphs, shuffled with a fixed seed, one JSON object
per line with a label), plus the same file gzipped. The vocabulary is fitted once (``fit``, timed, in
its own process: the default ``fit_max_bytes`` budget). Then each mode runs in a fresh process
that loads the vocabulary and measures its peak resident memory above what the process held before
reading (``/proc/self/status`` VmHWM, reset with ``clear_refs``):

* ``materialized`` (the peer): ``tok(path)``, every record of the file held at once, as the pipeline
  read every input before it streamed (before 2026-12-04, session 23);
* ``stream``: ``tok.iter_records(path)``, counting records without keeping them;
* ``stream_gz``: the same on the ``.jsonl.gz``;
* ``shard``: ``tokenize_shard`` (the pipeline's worker side: validation, the shard writer and its row
  groups) on the file.

Ratios are taken within the run: ``stream_memory_vs_materialized`` (target <= 0.1) and
``stream_time_vs_materialized``. Needs /work/shared/data/text (else it says so and exits 0).

    .venv/bin/python benchmarks/text_stream.py [--mb 150]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # keep benchmarks/ off the import path (script names may shadow stdlib modules)

import argparse
import gzip
import json
import random
import shutil
import subprocess
import tempfile
import time

DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "text"
)
MODES = ("materialized", "stream", "stream_gz", "shard")


def documents() -> list[tuple[str, str]]:
    """(text, label) of the shared data's real text: SMS messages (ham/spam), Shakespeare paragraphs."""
    docs = []
    with open(os.path.join(DATA, "sms_spam.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            label, _, text = line.rstrip("\n").partition("\t")
            if text:
                docs.append((text, label))
    with open(os.path.join(DATA, "tinyshakespeare.txt"), encoding="utf-8") as f:
        docs += [(p, "play") for p in f.read().split("\n\n") if p.strip()]
    return docs


def make_corpus(path: str, mb: int) -> int:
    """A JSONL file of about ``mb`` MB of the shared documents, shuffled (seed 0); its line count."""
    docs = documents()
    rng = random.Random(0)
    lines = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mb * 1e6:
            rng.shuffle(docs)
            for text, label in docs:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
                lines += 1
    return lines


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def child(mode: str, path: str, art: str, out: str) -> None:
    """One mode in this (fresh) process; prints {seconds, records, peak_mb_over_baseline}."""
    import maskloom.tokenizers  # noqa: F401
    from maskloom.tokenizers.base import get_tokenizer

    tok = get_tokenizer("text", None)
    if mode == "fit":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _hwm_kb()
        t0 = time.perf_counter()
        tok.fit([path])
        dt = time.perf_counter() - t0
        tok.save_artifacts(art)
        print(
            json.dumps({"seconds": round(dt, 2), "peak_mb_over_baseline": round((_hwm_kb() - base) / 1e3, 1)})
        )
        return
    tok.load_artifacts(art)
    if mode == "shard":
        from maskloom import tables
        from maskloom.pipelines.preprocess import plan_shards, tokenize_shard
        from maskloom.pipelines.sources import Input

        meta = tables.table_meta(tok.spec(), tokenizer="text", tokenizer_version=tok.version,
                                 config=tok.config_dict(), fingerprint=tok.fingerprint(),
                                 label_names=tok.label_names())  # fmt: skip
        (shard,) = plan_shards([Input(path)], "bench", 1)
    with open("/proc/self/clear_refs", "w") as f:  # peak resident memory from here
        f.write("5")
    base = _hwm_kb()
    t0 = time.perf_counter()
    if mode == "materialized":
        records = len(tok(path))
    elif mode in ("stream", "stream_gz"):
        records = sum(1 for _ in tok.iter_records(path))
    else:
        records = tokenize_shard(tok, shard, out, meta)["shard"]["rows"]
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": round(dt, 2), "records": records,
                      "peak_mb_over_baseline": round((_hwm_kb() - base) / 1e3, 1)}))  # fmt: skip


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=150, help="size of the generated JSONL corpus file (MB)")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "PATH", "ARTIFACTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if not os.path.isdir(DATA):
        print(json.dumps({"benchmark": "text_stream", "skipped": f"no shared data at {DATA}"}))
        return
    tmp = tempfile.mkdtemp(prefix="maskloom-text-stream-")
    try:
        path = os.path.join(tmp, "corpus.jsonl")
        lines = make_corpus(path, args.mb)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        art = os.path.join(tmp, "artifacts")
        result: dict = {"benchmark": "text_stream", "cpus": os.cpu_count(), "file_mb": round(os.path.getsize(path) / 1e6, 1),
                        "gz_mb": round(os.path.getsize(path + ".gz") / 1e6, 1), "lines": lines,
                        "fit": run_child("fit", path, art, "-")}  # fmt: skip
        for mode in MODES:
            result[mode] = run_child(mode, path + ".gz" if mode == "stream_gz" else path, art,
                                     os.path.join(tmp, "out"))  # fmt: skip
            print(f"{mode}: {result[mode]}", file=sys.stderr)
        m, s = result["materialized"], result["stream"]
        assert len({result[k]["records"] for k in MODES}) == 1, "the modes made different numbers of records"
        result["ratios"] = {
            "stream_memory_vs_materialized": round(s["peak_mb_over_baseline"] / m["peak_mb_over_baseline"], 3),
            "stream_time_vs_materialized": round(s["seconds"] / m["seconds"], 3),
            "shard_memory_vs_materialized": round(result["shard"]["peak_mb_over_baseline"] / m["peak_mb_over_baseline"], 3),
        }  # fmt: skip
        result["targets"] = {"stream_memory_vs_materialized": "<= 0.1"}
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
