"""Raw files -> a sharded token table with Ray Data: resumable, exactly-once, errors as rows.

The job reads top to bottom (the Ray Data pattern: items -> ``map_batches(Actor)`` -> write):

1. **plan**    sorted inputs are cut into shards of ``shard_size`` inputs (by default ~8 shards per
               worker and ~0.5 s of work as the driver measures it on a few inputs, 32-4096 inputs:
               ``default_shard_size``); a shard's id hashes its
               inputs (and labels) with the tokenizer fingerprint (and the fitted artifacts), so a
               rerun plans exactly the same shards and file names.
2. **fit**     a tokenizer that learns from the corpus (``needs_fit``) is fitted on the driver and
               its artifacts written to ``artifacts/`` first; workers load them.
3. **map**     ``ray.data.from_items(shard specs)`` -> ``map_batches(TokenizeShardActor,
               compute=ActorPoolStrategy)``: each actor builds its tokenizer once (intra-op
               threads capped to its CPUs; two shards in flight per actor, the one it works on and
               the next, so that it never waits for the scheduler and none hoards shards at the end
               of the job); per shard it
               tokenizes every input (a bad input becomes an error row, never a dead job), writes
               the shard a row group at a time under a temporary name and renames it atomically
               to its deterministic name, then writes a commit record
               ``_commits/<shard_id>.json`` (atomically, after the shard); a shard that runs
               for more than a second reports how far it got (``ShardProgress``) for the driver's
               bar, which counts inputs. With ``num_workers=0``
               the driver runs the same ``tokenize_shard`` over the shards itself, without Ray
               (small jobs, which Ray's start-up of seconds would dominate; debugging a tokenizer).
4. **commit**  the driver checks the accounting (inputs = distinct sources written + error rows),
               writes ``_errors.parquet`` and, last, ``_manifest.json``. Readers open a table
               through its manifest only, so an unfinished table is invisible.

Exactly-once: a retried shard (Ray restarts a killed actor and retries its task) rewrites the same
file name with the same content, and the manifest lists each planned shard once. An input that
kills its worker on every try (a decoder's segfault) would be retried for ever; the worker notes
which input it is on (``ShardAttempts``), and after two deaths on it the input is an error row. A
rerun after a crash skips shards whose commit record (and file) exist; a rerun of a finished job
does nothing; a changed config or input set never mixes into an existing table unless
``overwrite`` (which rebuilds it) or, for inputs added to a finished table's, ``append`` (which
tokenizes only those, into new shards after its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from maskloom import tables
from maskloom._paths import check_out_dir, make_out_dir
from maskloom._progress import Progress
from maskloom.pipelines._gc import gc_paused
from maskloom.pipelines.ray_utils import (
    init_ray,
    limit_threads,
    quiet_ray_data_bars,
    resources,
    restore_threads,
    shutdown_ray,
)
from maskloom.pipelines.sources import Input, InputSet
from maskloom.tokenizers.base import (
    TOKENIZERS,
    Record,
    SkipReport,
    TokenizeError,
    Tokenizer,
    get_tokenizer,
    guarded_samples,
    reporting_skips,
    special_file,
    split_part,
)

log = logging.getLogger(__name__)

COMMITS = tables.COMMITS
RUN_STATE = tables.RUN_STATE
DEFAULT_SHARD_SIZE = 256
"""Most inputs per shard by default when the cost of an input is not known (see
``TARGET_SHARD_SECONDS``)."""
SHARDS_PER_WORKER = 8
"""The default shard size aims at this many shards per worker (small jobs), so the last shard to
finish (the tail, when the other workers are already idle) is a small part of the job."""
MIN_DEFAULT_SHARD_SIZE = 32
"""Fewest inputs per shard by default: each shard costs a file, two fsyncs, a commit record and a
scheduling round trip (~20 ms), and readers prefer fewer, larger files."""
TARGET_SHARD_SECONDS = 0.5
"""Default shards are sized to about this much tokenizing, as the driver measures it on a few inputs
(``seconds_per_input``): a shard's fixed cost (Ray Data hands an actor its next shard 6-20 ms
after the last one, spikes to 95 ms, plus the file's fsyncs and commit record) is then a few
percent of it, and the tail stays short. At 256 inputs, a shard of 8 kHz spoken digits (0.45 ms
each) took 0.12 s and Ray's per-shard gaps cost two workers 10 % of their time; at 1,024 inputs
(this rule's choice) the 42,000-clip job's overhead fell from 19-20 % to 15-18 % with one worker
and its speed-up rose from 1.21-1.27x to 1.32-1.40x with two (1.65x after start-up). A shard's
memory is one row group (``tables.ShardWriter``) whatever its size."""
MAX_DEFAULT_SHARD_SIZE = 4096
"""Most inputs per shard by default (cheap inputs: a lost shard is redone in a few seconds)."""
BIG_INPUT_BYTES = 16 << 20
"""Inputs whose median size (of a few) reaches this are sized into shards by bytes, not timed."""
TARGET_SHARD_BYTES = 64 << 20
"""Input bytes per default shard of large inputs (at least one input)."""


class PreprocessError(RuntimeError):
    """A job that cannot finish (error rate above the limit, broken accounting); committed shards stay."""


class WriteError(PreprocessError):
    """The table directory refused a write (no space left, no permission, a read-only file system):
    the job stops, as every later shard would fail the same way; committed shards are kept."""


class TableConflictError(PreprocessError):
    """The output directory holds a table or partial job with another config or input set."""


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """One unit of work: a run of consecutive sorted inputs."""

    index: int
    """Position of the shard in the table (manifest order)."""
    shard_id: str
    """Hash of the inputs, labels and tokenizer fingerprint (+ artifacts digest)."""
    inputs: tuple[Input, ...]
    """The inputs, sorted by source."""

    @property
    def name(self) -> str:
        """Deterministic shard file name."""
        return f"part-{self.index:05d}-{self.shard_id}.parquet"

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "shard_id": self.shard_id,
                "inputs": [[i.source, i.label] for i in self.inputs],
            }
        )

    @classmethod
    def from_json(cls, s: str) -> ShardSpec:
        d = json.loads(s)
        return cls(
            index=d["index"], shard_id=d["shard_id"], inputs=tuple(Input(a, b) for a, b in d["inputs"])
        )


@dataclass(frozen=True, kw_only=True)
class PreprocessResult:
    """Summary of one preprocessing run (the table's totals plus what this run did)."""

    out_dir: str
    """The token table directory."""
    inputs: int
    """Inputs of the table (= distinct sources written + error rows)."""
    rows: int
    """Records (samples) in the table."""
    tokens: int
    """Tokens over all records."""
    errors: int
    """Rejected inputs (rows of ``_errors.parquet``)."""
    bytes: int
    """Bytes of the shards written."""
    input_bytes: int
    """Bytes of the raw inputs."""
    shards: int
    """Shards planned."""
    skipped_shards: int
    """Shards already committed by an earlier run and not redone."""
    seconds: float
    """Wall time of this run."""
    throughput: float
    """Inputs processed per second by this run (0 when nothing was to be done)."""
    first_shard_seconds: float = 0.0
    """Wall time until this run's first shard committed (Ray start-up, actor start-up, one shard)."""
    startup_seconds: float = 0.0
    """Wall time until a worker began its first shard (Ray start-up, planning, actor start-up)."""
    workers: int = 0
    """Tokenizer actors of this run (0 when nothing was to be done or it ran in this process)."""
    shard_size: int = 0
    """Inputs per shard of the plan."""
    worker_seconds: float = 0.0
    """Wall time the workers spent inside shards of this run (tokenize + write), summed."""
    worker_cpu_seconds: float = 0.0
    """CPU time the workers spent inside shards of this run, summed."""
    already_done: bool = False
    """True when the table was already finished with the same config and inputs."""
    appended_inputs: int = 0
    """Inputs this run added to a finished table (``append``); its shards: ``appended_shards``; of
    them, ``retried_inputs`` were its error rows (``retry_errors``)."""
    appended_shards: int = 0
    retried_inputs: int = 0
    skipped_parts: dict[str, int] = field(default_factory=dict)
    """Parts of written inputs that their tokenizer skipped ({"samples": 3, "lines": 40}: samples of tar
    shards, lines of JSON Lines files, ...; :class:`maskloom.tokenizers.base.SkipReport`), in
    ``inputs_with_skipped_parts`` inputs. The inputs are written; these parts are not."""
    inputs_with_skipped_parts: int = 0

    def summary(self) -> str:
        """One line: inputs, rows, tokens, errors, bytes, throughput."""
        if self.already_done:
            return (
                f"{self.out_dir}: already finished with this config ({_count(self.inputs, 'input')}, "
                f"{_count(self.rows, 'row')}, {_count(self.tokens, 'token')}, {_count(self.errors, 'error')}, "
                f"{_mb(self.bytes)}); nothing to do"
            )
        skipped = f", {self.skipped_shards}/{self.shards} shards resumed" if self.skipped_shards else ""
        if self.appended_shards:
            resumed = self.skipped_shards - (self.shards - self.appended_shards)
            skipped = (
                f", {_count(self.appended_inputs, 'input')} appended in {_count(self.appended_shards, 'shard')}"
                + (f" ({self.retried_inputs} retried errors)" if self.retried_inputs else "")
                + (f", {resumed} resumed" if resumed else "")
            )
        parts = ""
        if self.skipped_parts:
            parts = f"; skipped inside {_count(self.inputs_with_skipped_parts, 'input')}: " + ", ".join(
                count_parts(n, what) for what, n in self.skipped_parts.items()
            )
        rate = (  # a job of a few big files runs at 0.015 inputs/s, not "0.0"
            f"{self.throughput:.1f}"
            if self.throughput >= 1 or not self.throughput
            else f"{self.throughput:.2g}"
        )
        return (
            f"{_count(self.inputs, 'input')} = {self.inputs - self.errors:,} written + {_count(self.errors, 'error')}; "
            f"{_count(self.rows, 'row')}, {_count(self.tokens, 'token')}, {_mb(self.bytes)} written, "
            f"{rate} inputs/s "
            f"({_mb(self.input_bytes)} read, {self.seconds:.1f} s{skipped}){parts}"
        )


def count_parts(n: int, what: str) -> str:
    """``3 samples``, ``1 sample``, ``1 series`` (``what``, a :class:`SkipReport`'s, is plural)."""
    one = n == 1 and what.endswith("s") and not what.endswith("series")
    return f"{n:,} {what[:-1] if one else what}"


def _count(n: int, noun: str) -> str:
    """``1 error``, ``2 errors``, ``0 errors``, ``12,288 tokens``."""
    return f"{n} {noun}" if n == 1 else f"{n:,} {noun}s"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def shard_key(fingerprint: str, artifacts_digest: str) -> str:
    """What besides its inputs names a shard: the tokenizer fingerprint and its fitted artifacts."""
    return f"{fingerprint}:{artifacts_digest}"


def default_shard_size(num_inputs: int, num_workers: int, seconds_per_input: float | None = None) -> int:
    """Inputs per shard when the user sets none: ``SHARDS_PER_WORKER`` shards per worker for small
    jobs (so the tail shard is short), at most ``TARGET_SHARD_SECONDS`` of work by
    ``seconds_per_input`` (rounded down to a power of two, so that close estimates give the same
    plan; within ``MIN_DEFAULT_SHARD_SIZE``..``MAX_DEFAULT_SHARD_SIZE``) or ``DEFAULT_SHARD_SIZE``
    when it is unknown, at least ``MIN_DEFAULT_SHARD_SIZE`` (per-shard costs) unless the job is
    smaller or its inputs are heavy (then at least ``TARGET_SHARD_SECONDS`` of them: 4 inputs of a
    second each on 2 workers are 4 shards, not one); then, with several workers, evened out so that
    the shards are a multiple of the workers in number and of one size give or take their count
    (each worker gets the same work: no worker idles through the last round while another
    finishes) unless that would take it below that minimum."""
    per = _per_worker_share(num_inputs, num_workers)
    cap = DEFAULT_SHARD_SIZE
    floor = MIN_DEFAULT_SHARD_SIZE
    if seconds_per_input is not None and seconds_per_input > 0:
        fit = min(
            MAX_DEFAULT_SHARD_SIZE, max(MIN_DEFAULT_SHARD_SIZE, TARGET_SHARD_SECONDS / seconds_per_input)
        )
        cap = 1 << (int(fit).bit_length() - 1)  # a power of two
        # heavy inputs (a tar of 1,000 images, a video: a second each) need no minimum of 32 for the
        # per-shard costs to be small: 4 such inputs on 2 workers are 4 shards, not one on one worker
        floor = max(1, min(MIN_DEFAULT_SHARD_SIZE, math.ceil(TARGET_SHARD_SECONDS / seconds_per_input)))
    size = max(1, min(cap, max(per, min(floor, num_inputs))))
    # as many shards as a multiple of the workers, all of one size: with 21 shards on 2 workers one
    # worker would idle through the last shard (a second of a 13 s job); with 22 slightly smaller
    # ones neither does. A count that is a multiple already is evened out too: 42,000 clips in
    # shards of 1,024 were 41 full shards and one of 16, so one worker had a whole shard more to do
    # (0.4 s alone at the end of a 15 s job); 42 shards of 1,000 share the work evenly
    w = max(1, num_workers)
    count = -(-num_inputs // size)
    if w > 1 and count > 1:
        target = count + (-count) % w
        for c in range(target, target + 4 * w, w):  # equal sizes cannot make every count
            even = -(-num_inputs // c)
            if even < min(floor, size):
                break
            if -(-num_inputs // even) % w == 0:
                return even
    return size


def _per_worker_share(num_inputs: int, num_workers: int) -> int:
    """Inputs per shard for ``SHARDS_PER_WORKER`` shards per worker."""
    return -(-num_inputs // (SHARDS_PER_WORKER * max(1, num_workers)))


def _sample(n: int, k: int) -> list[int]:
    """Up to ``k`` evenly spaced indices of ``range(n)``, first and last included."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist())) if n else []


def big_input_bytes(inputs: Sequence[Input], sample: int = 9) -> int:
    """The median size of a few evenly spaced inputs when it is at least ``BIG_INPUT_BYTES``, else 0."""
    sizes = [_size(inputs[i].source) for i in _sample(len(inputs), sample)]
    median = int(np.median(sizes)) if sizes else 0
    return median if median >= BIG_INPUT_BYTES else 0


def measured_shard_size(tokenizer: Tokenizer, inputs: Sequence[Input], num_workers: int) -> int:
    """:func:`default_shard_size` with the cost of an input measured by :func:`seconds_per_input` on one
    thread, as a 1-CPU worker runs (measured only when shards could hold more than the minimum).

    Large inputs (:func:`big_input_bytes`: a text corpus's JSONL shards, Parquet files, long videos)
    are not timed (one could take minutes on the driver) and shards hold ``TARGET_SHARD_BYTES`` of
    them, at least one, and no more than the default share of a worker (so that 40 files of 300 MB
    on two workers are 40 shards, not one of 32 files and one of 8)."""
    big = big_input_bytes(inputs)
    if big:
        size = max(1, min(TARGET_SHARD_BYTES // big, _per_worker_share(len(inputs), num_workers)))
        log.info("inputs are large (~%.0f MB each): %d per shard", big / 1e6, size)
        return size
    spi = None
    # timed when shards could hold more than the minimum, or when several workers share a job that
    # the minimum would put in fewer shards than workers (heavy inputs, see default_shard_size)
    if _per_worker_share(len(inputs), num_workers) > MIN_DEFAULT_SHARD_SIZE or (
        num_workers > 1 and len(inputs) > num_workers and len(inputs) < MIN_DEFAULT_SHARD_SIZE * num_workers
    ):
        old_threads = limit_threads(1)
        try:
            spi = seconds_per_input(tokenizer, inputs)
        finally:
            restore_threads(old_threads)
        log.info(
            "tokenizing takes ~%s per input on the driver", "?" if spi is None else f"{spi * 1e3:.2f} ms"
        )
    return default_shard_size(len(inputs), num_workers, spi)


def seconds_per_input(
    tokenizer: Tokenizer, inputs: Sequence[Input], *, sample: int = 8, budget: float = 0.5
) -> float | None:
    """Median read + tokenize time of up to ``sample`` evenly spaced inputs, after one untimed input
    (lazy set-up: resampling kernels, filterbanks, loading compiled kernels); once ``budget`` seconds
    have passed *after that input* no new input is started but the first timed one.
    None when no sampled input tokenizes (the driver may not see the workers' files).

    The budget starts after the untimed input because that one can outlast it: in a fresh process
    the audio tokenizer's first call loads its numba kernels (0.55 s), and a budget counted from the
    start left one timed input, the second call, itself still 4x slower than the rest (1.1 against
    0.25 ms); the shards came out a quarter of their size (254 instead of 1,000 clips: 166 shards,
    a 42,000-clip job on two workers 22.7 instead of 18 s)."""
    n = len(inputs)
    if n < 2:
        return None
    picks = _sample(n, sample + 1)
    times: list[float] = []
    end = math.inf
    for k, i in enumerate(picks):
        if k > 1 and time.perf_counter() > end:  # at least one timed input
            break
        t0 = time.perf_counter()
        try:
            for _ in _input_records(tokenizer, inputs[i].source):  # as the workers read it, records not kept
                pass
        except Exception:  # noqa: BLE001 - a bad input is the workers' business (an error row)
            continue
        finally:
            if not k:
                end = time.perf_counter() + budget
        if k:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) if times else None


@gc_paused()
def plan_shards(
    inputs: Sequence[Input], key: str, shard_size: int = DEFAULT_SHARD_SIZE, *, first_index: int = 0
) -> list[ShardSpec]:
    """Cut sorted ``inputs`` into shards of ``shard_size``; ids hash each shard's inputs with ``key``
    (the tokenizer fingerprint plus artifacts digest), so equal inputs and config give equal plans.
    Indices (in file names) start at ``first_index`` (after a table's own shards, when appending)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ordered = sorted(inputs, key=lambda i: i.source)
    out = []
    for index, start in enumerate(range(0, len(ordered), shard_size), first_index):
        chunk = tuple(ordered[start : start + shard_size])
        sid = _digest({"key": key, "inputs": [[i.source, i.label] for i in chunk]})
        out.append(ShardSpec(index=index, shard_id=sid, inputs=chunk))
    return out


# ---------------------------------------------------------------------------------------------
# the worker side: one shard
# ---------------------------------------------------------------------------------------------
def _input_records(tokenizer: Tokenizer, source: str) -> Iterator[Record]:
    """``tokenizer.iter_records(source)``, the one way the pipeline reads an input (the workers, and
    the driver timing a few), after refusing an input that is no file (:func:`special_file`) for
    plug-ins that do not call :meth:`Tokenizer.check_file`: a named pipe would block their reader for
    ever, and the pipeline must be able to read an input again."""
    if what := special_file(split_part(source)[0]):
        raise TokenizeError(source, "unsupported", f"not a regular file: {what}")
    return tokenizer.iter_records(source)


def _records(tokenizer: Tokenizer, item: Input, spec: tables.TableSpec) -> Iterator[Record]:
    """read + tokenize one input as a stream (:meth:`Tokenizer.iter_records`), labels applied,
    records validated; raise TokenizeError (or ``_Rejected``: a tokenizer's bug) otherwise, possibly
    after some records. Only the tokenizer's own errors are turned into the input's: what the caller
    does with a record (writing it) raises in the caller's frame, not here."""
    stream = None
    count = 0
    try:
        stream = _input_records(tokenizer, item.source)
        for r in stream:
            if item.label is not None:
                r = dataclasses.replace(r, label=item.label)
            try:
                tables.validate_record(r, spec)
            except tables.TableError as e:
                raise TokenizeError(item.source, "invalid", str(e)) from e
            count += 1
            yield r
    except (TokenizeError, GeneratorExit):
        raise
    except Exception as e:  # a decoder crash or tokenizer bug on one input must not kill the job
        raise _Rejected(item.source, "internal", f"{type(e).__name__}: {e}") from e
    finally:
        if stream is not None and hasattr(stream, "close"):
            stream.close()  # a generator left part-way (an error, or the caller stopping) tidies up now
    if not count:
        raise TokenizeError(item.source, "empty", "the tokenizer produced no samples")


class _Rejected(Exception):
    """An unexpected exception on one input, carried as an error row with kind ``internal``."""

    def __init__(self, source: str, kind: str, reason: str) -> None:
        super().__init__(f"{source}: {kind}: {reason}")
        self.source, self.kind, self.reason = source, kind, reason


INPUT_TIMEOUT_S = 300.0
"""Default seconds an input may go without giving a record in a Ray worker before the worker is ended
(``--input-timeout``)."""

HUNG = "_hung"
"""Folder under ``_commits`` with one record per input that outlived the timeout in a worker."""


def _hung_path(out_dir: str, source: str, sample: int = -1) -> str:
    key = source if sample < 0 else f"{source}#{sample}"
    return os.path.join(
        out_dir,
        COMMITS,
        HUNG,
        hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json",
    )


def _hung(out_dir: str) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """The inputs and samples recorded as hung in ``out_dir`` (one read of the folder):
    ({source: timeout in seconds}, {source of a tar shard: {sample: timeout in seconds}})."""
    folder = os.path.join(out_dir, COMMITS, HUNG)
    inputs: dict[str, float] = {}
    samples: dict[str, dict[int, float]] = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        r = _read_json(os.path.join(folder, name))
        if r is None:
            continue
        if r.get("sample", -1) >= 0:
            samples.setdefault(r["source"], {})[int(r["sample"])] = float(r["seconds"])
        else:
            inputs[r["source"]] = float(r["seconds"])
    return inputs, samples


def _hung_inputs(out_dir: str) -> dict[str, float]:
    """{source: timeout in seconds} of the inputs recorded as hung in ``out_dir``."""
    return _hung(out_dir)[0]


def _hung_samples(out_dir: str) -> dict[str, dict[int, float]]:
    """{source: {sample: timeout in seconds}} of the samples of tar shards recorded as hung."""
    return _hung(out_dir)[1]


class InputWatchdog:
    """Ends its worker process when one input has made no progress for ``timeout`` seconds: no record
    since it began, or since its last record (:meth:`touch`).

    Decoders in C can hang for ever on a damaged file (decord's ``get_batch`` on some MP4s, for
    one); nothing inside the process can stop them, and one such file would stall the whole job.
    A daemon thread checks once a second; past the timeout it records the input under
    ``_commits/_hung/`` and ends the process (``os._exit``). Ray restarts the actor and reruns the
    shard, and :func:`tokenize_shard` turns the recorded input into an error row (kind
    ``corrupt``) instead of decoding it again: the shard is written once, exactly as if the file
    had failed to decode. In a tar shard each sample is watched on its own (:meth:`at_sample`): the
    one that hangs is recorded and skipped, as a sample that does not decode is, and the rest of the
    tar is written. Only for worker processes: ending the calling process (``num_workers=0``) would
    end the user's program."""

    def __init__(self, timeout: float, *, tick: float = 1.0) -> None:
        self.timeout = float(timeout)
        self._current: tuple[str, str, float, int] | None = None  # (out_dir, source, started, sample)
        self._thread = threading.Thread(target=self._watch, args=(min(tick, self.timeout / 4),),
                                        name="maskloom-input-watchdog", daemon=True)  # fmt: skip
        self._thread.start()

    def begin(self, out_dir: str, source: str) -> None:
        """Watch ``source`` from now (until :meth:`end`); plain assignments, no context manager: ~0.2
        instead of ~1.5 us an input, against ~200 us for a spoken-digit clip."""
        self._current = (out_dir, source, time.monotonic(), -1)

    def touch(self) -> None:
        """The input made progress (it gave a record): its time counts from now. An input whose records
        stream (a multi-gigabyte JSONL shard) may take longer than the timeout in all; only a stretch
        without a record is a hang."""
        cur = self._current
        if cur is not None:
            self._current = (cur[0], cur[1], time.monotonic(), cur[3])

    def at_sample(self, sample: int) -> None:
        """The input moved on to its sample ``sample`` (a tar shard's; -1: none): progress, and the
        sample a hang from now is recorded against."""
        cur = self._current
        if cur is not None:
            self._current = (cur[0], cur[1], time.monotonic(), sample)

    def end(self) -> None:
        self._current = None

    def _watch(self, tick: float) -> None:
        while True:
            time.sleep(tick)
            cur = self._current
            if cur is not None and time.monotonic() - cur[2] > self.timeout:
                out_dir, source, _, sample = cur
                path = _hung_path(out_dir, source, sample)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                rec = {
                    "source": source,
                    "seconds": self.timeout,
                    **({"sample": sample} if sample >= 0 else {}),
                }
                tables.atomic_write_bytes(path, json.dumps(rec).encode())
                what = "input" if sample < 0 else "sample"
                log.error("%s%s: no progress for %g s; ending this worker (Ray restarts it and the job goes "
                          "on without this %s)", source, "" if sample < 0 else f": sample {sample}", self.timeout,
                          what)  # fmt: skip
                logging.shutdown()
                os._exit(HUNG_EXIT_CODE)


HUNG_EXIT_CODE = 75
"""Exit status of a worker ended by :class:`InputWatchdog`."""

CRASHES = "_crashes"
"""Folder under ``_commits`` where a Ray worker keeps which input of its shard it is on."""
CRASH_LIMIT = 2
"""Deaths of a worker on one input, in one job, after which that input becomes an error row."""
SHARD_DEATH_LIMIT = 3
"""Deaths of a shard's workers outside any input, in one job, after which the job stops."""
SAMPLE_DEATH_LIMIT = 8
"""Deaths of workers on the samples of one input (a tar shard), in one job, after which the whole
input becomes an error row (each sample that killed its worker ``CRASH_LIMIT`` times is skipped
before that: a decoder that crashes on every sample must not cost a restart per sample for ever)."""


IN_PROCESS_RUN = "in-process"
""":class:`ShardAttempts`'s ``run`` for shards tokenized in the calling process (``num_workers=0``):
deaths there end the run itself, so they are counted across runs."""


class WorkerDeathsError(PreprocessError):
    """A shard's workers kept dying outside any input (writing the shard, not decoding): the job stops."""


class ShardAttempts:
    """Which input of a shard a Ray worker is on, kept where the next try of the shard can read it.

    A decoder that kills its process (a segfault in C, the kernel's OOM killer on a huge input) has
    no chance to raise: Ray restarts the actor and retries the shard, which dies again, for ever (Ray
    Data retries without limit). So before each input the worker writes the input's index to
    ``_commits/_crashes/<shard_id>.pos`` (one 16-byte ``pwrite``, ~0.6 us; the page cache keeps it
    when the process dies), and every try of the shard begins by reading what the try before left:
    an index means that try died on that input. An input on which workers died ``CRASH_LIMIT``
    times in this job becomes an error row (kind ``crashed``) and the shard goes on without it; a
    single death is retried as before, since a worker can be killed for reasons that are not its
    input's. An input of many samples (a tar shard) also notes which sample it is on (the second
    8 bytes, :meth:`at_sample`): a death there counts against that sample, which after
    ``CRASH_LIMIT`` deaths is skipped as a sample that does not decode is (kind ``crashed``, in the
    tar's warning) while the rest of the tar is written; ``SAMPLE_DEATH_LIMIT`` deaths on one
    input's samples make the whole input the error row. Deaths are counted per job (``run``): a
    rerun after the driver ended starts afresh. ``SHARD_DEATH_LIMIT`` deaths outside any input
    (writing the shard) stop the job (:class:`WorkerDeathsError`) instead of retrying for ever. A try
    that ends in Python (an error, Ctrl-C, SIGTERM) is no death: it removes its files. With
    ``num_workers=0`` a crash ends the calling process itself; its runs share one ``run``
    (:data:`IN_PROCESS_RUN`), so each rerun of the command counts the death, names the input (or
    its sample), and the third skips it."""

    _POS = struct.Struct("<qq")  # (input index, sample index within it); -1: on none
    _SAMPLE = struct.Struct("<q")

    def __init__(self, out_dir: str, shard: ShardSpec, run: str) -> None:
        folder = os.path.join(out_dir, COMMITS, CRASHES)
        self.state_path = os.path.join(folder, shard.shard_id + ".json")
        self.pos_path = os.path.join(folder, shard.shard_id + ".pos")
        self.shard = shard
        self.run = run
        self._fd = -1
        self.sample_skips: dict[int, dict[int, int]] = {}
        """{input index: {sample index: deaths}}: the samples not to read again (set by :meth:`begin`)."""

    def begin(self) -> dict[int, int]:
        """Count the death of the try before (if any) and start this one: {input index: deaths} of
        the inputs to skip."""
        state = _read_json(self.state_path)
        if state is None or state.get("run") != self.run:  # none, or an earlier job's: start afresh
            state = {"run": self.run, "deaths": {}, "elsewhere": 0}
        else:  # a try of this job began and did not finish (done() removes the files)
            try:
                with open(self.pos_path, "rb") as f:
                    raw = f.read(self._POS.size)
            except FileNotFoundError:
                raw = b""
            k, sample = self._POS.unpack(raw) if len(raw) == self._POS.size else (-1, -1)
            if 0 <= k < len(self.shard.inputs) and sample >= 0:  # on a sample of a tar: that sample's death
                mine = state.setdefault("sample_deaths", {}).setdefault(str(k), {})
                n = mine[str(sample)] = mine.get(str(sample), 0) + 1
                total = sum(mine.values())
                if total >= SAMPLE_DEATH_LIMIT:  # the whole input now
                    state["deaths"][str(k)] = total
                log.warning("%s: the process decoding its sample %d died (%d of the %d deaths after which the "
                            "sample is skipped); trying its shard again", self.shard.inputs[k].source, sample, n,
                            CRASH_LIMIT)  # fmt: skip
            elif 0 <= k < len(self.shard.inputs):
                n = state["deaths"][str(k)] = state["deaths"].get(str(k), 0) + 1
                log.warning("%s: the process decoding it died (%d of the %d deaths after which it becomes an "
                            "error row); trying its shard again", self.shard.inputs[k].source, n, CRASH_LIMIT)  # fmt: skip
            else:
                state["elsewhere"] += 1
                if state["elsewhere"] >= SHARD_DEATH_LIMIT:
                    raise WorkerDeathsError(
                        f"shard {self.shard.index} ({self.shard.name}): its workers died {state['elsewhere']} times "
                        "outside any input (writing the shard or its commit record); see the workers' output above"
                    )
        # not durable: this guards against the process dying, not the machine (an fsync per shard
        # cost 0.6 ms here, more on shared storage); the call also makes the folder pos_path shares
        tables.atomic_write_bytes(self.state_path, json.dumps(state).encode(), durable=False)
        self._fd = os.open(self.pos_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.at(-1)
        self.sample_skips = {}
        for k, per in state.get("sample_deaths", {}).items():
            skip = {int(i): n for i, n in per.items() if n >= CRASH_LIMIT}
            if skip:
                self.sample_skips[int(k)] = skip
        return {int(k): n for k, n in state["deaths"].items() if n >= CRASH_LIMIT}

    def at(self, index: int) -> None:
        """The worker is on input ``index`` of the shard from now (-1: on none), on none of its samples."""
        os.pwrite(self._fd, self._POS.pack(index, -1), 0)

    def at_sample(self, sample: int) -> None:
        """... and on sample ``sample`` of that input from now (-1: on none of them)."""
        os.pwrite(self._fd, self._SAMPLE.pack(sample), self._SAMPLE.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def done(self) -> None:
        """The shard is committed: nothing to carry over."""
        self.close()
        for p in (self.pos_path, self.state_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


class _SampleGuard:
    """The :class:`maskloom.tokenizers.base.SampleGuard` of one input of a shard: its position goes to
    the shard's :class:`ShardAttempts` (deaths) and :class:`InputWatchdog` (hangs), either may be None."""

    __slots__ = ("attempts", "watchdog", "skip")

    def __init__(
        self, attempts: ShardAttempts | None, watchdog: InputWatchdog | None, skip: dict[int, tuple[str, str]]
    ) -> None:
        self.attempts, self.watchdog, self.skip = attempts, watchdog, skip

    def at(self, sample: int) -> None:
        if self.attempts is not None:
            self.attempts.at_sample(sample)
        if self.watchdog is not None:
            self.watchdog.at_sample(sample)


def _died(deaths: int) -> str:
    return f"the process decoding it died {deaths} times (a crash in the decoder, or more memory than it had)"


def _no_progress(seconds: float) -> str:
    return (
        f"decoding made no progress for {seconds:g} s (--input-timeout); its worker was ended and restarted"
    )


PROGRESS = "_progress"
"""Folder under ``_commits`` where a long shard tells the driver how far it got (:class:`ShardProgress`)."""
PROGRESS_INTERVAL_S = 1.0
"""Seconds between two progress reports of a shard (none for a shard that takes less)."""


class ShardProgress:
    """How far a shard being tokenized got, for the driver's progress bar while it runs.

    A shard is the unit of commit, and the driver learns of one when it is done: a shard of a text
    corpus or of long videos can take minutes, through which a bar counting shards stands still.
    So the worker writes ``_commits/_progress/<shard_id>.json`` ({"run", "inputs": inputs done in
    the shard, "records": records kept}) at most every ``interval`` seconds, the first after
    ``interval`` (a shard of short inputs, ~0.5 s by default, writes none), and removes it once
    the shard is committed; the driver reads them (:class:`_LiveProgress`). It lives beside the
    shards, which the driver reads too, so it works on a cluster as on a laptop. Best effort: a
    failed write is ignored (the shard's own writes report a full disk)."""

    def __init__(
        self, out_dir: str, shard: ShardSpec, run: str, *, interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.path = os.path.join(out_dir, COMMITS, PROGRESS, shard.shard_id + ".json")
        self.run, self.clock = run, clock
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.due = clock() + self.interval
        self.written = False

    def report(self, inputs: int, records: int) -> None:
        """``inputs`` of the shard are done and ``records`` kept: written to the file when one is due."""
        now = self.clock()
        if now < self.due:
            return
        self.due = now + self.interval
        try:
            tables.atomic_write_bytes(self.path, json.dumps({"run": self.run, "inputs": inputs,
                                                             "records": records}).encode(), durable=False)  # fmt: skip
            self.written = True
        except OSError:
            pass

    def done(self) -> None:
        if self.written:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def read_progress(out_dir: str, run: str) -> dict[str, tuple[int, int]]:
    """{shard id: (inputs done, records kept)} of the shards of job ``run`` that reported progress
    (:class:`ShardProgress`) and have not removed it yet."""
    folder = os.path.join(out_dir, COMMITS, PROGRESS)
    out = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.endswith(".json") and not name.startswith("."):
            rec = _read_json(os.path.join(folder, name))
            if rec is not None and rec.get("run") == run:
                out[name[:-5]] = (int(rec["inputs"]), int(rec["records"]))
    return out


def tokenize_shard(
    tokenizer: Tokenizer,
    shard: ShardSpec,
    out_dir: str,
    meta: dict[str, Any],
    watchdog: InputWatchdog | None = None,
    run: str | None = None,
    progress: str | None = None,
) -> dict[str, Any]:
    """Tokenize every input of ``shard``, write the shard file atomically, then its commit record.

    ``run`` (a job's id, in Ray workers): keep :class:`ShardAttempts` so that an input that kills
    its worker again and again becomes an error row. ``progress`` (a job's id): report how far the
    shard got while it runs (:class:`ShardProgress`).

    Returns the commit record: {shard_id, index, fingerprint, shard ({name, rows, bytes, sha256,
    inputs}) or None when every input failed, sources (inputs written), errors ([source, kind,
    message] rows), tokens, input_bytes, seconds, plus diagnostics: started (Unix time), cpu_seconds,
    write_seconds (packing + writing the shard file, row group by row group)}.
    """
    started = time.time()
    t0, c0 = time.perf_counter(), time.process_time()
    spec = tables.spec_from_meta(meta)
    path = os.path.join(out_dir, shard.name)
    attempts = ShardAttempts(out_dir, shard, run) if run else None
    try:
        crashed = attempts.begin() if attempts else {}
    except OSError as e:
        raise WriteError(f"{path}: cannot write the shard's bookkeeping ({e.strerror or e})") from None
    # inputs rejected without reading them: those that outlived the timeout in an earlier try of this
    # shard, those its workers died on, and those found bad after some of their records were written
    skip: dict[int, tuple[str, str]] = {}
    # ... and the samples of tar shards skipped likewise (the rest of their tar is read)
    sample_skip: dict[int, dict[int, tuple[str, str]]] = {}
    hung, hung_samples = _hung(out_dir)  # one read of the folder, for both
    for index, item in enumerate(shard.inputs):
        if item.source in hung:
            skip[index] = ("corrupt", _no_progress(hung[item.source]))
        elif index in crashed:
            skip[index] = ("crashed", _died(crashed[index]) + "; the job went on without it")
        samples = {s: ("corrupt", _no_progress(t)) for s, t in hung_samples.get(item.source, {}).items()}
        if attempts is not None:
            samples.update(
                {s: ("crashed", _died(n)) for s, n in attempts.sample_skips.get(index, {}).items()}
            )
        if samples:
            sample_skip[index] = samples
    live = ShardProgress(out_dir, shard, progress) if progress else None
    try:
        while True:
            try:
                out = _write_shard(tokenizer, shard, out_dir, spec, meta, skip, watchdog, attempts, live,
                                   sample_skip)  # fmt: skip
                break
            except _RedoShard as r:  # rare: its records are in the file already; write it again without them
                skip[r.index] = (r.kind, r.reason)
                log.info("%s: rejected after some of its records were written (%s: %s); writing shard %d again "
                         "without it", shard.inputs[r.index].source, r.kind, r.reason, shard.index)  # fmt: skip
    except BaseException as e:
        if attempts is not None:  # ended in Python (an error, Ctrl-C), not by the process dying
            attempts.done()
        if isinstance(e, OSError):
            raise WriteError(f"{path}: cannot write the shard ({e.strerror or e})") from None
        raise
    info, written, errors, tokens, input_bytes, write_seconds, skipped_parts = out
    commit = {
        "shard_id": shard.shard_id,
        "index": shard.index,
        "fingerprint": meta["fingerprint"],
        "shard": info,
        "sources": written,
        "errors": errors,
        "tokens": int(tokens),
        "input_bytes": input_bytes,
        "seconds": time.perf_counter() - t0,
        "write_seconds": write_seconds,
        "skipped_parts": skipped_parts,
        "cpu_seconds": time.process_time() - c0,
        "started": started,
        "host": socket.gethostname(),
    }
    try:
        tables.atomic_write_bytes(_commit_path(out_dir, shard.shard_id), json.dumps(commit).encode())
    except OSError as e:
        raise WriteError(
            f"{_commit_path(out_dir, shard.shard_id)}: cannot write the commit record ({e.strerror or e})"
        ) from None
    finally:
        if attempts is not None:
            attempts.done()
        if live is not None:
            live.done()
    return commit


class _RedoShard(Exception):
    """An input of the shard was found bad after some of its records were written (a row group
    holding them is in the file): the shard must be written again without it."""

    def __init__(self, index: int, kind: str, reason: str) -> None:
        super().__init__(index, kind, reason)
        self.index, self.kind, self.reason = index, kind, reason


STREAM_BATCH = 256
"""Most records handed to the shard writer at a time while an input streams its records."""
STREAM_BATCH_BYTES = 4 << 20
"""... and most bytes of tokens: a tar of videos streams records of 2.4 MB each (1,568 tubelets of
1,536 bytes), and 256 of them held 0.6 GB before the writer, whose row group is 32 MB, saw any."""


class _ShardPass(NamedTuple):
    """What one pass of :func:`_write_shard` over a shard gives."""

    info: dict[str, Any] | None
    """The shard file's {name, rows, bytes, sha256, inputs}, or None when no input was written."""
    written: list[str]
    """Sources written."""
    errors: list[list[str]]
    """Error rows: [source, kind, message]."""
    tokens: int
    input_bytes: int
    write_seconds: float
    skipped_parts: list[list[Any]]
    """Parts skipped inside written inputs: [source, what, skipped, total, example] each
    (:class:`maskloom.tokenizers.base.SkipReport`)."""


def _write_shard(
    tokenizer: Tokenizer,
    shard: ShardSpec,
    out_dir: str,
    spec: tables.TableSpec,
    meta: dict[str, Any],
    skip: dict[int, tuple[str, str]],
    watchdog: InputWatchdog | None,
    attempts: ShardAttempts | None,
    live: ShardProgress | None = None,
    sample_skip: dict[int, dict[int, tuple[str, str]]] | None = None,
) -> _ShardPass:
    """One pass of :func:`tokenize_shard` over the shard's inputs. Records stream into the file a row
    group at a time, so a shard's memory is one row group however many inputs (or records per input)
    it has.
    An input that fails part-way loses the records it streamed; if some of them were written already
    :class:`_RedoShard` asks for the pass to be made again with it in ``skip``. ``sample_skip``:
    {input index: {sample: (kind, reason)}}, the samples of tar shards not to read (a
    :class:`_SampleGuard` per input tells the tar readers, and keeps where the worker is)."""
    guarded = attempts is not None or watchdog is not None
    skipped_parts: list[list[Any]] = []
    written: list[str] = []
    errors: list[list[str]] = []
    input_bytes = tokens = 0
    with tables.ShardWriter(os.path.join(out_dir, shard.name), spec, meta) as writer:
        for index, item in enumerate(shard.inputs):
            mark = writer.mark()
            n_tokens = 0
            reports: list[SkipReport] = []  # kept only if the input is written
            try:
                input_bytes += _size(item.source)
                if index in skip:
                    raise _Rejected(item.source, *skip[index])
                if attempts is not None:
                    attempts.at(index)  # until the next input: its records' writing counts as its own
                if watchdog is not None:
                    watchdog.begin(out_dir, item.source)
                try:
                    guard = None
                    if guarded:
                        guard = _SampleGuard(attempts, watchdog, (sample_skip or {}).get(index, {}))
                    with guarded_samples(guard), reporting_skips(reports.append):
                        batch: list[Record] = []
                        held = 0  # bytes of tokens in batch
                        for r in _records(tokenizer, item, spec):
                            if watchdog is not None:
                                watchdog.touch()
                            batch.append(r)
                            n_tokens += r.num_tokens
                            held += r.tokens.nbytes
                            if len(batch) >= STREAM_BATCH or held >= STREAM_BATCH_BYTES:
                                writer.add(batch)  # an OSError here is the disk's, not the input's
                                batch, held = [], 0
                                if live is not None:
                                    live.report(index, writer.records)
                        writer.add(batch)
                finally:
                    if watchdog is not None:
                        watchdog.end()
            except (TokenizeError, _Rejected) as e:
                if not writer.rollback(mark):
                    raise _RedoShard(index, e.kind, e.reason) from None
                log.debug("rejected %s: %s: %s", e.source, e.kind, e.reason)
                errors.append([item.source, e.kind, e.reason])
                continue
            written.append(item.source)
            skipped_parts += [[item.source, r.what, r.skipped, r.total, r.example] for r in reports]
            tokens += n_tokens
            if live is not None:
                live.report(index + 1, writer.records)
        if attempts is not None:
            attempts.at(-1)
        info = writer.close()
    if info is not None:
        info["inputs"] = len(written)
    return _ShardPass(info, written, errors, tokens, input_bytes, writer.seconds, skipped_parts)


def _size(path: str) -> int:
    """Bytes of a file, or of the files under a directory (a dataset folder source); 0 if missing.
    A part of a file (:func:`split_inputs`): its share of the file's bytes by its units."""
    try:
        st = os.stat(path)  # one stat for a file (the common case), not isdir + getsize
        if not stat.S_ISDIR(st.st_mode):
            return st.st_size
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    except OSError:
        whole, part = split_part(path)
        return 0 if part is None else _size(whole) * (part[1] - part[0]) // part[2]


def split_inputs(tokenizer: Tokenizer, items: Sequence[Input]) -> list[Input]:
    """``items`` with each one the tokenizer reads in parts (:meth:`Tokenizer.split_input`: a big
    Parquet file of text) replaced by its parts, each an input of its own with the file's label."""
    out: list[Input] = []
    for item in items:
        parts = tokenizer.split_input(item.source)
        if parts:
            log.info("%s: read as %d parts (%s)", item.source, len(parts), ", ".join(p.rsplit("#", 1)[1] for p in parts[:3])
                     + (", ..." if len(parts) > 3 else ""))  # fmt: skip
            out += [Input(p, item.label) for p in parts]
        else:
            out.append(item)
    return out


def _commit_path(out_dir: str, shard_id: str) -> str:
    return os.path.join(out_dir, COMMITS, f"{shard_id}.json")


def build_tokenizer(
    modality: str, config: Any, imports: Sequence[str] = (), artifacts_dir: str | None = None
) -> Tokenizer:
    """Import plug-in modules, build the tokenizer, load its artifacts (the same on driver and workers)."""
    for m in imports:
        importlib.import_module(m)
    tok = get_tokenizer(modality, config)
    if artifacts_dir and os.path.isdir(artifacts_dir):
        tok.load_artifacts(artifacts_dir)
    return tok


class TokenizeShardActor:
    """Ray Data actor: builds the tokenizer once, then tokenizes one shard spec per call.

    ``threads`` caps the intra-op threads of torch/OpenMP/BLAS/Arrow in the actor process (its CPUs),
    so that N actors on N cores do not start N x N threads.
    """

    def __init__(
        self,
        *,
        modality: str,
        config: dict[str, Any],
        imports: Sequence[str],
        artifacts_dir: str | None,
        out_dir: str,
        meta: dict[str, Any],
        threads: int = 1,
        input_timeout: float | None = None,
        run: str | None = None,
        progress: str | None = None,
    ) -> None:
        limit_threads(threads)  # env vars first: OpenMP reads them when torch is first imported
        self.tokenizer = build_tokenizer(modality, config, imports, artifacts_dir)
        limit_threads(threads)  # and torch itself, now that the tokenizer may have imported it
        self.out_dir = out_dir
        self.meta = meta
        self.watchdog = InputWatchdog(input_timeout) if input_timeout else None
        self.run = run
        self.progress = progress

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        commits = []
        for s in batch["spec"]:
            try:
                commits.append(
                    json.dumps(
                        tokenize_shard(
                            self.tokenizer,
                            ShardSpec.from_json(s),
                            self.out_dir,
                            self.meta,
                            self.watchdog,
                            self.run,
                            self.progress,
                        )
                    )
                )
            except WriteError as e:  # handed over as a row: Ray would deliver only its text, in a traceback
                commits.append(json.dumps({"write_error": str(e)}))
            except WorkerDeathsError as e:
                commits.append(json.dumps({"worker_deaths": str(e)}))
        return {"commit": np.array(commits, dtype=object)}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def _abspath(p: str) -> str:
    """``os.path.abspath``, without its normalisation for a path that has nothing to normalise (an
    absolute path without ``//``, ``/.`` or a trailing ``/``: 0.5 of 1.5 s for a million paths)."""
    if p.startswith("/") and "//" not in p and "/." not in p and not p.endswith("/"):
        return p
    return os.path.abspath(p)


@gc_paused()
def _as_inputs(
    inputs: InputSet | Sequence[Input] | Sequence[str],
) -> tuple[list[Input], tuple[str, ...] | None]:
    if isinstance(inputs, InputSet):
        items, names = list(inputs.inputs), inputs.label_names
    else:
        items = [i if isinstance(i, Input) else Input(_abspath(str(i))) for i in inputs]
        names = None
    if not items:
        raise ValueError("the input set is empty")
    seen: set[str] = set()
    for i in items:
        if i.source in seen:
            raise ValueError(f"{i.source}: listed twice in the inputs")
        seen.add(i.source)
    return sorted(items, key=lambda i: i.source), names


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _clear(out_dir: str) -> None:
    """Remove what a preprocessing job writes (and nothing else) from ``out_dir``."""
    for name in (tables.MANIFEST, tables.ERRORS):
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            os.unlink(p)
    for name in (COMMITS, tables.ARTIFACTS):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for p in glob.glob(os.path.join(out_dir, "part-*.parquet")) + glob.glob(
        os.path.join(out_dir, tables.TEMP_PREFIX + "*")
    ):
        os.unlink(p)


def artifacts_digest(directory: str) -> str:
    """Hash of the files under ``directory`` (the tokenizer artifacts); stable when it is absent."""
    h = hashlib.sha256()
    if os.path.isdir(directory):
        for root, dirs, files in os.walk(directory):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, directory).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:16]


def _shared_folder(folder: str) -> None:
    """Make ``folder`` if it is missing, writable by every user and sticky (mode 1777, as ``/tmp``):
    the lock folder in the system's temporary folder is shared by the users of a machine, and one
    made by the first user's umask (0755) would leave every other user's jobs without a lock."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return
    os.chmod(folder, 0o1777)


@contextlib.contextmanager
def _job_lock(out_dir: str) -> Generator[None, None, None]:
    """Hold this machine's lock on table ``out_dir`` for one job, or raise TableConflictError.

    Two jobs on one table (a command started twice, a scheduler retrying a job whose first try still
    runs) would write the same shards and then remove each other's commit records. The lock is an
    ``flock`` on a file in the system's temporary folder named by the table's absolute path, so the
    table holds nothing extra; it is released when the job ends, however it ends (the OS drops it
    with the process). Drivers on different machines sharing storage are not covered."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = os.path.join(tempfile.gettempdir(), "maskloom-locks")
    key = hashlib.sha256(os.path.abspath(out_dir).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    try:
        _shared_folder(folder)
        f = open(os.path.join(folder, key + ".lock"), "a+")  # noqa: SIM115 - closed below
    except OSError as e:  # a temporary folder this user cannot write: run unguarded rather than not at all
        log.warning("cannot take the one-job-per-table lock in %s (%s); running without it", folder, e)
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise TableConflictError(
                f"{os.path.abspath(out_dir)}: another maskloom preprocess (pid {holder}) is writing this table; wait for it to "
                "end, or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_as_exit(enabled: bool) -> Generator[None, None, None]:
    """While tokenizing in this process, SIGTERM (a scheduler's preemption, ``timeout``) ends it by
    SystemExit(143) instead of at once, so that the shard in hand cleans up like Ctrl-C and is not
    counted as a crash (:class:`ShardAttempts`). Only in the main thread, where Python takes signals."""
    import signal

    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _one_job_per_table(fn: Any) -> Any:
    """Run ``fn`` (whose parameter ``out_dir`` names the table) under :func:`_job_lock`."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out_dir = sig.bind(*args, **kwargs).arguments.get("out_dir") or ""
        if not out_dir:  # fn's own check reports it
            return fn(*args, **kwargs)
        with _job_lock(out_dir):
            return fn(*args, **kwargs)

    return wrapper


@_one_job_per_table
def preprocess(
    inputs: InputSet | Sequence[Input] | Sequence[str] | str | os.PathLike[str],
    modality: str,
    config: Any = None,
    out_dir: str = "",
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    object_store_memory: int | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    max_error_rate: float | None = None,
    label_names: Sequence[str] | None = None,
    imports: Sequence[str] = (),
    progress: bool = True,
    input_timeout: float | None = INPUT_TIMEOUT_S,
    append: bool = False,
    retry_errors: bool = False,
) -> PreprocessResult:
    """Tokenize ``inputs`` with tokenizer ``modality`` (``config``: dataclass, dict or None) into the
    token table ``out_dir`` (``inputs``: an InputSet, Inputs or paths, or one directory, file or glob
    resolved as the command line does, by :func:`~maskloom.pipelines.sources.find_inputs` with the
    tokenizer's extensions), on an embedded local Ray or the cluster at ``address``/``RAY_ADDRESS``
    (``num_workers=0``: in this process, without Ray: the same shards, commit records and table,
    for small jobs that Ray's start-up would dominate, and for debugging a tokenizer).

    ``label_names`` overrides the input set's (or the tokenizer's) class names; ``imports`` names
    modules to import first on the driver and every worker (plug-in tokenizers). ``shard_size``
    None: ``default_shard_size`` for the inputs and the workers (``num_workers``, else the CPUs of
    the running Ray or of this machine); a resumed partial job keeps its plan's size.
    ``append``: ``out_dir`` holds a finished table of some of ``inputs`` (same config and labels):
    tokenize only the inputs it lacks into new shards and list them in the manifest beside the old
    ones (:func:`_append_base`), for a collection that grows; the old shards are not touched.
    ``retry_errors`` (implies ``append``): the inputs the finished table holds as error rows are
    tokenized again too (files fixed since, a decoder upgraded); its written rows stay.
    ``input_timeout``: seconds one input may go without giving a record in a Ray worker before the
    worker is ended and the input becomes an error row (:class:`InputWatchdog`; None or 0: no
    limit). In Ray workers an input that kills its worker twice becomes an error row too
    (:class:`ShardAttempts`). Raises
    TableConflictError (another config/input set in ``out_dir`` and not ``overwrite``), OutDirError
    (``out_dir`` is a file or cannot be made),
    PreprocessError (error rate above ``max_error_rate``, WriteError, WorkerDeathsError; committed
    shards are kept for a rerun),
    ValueError for an empty input set or a bad config, and RegistryError for an unknown modality.
    """
    t0 = time.perf_counter()
    if not out_dir:
        raise ValueError("out_dir is required")
    check_out_dir(out_dir)  # before any work (a URL: before it becomes a local folder named "s3:")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0: in this process, without Ray), got {num_workers}")
    if max_error_rate is not None and not 0.0 <= max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate must lie in [0, 1], got {max_error_rate}")
    if input_timeout is not None and input_timeout < 0:
        raise ValueError(f"input_timeout must be >= 0 seconds (0: no limit), got {input_timeout}")
    append = append or retry_errors
    if append and overwrite:
        raise ValueError(
            "append and overwrite exclude each other: append adds to a table, overwrite replaces it"
        )
    for m in imports:
        importlib.import_module(m)
    cls = TOKENIZERS.get(modality)  # unknown modality -> RegistryError before any work
    tokenizer = build_tokenizer(modality, config)
    if isinstance(inputs, (str, os.PathLike)):  # one directory, file or glob, as on the command line
        from maskloom.pipelines.sources import find_inputs, skipped_note

        given = os.fspath(inputs)
        inputs = find_inputs(given, extensions=cls.extensions, companions=tokenizer.companion_files)
        if inputs.skipped:
            log.warning("%s", skipped_note(inputs.skipped, given, cls.extensions))
    items, names = _as_inputs(inputs)
    items = split_inputs(tokenizer, items)
    fingerprint = tokenizer.fingerprint()
    if label_names is None:
        label_names = names
    with gc_paused():
        inputs_digest = _digest({"inputs": [[i.source, i.label] for i in items], "label_names": label_names})
    out_dir = os.path.abspath(out_dir)
    commits_dir = os.path.join(out_dir, COMMITS)
    artifacts_dir = os.path.join(out_dir, tables.ARTIFACTS)

    # ---- state of out_dir: finished table, partial job, or nothing ------------------------------
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        ours = os.path.exists(os.path.join(out_dir, tables.MANIFEST)) or os.path.isdir(commits_dir)
        if not ours:
            raise TableConflictError(
                f"{out_dir}: exists, is not empty and is not a token table; choose another --out"
            )
    if overwrite and os.path.isdir(out_dir):
        _clear(out_dir)
    base: _AppendBase | None = None
    finished = os.path.exists(os.path.join(out_dir, tables.MANIFEST))
    if finished:
        manifest = tables.read_manifest(out_dir)
        same = (
            manifest.meta.get("fingerprint") == fingerprint
            and manifest.extra.get("inputs_digest") == inputs_digest
        )
        if not same and manifest.meta.get("fingerprint") != fingerprint:
            raise TableConflictError(
                f"{out_dir}: holds a finished table built with another config; use overwrite (--overwrite) to replace it"
            )
        if not same and not append:
            raise TableConflictError(
                f"{out_dir}: holds a finished table built with another input set; use append (--append) to add "
                "new inputs to it, or overwrite (--overwrite) to replace it"
            )
        if not same or (retry_errors and manifest.totals["errors"]):
            base = _append_base(out_dir, manifest, items, label_names, retry_errors=retry_errors)
            log.info(
                "appending %d inputs to the %d of %s", len(base.items), manifest.totals["inputs"], out_dir
            )
    if finished and base is None:
        log.info("%s: already finished with this config; nothing to do", out_dir)
        tot = manifest.totals
        return PreprocessResult(
            out_dir=out_dir, inputs=tot["inputs"], rows=tot["rows"], tokens=manifest.extra.get("tokens", 0),
            errors=tot["errors"], bytes=sum(s["bytes"] for s in manifest.shards),
            input_bytes=manifest.extra.get("input_bytes", 0), shards=manifest.extra.get("planned_shards", 0),
            skipped_shards=manifest.extra.get("planned_shards", 0), seconds=time.perf_counter() - t0,
            throughput=0.0, already_done=True, shard_size=manifest.extra.get("shard_size", 0),
            skipped_parts=manifest.extra.get("skipped_parts", {}).get("counts", {}),
            inputs_with_skipped_parts=manifest.extra.get("skipped_parts", {}).get("inputs", 0),
        )  # fmt: skip
    state = _read_json(os.path.join(commits_dir, RUN_STATE))
    if state is not None and state.get("fingerprint") != fingerprint:
        raise TableConflictError(
            f"{out_dir}: holds a partial job with another config (fingerprint {state.get('fingerprint')}, "
            f"now {fingerprint}); use overwrite (--overwrite) to start over"
        )
    make_out_dir(out_dir, "table directory")
    os.makedirs(commits_dir, exist_ok=True)

    # ---- fit on the driver (corpus-level tokenizers); workers load the artifacts ----------------
    whole = items  # the table's inputs when the job ends
    if base is not None:
        items = base.items  # the inputs to tokenize now
    if tokenizer.needs_fit:
        if base is not None:  # new inputs are tokenized with what the table was fitted on
            tokenizer.load_artifacts(artifacts_dir)
        elif (
            state is not None and state.get("inputs_digest") == inputs_digest and os.path.isdir(artifacts_dir)
        ):
            tokenizer.load_artifacts(artifacts_dir)
            log.info("reusing the fitted artifacts in %s", artifacts_dir)
        else:
            log.info("fitting the %s tokenizer on %d inputs", modality, len(items))
            if progress:  # a corpus's vocabulary can take a minute: say what the job is doing
                print(f"preprocess: fitting the {modality} tokenizer on {_count(len(items), 'input')}",
                      file=sys.stderr, flush=True)  # fmt: skip
            t_fit = time.perf_counter()
            try:
                tokenizer.fit([i.source for i in items])
            except TokenizeError as e:  # a tokenizer's fit should skip bad inputs; one that does not
                raise PreprocessError(  # ends the job with one line, nothing written yet
                    f"fitting the {modality} tokenizer on the inputs failed at {e}; nothing was tokenized "
                    "(a fit should skip such inputs: please report it)"
                ) from None
            shutil.rmtree(artifacts_dir, ignore_errors=True)
            tokenizer.save_artifacts(artifacts_dir)
            if progress:
                print(
                    f"preprocess: fitted in {time.perf_counter() - t_fit:.1f} s", file=sys.stderr, flush=True
                )
    elif base is None:
        tokenizer.save_artifacts(artifacts_dir)
    art_digest = artifacts_digest(artifacts_dir)
    key = shard_key(fingerprint, art_digest)
    spec = tokenizer.spec()
    if label_names is None:
        label_names = tokenizer.label_names()
    meta = tables.table_meta(
        spec, tokenizer=tokenizer.name, tokenizer_version=tokenizer.version, config=tokenizer.config_dict(),
        fingerprint=fingerprint, label_names=label_names,
    )  # fmt: skip
    if base is not None:
        meta = base.manifest.meta  # the new shards carry exactly the old ones' table facts
    if shard_size is None:
        if state is not None and state.get("inputs_digest") == inputs_digest and state.get("shard_size"):
            shard_size = int(state["shard_size"])  # resume the partial job's plan, whatever the workers now
        else:
            hint = (
                1
                if num_workers == 0
                else resources(num_workers, cpus_per_worker, gpus_per_worker).num_workers
            )
            shard_size = measured_shard_size(tokenizer, items, hint)
    plan = plan_shards(items, key, shard_size, first_index=0 if base is None else base.first_index)
    tables.atomic_write_bytes(
        os.path.join(commits_dir, RUN_STATE),
        json.dumps({"fingerprint": fingerprint, "inputs_digest": inputs_digest, "artifacts_digest": art_digest,
                    "modality": modality, "shards": len(plan), "inputs": len(items),
                    "shard_size": shard_size}).encode(),
    )  # fmt: skip

    # ---- resume: shards with a commit record (and their file) are done ---------------------------
    done = _read_commits(plan, out_dir)
    todo = [sh for sh in plan if sh.shard_id not in done]
    skipped = len(plan) - len(todo)
    if skipped:
        log.info("resuming: %d of %d shards already committed", skipped, len(plan))

    # ---- map: Ray Data actor pool over the missing shards (or this process) ---------------------
    tally = _Tally(t0, sum(len(c["errors"]) for c in done.values()))
    limit = None if max_error_rate is None else max_error_rate * len(items)
    run = uuid.uuid4().hex
    live_id = run if progress else None  # shards report how far they got only when a bar shows it
    if todo:
        if num_workers == 0:  # here, without Ray: the same shards, records and table
            log.info("tokenizing %d shards of %d inputs in this process", len(todo), shard_size)
            commits: Generator[dict[str, Any], None, None] = (
                tokenize_shard(tokenizer, sh, out_dir, meta, run=IN_PROCESS_RUN, progress=live_id)
                for sh in todo
            )
        else:
            actor = {"modality": modality, "config": tokenizer.config_dict(), "imports": list(imports),
                     "artifacts_dir": artifacts_dir if os.path.isdir(artifacts_dir) else None,
                     "out_dir": out_dir, "meta": meta, "input_timeout": input_timeout,
                     "run": run, "progress": live_id}  # fmt: skip
            commits = _commits_on_ray(
                todo, actor, tally, address=address, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker, object_store_memory=object_store_memory,
                long_shards=big_input_bytes(items) > 0,
            )  # fmt: skip
        try:
            resumed = len(items) - sum(len(sh.inputs) for sh in todo)
            with Progress(len(items), initial=resumed, unit="input", desc="preprocess", enabled=progress) as bar, \
                    _LiveProgress(bar, out_dir, live_id, tally, done) as live, \
                    contextlib.closing(commits), _sigterm_as_exit(num_workers == 0):  # fmt: skip
                for c in commits:
                    if "write_error" in c:  # from a worker: the disk, not an input; every shard would fail
                        raise WriteError(c["write_error"])
                    if "worker_deaths" in c:
                        raise WorkerDeathsError(f"{c['worker_deaths']}; {len(done)} committed shards kept")
                    if num_workers != 0:
                        _check_visible(out_dir, c)
                        _check_inputs_seen(out_dir, c)
                    live.commit(c)
                    if limit is not None and tally.errors > limit:
                        break  # the rate can only grow: stop early, keep what is committed
        except WriteError as e:
            raise WriteError(f"{e}; {len(done)} committed shards kept: free space (or fix the permissions), "
                             "then run the same command again to resume") from None  # fmt: skip

    # ---- commit: accounting, errors, manifest (last) -------------------------------------------
    errors = [e for sh in plan if sh.shard_id in done for e in done[sh.shard_id]["errors"]]
    if max_error_rate is not None and items and len(errors) / len(items) > max_error_rate:
        raise PreprocessError(
            f"{out_dir}: {len(errors)} of {len(items)} inputs rejected ({len(errors) / len(items):.1%}), "
            f"above --max-error-rate {max_error_rate:.1%}; {len(done)} committed shards kept; see {commits_dir}"
        )
    # the records the workers wrote are the truth, whatever the driver received
    done = _read_commits(plan, out_dir, every=True)
    commits = [done[sh.shard_id] for sh in plan]
    _check_accounting(plan, commits, out_dir)
    parts = _skipped_parts(
        [p for c in commits for p in c.get("skipped_parts", ())],
        None if base is None else base.manifest.extra.get("skipped_parts"),
    )
    rows = sum(c["shard"]["rows"] for c in commits if c["shard"])
    tokens = sum(c["tokens"] for c in commits)
    shard_infos = [c["shard"] for c in commits if c["shard"]]
    input_bytes = sum(c["input_bytes"] for c in commits)
    planned = len(plan)
    if base is not None:  # the table's own shards, errors and totals first
        old = base.manifest
        shard_infos = list(old.shards) + shard_infos
        errors = base.errors + errors
        rows += old.totals["rows"]
        tokens += old.extra.get("tokens", 0)
        input_bytes += old.extra.get("input_bytes", 0)
        planned += base.first_index
        skipped += base.first_index
    seconds = time.perf_counter() - t0
    processed = sum(len(sh.inputs) for sh in todo)
    manifest = tables.Manifest(
        meta=meta,
        shards=shard_infos,
        totals={"inputs": len(whole), "rows": rows, "errors": len(errors)},
        extra={"inputs_digest": inputs_digest, "artifacts_digest": art_digest, "tokens": tokens,
               "input_bytes": input_bytes, "planned_shards": planned, "shard_size": shard_size,
               **({"skipped_parts": parts} if parts["inputs"] else {})},
    )  # fmt: skip
    try:
        _write_errors(os.path.join(out_dir, tables.ERRORS), errors)
        tables.write_manifest(out_dir, manifest)
    except OSError as e:
        raise WriteError(f"{out_dir}: cannot write the error table and manifest ({e.strerror or e}); every shard "
                         "is committed: free space, then run the same command again to finish") from None  # fmt: skip
    _tidy(out_dir, {s["name"] for s in shard_infos})
    result = PreprocessResult(
        out_dir=out_dir, inputs=len(whole), rows=rows, tokens=tokens, errors=len(errors),
        bytes=sum(s["bytes"] for s in shard_infos), input_bytes=input_bytes, shards=planned,
        skipped_shards=skipped, seconds=seconds, throughput=processed / seconds if processed else 0.0,
        first_shard_seconds=tally.first, startup_seconds=max(0.0, tally.first_start), workers=tally.workers,
        shard_size=shard_size, worker_seconds=tally.seconds, worker_cpu_seconds=tally.cpu_seconds,
        appended_inputs=0 if base is None else len(items), appended_shards=0 if base is None else len(plan),
        retried_inputs=0 if base is None else base.retried, skipped_parts=parts["counts"],
        inputs_with_skipped_parts=parts["inputs"],
    )  # fmt: skip
    log.info("%s", result.summary())
    return result


SKIPPED_EXAMPLES = 5
"""Inputs with skipped parts named in the manifest (``extra["skipped_parts"]["examples"]``)."""


def _skipped_parts(parts: Sequence[Sequence[Any]], earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"inputs": written inputs with skipped parts, "counts": {what: parts skipped}, "examples": up to
    ``SKIPPED_EXAMPLES`` lines} of the commit records' ``skipped_parts`` ([source, what, skipped,
    total, example] each), added to ``earlier`` (a finished table's, when appending)."""
    earlier = earlier or {"inputs": 0, "counts": {}, "examples": []}
    counts = dict(earlier["counts"])
    examples = list(earlier["examples"])
    sources = set()
    for source, what, skipped, total, example in parts:
        counts[what] = counts.get(what, 0) + int(skipped)
        sources.add(source)
        if len(examples) < SKIPPED_EXAMPLES:
            examples.append(f"{source}: {skipped:,} of {total:,} {what} skipped, the first: {example}")
    return {"inputs": earlier["inputs"] + len(sources), "counts": counts, "examples": examples}


@dataclass(frozen=True)
class _AppendBase:
    """What appending to a finished table starts from (:func:`_append_base`)."""

    manifest: tables.Manifest
    items: list[Input]
    """The inputs the table lacks, sorted: the ones to tokenize."""
    errors: list[tuple[str, str, str]]
    """The table's error rows, kept."""
    first_index: int
    """Index of the first new shard: after every shard the table's job planned."""
    retried: int = 0
    """Of ``items``, the inputs the table held as error rows (``retry_errors``)."""


@gc_paused()
def _append_base(
    out_dir: str,
    manifest: tables.Manifest,
    items: Sequence[Input],
    label_names: Sequence[str] | None,
    *,
    retry_errors: bool = False,
) -> _AppendBase:
    """Check that the finished table in ``out_dir`` (same config) can grow into ``items``: the same
    label names, every input it accounts for (written or an error row) still among ``items`` with
    the label it was written with. Reads the table's ``source`` and ``label`` columns and its
    error rows; raises TableConflictError naming the first difference."""
    from maskloom.tokenizers.base import utf8_text

    old_names = manifest.meta.get("label_names")
    new_names = None if label_names is None else list(label_names)
    if new_names is not None and old_names is not None and new_names != list(old_names):
        added = [n for n in new_names if n not in old_names]
        what = (
            f"new classes {added[:5]}"
            if added
            else f"label names {new_names[:5]}... instead of {old_names[:5]}..."
        )
        raise TableConflictError(
            f"{out_dir}: cannot append: the inputs have {what}; a table keeps its classes (their numbers are in "
            "its rows): use overwrite (--overwrite) to rebuild it"
        )
    by_source = {utf8_text(i.source): i for i in items}  # sources as the table stores them
    table = tables.TokenTable(out_dir)
    written: dict[str, int | None] = {}
    for path in table.shard_paths():
        t = tables.read_shard(path, ["source", "label"])  # a damaged shard: one TableError naming it
        written.update(zip(t.column("source").to_pylist(), t.column("label").to_pylist()))
    errors = [(r["source"], r["kind"], r["message"]) for r in table.errors().to_pylist()]
    gone = [s for s in (*written, *(e[0] for e in errors)) if s not in by_source]
    if gone:
        raise TableConflictError(
            f"{out_dir}: cannot append: {len(gone)} of the table's inputs are not among the inputs (the first: "
            f"{gone[0]}); append only adds inputs: use overwrite (--overwrite) to rebuild it"
        )
    for source, label in written.items():
        item = by_source[source]
        if item.label != label:
            raise TableConflictError(
                f"{out_dir}: cannot append: {source} was written with label {label}, the inputs now give it "
                f"{item.label}; use overwrite (--overwrite) to rebuild the table"
            )
    if len(written) + len(errors) != manifest.totals["inputs"]:
        raise TableConflictError(
            f"{out_dir}: cannot append: its shards and error rows account for {len(written) + len(errors)} inputs, "
            f"its manifest says {manifest.totals['inputs']}; run inspect --verify on it"
        )
    if retry_errors:  # their inputs are tokenized again: new error rows replace these
        retried, errors = len(errors), []
    else:
        retried = 0
    old = set(written) | {e[0] for e in errors}
    new = sorted((i for s, i in by_source.items() if s not in old), key=lambda i: i.source)
    return _AppendBase(manifest=manifest, items=new, errors=errors, retried=retried,
                       first_index=int(manifest.extra.get("planned_shards", len(manifest.shards))))  # fmt: skip


FEW_SHARDS_PER_WORKER = 2
"""With at most this many shards per worker, or shards of large inputs (``long_shards``: untimed,
64 MB of a text corpus each), an actor is handed one shard at a time (``max_tasks_in_flight=1``),
not two: Ray Data gives its tasks to the actors that are ready, and the first actor up took both
shards of a 136 MB Parquet file split in two while the second idled, so two workers took the
130 s of one. One shard at a time costs a scheduling round trip per shard (~0.2 s), nothing next
to such shards."""


def _commits_on_ray(
    todo: Sequence[ShardSpec],
    actor: dict[str, Any],
    tally: _Tally,
    *,
    address: str | None,
    num_workers: int | None,
    cpus_per_worker: float | None,
    gpus_per_worker: float | None,
    object_store_memory: int | None,
    long_shards: bool = False,
) -> Generator[dict[str, Any], None, None]:
    """Tokenize ``todo`` on a Ray Data pool of :class:`TokenizeShardActor` (``actor``: its constructor
    arguments but the threads) and yield the commit records as they arrive; records the pool's size
    in ``tally.workers``. Ray is started or connected to on the first record asked for, and shut
    down (if this started it) when the generator ends or is closed."""
    started = init_ray(address, object_store_memory=object_store_memory)
    try:
        import ray.data

        res = resources(min(num_workers, len(todo)) if num_workers else None, cpus_per_worker,
                        gpus_per_worker, 1, object_store_memory, max_workers=len(todo))  # fmt: skip
        if long_shards or len(todo) <= FEW_SHARDS_PER_WORKER * res.num_workers:
            res = dataclasses.replace(res, max_tasks_in_flight=1)  # see FEW_SHARDS_PER_WORKER
        quiet_ray_data_bars()  # ours counts inputs
        with gc_paused():
            specs = [{"spec": sh.to_json()} for sh in todo]
        ds = ray.data.from_items(specs, override_num_blocks=len(todo)).map_batches(
            TokenizeShardActor,
            fn_constructor_kwargs={**actor, "threads": res.threads_per_worker},
            **res.map_batches_kwargs(),
        )
        tally.workers = res.num_workers
        log.info("tokenizing %d shards with %d workers", len(todo), res.num_workers)
        try:
            for row in ds.iter_rows():
                yield json.loads(row["commit"])
        except ray.exceptions.RayActorError as e:  # the actor's constructor failed: no worker can start
            raise PreprocessError(
                f"the tokenizer workers could not start: {_last_error(str(e))} (a plug-in must be importable on "
                "every worker: `ray job submit --working-dir` ships it, or install it on the nodes)"
            ) from e
    finally:
        shutdown_ray(started)


def _last_error(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback Ray handed over as text (the worker's own
    exception), or the text's last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln):
            return ln
    return lines[-1] if lines else text


PROGRESS_POLL_S = 1.0
"""Seconds between two reads of the shards' progress reports by the driver."""


class _LiveProgress:
    """The driver's bar over inputs: those of committed shards, plus what the shards still running
    report (:class:`ShardProgress`), read by a thread every ``poll`` seconds while the main thread
    waits for the next commit record. Postfix: records kept and error rows."""

    def __init__(
        self, bar: Progress, out_dir: str, run: str | None, tally: _Tally, done: dict[str, dict[str, Any]],
        *, poll: float | None = None,
    ) -> None:  # fmt: skip
        self.bar, self.out_dir, self.run = bar, out_dir, run
        self.poll = PROGRESS_POLL_S if poll is None else poll
        self.tally, self.done = tally, done
        self.inputs = bar.n  # of committed shards
        self.records = sum(c["shard"]["rows"] for c in done.values() if c["shard"])
        self.flight: dict[str, tuple[int, int]] = {}  # shard id -> (inputs, records) of running shards
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _LiveProgress:
        if self.run is not None:
            self._thread = threading.Thread(target=self._watch, name="maskloom-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def commit(self, c: dict[str, Any]) -> None:
        """Shard ``c`` (its commit record) is done: count it whole instead of what it reported."""
        with self._lock:
            self.done[c["shard_id"]] = c
            self.tally.add(c)
            self.flight.pop(c["shard_id"], None)
            self.inputs += len(c["sources"]) + len(c["errors"])
            self.records += c["shard"]["rows"] if c["shard"] else 0
            self._show()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            reports = read_progress(self.out_dir, self.run)  # type: ignore[arg-type]
            with self._lock:
                self.flight = {k: v for k, v in reports.items() if k not in self.done}
                self._show()

    def _show(self) -> None:
        running = self.flight.values()
        self.bar.set_postfix(
            records=f"{self.records + sum(r for _, r in running):,}", errors=f"{self.tally.errors:,}"
        )
        self.bar.moveto(self.inputs + sum(i for i, _ in running))


class _Tally:
    """The driver's running figures over the commit records it receives."""

    def __init__(self, t0: float, errors: int) -> None:
        self.t0 = t0  # perf_counter at the job's start
        self.wall0 = time.time() - (time.perf_counter() - t0)  # the same in Unix time (shards' stamps)
        self.errors = errors
        self.first = self.first_start = self.seconds = self.cpu_seconds = 0.0
        self.workers = 0  # tokenizer actors (0: the job ran in the driver)

    def add(self, c: dict[str, Any]) -> None:
        self.first = self.first or time.perf_counter() - self.t0
        start = c.get("started", 0.0) - self.wall0
        self.first_start = start if not self.first_start else min(self.first_start, start)
        self.seconds += c.get("seconds", 0.0)
        self.cpu_seconds += c.get("cpu_seconds", 0.0)
        self.errors += len(c["errors"])


def _write_errors(path: str, errors: Sequence[Sequence[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(tables.errors_to_arrow(tuple(e) for e in errors), sink, compression="zstd")
    tables.atomic_write_bytes(path, sink.getvalue().to_pybytes())


@gc_paused()
def _read_commits(
    plan: Sequence[ShardSpec], out_dir: str, *, every: bool = False
) -> dict[str, dict[str, Any]]:
    """The commit records of ``plan``'s shards whose record and file are intact, by shard id; with
    ``every``, a shard without one is an error."""
    done: dict[str, dict[str, Any]] = {}
    for sh in plan:
        c = _read_json(_commit_path(out_dir, sh.shard_id))
        if c is not None and _shard_intact(out_dir, c):
            done[sh.shard_id] = c
        elif every:
            raise PreprocessError(f"{out_dir}: shard {sh.index} ({sh.shard_id}) has no valid commit record")
    return done


VISIBLE_WAIT_S = 75.0
"""Seconds the driver waits for a shard a worker committed to show in its own view of the table's
folder before it stops the job: an NFS client may keep a folder's listing for up to ``acdirmax``
(60 s by default) and so answer "no such file" for another machine's new file that long (the
driver looked the commit records up when it planned the job)."""


def _check_visible(out_dir: str, commit: dict[str, Any], wait: float | None = None) -> None:
    """Raise PreprocessError, naming both machines, when the driver does not see the commit record and
    shard that a worker reported (within ``wait`` seconds, default :data:`VISIBLE_WAIT_S`): on a
    cluster, an output folder on each node's local disk (``-o /tmp/out``) gets the shards on the
    workers' disks, and the job would only fail at its end, every input tokenized, when the driver
    finds no commit records."""
    record = _commit_path(out_dir, commit["shard_id"])
    deadline = time.monotonic() + (VISIBLE_WAIT_S if wait is None else wait)
    while not (os.path.isfile(record) and _shard_intact(out_dir, commit)):
        if time.monotonic() >= deadline:
            info = commit.get("shard")
            what = (
                os.path.join(out_dir, info["name"]) if info is not None and os.path.isfile(record) else record
            )
            raise PreprocessError(
                f"{out_dir}: shard {commit['index']} was written by a worker on {commit.get('host', '?')}, but "
                f"this driver on {socket.gethostname()} does not see {what}: on a cluster, --out must be a folder "
                "on storage that every node sees (a shared filesystem), not a node's local disk"
            )
        for folder in (os.path.dirname(record), out_dir):  # opening a folder makes NFS check it anew
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                next(entries, None)
        time.sleep(0.2)


def _driver_sees(source: str) -> bool:
    """Whether this process sees input ``source`` (the file of a part)."""
    return os.path.exists(split_part(source)[0])


def _check_inputs_seen(out_dir: str, commit: dict[str, Any]) -> None:
    """Raise PreprocessError when a worker on another machine found inputs missing that this driver
    sees: inputs on the driver's own disk, which the cluster's nodes do not share. Every input would
    become an error row ``missing``, so the job stops at the first such shard, and that shard's commit
    record and file are removed: its error rows are the node's view, not the inputs', and the same
    command (with the inputs on shared storage) tokenizes it again."""
    host = commit.get("host")
    if host is None or host == socket.gethostname():
        return
    seen = [e[0] for e in commit["errors"] if e[1] == "missing" and _driver_sees(e[0])]
    if not seen:
        return
    info = commit.get("shard")
    for p in [_commit_path(out_dir, commit["shard_id"])] + (
        [os.path.join(out_dir, info["name"])] if info else []
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    raise PreprocessError(
        f"{seen[0]}: missing for the worker on {host}, but this driver on {socket.gethostname()} sees it "
        f"({_count(len(seen), 'such input')} in shard {commit['index']}): on a cluster, inputs must be on storage that every "
        "node sees (a shared filesystem); the shard is left to do again (a network filesystem can also show a "
        "machine's new files to the others late: then run the same command again)"
    )


def _shard_intact(out_dir: str, commit: dict[str, Any]) -> bool:
    """A commit record is valid when its shard file (if any) exists with the recorded size."""
    info = commit.get("shard")
    if info is None:
        return True
    p = os.path.join(out_dir, info["name"])
    return os.path.isfile(p) and os.path.getsize(p) == info["bytes"]


@gc_paused()
def _check_accounting(plan: Sequence[ShardSpec], commits: Sequence[dict[str, Any]], out_dir: str) -> None:
    """inputs = distinct sources written + error rows, shard by shard and in total."""
    total_written: set[str] = set()
    n_err = 0
    for sh, c in zip(plan, commits):
        expected = {i.source for i in sh.inputs}
        written, failed = set(c["sources"]), [e[0] for e in c["errors"]]
        if len(written) != len(c["sources"]) or len(set(failed)) != len(failed) or written & set(failed):
            raise PreprocessError(
                f"{out_dir}: shard {sh.index}: an input is counted twice in its commit record"
            )
        if written | set(failed) != expected:
            raise PreprocessError(
                f"{out_dir}: shard {sh.index}: commit record does not account for its inputs"
            )
        if total_written & written:
            raise PreprocessError(f"{out_dir}: shard {sh.index}: a source appears in two shards")
        total_written |= written
        n_err += len(failed)
    n_inputs = sum(len(sh.inputs) for sh in plan)
    if len(total_written) + n_err != n_inputs:
        raise PreprocessError(
            f"{out_dir}: accounting failed: {len(total_written)} sources written + {n_err} errors != {n_inputs} inputs"
        )


def _tidy(out_dir: str, keep: set[str]) -> None:
    """After the manifest: drop commit records, temp files and shard files the manifest does not list."""
    shutil.rmtree(os.path.join(out_dir, COMMITS), ignore_errors=True)
    for p in glob.glob(os.path.join(out_dir, tables.TEMP_PREFIX + "*")):
        os.unlink(p)
    for p in glob.glob(os.path.join(out_dir, "part-*.parquet")):
        if os.path.basename(p) not in keep:
            os.unlink(p)
