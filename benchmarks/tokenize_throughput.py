"""Tokenizer throughput: decode-only (``tokenizer.read``) vs decode + tokenize (``tokenizer(source)``).

For every registered modality tokenizer, on the same input files, in one process: samples/s and
MB/s of reading alone and of reading + tokenizing, and their ratio (decode-only time over
decode+tokenize time; 1.0 means tokenizing is free). The target is a ratio >= 0.8 for image, audio
and video: tokenizing should cost little next to decoding the file. Times are sums over the inputs
of each input's best time over ``--repeat`` passes (robust to a busy machine);
``whole_pass_ratio`` is the same ratio from the best whole passes.

Inputs are the real datasets in /work/shared/data when present (CIFAR-10 JPEGs, FSDD WAVs, video
clips, point clouds, TU graphs, ETTh1/UCR, SMS spam + tiny Shakespeare), otherwise (or when none
of a modality's real files tokenizes) the generated demo data (``maskloom.demo_data``). A modality
whose tokenizer is not registered is reported as skipped.

The image row tokenizes at the data's native size (``image_size`` = the first image's shorter side,
rounded down to a multiple of the patch size: 32 for CIFAR-10, 64 for the demo shapes), so that it
measures patching rather than resampling; the ``image@224_upscaled`` row keeps the default
``image_size=224``, where the bicubic 32 -> 224 upscale (Pillow) dominates. Likewise the audio row
pads to the target length AudioMAE uses for clips of the data's length (FSDD's spoken digits: 128
frames, as AudioMAE's Speech Commands), and the ``audio@1024_frames`` row keeps the AudioSet default
of 10 s, which writes 19 frames of padding for every real frame of a 0.5 s clip.

torch, OpenMP/BLAS, Arrow and Hugging Face tokenizers get ``--threads`` threads (default 1, as in a
1-CPU preprocessing worker: ``ray_utils.limit_threads``); on a shared machine more threads mostly
add contention.

    .venv/bin/python benchmarks/tokenize_throughput.py [--data DIR|demo] [--limit 200] [--repeat 4]
        [--threads 1] [--modalities image audio ...]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

MODALITIES = ("image", "video", "audio", "point_cloud", "graph", "time_series", "text")
TARGET = {"image": 0.8, "audio": 0.8, "video": 0.8}
REAL_PATHS = {  # modality -> paths under the data root (files, or directories walked for the extensions)
    "image": ["images/cifar10/train"],
    "video": ["video"],
    "audio": ["audio/fsdd"],
    "point_cloud": ["point_clouds"],
    "graph": ["graphs/ENZYMES"],  # a TU folder is one source (600 graphs); one dataset per fitted tokenizer
    "time_series": ["time_series/ETTh1.csv", "time_series/ucr"],
    "text": ["text/sms_spam.tsv", "text/tinyshakespeare.txt"],
}
DEMO_PATHS = {
    "image": ["image"],
    "video": ["video"],
    "audio": ["audio"],
    "point_cloud": ["point_cloud"],
    "graph": ["graph/DEMO"],
    "time_series": ["time_series"],
    "text": ["text/docs.jsonl"],
}
DIR_SOURCES = {"graph"}  # tokenizers whose source is a dataset folder
CONFIGS: dict[str, dict[str, Any]] = {"text": {"text_column": "sms"}}  # SMS Spam: `Label<TAB>SMS`
NATIVE_SIZE = {"image", "audio"}  # modalities whose main row fits the data's size (see _native_config)
EXTRA = {  # name -> (modality, config, data): further rows; data "same" = the modality's own files
    "image@224_upscaled": ("image", {"image_size": 224}, "same"),  # the default size: 32 -> 224 bicubic
    "audio@1024_frames": ("audio", {"target_frames": 1024}, "same"),  # the default: 10 s (AudioSet)
    "point_cloud@demo": ("point_cloud", None, "demo"),  # the real scans here have 50-100 points; demo: 1024
}
SKIP_NAMES = ("semantic_mask", "labels")  # per-point label files beside the real scans, not point clouds


def _walk(path: str, extensions: tuple[str, ...]) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        out += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(extensions) and not f.startswith(SKIP_NAMES)
        ]
    return out


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _spread(paths: list[str], limit: int) -> list[str]:
    """At most ``limit`` paths, evenly spaced over the sorted list (so every class folder is sampled)."""
    if len(paths) <= limit:
        return paths
    idx = np.linspace(0, len(paths) - 1, limit).round().astype(int)
    return [paths[i] for i in idx]


def _sources(modality: str, root: str, rel: list[str], extensions: tuple[str, ...], limit: int) -> list[str]:
    found: list[str] = []
    for r in rel:
        p = os.path.join(root, r)
        if not os.path.exists(p):
            continue
        found += [p] if modality in DIR_SOURCES else _walk(p, extensions)
    return _spread(found, limit)


def _native_config(modality: str, sources: list[str]) -> dict[str, Any]:
    """Config overrides that fit the tokenizer to the data, as a user would set them.

    * images: ``image_size`` = the first readable image's shorter side rounded down to a multiple of
      the patch size (no resampling);
    * audio: ``target_frames`` by AudioMAE's per-dataset rule (``main_finetune_as.py``: 1024 frames for
      10 s AudioSet clips, 512 for 5 s ESC-50, 128 for 1 s Speech Commands): the frames of the 99th
      percentile clip, rounded up to a power of two (FSDD's spoken digits, 0.98 s: 128), instead of
      the AudioSet default, which pads a 0.5 s clip with 19 times its length.
    """
    if modality not in NATIVE_SIZE:
        return {}
    if modality == "audio":
        import soundfile as sf

        from maskloom.tokenizers.audio import AudioConfig

        c = AudioConfig()
        seconds = []
        for s in sources:
            try:
                seconds.append(sf.info(s).duration)
            except (RuntimeError, sf.LibsndfileError):
                continue
        if not seconds:
            return {}
        frames = float(np.percentile(seconds, 99)) * 1000.0 / c.frame_shift_ms
        return {"target_frames": max(c.patch_size, 1 << max(0, math.ceil(frames) - 1).bit_length())}
    from PIL import Image

    from maskloom.tokenizers.image import ImageConfig

    p = ImageConfig().patch_size
    for s in sources:
        try:
            with Image.open(s) as img:
                return {"image_size": max(p, min(img.size) // p * p)}
        except OSError:
            continue
    return {}


def _phase(seconds: float, n: int, nbytes: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 4),
        "samples_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "mb_per_s": round(nbytes / 1e6 / seconds, 3) if seconds > 0 else None,
    }


def bench_modality(
    modality: str, sources: list[str], repeat: int, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Measure one tokenizer on ``sources``; files it rejects are counted and left out of the timing."""
    from maskloom.tokenizers import TokenizeError, get_tokenizer

    tok = get_tokenizer(modality, config if config is not None else CONFIGS.get(modality))
    out: dict[str, Any] = {"status": "ok", "config": tok.config_dict()}
    if tok.needs_fit:
        t0 = time.perf_counter()
        try:
            tok.fit(sources)
        except TokenizeError as e:
            return {**out, "status": "failed", "errors": {e.kind: {"count": 1, "first": f"fit: {e}"}}}
        out["fit_seconds"] = round(time.perf_counter() - t0, 4)
    ok, errors = [], {}
    records = tokens = 0
    for s in sources:  # warm-up pass: which inputs tokenize, and how many records/tokens they give
        try:
            recs = tok(s)
        except TokenizeError as e:
            errors.setdefault(e.kind, []).append(f"{os.path.basename(e.source)}: {e.reason}")
            continue
        ok.append(s)
        records += len(recs)
        tokens += sum(r.num_tokens for r in recs)
    out.update(inputs=len(sources), ok_inputs=len(ok), records=records, tokens=tokens)
    if errors:
        out["errors"] = {k: {"count": len(v), "first": v[0]} for k, v in errors.items()}
    if not ok:
        out["status"] = "failed"
        return out
    nbytes = sum(_size(s) for s in ok)
    # Every input is timed on its own, read then read + tokenize, and keeps its best time over the
    # passes: a pause on a shared machine (another process scheduled in) spoils one input's time in
    # one pass, not a whole pass, so the sums of per-input minima are stable where best-of-N whole
    # passes are not. The whole-pass best times are reported too.
    n = len(ok)
    read_t, full_t = np.full(n, np.inf), np.full(n, np.inf)
    pass_r, pass_f = [], []
    clock = time.perf_counter
    for k in range(repeat):
        pr = pf = 0.0
        for i, s in enumerate(ok):  # which phase goes first alternates: the second one finds caches warm
            if k % 2 == 0:
                t0 = clock()
                tok.read(s)
                t1 = clock()
                tok(s)
                t2 = clock()
                dr, df = t1 - t0, t2 - t1
            else:
                t0 = clock()
                tok(s)
                t1 = clock()
                tok.read(s)
                t2 = clock()
                dr, df = t2 - t1, t1 - t0
            read_t[i], full_t[i] = min(read_t[i], dr), min(full_t[i], df)
            pr, pf = pr + dr, pf + df
        pass_r.append(pr)
        pass_f.append(pf)
    r, f = float(read_t.sum()), float(full_t.sum())
    out["whole_pass_ratio"] = round(min(pass_r) / min(pass_f), 3)
    out["bytes"] = nbytes
    out["decode"] = _phase(r, len(ok), nbytes)
    out["decode_tokenize"] = {
        **_phase(f, len(ok), nbytes),
        "records_per_s": round(records / f, 2),
        "tokens_per_s": round(tokens / f, 1),
    }
    out["ratio"] = round(r / f, 3)
    if modality in TARGET:
        out["target"] = TARGET[modality]
        out["meets_target"] = bool(out["ratio"] >= TARGET[modality])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", default="/work/shared/data", help="data root, or 'demo' to use generated demo data only"
    )
    p.add_argument("--limit", type=int, default=200, help="most inputs per modality (default 200)")
    p.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="timed passes; each input keeps its best time (default 4: two with each phase first)",
    )
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of torch, BLAS, Arrow, HF tokenizers (default 1, as a 1-CPU Ray worker; 0: defaults)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import torch

    if args.threads > 0:  # as in a Ray worker: torch, OpenMP/BLAS, Arrow, Hugging Face tokenizers
        from maskloom.pipelines.ray_utils import limit_threads

        limit_threads(args.threads)

    result: dict[str, Any] = {
        "benchmark": "tokenize",
        "limit": args.limit,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "modalities": {},
    }
    try:
        from maskloom.tokenizers import TOKENIZERS

        registered = set(TOKENIZERS.names())
    except Exception as e:  # a broken tokenizer module breaks the package import: report, don't crash
        result["error"] = f"importing maskloom.tokenizers failed: {type(e).__name__}: {e}"
        print(json.dumps(result, indent=1))
        return 1
    real_root = None if args.data == "demo" or not os.path.isdir(args.data) else args.data
    demo_root: str | None = None

    def demo() -> str:
        nonlocal demo_root
        if demo_root is None:
            from maskloom.demo_data import write_demo_data

            demo_root = tempfile.mkdtemp(prefix="maskloom-bench-")
            write_demo_data(demo_root, seed=0, per_class=max(1, args.limit // 4))
        return demo_root

    def _bench(m: str, srcs: list[str]) -> dict[str, Any]:
        native = _native_config(m, srcs)
        config = {**CONFIGS.get(m, {}), **native} if native else None
        return bench_modality(m, srcs, args.repeat, config)

    def _run(m: str, ext: tuple[str, ...]) -> dict[str, Any]:
        if real_root is not None:
            srcs = _sources(m, real_root, REAL_PATHS[m], ext, args.limit)
            if srcs:
                entry = {"data": "real", **_bench(m, srcs)}
                if entry["status"] == "ok":
                    return entry
                return {
                    "data": "demo",
                    "real_data_failed": entry.get("errors"),
                    **_bench(m, _sources(m, demo(), DEMO_PATHS[m], ext, args.limit)),
                }
        return {"data": "demo", **_bench(m, _sources(m, demo(), DEMO_PATHS[m], ext, args.limit))}

    for m in args.modalities:
        if m not in registered:
            result["modalities"][m] = {"status": "skipped", "reason": f"no tokenizer registered for {m!r}"}
            continue
        ext = TOKENIZERS.get(m).extensions
        t0 = time.perf_counter()
        try:
            entry = _run(m, ext)
        except Exception as e:  # a tokenizer bug (not a TokenizeError): report it, go on with the others
            entry = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}
        entry["wall_seconds"] = round(time.perf_counter() - t0, 2)
        result["modalities"][m] = entry
        print(f"{m}: {entry.get('ratio')}", file=sys.stderr)
    for name, (m, cfg, where) in EXTRA.items():
        if m in args.modalities and m in registered and result["modalities"][m].get("status") == "ok":
            data = result["modalities"][m]["data"] if where == "same" else "demo"
            if data == "demo" and result["modalities"][m]["data"] == "demo" and cfg is None:
                continue  # the same as the main row
            root = real_root if data == "real" else demo()
            paths = (REAL_PATHS if data == "real" else DEMO_PATHS)[m]
            srcs = _sources(m, root, paths, TOKENIZERS.get(m).extensions, args.limit)
            config = {**CONFIGS.get(m, {}), **(cfg or {})}
            try:
                result["modalities"][name] = {"data": data, **bench_modality(m, srcs, args.repeat, config)}
            except Exception as e:
                result["modalities"][name] = {"status": "crashed", "error": f"{type(e).__name__}: {e}"}
    met = {m: e.get("meets_target") for m, e in result["modalities"].items() if "meets_target" in e}
    result["summary"] = {
        "ratios": {m: e.get("ratio") for m, e in result["modalities"].items()},
        "targets_met": met,
        "skipped": [m for m, e in result["modalities"].items() if e["status"] == "skipped"],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
