import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import ppkit_tokenizer  # noqa: F401  (registers the test tokenizer "ppkit_numbers")
import pyarrow.parquet as pq
import pytest
import ray

import maskloom.pipelines.preprocess as pp
from maskloom import tables
from maskloom.cli import main
from maskloom.pipelines.preprocess import (
    COMMITS,
    PreprocessError,
    PreprocessResult,
    ShardAttempts,
    ShardSpec,
    TableConflictError,
    TokenizeShardActor,
    WorkerDeathsError,
    _size,
    artifacts_digest,
    default_shard_size,
    plan_shards,
    preprocess,
    shard_key,
    tokenize_shard,
)
from maskloom.pipelines.ray_utils import (
    RAY_DATA_PROGRESS_LOGGER,
    THREAD_ENV_VARS,
    WORKER_NICENESS_ENV,
    RayResources,
    init_ray,
    limit_threads,
    quiet_ray_data_bars,
    resources,
    restore_threads,
)
from maskloom.pipelines.sources import Input, find_inputs
from maskloom.testing import write_tar
from maskloom.tokenizers.base import Record, TokenizeError, get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TOK = ppkit_tokenizer.NAME
TAR_TOK = ppkit_tokenizer.TAR_NAME  # the same, reading tar shards in folders too
IMPORTS = ["ppkit_tokenizer"]


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray for the module; workers import the test tokenizer through PYTHONPATH."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = HERE + (os.pathsep + old if old else "")
    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def make_data(root, n_a=5, n_b=4, bad=("b/bad.txt",)):
    """a/f{i}.txt holds "i i+1" (2 tokens), b/g{i}.txt holds "i" (1 token); bad files hold words."""
    for i in range(n_a):
        os.makedirs(root / "a", exist_ok=True)
        (root / "a" / f"f{i}.txt").write_text(f"{i} {i + 1}")
    for i in range(n_b):
        os.makedirs(root / "b", exist_ok=True)
        (root / "b" / f"g{i}.txt").write_text(f"{i}")
    for b in bad:
        (root / b).write_text("not numbers")
    return find_inputs(str(root), extensions=(".txt",), labels="folder")


def _cli_subprocess() -> tuple[dict[str, str], str]:
    """(environment, ``python -c`` code) to run ``maskloom`` in a child process that has the test
    tokenizer registered (for tests that kill, interrupt or crash the command)."""
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env, "import ppkit_tokenizer, sys; from maskloom.cli import main; sys.exit(main(sys.argv[1:]))"


def _preprocess_argv(inputs, out, *options: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of ``maskloom preprocess INPUTS -m ppkit_numbers -o OUT --import ppkit_tokenizer
    --no-progress OPTIONS`` in a child process (:func:`_cli_subprocess`)."""
    env, code = _cli_subprocess()
    argv = [sys.executable, "-c", code, "preprocess", str(inputs), "-m", TOK, "-o", str(out),
            "--import", "ppkit_tokenizer", "--no-progress", *options]  # fmt: skip
    return argv, env


# ---- planning and one shard (no Ray) ---------------------------------------------------------
def test_plan_is_deterministic_and_keyed_by_config():
    inputs = [Input(f"/d/{c}.txt", k) for k, c in enumerate("edcba")]
    p1 = plan_shards(inputs, "fp1", 2)
    assert [[i.source for i in sh.inputs] for sh in p1] == [
        ["/d/a.txt", "/d/b.txt"],
        ["/d/c.txt", "/d/d.txt"],
        ["/d/e.txt"],
    ]
    assert [sh.index for sh in p1] == [0, 1, 2]
    assert plan_shards(list(reversed(inputs)), "fp1", 2) == p1
    assert p1[1].name == f"part-00001-{p1[1].shard_id}.parquet" and len(p1[1].shard_id) == 16
    p2 = plan_shards(inputs, "fp2", 2)
    assert not {s.shard_id for s in p1} & {s.shard_id for s in p2}
    relabeled = plan_shards([Input(i.source, 0) for i in inputs], "fp1", 2)
    assert [s.shard_id == r.shard_id for s, r in zip(p1, relabeled)] == [False, False, True]  # e kept label 0
    assert ShardSpec.from_json(p1[0].to_json()) == p1[0]


def test_input_size_of_file_folder_and_missing_path(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"x" * 5)
    (tmp_path / "d" / "e" / "b.bin").write_bytes(b"y" * 7)
    assert _size(str(tmp_path / "d" / "a.bin")) == 5
    assert _size(str(tmp_path / "d")) == 12  # a dataset folder source: every file under it
    assert _size(str(tmp_path / "nope")) == 0


def test_ray_data_bar_notice_is_dropped_and_other_warnings_kept():
    import logging

    import ray.data

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        quiet_ray_data_bars()
        quiet_ray_data_bars()  # idempotent: one filter
        assert ray.data.DataContext.get_current().enable_progress_bars is False
        assert sum(type(f).__name__ == "_DropBarNotice" for f in logger.filters) == 1
        logger.warning("Progress bars disabled. To enable, set `...enable_progress_bars = True`.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


class _Streaming(ppkit_tokenizer.NumbersTokenizer):
    """Streams one record per number; a file holding "-1" is found bad only at its end (after its
    records), and one holding "-2" raises a tokenizer bug part-way (an internal error)."""

    def iter_records(self, source):
        v = self.read(source)
        for k, x in enumerate(v):
            if x == -2:
                raise RuntimeError("bug part-way")
            yield Record(id=f"{source}#{k}", source=source, tokens=np.array([[x, 2 * x]], np.float32),
                         positions=np.array([[0.0]], np.float32))  # fmt: skip
        if (v == -1).any():
            raise TokenizeError(source, "invalid", "a -1 at the end")


@pytest.mark.parametrize("row_group_bytes", [32 << 20, 1])
def test_an_input_found_bad_after_streaming_records_keeps_none_of_them(tmp_path, caplog, monkeypatch,
                                                                       row_group_bytes):  # fmt: skip
    """Records stream from Tokenizer.iter_records into the shard; an input that fails after some of
    its records loses them all: dropped from the pending row group, or (once a row group holding
    them is written: 1-byte row groups here) the shard written again without the input."""
    import functools
    import logging

    monkeypatch.setattr(
        tables, "ShardWriter", functools.partial(tables.ShardWriter, row_group_bytes=row_group_bytes)
    )
    monkeypatch.setattr(pp, "STREAM_BATCH", 1 if row_group_bytes == 1 else pp.STREAM_BATCH)
    (tmp_path / "in").mkdir()
    for name, text in [("a.txt", "1 2 3"), ("b.txt", "4 5 -1"), ("c.txt", "6 -2 7"), ("d.txt", "8")]:
        (tmp_path / "in" / name).write_text(text)
    tok = _Streaming(None)
    meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version="1", config=tok.config_dict(),
                             fingerprint=tok.fingerprint())  # fmt: skip
    (shard,) = plan_shards(find_inputs(str(tmp_path / "in"), extensions=(".txt",)).inputs, "k", 10)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="maskloom.pipelines.preprocess"):
        c = tokenize_shard(tok, shard, str(out), meta)
    assert [os.path.basename(s) for s in c["sources"]] == ["a.txt", "d.txt"]
    assert [(os.path.basename(s), k, m) for s, k, m in c["errors"]] == [
        ("b.txt", "invalid", "a -1 at the end"),
        ("c.txt", "internal", "RuntimeError: bug part-way"),
    ]
    assert c["tokens"] == 4 and c["shard"]["rows"] == 4 and c["shard"]["inputs"] == 2
    t = pq.read_table(out / shard.name)
    assert [r.tokens.tolist() for r in tables.arrow_to_records(t)] == [
        [[1, 2]],
        [[2, 4]],
        [[3, 6]],
        [[8, 16]],
    ]
    assert [os.path.basename(i) for i in t.column("id").to_pylist()] == [
        "a.txt#0",
        "a.txt#1",
        "a.txt#2",
        "d.txt#0",
    ]
    redone = [r.getMessage() for r in caplog.records if "writing shard 0 again" in r.getMessage()]
    if row_group_bytes == 1:  # each of the two bad inputs had a row group in the file: two passes more
        assert (
            len(redone) == 2
            and "b.txt: rejected after some of its records were written (invalid" in redone[0]
        )
    else:
        assert redone == []
    assert sorted(os.listdir(out)) == sorted([COMMITS, shard.name])  # no temp file of a dropped pass left


def test_streamed_records_reach_the_writer_in_batches_bounded_by_bytes(tmp_path, monkeypatch):
    """A stream of big records (a tar of videos: 2.4 MB each) goes to the writer every
    STREAM_BATCH_BYTES of tokens, not every STREAM_BATCH records (0.6 GB)."""
    monkeypatch.setattr(pp, "STREAM_BATCH_BYTES", 24)  # 3 records of 8 bytes of tokens
    sizes: list[int] = []
    add = tables.ShardWriter.add
    monkeypatch.setattr(
        tables.ShardWriter, "add", lambda self, recs: (sizes.append(len(recs)), add(self, recs))[1]
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(" ".join(str(i) for i in range(8)))
    tok = get_tokenizer(TOK, {"stream_delay": 1e-6})
    meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version="1", config=tok.config_dict(),
                             fingerprint=tok.fingerprint())  # fmt: skip
    (shard,) = plan_shards(find_inputs(str(tmp_path / "in"), extensions=(".txt",)).inputs, "k", 10)
    c = tokenize_shard(tok, shard, str(tmp_path / "out"), meta)
    assert sizes == [3, 3, 2] and c["shard"]["rows"] == 8


def test_shard_writer_rolls_back_pending_records_only(tmp_path):
    tok = get_tokenizer(TOK, None)
    spec = tok.spec()
    recs = [r for i in range(3) for r in tok.tokenize(np.array([i], np.float32), source=f"s{i}")]
    with tables.ShardWriter(str(tmp_path / "x.parquet"), spec, row_group_bytes=1 << 20) as w:
        w.add(recs[:1])
        m = w.mark()
        w.add(recs[1:])
        assert w.rollback(m) and w.mark() == m
        w.add(recs[2:])
        m2 = w.mark()
        w.row_group_bytes = 1  # the next add writes a row group
        w.add(recs[1:2])
        assert w.rows == 3 and not w.rollback(m2) and w.rows == 3
        info = w.close()
    t = pq.read_table(tmp_path / "x.parquet")
    assert info["rows"] == 3 and t.column("source").to_pylist() == ["s0", "s2", "s1"]


def test_shard_writer_packs_small_records_and_rolls_back_across_packs(tmp_path):
    """Records are packed into Arrow every pack_records while a row group fills (one row group in the
    file all the same); a rollback keeps exactly the records before the mark, packed or not."""
    tok = get_tokenizer(TOK, None)
    recs = [r for i in range(9) for r in tok.tokenize(np.array([i], np.float32), source=f"s{i}")]
    path = tmp_path / "x.parquet"
    with tables.ShardWriter(str(path), tok.spec(), pack_records=2) as w:
        w.add(recs[0:3])  # 3 pending: packed
        w.add(recs[3:4])
        assert (w._packed_rows, len(w._pending)) == (3, 1)
        w.add(recs[4:5])  # 2 pending: packed
        m = w.mark()  # 5 records: packs of 3 and 2
        w.add(recs[5:6])
        w.add(recs[6:7])  # a pack of 2 more
        assert (w._packed_rows, len(w._pending)) == (7, 0)
        assert w.rollback(m) and w.mark() == m and (w._packed_rows, len(w._pending)) == (5, 0)
        assert w.rollback((w.rows, 2, 0)) and (w._packed_rows, len(w._pending)) == (2, 0)  # inside a pack
        w.add(recs[7:9])
        info = w.close()
    pf = pq.ParquetFile(path)
    assert info["rows"] == 4 and pf.metadata.num_row_groups == 1
    assert pf.read().column("source").to_pylist() == ["s0", "s1", "s7", "s8"]


def test_tokenize_shard_writes_shard_then_commit_with_error_rows(tmp_path):
    found = make_data(tmp_path / "in", n_a=2, n_b=1)
    tok = get_tokenizer(TOK, {"crash_on": "g0"})
    meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version="1", config=tok.config_dict(),
                             fingerprint=tok.fingerprint(), label_names=found.label_names)  # fmt: skip
    (shard,) = plan_shards(found.inputs, "k", 10)
    out = tmp_path / "out"
    c = tokenize_shard(tok, shard, str(out), meta)
    assert c == json.loads((out / COMMITS / f"{shard.shard_id}.json").read_text())
    assert [os.path.basename(s) for s in c["sources"]] == ["f0.txt", "f1.txt"]
    assert [(os.path.basename(s), k) for s, k, _ in c["errors"]] == [
        ("bad.txt", "corrupt"),
        ("g0.txt", "internal"),
    ]
    assert c["errors"][1][2] == "RuntimeError: boom"
    assert c["tokens"] == 4 and c["shard"]["rows"] == 2 and c["shard"]["inputs"] == 2
    assert c["input_bytes"] == sum(os.path.getsize(i.source) for i in shard.inputs)  # failed ones too
    assert (
        c["seconds"] >= c["write_seconds"] > 0
        and c["cpu_seconds"] > 0
        and abs(c["started"] - time.time()) < 60
    )
    t = pq.read_table(out / shard.name)
    tables.validate_table(t)
    assert t.column("label").to_pylist() == [0, 0]
    assert [r.tokens.tolist() for r in tables.arrow_to_records(t)] == [[[0, 0], [1, 2]], [[1, 2], [2, 4]]]
    assert os.listdir(out) == [COMMITS, shard.name] or sorted(os.listdir(out)) == sorted(
        [COMMITS, shard.name]
    )


def test_a_long_shard_reports_its_progress_at_most_every_interval(tmp_path):
    """ShardProgress writes _commits/_progress/<shard id>.json only once an interval has passed (a
    short shard writes none), then at most once per interval; read_progress keeps the job's own
    reports; done() removes the file."""
    (shard,) = plan_shards([Input(f"/d/{c}.txt") for c in "abc"], "k", 10)
    clock = [0.0]
    live = pp.ShardProgress(str(tmp_path), shard, "job1", interval=1.0, clock=lambda: clock[0])
    folder = tmp_path / COMMITS / pp.PROGRESS
    live.report(1, 10)
    assert not folder.exists()  # not due yet
    clock[0] = 1.0
    live.report(2, 20)
    clock[0] = 1.5
    live.report(3, 30)  # due again at 2.0: not written
    assert json.loads((folder / f"{shard.shard_id}.json").read_text()) == {
        "run": "job1",
        "inputs": 2,
        "records": 20,
    }
    other = pp.ShardProgress(str(tmp_path), plan_shards([Input("/d/z.txt")], "k", 1)[0], "job0", interval=0.0)
    other.report(1, 5)  # an earlier job's report, left behind
    assert pp.read_progress(str(tmp_path), "job1") == {shard.shard_id: (2, 20)}
    live.done()
    assert pp.read_progress(str(tmp_path), "job1") == {}


def test_the_bar_counts_inputs_inside_a_running_shard(tmp_path, monkeypatch, capsys):
    """One shard of 6 slow inputs: the driver's bar (a log line per update here) moves through the
    shard as it reports, not from 0 to 6 at its commit; the progress files go with the job."""
    import functools

    from maskloom._progress import Progress

    make_data(tmp_path / "in", n_a=6, n_b=0, bad=())
    monkeypatch.setattr(pp, "Progress", functools.partial(Progress, interval=0.0))
    monkeypatch.setattr(pp, "PROGRESS_INTERVAL_S", 0.05)
    monkeypatch.setattr(pp, "PROGRESS_POLL_S", 0.05)
    r = preprocess(
        str(tmp_path / "in"), TOK, {"delay": 0.2}, str(tmp_path / "out"), num_workers=0, shard_size=6
    )
    assert r.rows == 6 and r.shards == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("preprocess: ")]
    counts = [int(re.match(r"preprocess: (\d+)/6 inputs", ln).group(1)) for ln in lines]
    assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts) - {0, 6}) >= 3, lines
    assert lines[-1].startswith("preprocess: 6/6 inputs (100%)") and lines[-1].endswith("records=6, errors=0")
    k = counts.index(next(c for c in counts if 0 < c < 6))
    assert f"records={counts[k]}," in lines[k]  # one record per input, counted as the shard writes it
    assert not (tmp_path / "out" / COMMITS).exists()


def test_a_fit_says_what_the_job_is_doing(tmp_path, capsys):
    """With a bar, the fit stage (a corpus's vocabulary: a minute) is announced, then timed."""
    (tmp_path / "in").mkdir()
    for k in range(3):
        (tmp_path / "in" / f"{k}.txt").write_text(f"document {k} with some words\n")
    preprocess(str(tmp_path / "in"), "text", {"vocab_size": 300}, str(tmp_path / "out"), num_workers=0)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "preprocess: fitting the text tokenizer on 3 inputs"
    assert re.fullmatch(r"preprocess: fitted in \d+\.\d s", err[1])
    preprocess(str(tmp_path / "in"), "text", {"vocab_size": 300}, str(tmp_path / "out2"), num_workers=0,
               progress=False)  # fmt: skip
    assert "fitting" not in capsys.readouterr().err


def test_resources_defaults_and_validation():
    r = resources(max_workers=1)
    assert r.num_workers == 1 and r.cpus_per_worker == 1.0 and r.gpus_per_worker == 0.0 and r.batch_size == 1
    assert resources(3, 0.5).num_workers == 3
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        resources(0)
    kw = resources(2).map_batches_kwargs()
    assert (
        kw["compute"].__class__.__name__ == "ActorPoolStrategy"
        and kw["num_cpus"] == 1.0
        and "num_gpus" not in kw
    )


def test_default_shard_size_aims_at_shards_per_worker_within_bounds():
    # 8 shards per worker, at most 256 and at least 32 inputs per shard (unless the job is smaller)
    cases = [(1, 1), (10, 2), (100, 2), (500, 1), (2000, 2), (3000, 1), (3000, 2), (100_000, 2)]
    # (100,000 on 2 workers: 391 shards of 256 would leave one alone at the end: 394 of 254)
    assert [default_shard_size(n, w) for n, w in cases] == [1, 10, 32, 63, 125, 256, 188, 254]
    assert default_shard_size(3000, 0) == 256  # a worker count below one counts as one


def test_default_shard_size_holds_half_a_second_of_measured_work():
    # ~0.5 s per shard by the measured cost of an input, rounded down to a power of two, 32..4096
    big = 1_000_000
    assert default_shard_size(big, 1, 0.00025) == 1024  # 2000 -> 1024 (8 kHz spoken digits)
    assert default_shard_size(big, 1, 0.0002) == 2048  # 2500 -> 2048
    assert default_shard_size(big, 1, 0.003) == 128  # 166 -> 128 (images upscaled to 224)
    assert default_shard_size(big, 1, 1e-6) == 4096 and default_shard_size(big, 1, 0.5) == 32
    assert default_shard_size(3000, 2, 0.00025) == 188  # small jobs: still 8 shards per worker
    assert default_shard_size(big, 1, None) == 256 and default_shard_size(big, 1, 0.0) == 256
    # heavy inputs (a tar of images, a video: ~1 s each): no minimum of 32 in a small job, so that
    # its workers share it (4 tars on 2 workers were one shard on one worker)
    assert default_shard_size(4, 2, 1.0) == 1 and default_shard_size(40, 2, 1.0) == 3
    assert default_shard_size(4, 2, 0.3) == 2 and default_shard_size(40, 2, 0.05) == 10
    assert default_shard_size(100, 2, 0.001) == 32 == default_shard_size(100, 2)  # light ones keep it


def test_default_shards_are_a_multiple_of_the_workers():
    """42,000 clips at 2048 per shard would be 21 shards: one worker alone through the last one.
    The size shrinks to 1910 (22 shards) instead; 100,000 inputs on 4 workers: 256 -> 253 (396)."""
    assert default_shard_size(42_000, 1, 0.00024) == 2048  # one worker: no rounding
    assert default_shard_size(42_000, 2, 0.00024) == 1910 and -(-42_000 // 1910) == 22
    assert default_shard_size(100_000, 4) == 253 and -(-100_000 // 253) == 396
    # a count that is a multiple of the workers already is evened out: 1024 per shard would be 41
    # full shards and one of 16 (one worker a shard behind); 42 shards of 1000 instead
    assert default_shard_size(42_000, 1, 0.00045) == 1024
    assert default_shard_size(42_000, 2, 0.00045) == 1000
    assert default_shard_size(42_001, 2, 0.00045) == 1001 and -(-42_001 // 1001) == 42
    for n in range(3_000, 60_000, 997):
        for w in (2, 3, 4, 8):
            size = default_shard_size(n, w, 0.00024)
            count = -(-n // size)
            assert count % w == 0, (n, w)
            assert n - (count - 1) * size >= size - count, (n, w)  # the last shard is about as big
    # not below the minimum size: 2053 inputs on 8 workers keep 63 shards of 33
    assert default_shard_size(2053, 8) == 33


def test_seconds_per_input_samples_evenly_after_one_untimed_input():
    from maskloom.pipelines.preprocess import seconds_per_input
    from maskloom.pipelines.sources import Input

    class Clock:
        def __init__(self, fail=(), warm=0.02):
            self.calls, self.fail, self.warm = [], set(fail), warm

        def iter_records(self, source):  # what the workers read (a tar of images: a stream)
            self.calls.append(source)
            if source in self.fail:
                raise TokenizeError(source, "corrupt", "bad")
            time.sleep(self.warm if source == "s0" else 0.002)  # the first (warm-up) input is slow
            return iter([])

    inputs = [Input(f"s{i}") for i in range(100)]
    tok = Clock()
    spi = seconds_per_input(tok, inputs, sample=4)
    assert tok.calls == ["s0", "s25", "s50", "s74", "s99"]  # 5 evenly spaced, the first untimed
    assert 0.002 <= spi < 0.015
    tok = Clock(fail={f"s{i}" for i in range(100)})
    assert seconds_per_input(tok, inputs) is None  # e.g. the driver cannot read the workers' files
    assert seconds_per_input(Clock(), inputs[:1]) is None
    tok = Clock()
    seconds_per_input(tok, inputs, sample=8, budget=0.0)  # no new input once the budget is spent
    assert tok.calls == ["s0", "s12"]
    tok = Clock(warm=0.2)  # the budget starts after the warm-up input, which here outlasts it alone
    spi = seconds_per_input(tok, inputs, sample=4, budget=0.1)
    assert tok.calls == ["s0", "s25", "s50", "s74", "s99"] and spi < 0.1


def test_large_inputs_are_sized_into_shards_by_bytes_without_timing(tmp_path):
    """40 files of 300 MB on two workers are 40 shards (the default would make one shard of 32 files
    and one of 8), and none is tokenized on the driver to time it (one could take minutes)."""
    from maskloom.pipelines.preprocess import BIG_INPUT_BYTES, big_input_bytes, measured_shard_size

    def files(n, size):
        out = []
        for i in range(n):
            p = tmp_path / f"{size}-{i:03d}.jsonl"
            with open(p, "wb") as f:
                f.truncate(size)  # sparse: no disk
            out.append(Input(str(p)))
        return out

    class NotTimed:
        def __call__(self, source):
            raise AssertionError("a large input was tokenized on the driver")

    big = files(40, 300 << 20)
    assert big_input_bytes(big) == 300 << 20
    assert measured_shard_size(NotTimed(), big, 2) == 1
    mid = files(600, 20 << 20)  # 64 MB of 20 MB inputs: 3 per shard (the worker share, 38, is more)
    assert measured_shard_size(NotTimed(), mid, 2) == 3
    assert measured_shard_size(NotTimed(), mid[:40], 2) == 3  # share 3
    assert measured_shard_size(NotTimed(), mid[:20], 2) == 2  # share 2
    small = files(3, BIG_INPUT_BYTES - 1)
    assert big_input_bytes(small) == 0 and big_input_bytes([]) == 0
    assert big_input_bytes([Input(str(tmp_path / "missing"))]) == 0  # the driver may not see the files


def test_a_small_parallel_job_is_timed_so_heavy_inputs_spread_over_the_workers():
    from maskloom.pipelines.preprocess import measured_shard_size

    class Slow:  # 0.3 s an input, as a tar of a few hundred images
        calls = 0

        def iter_records(self, source):
            Slow.calls += 1
            time.sleep(0.3)
            return iter([])

    inputs = [Input(f"t{i}.tar") for i in range(4)]
    assert measured_shard_size(Slow(), inputs, 2) == 2 and Slow.calls >= 2  # 2 shards, one per worker
    Slow.calls = 0
    assert measured_shard_size(Slow(), inputs, 1) == 4 and Slow.calls == 0  # one worker: not timed


def test_max_tasks_in_flight_reaches_the_actor_pool():
    assert resources(2).max_tasks_in_flight == 2 and resources(2, 2.5).threads_per_worker == 2
    assert resources(2, 0.5).threads_per_worker == 1
    assert resources(2).map_batches_kwargs()["compute"].max_tasks_in_flight_per_actor == 2


def test_limit_threads_sets_and_restores_every_library(monkeypatch):
    import pyarrow as pa
    import torch

    for k in (*THREAD_ENV_VARS, "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    from threadpoolctl import threadpool_info

    blas = lambda: [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]  # noqa: E731
    before = (torch.get_num_threads(), pa.cpu_count(), blas())
    assert before[2], "numpy's BLAS pool is loaded (numpy is imported)"
    old = limit_threads(1)
    try:
        assert [os.environ[k] for k in THREAD_ENV_VARS] == ["1"] * len(THREAD_ENV_VARS)
        assert torch.get_num_threads() == 1 and pa.cpu_count() == 1
        assert blas() == [1] * len(before[2])  # numpy's OpenBLAS, loaded before the call, obeys too
        # Hugging Face tokenizers: no rayon pool for one thread (its pool slowed later work by 15 %)
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and os.environ["RAYON_NUM_THREADS"] == "1"
    finally:
        restore_threads(old)
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
    assert "TOKENIZERS_PARALLELISM" not in os.environ and "RAYON_NUM_THREADS" not in os.environ
    old = limit_threads(2)
    try:
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true" and os.environ["RAYON_NUM_THREADS"] == "2"
    finally:
        restore_threads(old)
    assert (torch.get_num_threads(), pa.cpu_count(), blas()) == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        limit_threads(0)


def test_actor_limits_its_threads_before_and_after_building_the_tokenizer(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = limit_threads(2)  # saved so that the test restores what the actor changes
    try:
        tok = get_tokenizer(TOK)
        meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version="1", config=tok.config_dict(),
                                 fingerprint=tok.fingerprint())  # fmt: skip
        actor = TokenizeShardActor(modality=TOK, config={}, imports=IMPORTS, artifacts_dir=None,
                                   out_dir=str(tmp_path), meta=meta, threads=1)  # fmt: skip
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        (tmp_path / "x.txt").write_text("3 4")
        (shard,) = plan_shards([Input(str(tmp_path / "x.txt"))], "k", 4)
        out = actor({"spec": np.array([shard.to_json()], dtype=object)})
        assert json.loads(out["commit"][0])["tokens"] == 2
    finally:
        restore_threads(old)


# ---- whole jobs on the embedded Ray ----------------------------------------------------------
def test_embedded_ray_runs_its_workers_at_the_drivers_niceness(local_ray):
    """Ray's workers take niceness 15 by default; the embedded Ray starts them at 0 (a plain loop's),
    without leaving Ray's variable set in this process."""

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)  # 15 with Ray's default
    assert WORKER_NICENESS_ENV not in os.environ


def test_preprocess_table_accounting_rerun_and_conflicts(tmp_path, local_ray):
    found = make_data(tmp_path / "in")
    out = str(tmp_path / "t")
    r = preprocess(found, TOK, None, out, shard_size=3, imports=IMPORTS, progress=False, num_workers=2)
    assert (r.inputs, r.rows, r.tokens, r.errors, r.shards, r.skipped_shards) == (10, 9, 14, 1, 4, 0)
    assert not r.already_done and r.bytes == sum(
        os.path.getsize(p) for p in tables.TokenTable(out).shard_paths()
    )
    table = tables.TokenTable(out)
    assert table.label_names == ["a", "b"] and table.num_rows == 9
    assert table.manifest.totals == {"inputs": 10, "rows": 9, "errors": 1}
    t = table.read()
    tables.validate_table(t)
    assert sorted(os.path.basename(s) for s in t.column("source").to_pylist()) == [
        f"f{i}.txt" for i in range(5)
    ] + [f"g{i}.txt" for i in range(4)]
    assert t.column("label").to_pylist() == [0] * 5 + [1] * 4
    errs = table.errors().to_pylist()
    assert [(os.path.basename(e["source"]), e["kind"]) for e in errs] == [("bad.txt", "corrupt")]
    # the directory holds exactly the table: no commits, no temp files
    assert sorted(os.listdir(out)) == sorted(
        ["_manifest.json", "_errors.parquet", "artifacts"] + [s["name"] for s in table.manifest.shards]
    ) or sorted(os.listdir(out)) == sorted(
        ["_manifest.json", "_errors.parquet"] + [s["name"] for s in table.manifest.shards]
    )

    again = preprocess(found, TOK, None, out, shard_size=3, imports=IMPORTS, progress=False)
    assert again.already_done and again.rows == 9 and "nothing to do" in again.summary()
    with pytest.raises(TableConflictError, match="another config"):
        preprocess(found, TOK, {"scale": 2.0}, out, shard_size=3, imports=IMPORTS, progress=False)
    r2 = preprocess(
        found, TOK, {"scale": 2.0}, out, shard_size=3, imports=IMPORTS, progress=False, overwrite=True
    )
    assert r2.rows == 9 and tables.TokenTable(out).meta["config"]["scale"] == 2.0
    assert tables.TokenTable(out).records()[1].tokens.tolist() == [[2, 4], [4, 8]]


def test_check_visible_names_the_file_the_driver_does_not_see(tmp_path, monkeypatch):
    """On a cluster whose --out is each node's local disk, the driver stops at the first shard it does
    not see, naming both machines and the file, not at the end of the job."""
    monkeypatch.setattr(pp.socket, "gethostname", lambda: "head")
    out = tmp_path / "t"
    (out / COMMITS).mkdir(parents=True)
    commit = {
        "shard_id": "abc",
        "index": 3,
        "host": "worker-7",
        "shard": {"name": "part-00003-abc.parquet", "bytes": 4},
    }
    record = out / COMMITS / "abc.json"
    with pytest.raises(PreprocessError) as e:
        pp._check_visible(str(out), commit, wait=0)
    assert str(e.value) == (
        f"{out}: shard 3 was written by a worker on worker-7, but this driver on head does not see {record}: on a "
        "cluster, --out must be a folder on storage that every node sees (a shared filesystem), not a node's "
        "local disk"
    )
    record.write_text("{}")
    with pytest.raises(
        PreprocessError, match=f"does not see {re.escape(str(out / 'part-00003-abc.parquet'))}: "
    ):
        pp._check_visible(str(out), commit, wait=0)
    (out / "part-00003-abc.parquet").write_bytes(b"1234")
    pp._check_visible(str(out), commit, wait=0)  # both seen: nothing to say
    pp._check_visible(str(out), {**commit, "shard": None}, wait=0)  # every input failed: no shard file
    (out / "part-00003-abc.parquet").unlink()
    t0 = time.monotonic()  # a file that shows late (a network filesystem's cache) is waited for
    threading.Timer(0.3, lambda: (out / "part-00003-abc.parquet").write_bytes(b"1234")).start()
    pp._check_visible(str(out), commit, wait=5)
    assert 0.25 < time.monotonic() - t0 < 2


def test_a_driver_that_does_not_see_the_workers_shards_stops_at_the_first(tmp_path, local_ray, monkeypatch):
    """Through Ray: the driver that does not see a committed shard (here: told so) stops the job with
    that message; nothing is lost, and the same command, where the driver sees the folder, finishes."""
    found = make_data(tmp_path / "in")
    out = str(tmp_path / "t")
    monkeypatch.setattr(pp, "VISIBLE_WAIT_S", 0.2)
    monkeypatch.setattr(pp, "_shard_intact", lambda out_dir, commit: False)  # the driver's view only
    with pytest.raises(PreprocessError, match=r"was written by a worker on .*, but this driver on .* does not see "
                       r".*part-000\d\d-\w+\.parquet: on a cluster, --out must be a folder"):  # fmt: skip
        preprocess(found, TOK, None, out, shard_size=3, imports=IMPORTS, progress=False, num_workers=2)
    monkeypatch.undo()
    r = preprocess(found, TOK, None, out, shard_size=3, imports=IMPORTS, progress=False, num_workers=2)
    assert (r.inputs, r.rows, r.errors, r.shards) == (10, 9, 1, 4)
    assert r.skipped_shards >= 1  # the shard(s) committed before the stop were kept


def test_inputs_the_driver_sees_but_a_worker_elsewhere_does_not_stop_the_job(
    tmp_path, local_ray, monkeypatch
):
    """Inputs on the driver's own disk: a worker on another machine finds them missing. The job stops at
    the first such shard, whose commit record and file are removed (its error rows are the node's view),
    so the same command with the inputs shared redoes it; a file missing for everyone is an error row."""
    (tmp_path / "in").mkdir()
    srcs = []
    for i in range(5):
        (tmp_path / "in" / f"f{i}.txt").write_text(f"{i}")
        srcs.append(str(tmp_path / "in" / f"f{i}.txt"))
    gone = str(tmp_path / "in" / "gone.txt")  # shard 1: f3, f4, gone
    srcs.append(gone)
    out = tmp_path / "t"
    monkeypatch.setattr(pp.socket, "gethostname", lambda: "head")  # the workers are elsewhere
    monkeypatch.setattr(pp, "_driver_sees", lambda source: True)  # ... and the driver sees gone.txt
    with pytest.raises(PreprocessError) as e:
        preprocess(srcs, TOK, None, str(out), shard_size=3, imports=IMPORTS, progress=False, num_workers=2)
    assert re.fullmatch(
        f"{re.escape(gone)}: missing for the worker on (?!head).+, but this driver on head sees it \\(1 such input "
        "in shard 1\\): on a cluster, inputs must be on storage that every node sees \\(a shared filesystem\\); "
        "the shard is left to do again \\(a network filesystem can also show a machine's new files to the others "
        "late: then run the same command again\\)",
        str(e.value),
    ), str(e.value)
    records = [json.loads(p.read_text()) for p in (out / COMMITS).glob("*.json")]
    assert [c["index"] for c in records if c.get("index") == 1] == []  # shard 1's record is removed ...
    assert not list(out.glob("part-00001-*.parquet"))  # ... and so is its file
    assert {c["index"] for c in records if "index" in c} <= {0}  # shard 0 may have committed meanwhile
    monkeypatch.undo()  # one machine: gone.txt is missing for the driver too, an error row
    r = preprocess(srcs, TOK, None, str(out), shard_size=3, imports=IMPORTS, progress=False, num_workers=2)
    assert (r.inputs, r.rows, r.errors, r.shards) == (6, 5, 1, 2)
    assert [(x["source"], x["kind"]) for x in tables.TokenTable(str(out)).errors().to_pylist()] == [
        (gone, "missing")
    ]


def test_preprocess_kept_ids_unique_and_plain_list_inputs(tmp_path, local_ray):
    srcs = []
    for i in range(4):
        p = tmp_path / f"x{i}.txt"
        p.write_text(" ".join(str(v) for v in range(i + 1)))
        srcs.append(str(p))
    r = preprocess(srcs, TOK, None, str(tmp_path / "t"), shard_size=1, imports=IMPORTS, progress=False)
    assert (r.rows, r.tokens, r.errors) == (4, 10, 0)
    t = tables.TokenTable(str(tmp_path / "t"))
    assert [rec.id for rec in t.records()] == [f"{s}#0" for s in srcs]
    assert t.label_names is None and t.read().column("label").null_count == 4


def test_a_table_is_readable_by_others_as_the_umask_allows(tmp_path):
    """Every file of a finished table (shards, _errors.parquet, _manifest.json, artifacts) has the
    permissions of a file made with open() under the user's umask: under 022, 0o644, so that a
    training job of another user, or a team sharing the folder, can read it (tempfile's 0o600 made
    such a table readable by its writer alone)."""
    found = make_data(tmp_path / "in", n_a=3, n_b=2)
    old = os.umask(0o022)
    try:
        r = preprocess(found, TOK, None, str(tmp_path / "t"), shard_size=2, progress=False, num_workers=0)
    finally:
        os.umask(old)
    assert (r.inputs, r.shards) == (6, 3)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "t") for f in fs]
    names = {os.path.basename(f) for f in files}
    assert {"_manifest.json", "_errors.parquet"} <= names and sum(n.startswith("part-") for n in names) == 3
    assert {os.path.relpath(f, tmp_path / "t"): oct(os.stat(f).st_mode & 0o777) for f in files} == {
        os.path.relpath(f, tmp_path / "t"): "0o644" for f in files
    }


@pytest.mark.timeout(60)
def test_a_named_pipe_is_an_error_row_even_for_a_plug_in_that_does_not_check_files(tmp_path, monkeypatch):
    """A plug-in reader that opens its input without Tokenizer.check_file would block for ever on a named
    pipe: the pipeline rejects special files itself (an error row, ``unsupported``), and the driver's
    estimate of an input's cost does not time them."""
    monkeypatch.setattr(pp.Tokenizer, "check_file", staticmethod(lambda source: None))
    (tmp_path / "in").mkdir()
    srcs = []
    for i in range(6):
        (tmp_path / "in" / f"f{i}.txt").write_text(f"{i} {i}")
        srcs.append(str(tmp_path / "in" / f"f{i}.txt"))
    os.mkfifo(tmp_path / "in" / "pipe.txt")
    srcs.insert(0, str(tmp_path / "in" / "pipe.txt"))
    r = preprocess(srcs, TOK, None, str(tmp_path / "t"), progress=False, num_workers=0)
    assert (r.inputs, r.rows, r.errors) == (7, 6, 1)
    assert tables.TokenTable(str(tmp_path / "t")).errors().to_pylist() == [
        {"source": srcs[0], "kind": "unsupported", "message": "not a regular file: a named pipe"}
    ]
    assert pp.seconds_per_input(get_tokenizer(TOK), [Input(s) for s in srcs]) > 0


def test_append_adds_the_new_inputs_as_new_shards_and_leaves_the_old_ones(tmp_path):
    """A collection that grew: --append tokenizes only the inputs the table lacks into shards after
    its own, keeps its shards (not rewritten), error rows and classes, and accounts for everything."""
    found = make_data(tmp_path / "in", n_a=3, n_b=2)
    out = tmp_path / "t"
    r1 = preprocess(found, TOK, None, str(out), shard_size=2, progress=False, num_workers=0)
    assert (r1.inputs, r1.rows, r1.errors, r1.shards) == (6, 5, 1, 3)
    old = tables.TokenTable(str(out)).manifest.shards
    mtimes = {s["name"]: os.path.getmtime(out / s["name"]) for s in old}
    (tmp_path / "in" / "a" / "f9.txt").write_text("9 10")
    (tmp_path / "in" / "b" / "g9.txt").write_text("9")
    (tmp_path / "in" / "b" / "bad2.txt").write_text("words")
    grown = find_inputs(str(tmp_path / "in"), extensions=(".txt",), labels="folder")
    with pytest.raises(TableConflictError, match=r"another input set; use append \(--append\)"):
        preprocess(grown, TOK, None, str(out), shard_size=2, progress=False, num_workers=0)
    r2 = preprocess(grown, TOK, None, str(out), shard_size=2, progress=False, num_workers=0, append=True)
    assert (r2.inputs, r2.rows, r2.errors, r2.shards, r2.skipped_shards) == (9, 7, 2, 5, 3)
    table = tables.TokenTable(str(out))
    assert table.manifest.totals == {"inputs": 9, "rows": 7, "errors": 2}
    assert table.manifest.shards[:3] == old
    assert [s["name"][:10] for s in table.manifest.shards[3:]] == ["part-00003", "part-00004"]
    assert {s["name"]: os.path.getmtime(out / s["name"]) for s in old} == mtimes  # not rewritten
    t = table.read()
    assert sorted(os.path.basename(x) for x in t.column("source").to_pylist()) == [
        "f0.txt", "f1.txt", "f2.txt", "f9.txt", "g0.txt", "g1.txt", "g9.txt"]  # fmt: skip
    labels = dict(
        zip((os.path.basename(x) for x in t.column("source").to_pylist()), t.column("label").to_pylist())
    )
    assert (labels["f9.txt"], labels["g9.txt"]) == (0, 1) and table.label_names == ["a", "b"]
    assert sorted(os.path.basename(e["source"]) for e in table.errors().to_pylist()) == [
        "bad.txt",
        "bad2.txt",
    ]
    assert sorted(set(os.listdir(out)) - {"artifacts"}) == sorted(
        ["_manifest.json", "_errors.parquet"] + [s["name"] for s in table.manifest.shards]
    )  # no commit records or temp files left
    again = preprocess(grown, TOK, None, str(out), shard_size=2, progress=False, num_workers=0, append=True)
    assert again.already_done and again.inputs == 9


def test_retry_errors_tokenizes_the_error_rows_inputs_again(tmp_path):
    """A file fixed since the table was built (or a decoder upgraded): --retry-errors tokenizes the
    table's error-row inputs again, with any new inputs; its written rows stay as they are."""
    found = make_data(tmp_path / "in", n_a=2, n_b=2, bad=("a/bad1.txt", "b/bad2.txt"))
    out = str(tmp_path / "t")
    r1 = preprocess(found, TOK, None, out, shard_size=2, progress=False, num_workers=0)
    assert (r1.inputs, r1.rows, r1.errors) == (6, 4, 2)
    old = tables.TokenTable(out).manifest.shards
    (tmp_path / "in" / "a" / "bad1.txt").write_text("7 8")  # fixed
    (tmp_path / "in" / "b" / "g5.txt").write_text("5")  # new
    grown = find_inputs(str(tmp_path / "in"), extensions=(".txt",), labels="folder")
    r2 = preprocess(grown, TOK, None, out, shard_size=2, progress=False, num_workers=0, retry_errors=True)
    assert (r2.inputs, r2.rows, r2.errors) == (7, 6, 1)
    assert r2.summary().endswith(", 3 inputs appended in 2 shards (2 retried errors))")
    table = tables.TokenTable(out)
    assert table.manifest.shards[: len(old)] == old
    assert [os.path.basename(e["source"]) for e in table.errors().to_pylist()] == ["bad2.txt"]
    fixed = [x for x in table.records() if x.source.endswith("bad1.txt")]
    assert len(fixed) == 1 and fixed[0].tokens.tolist() == [[7, 14], [8, 16]] and fixed[0].label == 0
    # nothing new and the one error still bad: retried again, the same table
    r3 = preprocess(grown, TOK, None, out, shard_size=2, progress=False, num_workers=0, retry_errors=True)
    assert (r3.inputs, r3.rows, r3.errors) == (7, 6, 1)
    assert preprocess(grown, TOK, None, out, shard_size=2, progress=False, num_workers=0).already_done


def test_reading_a_job_that_has_not_finished_says_how_far_it_got_and_how_to_finish(tmp_path, capsys):
    """A job cut short (here by --max-error-rate; a crash or Ctrl-C alike) leaves committed shards and
    no manifest: reading it (inspect, train, the loader) says so, not "not a finished token table"."""
    found = make_data(tmp_path / "in", n_a=5, n_b=4, bad=("a/bad.txt",))  # a/bad.txt is in the first shard
    out = tmp_path / "t"
    with pytest.raises(PreprocessError, match="above --max-error-rate"):
        preprocess(
            found, TOK, None, str(out), shard_size=3, progress=False, num_workers=0, max_error_rate=0.0
        )
    note = (
        f"{out}: a preprocessing job ({TOK}, 10 inputs) that has not finished: 1 of its 4 shards committed; run "
        "`maskloom preprocess` again on the same inputs and config to finish it (a table is readable once its "
        "manifest is written)"
    )
    assert tables.partial_job_note(str(out)) == note
    with pytest.raises(tables.TableError) as e:
        tables.TokenTable(str(out))
    assert str(e.value) == note
    assert main(["inspect", str(out)]) == 2
    assert capsys.readouterr().err == f"maskloom inspect: error: {note}\n"
    assert tables.partial_job_note(str(tmp_path / "in")) is None  # not a job's folder
    r = preprocess(found, TOK, None, str(out), shard_size=3, progress=False, num_workers=0)
    assert (r.inputs, r.skipped_shards) == (10, 1) and tables.partial_job_note(str(out)) is None


def test_an_interrupted_append_resumes_its_committed_shards(tmp_path):
    found = make_data(tmp_path / "in", n_a=2, n_b=2, bad=())
    out = tmp_path / "t"
    preprocess(found, TOK, None, str(out), shard_size=2, progress=False, num_workers=0)
    for k in range(5, 9):
        (tmp_path / "in" / "a" / f"f{k}.txt").write_text(str(k))
    grown = find_inputs(str(tmp_path / "in"), extensions=(".txt",), labels="folder")
    # the append job's first new shard was committed before its driver died
    tok = get_tokenizer(TOK)
    new = [i for i in grown.inputs if os.path.basename(i.source) in {f"f{k}.txt" for k in range(5, 9)}]
    plan = plan_shards(
        new, shard_key(tok.fingerprint(), artifacts_digest(str(out / "artifacts"))), 2, first_index=2
    )
    tokenize_shard(tok, plan[0], str(out), tables.TokenTable(str(out)).meta)
    mtime = os.path.getmtime(out / plan[0].name)
    r = preprocess(grown, TOK, None, str(out), shard_size=2, progress=False, num_workers=0, append=True)
    assert (r.inputs, r.rows, r.shards, r.skipped_shards) == (8, 8, 4, 3)  # 2 old + the committed new one
    assert r.summary().endswith(", 4 inputs appended in 2 shards, 1 resumed)")
    assert os.path.getmtime(out / plan[0].name) == mtime
    assert [s["name"] for s in tables.TokenTable(str(out)).manifest.shards][2:] == [sh.name for sh in plan]


def test_cli_append(tmp_path, capsys):
    make_data(tmp_path / "in", n_a=2, n_b=1, bad=())
    args = ["preprocess", str(tmp_path / "in"), "-m", TOK, "-o", str(tmp_path / "t"), "--num-workers", "0",
            "--no-progress"]  # fmt: skip
    (tmp_path / "in" / "a" / "cover.png").write_bytes(b"not the tokenizer's")
    assert main(args) == 0
    note = "maskloom preprocess: note: skipped 1 file (.png 1) in the input folders: not .txt\n"
    assert note in capsys.readouterr().err
    (tmp_path / "in" / "b" / "g7.txt").write_text("7")
    assert main(args) == 2
    assert "use append (--append) to add new inputs to it" in capsys.readouterr().err
    assert main([*args, "--append"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("4 inputs = 4 written + 0 errors; 4 rows") and "s, 1 input appended in 1 shard)" in out
    )
    assert main([*args, "--retry-errors"]) == 0  # no error rows, no new inputs: nothing to do
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--append", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_manifest_entries_deleted_since_are_error_rows_and_the_job_goes_on(tmp_path, capsys):
    """A manifest of a collection that lost a file since it was written: the job says so, makes that
    entry an error row ('missing') and writes the rest; a manifest whose every entry is gone is refused."""
    make_data(tmp_path / "in", n_a=2, n_b=1, bad=())
    (tmp_path / "m.csv").write_text(
        "path,label\nin/a/f0.txt,a\nin/a/f1.txt,a\nin/b/gone.txt,b\nin/b/g0.txt,b\n"
    )
    args = ["preprocess", str(tmp_path / "m.csv"), "--manifest", "-m", TOK, "-o", str(tmp_path / "t"),
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    io = capsys.readouterr()
    gone = str(tmp_path / "in" / "b" / "gone.txt")
    assert (
        f"maskloom preprocess: note: 1 manifest entry names no file here (first: {gone}); each becomes an error "
        "row 'missing' unless the workers see it\n"
    ) in io.err
    assert io.out.startswith("4 inputs = 3 written + 1 error; 3 rows")
    table = tables.TokenTable(str(tmp_path / "t"))
    assert [(e["source"], e["kind"]) for e in table.errors().to_pylist()] == [(gone, "missing")]
    assert table.label_names == ["a", "b"]
    (tmp_path / "w.csv").write_text("path\nnope/a.txt\nnope/b.txt\n")
    assert (
        main(["preprocess", str(tmp_path / "w.csv"), "--manifest", "-m", TOK, "-o", str(tmp_path / "t2")])
        == 2
    )
    assert (
        f"maskloom preprocess: error: {tmp_path / 'nope/a.txt'}: no such file or directory (listed in "
        f"{tmp_path / 'w.csv'}, as is every other of its 2 entries: are its paths right?)"
    ) in capsys.readouterr().err


def test_append_refuses_what_would_change_the_table(tmp_path):
    """Removed inputs, new classes, changed labels and another config are refused, each in one line."""
    found = make_data(tmp_path / "in", n_a=2, n_b=2, bad=())
    out = str(tmp_path / "t")
    preprocess(found, TOK, None, out, progress=False, num_workers=0)
    os.makedirs(tmp_path / "in" / "c")
    (tmp_path / "in" / "c" / "h0.txt").write_text("1")
    grown = find_inputs(str(tmp_path / "in"), extensions=(".txt",), labels="folder")
    with pytest.raises(TableConflictError) as e:
        preprocess(grown, TOK, None, out, progress=False, num_workers=0, append=True)
    assert str(e.value) == (
        f"{out}: cannot append: the inputs have new classes ['c']; a table keeps its classes (their numbers are in "
        "its rows): use overwrite (--overwrite) to rebuild it"
    )
    items = [Input(i.source, i.label) for i in found.inputs]
    with pytest.raises(
        TableConflictError,
        match=r"cannot append: 1 of the table's inputs are not among the inputs \(the first: ",
    ):
        preprocess(items[1:] + [Input(str(tmp_path / "in" / "c" / "h0.txt"), 0)], TOK, None, out, progress=False,
                   num_workers=0, append=True, label_names=["a", "b"])  # fmt: skip
    relabelled = [Input(i.source, 1 - i.label) for i in items] + [
        Input(str(tmp_path / "in" / "c" / "h0.txt"), 0)
    ]
    with pytest.raises(TableConflictError, match="was written with label 0, the inputs now give it 1"):
        preprocess(
            relabelled, TOK, None, out, progress=False, num_workers=0, append=True, label_names=["a", "b"]
        )
    with pytest.raises(TableConflictError, match="another config"):
        preprocess(grown, TOK, {"scale": 3.0}, out, progress=False, num_workers=0, append=True)
    with pytest.raises(ValueError, match="append and overwrite exclude each other"):
        preprocess(grown, TOK, None, out, progress=False, num_workers=0, append=True, overwrite=True)
    assert tables.TokenTable(out).manifest.totals["inputs"] == 4  # untouched


def test_append_to_a_fitted_text_table_keeps_its_vocabulary(tmp_path):
    """A tokenizer fitted on the corpus (text BPE) tokenizes the new inputs with the table's artifacts."""
    d = tmp_path / "docs"
    d.mkdir()
    for k in range(3):
        (d / f"d{k}.txt").write_text("the quick brown fox jumps over the lazy dog " * (k + 2))
    out = str(tmp_path / "t")
    preprocess(str(d / "*.txt"), "text", {"vocab_size": 300}, out, progress=False, num_workers=0)
    digest = artifacts_digest(os.path.join(out, tables.ARTIFACTS))
    (d / "d9.txt").write_text("a brown dog and a lazy fox")
    r = preprocess(str(d / "*.txt"), "text", {"vocab_size": 300}, out, progress=False, num_workers=0,
                   append=True)  # fmt: skip
    assert (r.inputs, r.errors) == (4, 0)
    assert artifacts_digest(os.path.join(out, tables.ARTIFACTS)) == digest  # not refitted
    tok = get_tokenizer("text", {"vocab_size": 300})
    tok.load_artifacts(os.path.join(out, tables.ARTIFACTS))
    new = [x for x in tables.TokenTable(out).records() if x.source.endswith("d9.txt")]
    assert len(new) == 1 and np.array_equal(new[0].tokens, tok(str(d / "d9.txt"))[0].tokens)


def test_default_shard_size_used_recorded_and_kept_on_resume(tmp_path, local_ray):
    found = make_data(tmp_path / "in", n_a=3, n_b=0, bad=("a/bad1.txt", "a/bad2.txt"))
    out = str(tmp_path / "t")
    # a job that stops on its error rate, committed shards of 2 inputs kept
    with pytest.raises(PreprocessError, match="above --max-error-rate"):
        preprocess(found, TOK, None, out, shard_size=2, imports=IMPORTS, progress=False, max_error_rate=0.1)
    committed = {f for f in os.listdir(os.path.join(out, COMMITS)) if not f.startswith("_")}  # commit records
    assert committed
    # the rerun without a shard size resumes that plan (the default would be one shard of 5)
    assert default_shard_size(5, 2) == 5
    r = preprocess(found, TOK, None, out, imports=IMPORTS, progress=False, num_workers=2)
    assert (r.shard_size, r.shards, r.rows, r.errors) == (2, 3, 3, 2)
    assert len(committed) <= r.skipped_shards <= 3  # (a shard in flight may commit after the stop)
    assert tables.TokenTable(out).manifest.extra["shard_size"] == 2
    # a fresh job takes the default, and reports its workers and their time in shards
    r2 = preprocess(found, TOK, None, str(tmp_path / "t2"), imports=IMPORTS, progress=False, num_workers=1)
    assert (r2.shard_size, r2.shards, r2.workers, r2.rows) == (5, 1, 1, 3)
    assert r2.worker_seconds > 0 and r2.worker_cpu_seconds > 0
    assert 0 < r2.startup_seconds <= r2.first_shard_seconds <= r2.seconds


def test_killed_worker_neither_loses_nor_duplicates_rows(tmp_path, local_ray):
    found = make_data(tmp_path / "in", n_a=6, n_b=6, bad=())
    marker = tmp_path / "died"
    out = str(tmp_path / "t")
    r = preprocess(
        found, TOK, {"die_marker": str(marker)}, out, shard_size=4, imports=IMPORTS, progress=False
    )
    assert marker.exists()  # a worker process really died midway
    assert (r.inputs, r.rows, r.errors) == (12, 12, 0)
    ids = tables.TokenTable(out).read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@pytest.mark.timeout(120)  # without the guard: for ever
def test_an_input_that_kills_its_worker_every_time_becomes_an_error_row(tmp_path, local_ray):
    """A decoder that crashes its process (a segfault in C; the OOM killer on a huge input) never
    raises: Ray Data restarts the actor and retries the shard without limit, so one such file stalled
    the job for ever. After two deaths on the same input it is an error row; every other input is
    written once."""
    found = make_data(tmp_path / "in", n_a=3, n_b=3, bad=())
    out = str(tmp_path / "t")
    r = preprocess(found, TOK, {"segfault_on": "a/f1.txt"}, out, shard_size=3, imports=IMPORTS, progress=False,
                   num_workers=1)  # fmt: skip
    assert (r.inputs, r.rows, r.errors) == (6, 5, 1)
    t = tables.TokenTable(out)
    bad = str(tmp_path / "in" / "a" / "f1.txt")
    assert t.errors().to_pylist() == [{
        "source": bad, "kind": "crashed",
        "message": "the process decoding it died 2 times (a crash in the decoder, or more memory than it had); "
                   "the job went on without it",
    }]  # fmt: skip
    ids = t.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 5 and f"{bad}#0" not in ids
    assert not os.path.exists(os.path.join(out, COMMITS))


def test_parts_skipped_inside_written_inputs_are_counted(tmp_path, capsys):
    """A tar written without its bad sample is accounted for as written; the sample is counted in the
    summary line, the manifest and ``maskloom inspect``, across an append, and a rerun reports it."""

    def tar(name, bad):
        members = [(f"s{i}.txt", b"not numbers" if i == bad else b"%d" % i) for i in range(5)]
        return write_tar(tmp_path / "in" / name, members)

    os.makedirs(tmp_path / "in")
    first, second = tar("a.tar", 1), tar("b.tar", 3)
    out = str(tmp_path / "t")
    r = preprocess([first], TAR_TOK, None, out, num_workers=0, progress=False)
    assert (r.inputs, r.rows, r.errors) == (1, 4, 0)
    assert (r.skipped_parts, r.inputs_with_skipped_parts) == ({"samples": 1}, 1)
    assert r.summary().endswith("; skipped inside 1 input: 1 sample")
    why = "s1 (corrupt: not numbers (could not convert string to float: 'not'))"
    assert tables.TokenTable(out).manifest.extra["skipped_parts"] == {
        "inputs": 1, "counts": {"samples": 1}, "examples": [f"{first}: 1 of 5 samples skipped, the first: {why}"]
    }  # fmt: skip
    again = preprocess([first], TAR_TOK, None, out, num_workers=0, progress=False)
    assert again.already_done and again.skipped_parts == {"samples": 1}
    more = preprocess([first, second], TAR_TOK, None, out, num_workers=0, progress=False, append=True)
    assert (more.inputs, more.rows, more.skipped_parts, more.inputs_with_skipped_parts) == (
        2,
        8,
        {"samples": 2},
        2,
    )
    assert main(["inspect", out]) == 0
    printed = capsys.readouterr().out
    assert "skipped inside 2 written input(s): 2 samples\n" in printed
    assert f"  {second}: 1 of 5 samples skipped, the first: s3 (corrupt:" in printed
    # a table without skipped parts says nothing of them
    plain = preprocess([tar("c.tar", -1)], TAR_TOK, None, str(tmp_path / "u"), num_workers=0, progress=False)
    assert plain.skipped_parts == {} and "skipped inside" not in plain.summary()
    assert "skipped_parts" not in tables.TokenTable(str(tmp_path / "u")).manifest.extra


def test_a_big_parquet_file_is_shared_by_workers_in_parts(tmp_path, local_ray, monkeypatch):
    """One Parquet file of text, split at row groups on the driver: every part is an input (its own
    shard, on either worker), and the table holds the records of the file read whole."""
    import pyarrow as pa

    from maskloom.tokenizers.text import TextTokenizer

    words = "the quick brown fox jumps over a lazy dog while seven tired cats sleep".split()
    texts = [f"row {i} " + " ".join(words[i % 9 : i % 9 + 4]) for i in range(60)]
    labels = ["x" if i % 4 else "y" for i in range(60)]
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": texts, "label": labels}), path, row_group_size=10)  # 6 row groups
    config = {"vocab_size": 300, "min_frequency": 1, "max_length": 64}

    def table(out, **kw):
        r = preprocess([path], "text", config, str(tmp_path / out), progress=False, **kw)
        t = tables.TokenTable(str(tmp_path / out))
        recs = sorted(t.records(), key=lambda rec: rec.id)
        return (
            r,
            t,
            [(rec.id, rec.source, rec.label, rec.meta["doc"], t.tokenizer().detokenize(rec)) for rec in recs],
        )

    whole, _, expected = table("whole", num_workers=0)
    assert (whole.inputs, whole.rows) == (1, 60)
    md = pq.read_metadata(path)
    group = sum(md.row_group(0).column(c).total_compressed_size for c in range(md.num_columns))
    monkeypatch.setattr(TextTokenizer, "PART_BYTES", int(1.5 * group))  # a part: 2 row groups
    r, t, got = table("parts", num_workers=2, shard_size=1)
    assert (r.inputs, r.rows, r.errors, r.shards) == (3, 60, 0, 3)
    assert got == expected  # ids, source (the file), labels, documents and their text
    assert r.input_bytes == 3 * (os.path.getsize(path) * 2 // 6)  # each part its share of the file
    assert t.manifest.totals == {"inputs": 3, "rows": 60, "errors": 0}


def test_few_or_long_shards_go_to_the_actors_one_at_a_time(tmp_path, local_ray, monkeypatch):
    """Two shards in flight per actor let the first actor up take both shards of a 2-shard job while
    the other idled: with few shards per worker, or shards of large inputs, one at a time."""
    seen = []
    kwargs = RayResources.map_batches_kwargs

    def spy(self):
        seen.append(self.max_tasks_in_flight)
        return kwargs(self)

    monkeypatch.setattr(RayResources, "map_batches_kwargs", spy)
    found = make_data(tmp_path / "in", n_a=4, n_b=4, bad=())
    for out, size in (("few", 4), ("many", 1)):  # 2 shards on 2 workers; 8 shards
        r = preprocess(found, TOK, None, str(tmp_path / out), shard_size=size, num_workers=2, imports=IMPORTS,
                       progress=False)  # fmt: skip
        assert (r.rows, r.workers) == (8, 2)
    monkeypatch.setattr(pp, "BIG_INPUT_BYTES", 1)  # every input "large": shards of big files
    preprocess(
        found, TOK, None, str(tmp_path / "big"), shard_size=1, num_workers=2, imports=IMPORTS, progress=False
    )
    assert seen == [1, 2, 1]


def _third_run_after_two_crashes(argv, env, named: str) -> subprocess.CompletedProcess:
    """Run the command three times: the first two end in SIGSEGV, the second naming what killed the
    first (``named`` in its stderr); the third succeeds, and is returned."""
    runs = [subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60) for _ in range(3)]
    assert [r.returncode for r in runs[:2]] == [-signal.SIGSEGV] * 2, runs[1].stderr
    assert named in runs[1].stderr
    assert runs[2].returncode == 0, runs[2].stderr
    return runs[2]


@pytest.mark.timeout(120)
def test_an_input_that_kills_the_in_process_job_is_named_and_skipped_on_the_third_run(tmp_path):
    """--num-workers 0: a decoder's crash ends the command itself. Each rerun counts the death and
    names the input; the third run skips it as an error row. Ctrl-C and SIGTERM are no deaths."""
    make_data(tmp_path / "in", n_a=3, n_b=3, bad=())
    out = tmp_path / "t"
    argv, env = _preprocess_argv(tmp_path / "in", out, "--shard-size", "3", "--num-workers", "0",
                                 "--set", "segfault_on=a/f1.txt")  # fmt: skip
    bad = str(tmp_path / "in" / "a" / "f1.txt")
    third = _third_run_after_two_crashes(argv, env, f"{bad}: the process decoding it died (1 of the 2 deaths")
    assert third.stdout.startswith("6 inputs = 5 written + 1 error; 5 rows")
    assert [e["kind"] for e in tables.TokenTable(str(out)).errors().to_pylist()] == ["crashed"]


def test_shard_attempts_count_deaths_per_input_within_one_job(tmp_path, caplog):
    """What each try of a shard reads from the one before it (a death is a try that never called done)."""
    shard = plan_shards([Input(f"/d/{c}.txt") for c in "abc"], "k", 3)[0]

    def died_at(run, index):
        a = ShardAttempts(str(tmp_path), shard, run)
        skip = a.begin()
        a.at(index)
        a.close()  # the process ends here: no done()
        return skip

    assert died_at("job1", 1) == {}
    assert died_at("job1", 1) == {}  # one death is retried: a worker may be killed for other reasons
    assert "/d/b.txt: the process decoding it died (1 of the 2 deaths" in caplog.text
    assert died_at("job1", 2) == {1: 2}  # b.txt is skipped now; the try dies on c.txt
    a = ShardAttempts(str(tmp_path), shard, "job1")
    assert a.begin() == {1: 2}  # c.txt died once: retried
    a.done()
    assert os.listdir(os.path.join(tmp_path, COMMITS, "_crashes")) == []
    assert died_at("job1", 0) == {}  # a committed shard's next try starts afresh
    assert died_at("job2", 0) == {}  # and so does another job (a rerun after the driver ended)
    # deaths outside any input (writing the shard) are retried up to a limit, then stop the job
    assert [died_at("job3", -1) for _ in range(3)] == [{}, {}, {}]
    with pytest.raises(WorkerDeathsError) as e:
        ShardAttempts(str(tmp_path), shard, "job3").begin()
    assert str(e.value) == (
        f"shard 0 ({shard.name}): its workers died 3 times outside any input (writing the shard or its commit "
        "record); see the workers' output above"
    )


def test_shard_attempts_count_deaths_per_sample_of_a_tar(tmp_path, caplog):
    """A death on a sample of a tar counts against that sample, not the tar: the sample is skipped
    after two, and the whole tar only after SAMPLE_DEATH_LIMIT deaths on its samples."""
    shard = plan_shards([Input(f"/d/{c}.tar") for c in "ab"], "k", 2)[0]

    def died_at(index, sample, run="job1"):
        a = ShardAttempts(str(tmp_path), shard, run)
        skip = a.begin()
        a.at(index)
        a.at_sample(sample)
        a.close()  # the process ends here: no done()
        return skip, a.sample_skips

    assert died_at(1, 5) == ({}, {})
    assert died_at(1, 7) == ({}, {})  # sample 5 died once: read again
    assert "/d/b.tar: the process decoding its sample 5 died (1 of the 2 deaths after which the sample is " \
           "skipped); trying its shard again" in caplog.text  # fmt: skip
    assert died_at(1, 5) == ({}, {})  # sample 7 died once
    a = ShardAttempts(str(tmp_path), shard, "job1")
    assert a.begin() == {} and a.sample_skips == {1: {5: 2}}
    a.at(1)
    a.at_sample(3)
    a.at(0)  # on the next input: a death now is that input's, not sample 3's
    a.close()
    b = ShardAttempts(str(tmp_path), shard, "job1")
    assert b.begin() == {}
    with open(b.state_path) as f:
        state = json.load(f)
    assert (state["deaths"], state["sample_deaths"]) == ({"0": 1}, {"1": {"5": 2, "7": 1}})
    b.done()
    # a decoder that crashes on every sample: the tar becomes the error row after SAMPLE_DEATH_LIMIT
    assert [died_at(1, s, "job2")[0] for s in range(pp.SAMPLE_DEATH_LIMIT)] == [{}] * pp.SAMPLE_DEATH_LIMIT
    assert ShardAttempts(str(tmp_path), shard, "job2").begin() == {1: pp.SAMPLE_DEATH_LIMIT}


def _numbers_tar(folder) -> str:
    """folder/t.tar: samples s0..s4 whose ``txt`` member holds "i i+1"."""
    os.makedirs(folder, exist_ok=True)
    return write_tar(os.path.join(folder, "t.tar"), [(f"s{i}.txt", b"%d %d" % (i, i + 1)) for i in range(5)])


@pytest.mark.timeout(120)
def test_a_tar_sample_that_kills_its_worker_costs_that_sample_not_the_tar(tmp_path, local_ray):
    """A decoder that crashes its process on one sample of a tar shard: after two deaths that sample
    is skipped (as one that does not decode is) and the tar's other samples are written, once."""
    tar = _numbers_tar(tmp_path / "in")
    (tmp_path / "in" / "u.txt").write_text("7")
    out = str(tmp_path / "t")
    r = preprocess(str(tmp_path / "in"), TAR_TOK, {"segfault_on": "t.tar#s2.txt"}, out, shard_size=2, imports=IMPORTS,
                   progress=False, num_workers=1)  # fmt: skip
    assert (r.inputs, r.rows, r.errors) == (2, 5, 0)
    assert (r.skipped_parts, r.inputs_with_skipped_parts) == ({"samples": 1}, 1)  # counted through Ray too
    ids = tables.TokenTable(out).read().column("id").to_pylist()
    assert sorted(ids) == [f"{tar}#s{i}" for i in (0, 1, 3, 4)] + [str(tmp_path / "in" / "u.txt") + "#0"]
    assert not os.path.exists(os.path.join(out, COMMITS))


@pytest.mark.timeout(120)
def test_a_tar_sample_that_hangs_costs_that_sample_not_the_tar(tmp_path, local_ray):
    """A sample whose decoder never returns: the watchdog ends the worker, and the next try skips
    that sample (kind ``corrupt``, as a whole input that hangs) and writes the rest of the tar."""
    tar = _numbers_tar(tmp_path / "in")
    out = str(tmp_path / "t")
    r = preprocess([tar], TAR_TOK, {"hang_on": "t.tar#s3.txt"}, out, imports=IMPORTS, progress=False,
                   num_workers=1, input_timeout=1.0)  # fmt: skip
    assert (r.inputs, r.rows, r.errors) == (1, 4, 0)
    assert tables.TokenTable(out).read().column("id").to_pylist() == [f"{tar}#s{i}" for i in (0, 1, 2, 4)]


@pytest.mark.timeout(120)
def test_a_tar_sample_that_kills_the_in_process_job_is_named_and_skipped_on_the_third_run(tmp_path):
    """--num-workers 0: each run that crashes names the sample; the third skips it with the tar's
    warning and writes the rest of the tar."""
    tar = _numbers_tar(tmp_path / "in")
    argv, env = _preprocess_argv(tmp_path / "in", tmp_path / "t", "--num-workers", "0",
                                 "--set", "segfault_on=t.tar#s2.txt")  # fmt: skip
    argv[argv.index(TOK)] = TAR_TOK
    third = _third_run_after_two_crashes(
        argv, env, f"{tar}: the process decoding its sample 2 died (1 of the 2 deaths"
    )
    assert f"{tar}: skipped 1 of 5 samples: s2 (crashed: the process decoding it died 2 times" in third.stderr
    assert third.stdout.startswith("1 input = 1 written + 0 errors; 4 rows"), third.stdout
    ids = tables.TokenTable(str(tmp_path / "t")).read().column("id").to_pylist()
    assert ids == [f"{tar}#s{i}" for i in (0, 1, 3, 4)]


def test_resume_skips_committed_shards(tmp_path, local_ray):
    found = make_data(tmp_path / "in", n_a=4, n_b=4, bad=())
    out = tmp_path / "t"
    tok = get_tokenizer(TOK)
    # a crashed run of the same job: its second shard committed, no manifest
    plan = plan_shards(
        found.inputs, shard_key(tok.fingerprint(), artifacts_digest(str(out / "artifacts"))), 3
    )
    meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version="1", config=tok.config_dict(),
                             fingerprint=tok.fingerprint(), label_names=found.label_names)  # fmt: skip
    tokenize_shard(tok, plan[1], str(out), meta)
    mtime = os.path.getmtime(out / plan[1].name)
    r = preprocess(found, TOK, None, str(out), shard_size=3, imports=IMPORTS, progress=False)
    assert (r.skipped_shards, r.shards, r.rows, r.inputs) == (1, 3, 8, 8)
    assert os.path.getmtime(out / plan[1].name) == mtime  # not rewritten
    assert [s["name"] for s in tables.TokenTable(str(out)).manifest.shards] == [sh.name for sh in plan]


# ---- the command ------------------------------------------------------------------------------
def test_cli_user_errors_exit_2(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "missing"), "-m", TOK, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"maskloom preprocess: error: {tmp_path / 'missing'}: no such file or directory"]
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", str(tmp_path / "empty"), "-m", TOK, "-o", str(tmp_path / "o")]) == 2
    assert "no input files with extension .txt" in capsys.readouterr().err
    (tmp_path / "empty" / "notes.md").write_text("x")
    assert main(["preprocess", str(tmp_path / "empty"), "-m", TOK, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("no input files with extension .txt; it holds 1 file (.md 1)")
    assert main(["preprocess", str(tmp_path), "-m", "no_such_modality", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("maskloom preprocess: error: unknown tokenizer 'no_such_modality'")
        and err.count("\n") == 1
    )
    assert main(["preprocess", str(tmp_path), "-m", TOK, "-o", "o", "--set", "nope=1"]) == 2
    assert "unknown key(s) ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "x.txt").write_text("1")
    assert main(["preprocess", str(tmp_path / "x.txt"), "-m", TOK, "-o", str(tmp_path)]) == 2
    assert "is not empty and is not a token table" in capsys.readouterr().err
    out = tmp_path / "x.txt"  # --out names a file, or a directory under one
    assert main(["preprocess", str(tmp_path / "x.txt"), "-m", TOK, "-o", str(out), "--num-workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"maskloom preprocess: error: {out}: exists and is not a directory; choose another --out"
    )
    assert (
        main(["preprocess", str(tmp_path / "x.txt"), "-m", TOK, "-o", str(out / "t"), "--num-workers", "0"])
        == 2
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"maskloom preprocess: error: {out / 't'}: cannot create the table directory: Not a directory"
    )
    assert out.read_text() == "1"


def test_cli_max_error_rate_fails_cleanly_and_keeps_commits(tmp_path, capsys, local_ray):
    make_data(tmp_path / "in", n_a=3, n_b=0, bad=("a/bad1.txt", "a/bad2.txt"))
    out = tmp_path / "t"
    argv = ["preprocess", str(tmp_path / "in"), "-m", TOK, "-o", str(out), "--import", "ppkit_tokenizer",
            "--shard-size", "2", "--no-progress"]  # fmt: skip
    assert main([*argv, "--max-error-rate", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "2 of 5 inputs rejected (40.0%), above --max-error-rate 30.0%" in err
    assert not (out / "_manifest.json").exists()
    with pytest.raises(tables.TableError, match=r"that has not finished: \d of its 3 shards committed"):
        tables.TokenTable(str(out))  # committed shards are invisible to readers
    assert len([f for f in os.listdir(out / COMMITS) if not f.startswith("_")]) >= 1
    assert main([*argv, "--max-error-rate", "0.5"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("5 inputs = 3 written + 2 errors; 3 rows, 6 tokens, ") and "inputs/s" in summary


@pytest.mark.slow  # two driver subprocesses, each starting its own Ray: ~30-70 s on 2 shared cores
def test_killed_driver_resumes_only_missing_shards(tmp_path):
    make_data(tmp_path / "in", n_a=4, n_b=4, bad=())
    out = tmp_path / "t"
    argv, env = _preprocess_argv(tmp_path / "in", out, "--shard-size", "1", "--num-workers", "1")
    slow = ["--set", "delay=0.5"]
    proc = subprocess.Popen(
        argv + slow, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            n = (
                len([f for f in os.listdir(out / COMMITS) if not f.startswith("_")])  # commit records
                if (out / COMMITS).exists()
                else 0
            )
            if n >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
        time.sleep(1.0)  # let a worker outside the process group notice and die
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = {f for f in os.listdir(out / COMMITS) if not f.startswith("_")}  # commit records
    assert 2 <= len(committed) < 8 and not (out / "_manifest.json").exists()
    # rerun with the same config (the delay is part of the config, so keep it)
    done = subprocess.run(argv + slow, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"{len(committed)}/8 shards resumed" in done.stdout
    t = tables.TokenTable(str(out))
    ids = t.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and t.manifest.totals == {"inputs": 8, "rows": 8, "errors": 0}
    assert len(t.manifest.shards) == 8 and np.all([s["rows"] == 1 for s in t.manifest.shards])


def test_image_folder_to_table_round_trip(tmp_path, local_ray):
    from PIL import Image

    import maskloom.tokenizers.image  # noqa: F401  (the real image tokenizer)

    rng = np.random.default_rng(0)
    pixels = {}
    for cls, n in (("cat", 2), ("dog", 1)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            p = tmp_path / "img" / cls / f"{i}.png"
            Image.fromarray(a).save(p)
            pixels[str(p)] = a
    (tmp_path / "img" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    found = find_inputs(str(tmp_path / "img"), extensions=(".png",), labels="folder")
    out = str(tmp_path / "t")
    r = preprocess(found, "image", {"image_size": 32, "patch_size": 16}, out, shard_size=2, progress=False)
    assert (r.inputs, r.rows, r.tokens, r.errors) == (4, 3, 12, 1)
    table = tables.TokenTable(out)
    assert table.label_names == ["cat", "dog"] and table.spec.token_dim == 768
    assert [e["kind"] for e in table.errors().to_pylist()] == ["corrupt"]
    tok = table.tokenizer()
    for rec in table.records():
        assert rec.label == (0 if "/cat/" in rec.source else 1)
        np.testing.assert_array_equal(tok.detokenize(rec), pixels[rec.source])


def test_gc_paused_restores_the_collector_and_pauses_the_planning():
    import gc

    from maskloom.pipelines import preprocess as P
    from maskloom.pipelines._gc import gc_paused
    from maskloom.pipelines.sources import Input

    was = gc.isenabled()
    try:
        gc.enable()
        with gc_paused():
            assert not gc.isenabled()
            with gc_paused():  # nested: the inner exit leaves it paused
                pass
            assert not gc.isenabled()
        assert gc.isenabled()
        with pytest.raises(KeyError), gc_paused():
            raise KeyError("x")
        assert gc.isenabled()  # resumed after an exception too
        gc.disable()
        with gc_paused():
            pass
        assert not gc.isenabled()  # a paused collector stays paused
        gc.enable()

        seen = []

        class Key(str):  # plan_shards sorts by source: see the collector's state while it runs
            def __lt__(self, other):
                seen.append(gc.isenabled())
                return str.__lt__(self, other)

        plan = P.plan_shards([Input(Key(f"/x/{i}")) for i in (3, 1, 2)], "k", 2)
        assert [[i.source for i in sh.inputs] for sh in plan] == [["/x/1", "/x/2"], ["/x/3"]]
        assert seen and not any(seen) and gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_abspath_fast_path_agrees_with_os_path():
    from maskloom.pipelines.preprocess import _abspath

    for p in ("/a/b.wav", "/a//b", "//a/b", "/a/./b", "/a/../b", "/a/b/", "/a/.hidden/c", "/a/b/.", "/a/b/..",
              "rel/x.wav", "./x", "../x", "x", "/", "/a/b..c/d", "/a/...", "/a/b./c"):  # fmt: skip
        assert _abspath(p) == os.path.abspath(p), p


# ---- in this process, without Ray (num_workers=0) ----------------------------------------------
def test_in_process_job_writes_the_table_ray_writes(tmp_path, local_ray, monkeypatch):
    found = make_data(tmp_path / "in")
    via_ray = preprocess(found, TOK, None, str(tmp_path / "ray"), shard_size=3, imports=IMPORTS, progress=False,
                         num_workers=1)  # fmt: skip

    def no_ray(*a, **k):
        raise AssertionError("an in-process job started Ray")

    monkeypatch.setattr(pp, "init_ray", no_ray)
    here = preprocess(found, TOK, None, str(tmp_path / "here"), shard_size=3, progress=False, num_workers=0)
    assert (here.inputs, here.rows, here.tokens, here.errors, here.shards, here.workers) == (
        10,
        9,
        14,
        1,
        4,
        0,
    )
    a, b = tables.TokenTable(str(tmp_path / "ray")), tables.TokenTable(str(tmp_path / "here"))
    assert [(s["name"], s["rows"], s["sha256"]) for s in a.manifest.shards] == [
        (s["name"], s["rows"], s["sha256"]) for s in b.manifest.shards
    ]  # the same shard files, byte for byte
    assert a.manifest.totals == b.manifest.totals and a.errors().to_pylist() == b.errors().to_pylist()
    assert via_ray.workers == 1 and here.startup_seconds < via_ray.startup_seconds
    again = preprocess(found, TOK, None, str(tmp_path / "here"), shard_size=3, progress=False, num_workers=0)
    assert again.already_done  # a rerun does nothing, as with Ray
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        preprocess(found, TOK, None, str(tmp_path / "neg"), num_workers=-1, progress=False)


def test_in_process_job_resumes_and_stops_at_the_error_rate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pp, "init_ray", lambda *a, **k: pytest.fail("an in-process job started Ray"))
    make_data(tmp_path / "in", n_a=3, n_b=0, bad=("a/bad1.txt", "a/bad2.txt"))
    out = tmp_path / "t"
    argv = ["preprocess", str(tmp_path / "in"), "-m", TOK, "-o", str(out), "--shard-size", "2", "--no-progress",
            "--num-workers", "0"]  # fmt: skip
    assert main([*argv, "--max-error-rate", "0.3"]) == 1  # stops after the shard that passes 30 %
    assert "2 of 5 inputs rejected (40.0%), above --max-error-rate 30.0%" in capsys.readouterr().err
    kept = sorted(f for f in os.listdir(out / COMMITS) if not f.startswith("_"))
    assert len(kept) == 1  # shards a/bad1, a/bad2 | a/f0, a/f1 | a/f2: it stopped after the first
    assert main([*argv, "--max-error-rate", "0.5"]) == 0
    out_ = capsys.readouterr()
    assert out_.out.strip().startswith("5 inputs = 3 written + 2 errors; 3 rows, 6 tokens, ")
    assert "1/3 shards resumed" in out_.out
    assert main([*argv[:-2], "--num-workers", "-1"]) == 2
    assert "--num-workers must be >= 0" in capsys.readouterr().err


def test_default_shard_size_is_planned_for_the_workers_that_will_run(tmp_path, monkeypatch):
    found = make_data(tmp_path / "in")
    seen = []

    def record(tokenizer, inputs, workers):
        seen.append(workers)
        raise KeyboardInterrupt  # planned: stop before any work

    monkeypatch.setattr(pp, "measured_shard_size", record)
    for n in (None, 0, 3):
        with pytest.raises(KeyboardInterrupt):
            preprocess(found, TOK, None, str(tmp_path / f"t{n}"), num_workers=n, progress=False)
    # None: as many workers as CPUs (the default pool); 0: the driver alone
    assert seen == [resources().num_workers, 1, 3]


def test_small_job_hint_only_when_an_embedded_ray_start_up_dominates(tmp_path):
    from maskloom.commands.preprocess import small_job_hint

    base = dict(out_dir=str(tmp_path), inputs=10, rows=10, tokens=100, errors=0, bytes=1, input_bytes=1,
                shards=2, skipped_shards=0, throughput=1.0, workers=2)  # fmt: skip
    slow_start = PreprocessResult(**base, seconds=10.5, startup_seconds=7.4)
    assert small_job_hint(slow_start, embedded=True) == (
        "maskloom preprocess: note: starting Ray took 7.4 of this job's 10.5 s; "
        "a job this small runs faster in this process: --num-workers 0"
    )
    assert small_job_hint(slow_start, embedded=False) is None  # a cluster: its Ray was running
    assert small_job_hint(PreprocessResult(**base, seconds=10.0, startup_seconds=5.0), embedded=True) is None
    assert small_job_hint(PreprocessResult(**base, seconds=60.0, startup_seconds=7.0), embedded=True) is None
    in_process = PreprocessResult(**{**base, "workers": 0}, seconds=1.0, startup_seconds=0.9)
    assert small_job_hint(in_process, embedded=True) is None
    done = PreprocessResult(**base, seconds=0.1, startup_seconds=0.0, already_done=True)
    assert small_job_hint(done, embedded=True) is None


def test_summary_counts_in_the_singular_and_plural(tmp_path):
    base = dict(out_dir=str(tmp_path), inputs=10, tokens=90, bytes=2_500_000, input_bytes=1_000_000, shards=2,
                skipped_shards=0, seconds=2.0, throughput=5.0)  # fmt: skip
    one = PreprocessResult(**base, rows=9, errors=1)
    assert one.summary() == (
        "10 inputs = 9 written + 1 error; 9 rows, 90 tokens, 2.5 MB written, 5.0 inputs/s (1.0 MB read, 2.0 s)"
    )
    assert (
        PreprocessResult(**base, rows=10, errors=0)
        .summary()
        .startswith("10 inputs = 10 written + 0 errors; ")
    )
    done = PreprocessResult(**base, rows=8, errors=2, already_done=True)
    assert done.summary() == (
        f"{tmp_path}: already finished with this config (10 inputs, 8 rows, 90 tokens, 2 errors, 2.5 MB); "
        "nothing to do"
    )
    single = {**base, "inputs": 1, "tokens": 1, "rows": 1, "errors": 0}
    assert PreprocessResult(**single).summary().startswith("1 input = 1 written + 0 errors; 1 row, 1 token, ")
    assert "(1 input, 1 row, 1 token, 0 errors, " in PreprocessResult(**single, already_done=True).summary()
    slow = {**base, "inputs": 2, "rows": 2, "errors": 0, "throughput": 2 / 130.8}  # two big files
    assert " 0.015 inputs/s (1.0 MB read, 2.0 s)" in PreprocessResult(**slow).summary()
    big = {**base, "inputs": 1200, "tokens": 12288, "rows": 1199, "errors": 1}
    assert (
        PreprocessResult(**big)
        .summary()
        .startswith("1,200 inputs = 1,199 written + 1 error; 1,199 rows, 12,288 tokens")
    )


def _non_utf8_name(directory, name: str) -> str | None:
    """``directory/name`` created empty, where ``name`` carries a lone surrogate (a file name byte that
    is not UTF-8, as Linux allows); None where the file system refuses such names (macOS)."""
    path = os.path.join(str(directory), name)
    try:
        open(path, "w").close()
    except (OSError, UnicodeEncodeError):
        return None
    return path


def test_file_names_that_are_not_utf8_are_kept_with_their_bytes_escaped(tmp_path, monkeypatch):
    """A Latin-1 file name (bytes, not UTF-8) neither stops the job nor is lost: its sample is
    written, with ``\\xNN`` for the byte in ``id`` and ``source``; a bad file of such a name is an
    error row the same way. (Before, Arrow refused the name and the job died at its error table.)"""
    monkeypatch.setattr(pp, "init_ray", lambda *a, **k: pytest.fail("an in-process job started Ray"))
    make_data(tmp_path / "in", n_a=2, n_b=0, bad=())
    good = _non_utf8_name(tmp_path / "in" / "a", "caf\udce9.txt")
    bad = _non_utf8_name(tmp_path / "in" / "a", "bad\udcff.txt")
    if good is None or bad is None:
        pytest.skip("this file system only takes UTF-8 file names")
    with open(good, "w") as f:
        f.write("7 8 9")
    with open(bad, "w") as f:
        f.write("not numbers")
    found = find_inputs(str(tmp_path / "in"), extensions=(".txt",))
    assert len(found) == 4
    out = tmp_path / "t"
    r = preprocess(found, TOK, None, str(out), shard_size=2, progress=False, num_workers=0)
    assert (r.inputs, r.rows, r.errors) == (4, 3, 1)
    t = tables.TokenTable(str(out))
    rows = {row["source"]: row["id"] for row in t.read(columns=["id", "source"]).to_pylist()}
    d = str(tmp_path / "in" / "a")
    assert rows == {
        f"{d}/caf\\xe9.txt": f"{d}/caf\\xe9.txt#0",
        f"{d}/f0.txt": f"{d}/f0.txt#0",
        f"{d}/f1.txt": f"{d}/f1.txt#0",
    }
    assert [(e["source"], e["kind"]) for e in t.errors().to_pylist()] == [(f"{d}/bad\\xff.txt", "corrupt")]
    again = preprocess(found, TOK, None, str(out), shard_size=2, progress=False, num_workers=0)
    assert again.already_done  # the commit records keep the names as they are: a rerun finds them


def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path):
    """SIGINT (Ctrl-C) mid-job: exit 130 with one line saying how many shards are kept, no traceback;
    the same command then finishes only the rest (in this process: no Ray, so it runs in seconds)."""
    make_data(tmp_path / "in", n_a=4, n_b=4, bad=())
    out = tmp_path / "t"
    argv, env = _preprocess_argv(
        tmp_path / "in", out, "--shard-size", "1", "--num-workers", "0", "--set", "delay=0.3"
    )
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (
            (out / COMMITS).exists()
            and len([f for f in os.listdir(out / COMMITS) if not f.startswith("_")]) >= 2
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    n = len([f for f in os.listdir(out / COMMITS) if not f.startswith("_")])
    assert proc.returncode == 130 and 2 <= n < 8
    assert err.splitlines()[-1] == (
        f"maskloom preprocess: interrupted; {n} committed shards kept: run the same command again to resume"
    )
    assert "Traceback" not in err
    assert not os.listdir(out / COMMITS / "_crashes")  # ended in Python: not a crash of its input
    # SIGTERM (a scheduler's preemption) ends it as cleanly, twice in a row
    crashes = out / COMMITS / "_crashes"
    for _ in range(2):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not any(f.endswith(".pos") for f in os.listdir(crashes)):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.02)  # until it is inside a shard
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 143 and not os.listdir(crashes)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "died" not in done.stderr
    assert tables.TokenTable(str(out)).manifest.totals == {"inputs": 8, "rows": 8, "errors": 0}


def test_config_files_and_set_overrides(tmp_path):
    from maskloom.commands.preprocess import _load_config

    (tmp_path / "c.json").write_text('{"scale": 2.0, "delay": 0}')
    (tmp_path / "c.toml").write_text("scale = 2.0\ndelay = 0\n")
    (tmp_path / "c.yaml").write_text("scale: 2.0\ndelay: 0\n")
    for name in ("c.json", "c.toml", "c.yaml"):
        assert _load_config(str(tmp_path / name), []) == {"scale": 2.0, "delay": 0}
    assert _load_config(str(tmp_path / "c.toml"), ["scale=3", "crash_on=x"]) == {
        "scale": 3,
        "delay": 0,
        "crash_on": "x",
    }  # --set wins; a value that is not JSON is a string
    (tmp_path / "bad.toml").write_text("scale = [\n")
    (tmp_path / "bad.json").write_text("{scale")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "c.ini").write_text("x")
    want = {
        "bad.toml": "bad.toml: cannot parse config (Invalid value (at end of document))",
        "bad.json": "bad.json: cannot parse config (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "bad.yaml": "bad.yaml: cannot parse config (while parsing a flow node expected the node content, but found "
        "'<stream end>' in \"<byte string>\", line 2, column 1: ^)",
        "bin.toml": "bin.toml: cannot parse config ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)",
        "list.json": "list.json: config must be a mapping of field -> value",
        "c.ini": "c.ini: config file must be .json, .toml or .yaml",
        "none.toml": "none.toml: no such config file",
    }
    for name, message in want.items():
        with pytest.raises(ValueError) as e:
            _load_config(str(tmp_path / name), [])
        assert str(e.value) == f"{tmp_path / message}"
    with pytest.raises(ValueError, match="--set 'scale': expected KEY=VALUE"):
        _load_config(None, ["scale"])


def test_an_address_where_no_ray_listens_fails_at_once_with_one_line(tmp_path):
    """ray.init would log "Failed to connect to GCS" for minutes; the CLI checks the port first. (In a
    fresh process: in this one a test's Ray may be running, which init_ray reuses.)"""
    from maskloom.pipelines.ray_utils import RayConnectError, check_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_data(tmp_path / "in", n_a=1, n_b=0, bad=())
    env, code = _cli_subprocess()
    argv = [sys.executable, "-c", code, "preprocess", str(tmp_path / "in"), "-m", TOK, "-o", str(tmp_path / "t"),
            "--no-progress", "--address", f"127.0.0.1:{port}"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.perf_counter() - t0 < 30, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"maskloom preprocess: error: no Ray cluster at 127.0.0.1:{port} (connection refused); start one with "
        "`ray start --head`, or leave out --address (and RAY_ADDRESS) for an embedded Ray"
    )
    with pytest.raises(
        RayConnectError, match=r"Ray address 'somehost': expected HOST:PORT \(e.g. 127.0.0.1:6379\)"
    ):
        check_reachable("somehost")
    for address in ("auto", "local", "ray://somehost:10001"):  # Ray's own forms: left to ray.init
        check_reachable(address)


def test_a_full_disk_stops_the_job_with_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys):
    """No space left (or no permission) is the disk's fault, not an input's: the job stops at the
    first shard that cannot be written, names it, keeps the committed ones and leaves no temp file."""
    import errno

    make_data(tmp_path / "in", n_a=4, n_b=4, bad=())
    out = tmp_path / "t"
    real_add, calls = tables.ShardWriter.add, []

    def add(self, records):
        calls.append(1)
        if len(calls) == 5:  # the third shard of two inputs
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, records)

    monkeypatch.setattr(tables.ShardWriter, "add", add)
    argv = ["preprocess", str(tmp_path / "in"), "-m", TOK, "-o", str(out), "--shard-size", "2", "--no-progress",
            "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 1
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("part-"))
    assert re.fullmatch(
        re.escape(f"maskloom preprocess: failed: {out}/") + r"part-00002-[0-9a-f]{16}\.parquet"
        + re.escape(": cannot write the shard (No space left on device); 2 committed shards kept: free space (or fix "
                    "the permissions), then run the same command again to resume"),
        capsys.readouterr().err.splitlines()[-1],
    )  # fmt: skip
    assert len(shards) == 2 and not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(tables.ShardWriter, "add", real_add)  # space again
    assert main(argv) == 0
    assert "2/4 shards resumed" in capsys.readouterr().out


def test_a_worker_hands_a_write_error_over_as_a_row_and_the_driver_stops(tmp_path, monkeypatch):
    """On Ray a worker's exception reaches the driver only as text in a traceback, so the actor
    returns the write error as a row, which the driver raises as WriteError."""
    from maskloom.pipelines.preprocess import WriteError

    found = make_data(tmp_path / "in", n_a=2, n_b=0, bad=())
    tok = get_tokenizer(TOK, None)
    meta = tables.table_meta(tok.spec(), tokenizer=TOK, tokenizer_version=tok.version, config=tok.config_dict(),
                             fingerprint=tok.fingerprint())  # fmt: skip
    spec = plan_shards(found.inputs, "k", 2)[0]

    def close(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tables.ShardWriter, "close", close)
    actor = TokenizeShardActor(modality=TOK, config={}, imports=(), artifacts_dir=None, out_dir=str(tmp_path),
                               meta=meta)  # fmt: skip
    row = json.loads(actor({"spec": np.array([spec.to_json()], dtype=object)})["commit"][0])
    assert row == {"write_error": f"{tmp_path / spec.name}: cannot write the shard (Permission denied)"}

    def ray_rows(todo, *a, **k):
        yield row

    monkeypatch.setattr(pp, "_commits_on_ray", ray_rows)
    with pytest.raises(WriteError) as e:
        preprocess(found, TOK, None, str(tmp_path / "t"), shard_size=2, progress=False, num_workers=1)
    assert str(e.value) == (
        f"{tmp_path / spec.name}: cannot write the shard (Permission denied); 0 committed shards kept: free space "
        "(or fix the permissions), then run the same command again to resume"
    )


def test_an_input_that_never_finishes_ends_its_worker_and_becomes_an_error_row(tmp_path, local_ray):
    """A decoder hung in C (decord on some MP4s) would stall the job for ever: past --input-timeout
    the watchdog records the input and ends the worker; Ray restarts it and reruns the shard, and the
    input becomes one error row. Every other input is written once."""
    found = make_data(tmp_path / "in", n_a=3, n_b=3, bad=())
    out = str(tmp_path / "t")
    t0 = time.perf_counter()
    r = preprocess(found, TOK, {"hang_on": "a/f1.txt"}, out, shard_size=3, imports=IMPORTS, progress=False,
                   num_workers=1, input_timeout=1.0)  # fmt: skip
    assert time.perf_counter() - t0 < 120
    assert (r.inputs, r.rows, r.errors) == (6, 5, 1)
    t = tables.TokenTable(out)
    hung = str(tmp_path / "in" / "a" / "f1.txt")
    assert t.errors().to_pylist() == [{
        "source": hung, "kind": "corrupt",
        "message": "decoding made no progress for 1 s (--input-timeout); its worker was ended and restarted",
    }]  # fmt: skip
    ids = t.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 5 and f"{hung}#0" not in ids
    assert not os.path.exists(os.path.join(out, COMMITS))  # the hung record went with the commit records


def test_an_input_whose_records_keep_coming_may_outlast_the_timeout(tmp_path, local_ray):
    """--input-timeout is a hang detector, not a limit on big inputs: 4 records 0.4 s apart (1.6 s in
    all) pass a 1 s timeout in a Ray worker."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text("1 2 3 4")
    out = str(tmp_path / "t")
    r = preprocess([str(tmp_path / "in" / "big.txt")], TOK, {"stream_delay": 0.4}, out, imports=IMPORTS,
                   progress=False, num_workers=1, input_timeout=1.0)  # fmt: skip
    assert (r.inputs, r.rows, r.errors) == (1, 4, 0)


def test_input_watchdog_records_the_input_and_ends_the_process(tmp_path):
    """The watchdog in a child process: past the timeout without progress, the record, then exit status
    75; an input that keeps giving records (touch) runs as long as it needs."""
    code = (
        "import sys, time; from maskloom.pipelines.preprocess import InputWatchdog\n"
        "w = InputWatchdog(0.2, tick=0.05)\n"
        "w.begin(sys.argv[1], 'fast.txt'); time.sleep(0.1); w.end()\n"
        "w.begin(sys.argv[1], 'streaming.txt')\n"
        "for _ in range(8): time.sleep(0.1); w.touch()  # 0.8 s in all, never 0.2 s without a record\n"
        "w.end()\n"
        "w.begin(sys.argv[1], 'slow.txt'); time.sleep(30)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == pp.HUNG_EXIT_CODE, done.stderr
    assert pp._hung_inputs(str(tmp_path)) == {"slow.txt": 0.2}
    # a tar's sample: moving on to a sample is progress, and the hang is that sample's
    code = (
        "import sys, time; from maskloom.pipelines.preprocess import InputWatchdog\n"
        "w = InputWatchdog(0.3, tick=0.05)\n"
        "w.begin(sys.argv[1], 'x.tar')\n"
        "for k in range(6): w.at_sample(k); time.sleep(0.1)  # 0.6 s in all\n"
        "w.at_sample(6); time.sleep(30)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tar")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == pp.HUNG_EXIT_CODE, done.stderr
    assert "x.tar: sample 6: no progress for 0.3 s; ending this worker" in done.stderr
    assert pp._hung_samples(str(tmp_path / "tar")) == {"x.tar": {6: 0.3}}
    assert pp._hung_inputs(str(tmp_path / "tar")) == {}
    with pytest.raises(ValueError, match="input_timeout must be >= 0 seconds"):
        preprocess(
            [str(tmp_path / "x.txt")], TOK, None, str(tmp_path / "t"), input_timeout=-1, progress=False
        )


def test_a_second_job_on_a_table_being_written_is_refused(tmp_path):
    """A command started twice (or a scheduler's retry while the first try runs) would write the same
    shards and remove each other's commit records: the second job stops at once, naming the first."""
    found = make_data(tmp_path / "in", n_a=2, n_b=0, bad=())
    out = tmp_path / "t"
    code = (
        "import sys, time; from maskloom.pipelines.preprocess import _job_lock\n"
        "with _job_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TableConflictError) as e:
            preprocess(found, TOK, None, str(out), progress=False, num_workers=0)
        assert str(e.value) == (
            f"{out}: another maskloom preprocess (pid {holder.pid}) is writing this table; wait for it to end, "
            "or choose another --out"
        )
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    r = preprocess(found, TOK, None, str(out), progress=False, num_workers=0)  # the OS dropped the lock
    assert (r.inputs, r.rows) == (2, 2)


def test_the_lock_folder_is_shared_by_the_users_of_the_machine(tmp_path, monkeypatch):
    """The first job on a machine makes the lock folder mode 1777 (as /tmp) whatever its umask, so the
    jobs of other users can take their locks in it; an existing folder is left as it is."""
    monkeypatch.setattr(pp.tempfile, "tempdir", str(tmp_path))
    old = os.umask(0o022)
    try:
        with pp._job_lock(str(tmp_path / "t")):
            pass
    finally:
        os.umask(old)
    folder = tmp_path / "maskloom-locks"
    assert oct(folder.stat().st_mode & 0o7777) == "0o1777"
    assert [p.suffix for p in folder.iterdir()] == [".lock"]
    os.chmod(folder, 0o755)
    with pp._job_lock(str(tmp_path / "t")):
        pass
    assert oct(folder.stat().st_mode & 0o7777) == "0o755"


def test_a_plug_in_that_fails_to_import_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "plug_syntax.py").write_text("def f(:\n")
    (tmp_path / "plug_raises.py").write_text("raise RuntimeError('no licence file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = [
        "preprocess",
        str(tmp_path),
        "-m",
        TOK,
        "-o",
        str(tmp_path / "o"),
        "--num-workers",
        "0",
        "--import",
    ]
    assert main([*base, "plug_syntax"]) == 2
    assert capsys.readouterr().err == (
        f"maskloom preprocess: error: --import plug_syntax: SyntaxError: invalid syntax ({tmp_path / 'plug_syntax.py'}, "
        "line 1) (-vv shows the traceback)\n"
    )
    assert main([*base, "plug_raises"]) == 2
    assert capsys.readouterr().err == (
        "maskloom preprocess: error: --import plug_raises: RuntimeError: no licence file (-vv shows the traceback)\n"
    )
    assert main([*base, "plug_missing_xyz"]) == 2
    assert (
        capsys.readouterr().err
        == "maskloom preprocess: error: --import: No module named 'plug_missing_xyz'\n"
    )


def test_workers_that_cannot_import_a_plug_in_end_the_job_with_one_line(tmp_path, monkeypatch, local_ray):
    """A plug-in importable on the driver but not on the workers (a cluster without it): every actor's
    constructor fails, and the job ends naming the worker's error, not with Ray's 100-line dump."""
    (tmp_path / "plug_driver_only.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # this process only: the workers' path lacks it
    found = make_data(tmp_path / "in", n_a=2, n_b=0, bad=())
    with pytest.raises(PreprocessError) as e:
        preprocess(found, TOK, None, str(tmp_path / "t"), imports=["ppkit_tokenizer", "plug_driver_only"],
                   progress=False, num_workers=1)  # fmt: skip
    assert str(e.value) == (
        "the tokenizer workers could not start: ModuleNotFoundError: No module named 'plug_driver_only' (a plug-in "
        "must be importable on every worker: `ray job submit --working-dir` ships it, or install it on the nodes)"
    )


def test_a_temp_folder_that_cannot_hold_the_lock_does_not_stop_the_job(tmp_path, monkeypatch, caplog):
    (tmp_path / "tmpfile").write_text("not a folder")
    monkeypatch.setattr(pp.tempfile, "gettempdir", lambda: str(tmp_path / "tmpfile"))
    found = make_data(tmp_path / "in", n_a=2, n_b=0, bad=())
    with caplog.at_level("WARNING", logger="maskloom.pipelines.preprocess"):
        r = preprocess(found, TOK, None, str(tmp_path / "t"), progress=False, num_workers=0)
    assert (r.inputs, r.rows) == (2, 2)
    assert "cannot take the one-job-per-table lock" in caplog.text


class _FitFails(ppkit_tokenizer.NumbersTokenizer):
    """A corpus-fitted tokenizer whose fit lets an input's TokenizeError out (a fit should skip it)."""

    needs_fit = True

    def fit(self, sources) -> None:
        raise TokenizeError(sorted(sources)[0], "corrupt", "not numbers")


def test_a_fit_that_lets_an_input_error_out_ends_the_job_with_one_line(tmp_path, capsys):
    from maskloom.tokenizers.base import register_tokenizer

    register_tokenizer("ppkit_fit_fails")(_FitFails)
    found = make_data(tmp_path / "in", n_a=2, n_b=1)
    with pytest.raises(PreprocessError, match=r"fitting the ppkit_fit_fails tokenizer on the inputs failed at "
                       r".*a/f0\.txt: corrupt: not numbers; nothing was tokenized"):  # fmt: skip
        preprocess(found, "ppkit_fit_fails", None, str(tmp_path / "t"), progress=False, num_workers=0)
    rc = main(["preprocess", str(tmp_path / "in"), "-m", "ppkit_fit_fails", "-o", str(tmp_path / "t2"),
               "--num-workers", "0", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(
        "maskloom preprocess: failed: fitting the ppkit_fit_fails tokenizer"
    )


def test_a_walk_leaves_out_the_side_files_of_graph_edge_lists(tmp_path, capsys):
    """g.features.csv and g.labels.csv beside g.csv are read with it, not as edge lists of their own."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "g.csv").write_text("src,dst\n0,1\n1,2\n")
    (d / "g.features.csv").write_text("3,1\n0,2\n1,1\n")
    (d / "g.labels.csv").write_text("0\n1\n1\n")
    (d / "h.edges").write_text("0 1\n1 2\n")
    np.save(d / "h.features.npy", np.ones((3, 2), np.float32))  # one feature width per table
    cfg = {"subgraph_centers": 1}
    r = preprocess(str(d), "graph", cfg, str(tmp_path / "t"), progress=False, num_workers=0)
    assert (r.inputs, r.errors) == (2, 0)  # g.csv and h.edges
    t = tables.TokenTable(str(tmp_path / "t"))
    assert sorted({os.path.basename(s) for s in t.read().column("source").to_pylist()}) == [
        "g.csv",
        "h.edges",
    ]
    rc = main(["preprocess", str(d), "-m", "graph", "-o", str(tmp_path / "t2"), "--set", "subgraph_centers=1",
               "--num-workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0 and "maskloom preprocess: 2 inputs ->" in capsys.readouterr().err


def test_a_tu_folder_without_as_one_source_gets_a_hint(tmp_path, capsys):
    raw = tmp_path / "MUTAG"
    raw.mkdir()
    for name in ("A", "graph_indicator", "graph_labels"):
        (raw / f"MUTAG_{name}.txt").write_text("1\n")
    assert main(["preprocess", str(raw), "-m", "graph", "-o", str(tmp_path / "t"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(a TU dataset folder is one input: add --as-one-source)") and "\n" not in err
