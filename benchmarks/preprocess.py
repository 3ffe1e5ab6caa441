"""Preprocessing throughput: the Ray pipeline vs a plain single-process loop doing the same work.

Workload (chosen so that a job lasts tens of seconds single-process, like a real corpus, instead of
the ~1-2 s that Ray's fixed start-up of a few seconds could never amortise):

* ``image``: the 3,000 CIFAR-10 JPEGs with the default image tokenizer (``image_size=224``,
  16x16 patches: each 32x32 file is upscaled, decoded and cut into 196 tokens of 768 bytes, like a
  real photo), 150 kB of tokens per input;
* ``audio``: the 2,000 spoken-digit WAVs with the default audio tokenizer (16 kHz Kaldi fbank,
  128 mel bins, 1024 frames, 16x16 patches).

Every input is repeated K times through distinct symlinks in a temporary directory (the sources
de-duplicate by path), K = 8 for images (24,000 inputs) and 21 for audio (42,000), so that the fair
peer below lasts ~20 s on this machine; ``--copies K`` overrides both. (Token tables v2 made shard
writes 10x cheaper and these jobs 2-2.7x shorter; the counts were raised to keep the ~20 s. Session
5's audio fbank took the audio peer from 16.5 to 14 s for 30,000 clips: 15 -> 21 copies. Session
11's audio path without torch decodes a clip in 95 instead of ~225 us: the audio peer went from 30 to
17-18 s; the counts stayed.) ``--modalities audio --copies 63`` is the README's 3x longer audio job (126,000 clips,
~59 s single-process), where Ray's fixed start-up of each actor is amortised as in a real corpus.
Without /work/shared/data, generated files stand in.

Modes, on the same files, each round running all of them back to back (rounds interleave, so load
from other users of the machine hits every mode alike; figures are medians over rounds):

* ``plain``: ``tokenizer(f)`` for every file in this process (decode + tokenize; nothing written);
* ``plain_write`` — **the fair peer**: the same plus packing the records of each shard and writing
  it with ``tables.ShardWriter`` (zstd Parquet row groups, temp name + fsync + rename + directory fsync),
  i.e. the work the pipeline does minus Ray and minus its exactly-once bookkeeping;
* ``plain_write_2`` — **the ceiling of two workers**: ``plain_write`` in two processes at once, each on
  every other file, timed from the moment both are ready (imports done, one file tokenized) until the
  slower one ends: what two cores give this work with no Ray, no start-up and no tail. Two such
  processes slow each other down (memory traffic: a 10 s audio clip is 256 kB of tokens, copied
  and compressed), so this is below 2x;
* ``warm_1``, ``warm_2``: ``preprocess()`` with 1 and 2 tokenizer actors on a Ray already running
  in this process that has run a Ray Data job before (as a cluster that serves jobs): planning, actor
  start-up (process, imports, tokenizer), the shards, commit records, ``_errors.parquet`` and the
  manifest. The first Ray Data job on a Ray starts Ray Data's three detached helper actors (stats,
  autoscaling coordinator, actor locations), each a process importing ``ray.data``: ~4 CPU-s on
  this machine, 2 s of a two-worker job's wall time. A cluster starts them once and keeps them, so
  after each ``ray.init`` here a 16-input job brings them up before the warm modes (until session
  15 the first warm mode of every round paid for them; ``cold_*`` still does);
* ``cold_1``, ``cold_2``: the same in a fresh Python process where nothing of Ray is imported or
  running: ``import ray``, ``ray.init`` of an embedded Ray, actors, the job and ``ray.shutdown``
  (only the interpreter start and ``import maskloom`` are outside the clock).

Threads: every tokenizing process (the plain loop and each actor) runs torch / OpenMP / BLAS /
Arrow with one intra-op thread (``ray_utils.limit_threads(1)``; an actor reserves one CPU).
Shard size: each pipeline run uses the pipeline's default for its worker count
(``default_shard_size``, with the driver's estimate of an input's cost); ``plain_write`` and
``plain_write_2`` use the single-worker default, estimated the same way once per round (so both
write the same shards).

Figures: inputs/s of each mode; ``overhead_1 = 1 - ray_1 / plain_write`` (target <= 0.15),
``speedup_2 = ray_2 / plain_write`` (target >= 1.6), for warm and cold (and against ``plain`` for
reference; ``*_after_startup``: the same from the moment a worker began its first shard, which a
long job tends to); ``ceiling_speedup_2 = plain_write_2 / plain_write`` and ``<start>_2_of_ceiling =
ray_2 / plain_write_2`` (the share of the 2-core ceiling the pipeline reaches); per run: start-up (until a worker began its first shard) and CPU seconds by process
kind (driver, tokenizer actors inside shards and in total, Ray's other worker processes: Ray Data's
helper actors and idle workers, raylet, gcs_server, other Ray helpers),
``cpus_used`` (CPUs' worth our processes got) and how busy the machine was with other people's
work (``others_busy_cpus``); ``<mode>_cpu_overhead = 1 - cpu(plain_write) / cpu(mode)``: the
share of a run's CPU that is not the peer's work (Ray, start-up, bookkeeping), which does not
depend on the load.
``<start>_2_cpu_bound_speedup = plain_write seconds / (CPU seconds of the two-worker run / 2)``: the
speed-up the run could have reached had it kept both cores busy from start to end with the CPU it
spent; when it is close to ``<start>_speedup_2``, the run was CPU-bound and only less CPU (less
start-up, less overhead per input) makes it faster, not better scheduling.

Caveat (a shared machine): Linux autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
shares the CPUs between *sessions*, and the benchmark, Ray and its workers form one session. While
another session keeps a core busy, two workers get the same share as the single-process loop, and
``speedup_2`` reads ~1 whatever the pipeline does; ``cpus_used`` and ``others_busy_cpus`` show it.

    python benchmarks/preprocess.py [--rounds 3] [--limit N] [--copies K] [--modalities image,audio]
        [--set audio.target_frames=128]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave

DATA = "/work/shared/data"

CASES = {
    # modality: (config, glob under DATA, copies by default)
    "image": ({"image_size": 224, "patch_size": 16}, "images/cifar10/*/*/*.jpg", 8),
    "audio": ({}, "audio/fsdd/*.wav", 21),  # the defaults: 16 kHz, 128 mel bins, 1024 frames
}
MODES = ("plain", "plain_write", "plain_write_2", "warm_1", "warm_2", "cold_1", "cold_2")
TICK = os.sysconf("SC_CLK_TCK")


def generate(modality: str, directory: str, n: int) -> list[str]:
    """Fallback inputs when the shared data is absent: random 32x32 JPEGs or 1 s 8 kHz tones."""
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
            t = np.arange(8000) / 8000
            x = (0.3 * np.sin(2 * np.pi * (200 + 5 * i) * t) * 32767).astype(np.int16)
            with wave.open(p, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(8000)
                w.writeframes(x.tobytes())
        out.append(p)
    return out


def with_copies(files: list[str], copies: int, directory: str) -> list[str]:
    """``copies`` distinct symlinks per file (the pipeline de-duplicates inputs by path)."""
    if copies <= 1:
        return files
    out = []
    for k in range(copies):
        d = os.path.join(directory, f"copy{k}")
        os.makedirs(d, exist_ok=True)
        for i, f in enumerate(files):
            p = os.path.join(d, f"{i:06d}{os.path.splitext(f)[1]}")
            os.symlink(f, p)
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# CPU accounting: this process and all its descendants (Ray's raylet, gcs_server, workers), by kind
# ---------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, start time in clock ticks since boot) of a process, None if it is
    gone. The start time tells a reused pid from the process that had it before."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, int(fields[19])


def _kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return "other_ray"
    if "maskloom_bench_preprocess" in cmd:
        return "plain_processes"  # plain_write_2's two loops
    if "raylet" in comm:
        return "raylet"
    if "gcs_server" in comm:
        return "gcs_server"
    if "MapWorker" in cmd:
        return "workers"  # the tokenizer actors
    if comm.startswith("ray::") or "default_worker.py" in cmd:
        return "other_workers"  # Ray Data's helper actors, idle workers
    return "other_ray"  # log monitor, dashboard/runtime-env agents, ...


def _machine_busy() -> float:
    """CPU seconds the whole machine spent not idle since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK


class CpuMeter:
    """Samples every 0.2 s the CPU time of this process's tree (a process that exits between two
    samples loses its last < 0.2 s). ``root`` is the driver (this process or a cold-run child)."""

    def __init__(self) -> None:
        self.root = os.getpid()
        self._stop = threading.Event()
        # by (pid, start time): a pid reused by a new process during a run is another process (a
        # worker of round 2 took the pid of one gone since round 1: counted against its CPU, the
        # totals of a round came out negative)
        self._last: dict[tuple[int, int], float] = {}
        self._first: dict[tuple[int, int], float] = {}
        self._kinds: dict[tuple[int, int], str] = {}
        self._ignored: set[tuple[int, int]] = set()

    def _sample(self) -> None:
        me = os.getpid()
        snap: dict[int, tuple[int, float, int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (st := _stat(int(name))) is not None:
                snap[int(name)] = st

        def ours(pid: int, depth: int = 0) -> bool:
            """In this process's tree: itself, a process already counted, or a child of one of ours.
            Decided over the whole snapshot, not in /proc's pid order: pids wrap (at 32,768 here),
            and a worker started after the wrap lists before the raylet that started it (until
            2026-12-04 it was then ignored, and a round's warm CPU came out ~1 CPU-s)."""
            if pid == me:
                return True
            if pid not in snap or depth > 64:
                return False
            key = (pid, snap[pid][2])
            if key in self._last:
                return True
            return key not in self._ignored and ours(snap[pid][0], depth + 1)

        for pid, (_, cpu, start) in snap.items():
            key = (pid, start)
            if key in self._ignored:
                continue
            if key not in self._last:
                if not ours(pid):
                    self._ignored.add(key)  # not ours
                    continue
                self._first[key] = 0.0 if self._started else cpu  # new processes: all their CPU
            if self._kinds.get(key) in (None, "other_workers"):  # an idle Ray worker may become an actor
                self._kinds[key] = _kind(pid, self.root)
            self._last[key] = cpu

    def __enter__(self) -> CpuMeter:
        self._started = False
        self._sample()  # processes already running: count from now
        self._started = True
        self._machine0, self._t0 = _machine_busy(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._t0
        self.machine = _machine_busy() - self._machine0

    def set_driver(self, pid: int) -> None:
        self.root = pid

    def report(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, cpu in self._last.items():
            pid = key[0]
            k = "driver" if pid == self.root else self._kinds[key]
            if pid == os.getpid() and self.root != os.getpid():
                k = "benchmark"  # the parent of a cold run (this loop, mostly idle)
            out[k] = out.get(k, 0.0) + cpu - self._first[key]
        ours = sum(out.values())
        out = {k: round(v, 2) for k, v in sorted(out.items())}
        out["total"] = round(ours, 2)
        out["cpus_used"] = round(ours / self.seconds, 2)  # CPUs' worth our processes got on average
        out["others_busy_cpus"] = round(max(0.0, self.machine - ours) / self.seconds, 2)
        return out


# ---------------------------------------------------------------------------------------------
# the modes
# ---------------------------------------------------------------------------------------------
def plain_loop(modality: str, config: dict, files: list[str], write_to: str | None, shard_size: int) -> dict:
    """decode + tokenize every file in this process (one intra-op thread); with ``write_to`` also
    pack and write each shard with ``tables.ShardWriter`` (the pipeline's writer: a row group at a
    time)."""
    from maskloom import tables
    from maskloom.pipelines.ray_utils import limit_threads, restore_threads
    from maskloom.tokenizers.base import TokenizeError, get_tokenizer

    tok = get_tokenizer(modality, config)  # may import torch: limit threads after
    spec = tok.spec()
    meta = tables.table_meta(spec, tokenizer=modality, tokenizer_version=tok.version, config=tok.config_dict(),
                             fingerprint=tok.fingerprint())  # fmt: skip
    old = limit_threads(1)
    rows = tokens = errors = 0
    writer = None
    try:
        with CpuMeter() as m:
            t0 = time.perf_counter()
            for k, f in enumerate(files):
                try:
                    recs = tok(f)
                except TokenizeError:
                    errors += 1
                    recs = []
                rows += len(recs)
                tokens += sum(r.num_tokens for r in recs)
                if write_to:
                    if writer is None:
                        path = os.path.join(write_to, tables.shard_name(k // shard_size))
                        writer = tables.ShardWriter(path, spec, meta)
                    writer.add(recs)
                    if (k + 1) % shard_size == 0 or k + 1 == len(files):
                        writer.close()
                        writer = None
            dt = time.perf_counter() - t0
    finally:
        restore_threads(old)
    return {"seconds": round(dt, 2), "inputs_per_s": round(len(files) / dt, 1), "rows": rows, "tokens": tokens,
            "errors": errors, "shard_size": shard_size if write_to else None, "cpu": m.report()}  # fmt: skip


PAIR = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("maskloom_bench_preprocess", sys.argv[1])
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)
modality, config, files, out, shard_size = json.load(open(sys.argv[2]))
B.plain_loop(modality, config, files[:1], None, 1)  # imports, kernels, page cache of one file
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
r = B.plain_loop(modality, config, files, out, shard_size)
print(json.dumps({"start": t0, "end": time.perf_counter(), "rows": r["rows"], "tokens": r["tokens"],
                  "errors": r["errors"]}), flush=True)
"""


def pair_loop(modality: str, config: dict, files: list[str], out: str, shard_size: int, tmp: str) -> dict:
    """``plain_loop`` with shard writing in two fresh processes at once, each on every other file;
    timed (CLOCK_MONOTONIC, common to both) from the later one's start to the later one's end."""
    procs = []
    for k in range(2):
        args = os.path.join(tmp, f"pair-args-{k}.json")
        with open(args, "w") as f:
            json.dump([modality, config, files[k::2], os.path.join(out, str(k)), shard_size], f)
        procs.append(subprocess.Popen([sys.executable, "-c", PAIR, os.path.abspath(__file__), args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))  # fmt: skip
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("plain_write_2: a process failed before its loop")
        with CpuMeter() as m:
            for p in procs:
                p.stdin.write("go\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("plain_write_2: a process failed")
    finally:
        for p in procs:  # one that failed must not leave the other waiting for its "go"
            if p.poll() is None:
                p.kill()
                p.wait()
    res = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    dt = max(r["end"] for r in res) - max(r["start"] for r in res)
    total = {k: sum(r[k] for r in res) for k in ("rows", "tokens", "errors")}
    return {"seconds": round(dt, 2), "inputs_per_s": round(len(files) / dt, 1), **total,
            "shard_size": shard_size, "cpu": m.report()}  # fmt: skip


def _pipeline_figures(r: dict, wall: float) -> dict:
    r = {"startup_seconds": 0.0, "shard_size": None, "workers": None, "worker_cpu_seconds": 0.0, **r}
    after = wall - r["startup_seconds"]
    return {"seconds": round(wall, 2), "inputs_per_s": round(r["inputs"] / wall, 1),
            "startup_seconds": round(r["startup_seconds"], 2),
            "first_shard_seconds": round(r["first_shard_seconds"], 2),
            "after_startup_inputs_per_s": round(r["inputs"] / after, 1) if after > 0 else None,
            "rows": r["rows"], "tokens": r["tokens"], "errors": r["errors"], "shards": r["shards"],
            "shard_size": r["shard_size"], "workers": r["workers"],
            "table_mb": round(r["bytes"] / 1e6, 1)}  # fmt: skip


def warm_run(modality: str, config: dict, files: list[str], workers: int, out: str) -> dict:
    """``preprocess`` on the Ray already running in this process."""
    import dataclasses

    from maskloom.pipelines.preprocess import preprocess

    with CpuMeter() as m:
        t0 = time.perf_counter()
        r = preprocess(files, modality, config, out, num_workers=workers, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
    res = _pipeline_figures(dataclasses.asdict(r), wall)
    cpu = m.report()
    cpu["workers_in_shards"] = round(getattr(r, "worker_cpu_seconds", 0.0), 2)
    return {**res, "cpu": cpu}


COLD = """
import dataclasses, json, sys, time
import maskloom.tokenizers
from maskloom.pipelines.preprocess import preprocess
files, modality, config, workers, out = json.load(open(sys.argv[1]))
assert "ray" not in sys.modules
t0 = time.perf_counter()
r = preprocess(files, modality, config, out, num_workers=workers, progress=False, overwrite=True)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "result": dataclasses.asdict(r)}))
"""


def cold_run(modality: str, config: dict, files: list[str], workers: int, out: str, tmp: str) -> dict:
    """``preprocess`` in a fresh process: Ray imported, started and shut down inside the clock."""
    args = os.path.join(tmp, "cold-args.json")
    with open(args, "w") as f:
        json.dump([files, modality, config, workers, out], f)
    import maskloom

    root = os.path.dirname(os.path.dirname(os.path.abspath(maskloom.__file__)))  # the maskloom we run
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with CpuMeter() as m:
        proc = subprocess.Popen([sys.executable, "-c", COLD, args], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        m.set_driver(proc.pid)
        stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"cold run failed:\n{stderr[-3000:]}")
    d = json.loads(stdout.strip().splitlines()[-1])
    res = _pipeline_figures(d["result"], d["wall"])
    cpu = m.report()
    cpu["workers_in_shards"] = round(d["result"].get("worker_cpu_seconds", 0.0), 2)
    return {**res, "cpu": cpu}


def _ratios(rnd: dict) -> dict:
    out = {}
    if "plain_write" in rnd:  # CPU cost per input (all our processes), independent of others' load
        cpi = rnd["plain_write"]["cpu"]["total"]
        for m in ("warm_1", "warm_2", "cold_1", "cold_2"):
            if m in rnd and rnd[m]["cpu"]["total"] > 0:
                out[f"{m}_cpu_overhead"] = 1 - cpi / rnd[m]["cpu"]["total"]
        for m in ("warm_2", "cold_2"):  # the most the CPU this run spent allows on 2 cores
            if m in rnd and rnd[m]["cpu"]["total"] > 0:
                cores = min(2, os.cpu_count() or 1)
                out[f"{m}_cpu_bound_speedup"] = rnd["plain_write"]["seconds"] / (
                    rnd[m]["cpu"]["total"] / cores
                )
    for start in ("warm", "cold"):
        for peer in ("plain_write", "plain"):
            sfx = "" if peer == "plain_write" else "_vs_plain"
            if f"{start}_1" in rnd and peer in rnd:
                out[f"{start}_overhead_1{sfx}"] = (
                    1 - rnd[f"{start}_1"]["inputs_per_s"] / rnd[peer]["inputs_per_s"]
                )
            if f"{start}_2" in rnd and peer in rnd:
                out[f"{start}_speedup_2{sfx}"] = rnd[f"{start}_2"]["inputs_per_s"] / rnd[peer]["inputs_per_s"]
    if "plain_write_2" in rnd:  # what two bare processes reach, and the share of it the pipeline gets
        if "plain_write" in rnd:
            out["ceiling_speedup_2"] = (
                rnd["plain_write_2"]["inputs_per_s"] / rnd["plain_write"]["inputs_per_s"]
            )
        for start in ("warm", "cold"):
            if f"{start}_2" in rnd:
                out[f"{start}_2_of_ceiling"] = (
                    rnd[f"{start}_2"]["inputs_per_s"] / rnd["plain_write_2"]["inputs_per_s"]
                )
    if "plain_write" in rnd:  # the same after the actors' start-up (what a long job tends to)
        peer = rnd["plain_write"]["inputs_per_s"]
        for start in ("warm", "cold"):
            one = rnd.get(f"{start}_1", {}).get("after_startup_inputs_per_s")
            two = rnd.get(f"{start}_2", {}).get("after_startup_inputs_per_s")
            if one:
                out[f"{start}_overhead_1_after_startup"] = 1 - one / peer
            if two:
                out[f"{start}_speedup_2_after_startup"] = two / peer
    return out


def _median_dicts(ds: list[dict]) -> dict:
    """Element-wise median of numeric leaves (other leaves: the first round's)."""
    out: dict = {}
    for k, v in ds[0].items():
        vals = [d.get(k) for d in ds]
        if isinstance(v, dict):
            out[k] = _median_dicts([x for x in vals if isinstance(x, dict)])
        elif (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and all(isinstance(x, (int, float)) for x in vals)
        ):
            out[k] = round(statistics.median(vals), 3)
        else:
            out[k] = v
    return out


def main() -> None:
    # keep benchmarks/ off the import path: a script named like a stdlib module there would shadow it
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="at most N files per modality (0 = all)")
    ap.add_argument(
        "--copies", type=int, default=0, help="repeat every file K times via symlinks (0: 8 images, 21 audio)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all modes (medians reported)")
    ap.add_argument("--modalities", default="image,audio")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODALITY.KEY=VALUE",
        help="override a tokenizer setting of a case, e.g. audio.target_frames=128 (repeatable)",
    )
    args = ap.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        modality, dot, name = key.partition(".")
        if not sep or not dot or modality not in CASES:
            ap.error(f"--set {item!r}: expected MODALITY.KEY=VALUE with MODALITY in {sorted(CASES)}")
        try:
            overrides.setdefault(modality, {})[name] = json.loads(value)
        except ValueError:
            overrides.setdefault(modality, {})[name] = value
    modes = args.modes.split(",")

    import shutil

    import maskloom.tokenizers  # noqa: F401

    try:
        from maskloom.pipelines.preprocess import default_shard_size
    except ImportError:  # an older maskloom (fixed shard size 256)

        def default_shard_size(n: int, workers: int, seconds_per_input: float | None = None) -> int:
            return 256

    def peer_shard_size(modality: str, config: dict, files: list[str]) -> int:
        """The shard size a 1-worker pipeline job picks for these files (its cost estimate included)."""
        try:
            from maskloom.pipelines.preprocess import measured_shard_size
            from maskloom.pipelines.sources import Input
            from maskloom.tokenizers.base import get_tokenizer
        except ImportError:  # before session 5: no estimate
            return default_shard_size(len(files), 1)
        return measured_shard_size(get_tokenizer(modality, config), [Input(f) for f in files], 1)

    from maskloom.pipelines.ray_utils import init_ray, shutdown_ray
    from maskloom.tokenizers.base import TOKENIZERS

    result: dict = {"benchmark": "preprocess", "cpus": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0],
                    "rounds": args.rounds,
                    "figures": "inputs/s, medians over rounds; ratios against plain_write (same work without "
                               "Ray) unless *_vs_plain; warm = Ray running before (actor start-up included), "
                               "cold = fresh process (import ray + ray.init + actors + shutdown included)"}  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="maskloom-bench-")
    try:
        for modality in args.modalities.split(","):
            if modality not in TOKENIZERS or modality not in CASES:
                result[modality] = {"skipped": "no tokenizer or no benchmark case"}
                continue
            config, pattern, copies = CASES[modality]
            config = {**config, **overrides.get(modality, {})}
            copies = args.copies or copies
            files = sorted(glob.glob(os.path.join(DATA, pattern)))
            source = "shared-data" if files else "generated"
            if not files:
                files = generate(modality, os.path.join(tmp, f"gen-{modality}"), args.limit or 1000)
            if args.limit:
                files = files[: args.limit]
            files = with_copies(files, copies, os.path.join(tmp, f"copies-{modality}"))
            plain_loop(modality, config, files[:20], None, 1)  # warm the imports and the page cache
            rounds = []
            for k in range(args.rounds):
                rnd: dict = {}
                ray_up = False
                peer_size = None  # the single-worker shard size, estimated once a round
                for mode in modes:
                    out = os.path.join(tmp, f"{modality}-{mode}")
                    shutil.rmtree(out, ignore_errors=True)
                    if mode == "plain":
                        rnd[mode] = plain_loop(modality, config, files, None, 0)
                    elif mode in ("plain_write", "plain_write_2"):
                        peer_size = peer_size or peer_shard_size(modality, config, files)
                        if mode == "plain_write":
                            rnd[mode] = plain_loop(modality, config, files, out, peer_size)
                        else:
                            rnd[mode] = pair_loop(modality, config, files, out, peer_size, tmp)
                    elif mode.startswith("warm"):
                        if not ray_up:
                            ray_up = init_ray(num_cpus=os.cpu_count())
                            # let the new Ray settle (idle workers start), as a running cluster
                            time.sleep(3.0)
                            first = os.path.join(tmp, "first-job")  # Ray Data's helpers, as on a cluster
                            warm_run(modality, config, files[:16], 1, first)
                            shutil.rmtree(first, ignore_errors=True)
                            time.sleep(2.0)  # that job's actor exits
                        rnd[mode] = warm_run(modality, config, files, int(mode[-1]), out)
                    else:
                        rnd[mode] = cold_run(modality, config, files, int(mode[-1]), out, tmp)
                    if ray_up and not any(m.startswith("warm") for m in modes[modes.index(mode) + 1 :]):
                        shutdown_ray(ray_up)  # the other modes want the machine without an idle Ray
                        ray_up = False
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"{modality} round {k}: {mode} {rnd[mode]['inputs_per_s']}/s", file=sys.stderr)
                rnd["ratios"] = _ratios(rnd)
                print(f"{modality} round {k}: {json.dumps({a: round(b, 3) for a, b in rnd['ratios'].items()})}",
                      file=sys.stderr)  # fmt: skip
                rounds.append(rnd)
            med = _median_dicts(rounds)
            result[modality] = part = {
                "data": source, "files": len(files), "copies": copies, "config": config, **{m: med[m] for m in modes},
                "ratios_median": med["ratios"],
                "ratios_per_round": [{k: round(v, 3) for k, v in r["ratios"].items()} for r in rounds],
                "targets": {"overhead_1": "<= 0.15", "speedup_2": ">= 1.6"},
            }  # fmt: skip
            print(json.dumps({modality: part}), file=sys.stderr)  # in case a later modality is cut short
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
