"""Preprocessing throughput: the Ray pipeline vs a plain single-process decode+tokenize loop.

For each modality with many input files (images: CIFAR-10 JPEGs, audio: spoken digits), on the
same files and in the same run:

* ``plain``: ``for f in files: tokenizer(f)`` in this process (decode + tokenize, nothing written;
  one torch thread, like a 1-CPU Ray actor); ``plain_write``: the same plus packing and writing
  the same zstd Parquet shards (equal output, no Ray);
* ``ray_1``, ``ray_2``: ``maskloom.pipelines.preprocess`` with one and two tokenizer actors on an
  embedded Ray started once before timing (end to end: planning, actor start-up, tokenizing,
  writing zstd Parquet shards, commit records, manifest).

Figures: inputs/s of each, ``overhead_1 = 1 - ray_1 / plain`` (target <= 0.15) and
``speedup_2 = ray_2 / plain`` (target >= 1.6 for images and audio on 2 cores), plus the same
ratios against ``plain_write`` and on steady-state throughput (excluding the time to the first committed shard, i.e. actor
start-up). Uses /work/shared/data when present, else generated files. Prints one JSON object.

    python benchmarks/preprocess.py [--limit N] [--modalities image,audio]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import wave

DATA = "/work/shared/data"

CASES = {
    # modality: (config, glob under DATA, generator for the fallback)
    "image": ({"image_size": 32, "patch_size": 4}, "images/cifar10/*/*/*.jpg"),
    "audio": ({"sample_rate": 8000, "target_frames": 128, "num_mel_bins": 128}, "audio/fsdd/*.wav"),
}


def generate(modality: str, directory: str, n: int) -> list[str]:
    """Fallback inputs when the shared data is absent: random 32x32 JPEGs or 0.5 s 8 kHz tones."""
    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    out = []
    for i in range(n):
        if modality == "image":
            from PIL import Image

            p = os.path.join(directory, f"{i:05d}.jpg")
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p, quality=90)
        else:
            p = os.path.join(directory, f"{i:05d}.wav")
            t = np.arange(4000) / 8000
            x = (0.3 * np.sin(2 * np.pi * (200 + 5 * i) * t) * 32767).astype(np.int16)
            with wave.open(p, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(8000)
                w.writeframes(x.tobytes())
        out.append(p)
    return out


def _one_thread() -> int | None:
    """Give the plain loop one intra-op thread, as Ray gives each 1-CPU actor (OMP_NUM_THREADS=1)."""
    if "torch" not in sys.modules:
        return None
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    return n


def _restore_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def plain_loop(
    modality: str, config: dict, files: list[str], write_to: str | None = None, shard_size: int = 0
) -> dict:
    """decode + tokenize every file in this process; with ``write_to`` also pack and write the same
    zstd Parquet shards as the pipeline (equal work, no Ray)."""
    from maskloom import tables
    from maskloom.tokenizers.base import get_tokenizer

    tok = get_tokenizer(modality, config)
    spec = tok.spec()
    meta = tables.table_meta(spec, tokenizer=modality, tokenizer_version=tok.version, config=tok.config_dict(),
                             fingerprint=tok.fingerprint())  # fmt: skip
    threads = _one_thread()
    t0 = time.perf_counter()
    rows = tokens = errors = 0
    pending = []
    for k, f in enumerate(files):
        try:
            recs = tok(f)
        except ValueError:
            errors += 1
            recs = []
        rows += len(recs)
        tokens += sum(r.num_tokens for r in recs)
        if write_to:
            pending.extend(recs)
            if (k + 1) % shard_size == 0 or k + 1 == len(files):
                name = tables.shard_name(k // shard_size)
                tables.write_shard(os.path.join(write_to, name), tables.records_to_arrow(pending, spec, meta))
                pending = []
    dt = time.perf_counter() - t0
    _restore_threads(threads)
    return {"seconds": round(dt, 3), "inputs_per_s": round(len(files) / dt, 1), "rows": rows, "tokens": tokens,
            "errors": errors}  # fmt: skip


def pipeline(modality: str, config: dict, files: list[str], workers: int, shard_size: int, tmp: str) -> dict:
    from maskloom.pipelines.preprocess import preprocess

    out = os.path.join(tmp, f"{modality}-{workers}")
    r = preprocess(files, modality, config, out, num_workers=workers, shard_size=shard_size, progress=False,
                   overwrite=True)  # fmt: skip
    after_first = r.seconds - r.first_shard_seconds
    steady = (r.inputs - shard_size) / after_first if after_first > 0 else float("nan")
    return {"seconds": round(r.seconds, 3), "inputs_per_s": round(r.throughput, 1),
            "first_shard_seconds": round(r.first_shard_seconds, 3), "steady_inputs_per_s": round(steady, 1),
            "rows": r.rows, "tokens": r.tokens, "errors": r.errors, "table_mb": round(r.bytes / 1e6, 2)}  # fmt: skip


def main() -> None:
    # benchmarks/ holds a tokenize.py that would shadow the standard library's (script dir is on sys.path)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="at most N files per modality (0 = all)")
    ap.add_argument("--modalities", default="image,audio")
    ap.add_argument("--shards", type=int, default=24, help="shards per run")
    args = ap.parse_args()

    import maskloom.tokenizers  # noqa: F401
    from maskloom.pipelines.ray_utils import init_ray, shutdown_ray
    from maskloom.tokenizers.base import TOKENIZERS

    result: dict = {"benchmark": "preprocess", "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    tmp = tempfile.mkdtemp(prefix="maskloom-bench-")
    started = init_ray(num_cpus=os.cpu_count())
    try:
        for modality in args.modalities.split(","):
            if modality not in TOKENIZERS or modality not in CASES:
                result[modality] = {"skipped": "no tokenizer or no benchmark case"}
                continue
            config, pattern = CASES[modality]
            files = sorted(glob.glob(os.path.join(DATA, pattern)))
            source = "shared-data" if files else "generated"
            if not files:
                files = generate(modality, os.path.join(tmp, f"gen-{modality}"), args.limit or 1000)
            if args.limit:
                files = files[: args.limit]
            shard_size = max(1, -(-len(files) // args.shards))
            plain_loop(modality, config, files[:20])  # warm the page cache and imports
            plain = plain_loop(modality, config, files)
            plain_w = plain_loop(modality, config, files, os.path.join(tmp, f"plain-{modality}"), shard_size)
            r1 = pipeline(modality, config, files, 1, shard_size, tmp)
            r2 = pipeline(modality, config, files, 2, shard_size, tmp)
            p, pw = plain["inputs_per_s"], plain_w["inputs_per_s"]
            result[modality] = {
                "data": source, "files": len(files), "config": config, "shard_size": shard_size,
                "plain": plain, "plain_write": plain_w, "ray_1": r1, "ray_2": r2,
                "overhead_1": round(1 - r1["inputs_per_s"] / p, 3),
                "speedup_2": round(r2["inputs_per_s"] / p, 3),
                "steady_overhead_1": round(1 - r1["steady_inputs_per_s"] / p, 3),
                "steady_speedup_2": round(r2["steady_inputs_per_s"] / p, 3),
                "overhead_1_vs_plain_write": round(1 - r1["inputs_per_s"] / pw, 3),
                "speedup_2_vs_plain_write": round(r2["inputs_per_s"] / pw, 3),
                "steady_overhead_1_vs_plain_write": round(1 - r1["steady_inputs_per_s"] / pw, 3),
                "steady_speedup_2_vs_plain_write": round(r2["steady_inputs_per_s"] / pw, 3),
                "targets": {"overhead_1": "<= 0.15", "speedup_2": ">= 1.6"},
            }  # fmt: skip
            print(f"{modality}: done", file=sys.stderr)
    finally:
        shutdown_ray(started)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
