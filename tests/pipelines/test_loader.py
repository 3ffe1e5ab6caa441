"""The training loader: exact batches, padding, bucketing, shuffling, DDP shards, resume, mixing, workers."""

import dataclasses
import pickle
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from maskloom import tables
from maskloom.pipelines.loader import (
    LoaderConfig,
    TokenLoader,
    _MetaJSON,
    collate_fn,
    plan_stream,
    ray_dataset,
    table_lengths,
)
from maskloom.tokenizers.base import Record, TableSpec, Tokenizer, register_tokenizer


class _TableOnly(Tokenizer):
    """A tokenizer that only declares a spec: the tests write its tables from records directly."""

    def read(self, source):
        return source

    def tokenize(self, raw, *, source=""):
        return []

    def detokenize(self, record):
        return record.tokens


@register_tokenizer("loader_test_vec")
class VecTokenizer(_TableOnly):
    """Continuous toy tokens: token t of sample i is [1000 i + 10 t + d for d < dim]."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        dim: int = 2
        """token width"""
        dtype: str = "float32"
        """stored token dtype"""

    def spec(self):
        return TableSpec(
            modality="loader_test_vec",
            token_kind="continuous",
            token_dim=self.config.dim,
            token_dtype=self.config.dtype,
            position_axes=("index",),
            position_kind="grid",
        )


@register_tokenizer("loader_test_ids")
class IdsTokenizer(_TableOnly):
    """Discrete toy tokens with optional graph-like edges."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        vocab: int = 10000
        """vocabulary size"""

    def spec(self):
        return TableSpec(
            modality="loader_test_ids",
            token_kind="discrete",
            token_dim=1,
            token_dtype="int32",
            position_axes=("a", "b"),
            position_kind="spectral",
            vocab_size=self.config.vocab,
        )


def vec_record(i, n, dim=2, label=None):
    t = np.arange(n)[:, None] * 10 + np.arange(dim)[None, :] + 1000 * i
    return Record(
        id=f"s{i}",
        source=f"f{i}",
        tokens=t.astype(np.float32),
        positions=np.arange(n, dtype=np.float32)[:, None],
        label=label,
        meta={"i": i},
    )


def ids_record(i, n, edges=None):
    return Record(
        id=f"g{i}",
        source=f"g{i}",
        tokens=(np.arange(n) + 100 * i).astype(np.int32),
        positions=np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32),
        edges=None if edges is None else np.asarray(edges, np.int32),
        label=i % 2,
    )


def make_vec(tmp_path, lengths, name="vec", rows_per_shard=4096, labels=None):
    recs = [vec_record(i, n, label=None if labels is None else labels[i]) for i, n in enumerate(lengths)]
    return tables.write_table(
        str(tmp_path / name), recs, VecTokenizer(), rows_per_shard=rows_per_shard
    ).directory


def ids_of(loader):
    return [b.ids for b in loader]


def padded_and_real(loader):
    pad = real = 0
    for b in loader:
        pad += int(b.padding.sum())
        real += int((~b.padding).sum())
    return pad, real


# ---------------------------------------------------------------------------------------------
def test_exact_batch_contents_and_padding(tmp_path):
    d = make_vec(tmp_path, [3, 1, 2], labels=[2, None, 0])
    (batch,) = list(TokenLoader(d, batch_size=3, shuffle=False, bucket=False))
    assert batch.modality == "loader_test_vec" and batch.ids == ["s0", "s1", "s2"]
    assert batch.tokens.dtype == torch.float32 and batch.tokens.shape == (3, 3, 2)
    expected = torch.tensor(
        [
            [[0, 1], [10, 11], [20, 21]],
            [[1000, 1001], [0, 0], [0, 0]],
            [[2000, 2001], [2010, 2011], [0, 0]],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(batch.tokens, expected)
    assert batch.padding.tolist() == [[False, False, False], [False, True, True], [False, False, True]]
    assert batch.positions.dtype == torch.float32
    assert batch.positions[..., 0].tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 0]]
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [2, -1, 0]
    assert batch.edges is None
    assert batch.meta == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert batch.lengths.tolist() == [3, 1, 2]


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_continuous_tokens_keep_their_stored_dtype(tmp_path, dtype):
    """No widening to float32 in the loader (adapters and objectives cast on the device)."""
    tok = VecTokenizer({"dim": 3, "dtype": dtype})
    vals = [np.arange(n * 3).reshape(n, 3) + 7 * i for i, n in enumerate([2, 1])]
    recs = [
        Record(
            id=f"s{i}", source=f"f{i}", tokens=v.astype(dtype), positions=np.zeros((len(v), 1), np.float32)
        )
        for i, v in enumerate(vals)
    ]
    d = tables.write_table(str(tmp_path / dtype), recs, tok).directory
    (b,) = list(TokenLoader(d, batch_size=2, shuffle=False, bucket=False))
    assert b.tokens.dtype == getattr(torch, dtype) and not b.is_discrete
    assert b.tokens.tolist() == [[[0, 1, 2], [3, 4, 5]], [[7, 8, 9], [0, 0, 0]]]


def test_discrete_tokens_and_edges(tmp_path):
    recs = [ids_record(0, 3, [[0, 1], [1, 2]]), ids_record(1, 2), ids_record(2, 1, [[0, 0]])]
    d = tables.write_table(str(tmp_path / "ids"), recs, IdsTokenizer()).directory
    (b,) = list(TokenLoader(d, batch_size=3, shuffle=False, bucket=False, with_meta=False))
    assert b.tokens.dtype == torch.int64 and b.tokens.tolist() == [[0, 1, 2], [100, 101, 0], [200, 0, 0]]
    assert b.is_discrete
    assert b.positions.shape == (3, 3, 2) and b.positions[0, 2].tolist() == [2.0, -2.0]
    assert b.edges.dtype == torch.int64
    assert b.edges.tolist() == [[[0, 1], [1, 2]], [[-1, -1], [-1, -1]], [[0, 0], [-1, -1]]]
    assert b.labels.tolist() == [0, 1, 0] and b.meta == []


def test_table_lengths_from_offsets(tmp_path):
    d = make_vec(tmp_path, [3, 1, 2, 7, 5], rows_per_shard=2)
    assert table_lengths(d).tolist() == [3, 1, 2, 7, 5]


def test_bucketing_without_shuffle_sorts_within_pool(tmp_path):
    d = make_vec(tmp_path, [3, 1, 2, 5, 4, 1])
    got = ids_of(TokenLoader(d, batch_size=2, shuffle=False, bucket=True))
    # lengths sorted: s1 s5 | s2 s0 | s4 s3; inside a batch the rows are in table order
    assert got == [["s1", "s5"], ["s0", "s2"], ["s3", "s4"]]
    # pools of bucket_window * batch_size = 2 rows: sorting only inside each pool
    got = ids_of(TokenLoader(d, batch_size=2, shuffle=False, bucket=True, bucket_window=1))
    assert got == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_bucketing_reduces_padding_exactly(tmp_path, shuffle):
    d = make_vec(tmp_path, [1, 9] * 8)  # 16 rows, 80 real tokens
    plain = padded_and_real(TokenLoader(d, batch_size=2, shuffle=False, bucket=False))
    assert plain == (64, 80)  # every batch is (1, 9): 8 padding of 18
    bucketed = padded_and_real(TokenLoader(d, batch_size=2, shuffle=shuffle, bucket=True, seed=3))
    assert bucketed == (0, 80)


def test_max_tokens_caps_padded_tokens(tmp_path):
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    d = make_vec(tmp_path, lengths)
    loader = TokenLoader(d, batch_size=8, max_tokens=20, seed=1)
    batches = list(loader)
    assert all(b.batch_size * b.seq_len <= 20 for b in batches)
    assert all(b.batch_size <= 8 for b in batches)
    assert sorted(i for b in batches for i in b.ids) == sorted(f"s{i}" for i in range(30))


def test_drop_last(tmp_path):
    d = make_vec(tmp_path, [2] * 7)
    assert [len(x) for x in ids_of(TokenLoader(d, batch_size=3, shuffle=False))] == [3, 3, 1]
    assert [len(x) for x in ids_of(TokenLoader(d, batch_size=3, shuffle=False, drop_last=True))] == [3, 3]


def test_shuffle_deterministic_by_seed_and_epoch(tmp_path):
    d = make_vec(tmp_path, [(i * 7) % 11 + 1 for i in range(40)], rows_per_shard=8)  # 5 shards

    def epoch_ids(seed, epoch):
        loader = TokenLoader(d, batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return ids_of(loader)

    a = epoch_ids(0, 0)
    assert a == epoch_ids(0, 0)
    assert a != epoch_ids(0, 1)
    assert a != epoch_ids(1, 0)
    for e in (a, epoch_ids(0, 1)):  # every epoch covers every row exactly once
        assert sorted(i for b in e for i in b) == sorted(f"s{i}" for i in range(40))


def test_iterating_to_the_end_advances_the_epoch(tmp_path):
    d = make_vec(tmp_path, [2, 3, 4, 5, 6, 7])
    loader = TokenLoader(d, batch_size=2, seed=5)
    first = ids_of(loader)
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0
    fresh = TokenLoader(d, batch_size=2, seed=5)
    fresh.set_epoch(1)
    assert ids_of(loader) == ids_of(fresh)
    loader.set_epoch(0)
    assert ids_of(loader) == first


@pytest.mark.parametrize("world_size,rows", [(2, 20), (3, 20)])
def test_rank_shards_disjoint_equal_and_covering(tmp_path, world_size, rows):
    d = make_vec(tmp_path, [i % 5 + 1 for i in range(rows)], rows_per_shard=6)
    full = ids_of(TokenLoader(d, batch_size=2, seed=2))  # 10 batches
    per_rank = [
        ids_of(TokenLoader(d, batch_size=2, seed=2, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    k = len(full) // world_size
    assert [len(p) for p in per_rank] == [k] * world_size
    flat = [tuple(b) for p in per_rank for b in p]
    assert len(set(flat)) == len(flat)  # disjoint batches
    samples = [i for b in flat for i in b]
    assert len(set(samples)) == len(samples)  # disjoint samples
    # rank r's block is block r of the single-process epoch; the remainder (10 % 3 = 1) is dropped
    assert flat == [tuple(b) for b in full[: k * world_size]]


def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path):
    d = make_vec(tmp_path, [(i * 5) % 9 + 1 for i in range(30)], rows_per_shard=7)
    full_loader = TokenLoader(d, batch_size=3, seed=4)
    full_loader.set_epoch(2)
    full = list(full_loader)
    loader = TokenLoader(d, batch_size=3, seed=4)
    loader.set_epoch(2)
    it = iter(loader)
    seen = [next(it) for _ in range(4)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4
    resumed = TokenLoader(d, batch_size=3, seed=4)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 4
    for a, b in zip(seen + rest, full):
        assert a.ids == b.ids and torch.equal(a.tokens, b.tokens) and torch.equal(a.padding, b.padding)
    assert resumed.epoch == 3
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(d, batch_size=3, seed=5).load_state_dict(state)


def test_a_state_saved_after_the_last_batch_resumes_with_the_next_epoch(tmp_path):
    """A training loop checkpoints after each step, so a state can hold (epoch e, position = all of
    its batches) before the loader has rolled over: iterating it yields epoch e + 1 (it yielded
    nothing, and training stopped with "the loader yielded no batch")."""
    d = make_vec(tmp_path, [(i * 5) % 9 + 1 for i in range(12)], rows_per_shard=5)
    loader = TokenLoader(d, batch_size=3, seed=4)
    it = iter(loader)
    n = len(loader.plan())
    for _ in range(n):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, n)
    resumed = TokenLoader(d, batch_size=3, seed=4)
    resumed.load_state_dict(state)
    want = TokenLoader(d, batch_size=3, seed=4)
    want.set_epoch(1)
    got, expected = ids_of(resumed), ids_of(want)
    assert got == expected and len(expected) == n
    assert resumed.epoch == 2


def test_num_workers_identical_in_order(tmp_path):
    d = make_vec(tmp_path, [(i * 3) % 8 + 1 for i in range(26)], rows_per_shard=5)
    ref = list(TokenLoader(d, batch_size=3, seed=7))
    par = list(TokenLoader(d, batch_size=3, seed=7, num_workers=2))
    assert [b.ids for b in par] == [b.ids for b in ref]
    for a, b in zip(par, ref):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.padding, b.padding) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("pipe_bytes", [0, 256 << 10])  # every batch as shared-memory tensors / pickled
@pytest.mark.parametrize("with_meta", [False, True])
def test_worker_batches_by_pipe_or_shared_memory_are_identical(tmp_path, monkeypatch, pipe_bytes, with_meta):
    from maskloom.pipelines import loader as loader_mod

    monkeypatch.setattr(loader_mod, "PIPE_BATCH_BYTES", pipe_bytes)  # forked workers inherit it
    edges = [
        None if i % 3 == 0 else np.array([[0, j % (i % 4 + 1)] for j in range(i % 5)]).reshape(-1, 2)
        for i in range(21)
    ]
    recs = [ids_record(i, i % 4 + 1, edges[i]) for i in range(21)]
    d = tables.write_table(str(tmp_path / "g"), recs, IdsTokenizer(), rows_per_shard=6).directory
    ref = list(TokenLoader(d, batch_size=4, seed=3, with_meta=with_meta))
    par = list(TokenLoader(d, batch_size=4, seed=3, with_meta=with_meta, num_workers=2))
    assert len(par) == len(ref) == 6
    for a, b in zip(par, ref):
        assert type(a) is type(b) and a.ids == b.ids and a.modality == b.modality
        for k in ("tokens", "positions", "padding", "labels", "edges"):
            x, y = getattr(a, k), getattr(b, k)
            assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and torch.equal(x, y)))
        if with_meta:
            assert isinstance(a.__dict__["_meta"], _MetaJSON)  # still unparsed after the trip
        assert a.meta == b.meta


def test_pipe_batch_round_trip_keeps_columns_and_unparsed_meta():
    from maskloom.pipelines.loader import _Batch, _PipeBatch

    b = _Batch(
        tokens=torch.arange(6).reshape(2, 3),
        positions=torch.zeros(2, 3, 1),
        padding=torch.tensor([[False, False, True], [False, False, False]]),
        modality="text",
        labels=torch.tensor([1, -1]),
        edges=None,
        ids=["a", "b"],
        meta=_MetaJSON(['{"k": 1}', "{}"]),
    )
    assert _PipeBatch.nbytes(b) == 6 * 8 + 6 * 4 + 6 + 2 * 8
    back = pickle.loads(pickle.dumps(_PipeBatch(b))).batch()
    assert isinstance(back.__dict__["_meta"], _MetaJSON) and back.meta == [{"k": 1}, {}]
    assert back.edges is None and back.ids == ["a", "b"] and back.modality == "text"
    assert torch.equal(back.tokens, b.tokens) and torch.equal(back.padding, b.padding)
    assert torch.equal(back.labels, b.labels) and back.positions.shape == (2, 3, 1)


def test_resume_with_workers(tmp_path):
    d = make_vec(tmp_path, [(i * 3) % 8 + 1 for i in range(20)], rows_per_shard=5)
    ref = ids_of(TokenLoader(d, batch_size=2, seed=7))
    loader = TokenLoader(d, batch_size=2, seed=7, num_workers=2)
    loader.load_state_dict({"epoch": 0, "position": 3})
    assert ids_of(loader) == ref[3:]


def test_multi_table_mixing_by_weights(tmp_path):
    a = make_vec(tmp_path, [i % 4 + 1 for i in range(24)], name="a")
    b = tables.write_table(
        str(tmp_path / "b"), [ids_record(i, i % 3 + 1) for i in range(8)], IdsTokenizer()
    ).directory

    def run(rank=0, world_size=1):
        loader = TokenLoader(
            [a, b],
            batch_size=2,
            seed=9,
            rank=rank,
            world_size=world_size,
            weights={"loader_test_vec": 3, "loader_test_ids": 1},
            steps_per_epoch=40,
        )
        return [(x.modality, tuple(x.ids)) for x in loader]

    first = run()
    assert first == run() and len(first) == 40
    mods = [m for m, _ in first]
    assert all(all(i.startswith("s" if m == "loader_test_vec" else "g") for i in ids) for m, ids in first)
    assert mods.count("loader_test_vec") > mods.count("loader_test_ids") > 0
    # the ids stream (4 batches) is sampled about 10 times: it cycles through new permutations
    assert mods.count("loader_test_ids") > 4
    # DDP: every rank gets the same modality at every step, with disjoint batches
    r0, r1 = run(0, 2), run(1, 2)
    assert [m for m, _ in r0] == [m for m, _ in r1]


def test_multi_table_without_weights_yields_every_batch_once(tmp_path):
    a = make_vec(tmp_path, [i % 4 + 1 for i in range(10)], name="a")
    a2 = make_vec(tmp_path, [2] * 4, name="a2")  # same modality: one stream with a
    b = tables.write_table(
        str(tmp_path / "b"), [ids_record(i, 2) for i in range(6)], IdsTokenizer()
    ).directory
    loader = TokenLoader([a, b, a2], batch_size=4, seed=1)
    assert loader.modalities == ["loader_test_vec", "loader_test_ids"]
    out = [(x.modality, x.ids) for x in loader]
    assert sorted(i for m, ids in out if m == "loader_test_vec" for i in ids) == sorted(
        [f"s{i}" for i in range(10)] + [f"s{i}" for i in range(4)]
    )
    assert sorted(i for m, ids in out if m == "loader_test_ids" for i in ids) == [f"g{i}" for i in range(6)]
    assert len(out) == len(loader) == 4 + 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    d = make_vec(tmp_path, [2, 2])
    with pytest.raises(tables.TableError, match="no such token table"):
        TokenLoader(str(tmp_path / "nope"), batch_size=2)
    with pytest.raises(ValueError, match="missing"):
        TokenLoader(d, batch_size=2, weights={"other": 1})
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(d, batch_size=2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="unknown option"):
        TokenLoader(d, batch_sise=2)
    wide = tables.write_table(
        str(tmp_path / "wide"), [vec_record(0, 2, dim=3)], VecTokenizer({"dim": 3})
    ).directory
    with pytest.raises(tables.TableError, match="different token specs"):
        TokenLoader([d, wide], batch_size=2)


def test_plan_stream_is_pure():
    lengths = np.array([5, 1, 4, 2, 3, 6, 2, 2])
    cfg = LoaderConfig(batch_size=3, seed=1)
    a = plan_stream(lengths, [3, 5], cfg, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in plan_stream(lengths, [3, 5], cfg, epoch=0)]
    assert sorted(np.concatenate(a).tolist()) == list(range(8))


@pytest.mark.slow
def test_ray_dataset_collate(tmp_path):
    ray = pytest.importorskip("ray")
    d = make_vec(tmp_path, [3, 1, 2], labels=[2, None, 0])
    t0 = time.time()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        ds = ray_dataset(d)
        batches = list(ds.iter_torch_batches(batch_size=3, collate_fn=collate_fn(d)))
    finally:
        ray.shutdown()
    assert time.time() - t0 < 120
    (b,) = batches
    order = np.argsort(b.ids)
    assert sorted(b.ids) == ["s0", "s1", "s2"]
    assert b.tokens.shape == (3, 3, 2) and b.labels[order].tolist() == [2, -1, 0]
    assert b.lengths[order].tolist() == [3, 1, 2]


def test_collate_from_chunks_with_distinct_offsets():
    from maskloom.pipelines.loader import _Chunk, collate

    spec = VecTokenizer().spec()
    # two rows of 2 and 1 tokens; positions stored with a leading unused entry (offsets shifted by 1)
    c = _Chunk(
        tok_off=np.array([0, 2, 3]),
        tok=np.arange(6, dtype=np.float32).reshape(3, 2),
        pos_off=np.array([1, 3, 4]),
        pos=np.array([[9], [0], [1], [7]], np.float32),
        edge_off=None,
        edges=None,
        labels=np.array([4, -1]),
        ids=np.array(["a", "b"], object),
        meta=np.array(['{"k": 1}', "{}"], object),
    )
    b = collate([(c, np.array([1, 0]), np.array([0, 1]))], spec)
    assert b.ids == ["b", "a"] and b.labels.tolist() == [-1, 4] and b.meta == [{}, {"k": 1}]
    assert b.tokens.tolist() == [[[4, 5], [0, 0]], [[0, 1], [2, 3]]]
    assert b.positions[..., 0].tolist() == [[7, 0], [0, 1]]
    assert b.padding.tolist() == [[False, True], [False, False]]


def test_each_row_group_read_once_per_epoch(tmp_path, monkeypatch):
    from maskloom.pipelines import loader as loader_mod

    d = make_vec(tmp_path, [i % 6 + 1 for i in range(40)], rows_per_shard=4)  # 10 shards of one row group
    loads = []
    real_load = loader_mod._Reader._load
    monkeypatch.setattr(
        loader_mod._Reader, "_load", lambda self, s, g: loads.append(g) or real_load(self, s, g)
    )
    loader = TokenLoader(d, batch_size=3, seed=1, bucket_window=2, cache=False)
    list(loader)
    assert sorted(loads) == list(range(10))
    loads.clear()
    list(TokenLoader(d, batch_size=3, seed=1, bucket_window=2, rank=1, world_size=2, cache=False))
    assert len(loads) == len(set(loads)) <= 6  # a rank reads about half of the row groups, each once


def test_cache_reads_a_small_table_once_and_changes_no_batch(tmp_path, monkeypatch):
    from maskloom.pipelines import loader as loader_mod

    d = make_vec(tmp_path, [i % 6 + 1 for i in range(40)], rows_per_shard=4)  # 10 shards of one row group
    loads: list[tuple[int, int]] = []  # (reader, row group)
    real_load = loader_mod._Reader._load
    monkeypatch.setattr(
        loader_mod._Reader, "_load", lambda self, s, g: loads.append((id(self), g)) or real_load(self, s, g)
    )
    for rank, world in ((0, 1), (1, 2)):
        kw = dict(batch_size=3, seed=1, bucket_window=2, rank=rank, world_size=world)
        cached, plain = TokenLoader(d, **kw), TokenLoader(d, **kw, cache=False)
        assert cached.config.cache and cached.streams[0].resident
        loads.clear()
        for _ in range(3):  # every epoch's batches are those of the uncached loader
            a, b = list(cached), list(plain)
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert x.ids == y.ids and torch.equal(x.labels, y.labels)
                assert torch.equal(x.tokens, y.tokens) and torch.equal(x.positions, y.positions)
                assert torch.equal(x.padding, y.padding)
        mine = [g for r, g in loads if r == id(cached._reader)]
        assert sorted(mine) == list(range(10))  # all row groups once, in the first epoch only
        theirs = [g for r, g in loads if r == id(plain._reader)]
        assert len(theirs) >= 3 * (10 if world == 1 else 3)  # read again every epoch


def test_thread_prefetch_identical_in_order(tmp_path):
    d = make_vec(tmp_path, [(i * 3) % 8 + 1 for i in range(26)], rows_per_shard=5)
    ref = list(TokenLoader(d, batch_size=3, seed=7))
    loader = TokenLoader(d, batch_size=3, seed=7, thread_prefetch=2)
    got = list(loader)
    assert [b.ids for b in got] == [b.ids for b in ref]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, ref))
    assert loader.epoch == 1
    # stopping early and resuming still gives exactly the rest
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    del it
    rest = list(loader)
    again = TokenLoader(d, batch_size=3, seed=7)
    again.set_epoch(1)
    assert [b.ids for b in first + rest] == ids_of(again)


# ---------------------------------------------------------------------------------------------
# the vectorised collate paths (windows over merged row groups; row copies for big rows) and lazy meta
def expected_batch(recs_by_id, ids, dim):
    """(tokens, positions, edges) padded from the records, the obvious way: one row at a time."""
    rs = [recs_by_id[i] for i in ids]
    L = max(r.num_tokens for r in rs)
    E = max((0 if r.edges is None else len(r.edges)) for r in rs)
    tok = np.zeros((len(rs), L, dim) if dim else (len(rs), L), np.float64)
    pos = np.zeros((len(rs), L, rs[0].positions.shape[1]), np.float64)
    edges = np.full((len(rs), E, 2), -1, np.int64)
    for i, r in enumerate(rs):
        tok[i, : r.num_tokens] = r.tokens
        pos[i, : r.num_tokens] = r.positions
        if r.edges is not None:
            edges[i, : len(r.edges)] = r.edges
    return tok, pos, edges


@pytest.mark.parametrize("row_copy_min", [1, 10**9])  # every path: per-row copies / windowed gathers
def test_batches_across_row_groups_match_records(tmp_path, monkeypatch, row_copy_min, jit_path):
    from maskloom.pipelines import loader as loader_mod

    monkeypatch.setattr(loader_mod, "ROW_COPY_MIN", row_copy_min)
    vec = [vec_record(i, (i * 7) % 9 + 1, label=i % 3) for i in range(37)]
    d = tables.write_table(str(tmp_path / "v"), vec, VecTokenizer(), rows_per_shard=5).directory
    ids = [
        ids_record(i, i % 5 + 1, None if i % 3 else np.array([[0, i % 5]] * (i % 4), np.int32).reshape(-1, 2))
        for i in range(23)
    ]
    e = tables.write_table(str(tmp_path / "e"), ids, IdsTokenizer(), rows_per_shard=4).directory
    for path, recs, dim in ((d, vec, 2), (e, ids, 0)):
        by_id = {r.id: r for r in recs}
        batches = list(TokenLoader(path, batch_size=6, seed=3, bucket_window=3))
        assert sorted(i for b in batches for i in b.ids) == sorted(by_id)
        spanning = 0
        for b in batches:
            tok, pos, edges = expected_batch(by_id, b.ids, dim)
            assert np.array_equal(b.tokens.numpy(), tok) and np.array_equal(b.positions.numpy(), pos)
            assert b.lengths.tolist() == [by_id[i].num_tokens for i in b.ids]
            assert b.labels.tolist() == [-1 if by_id[i].label is None else by_id[i].label for i in b.ids]
            if dim == 0:
                assert b.edges is not None and np.array_equal(b.edges.numpy(), edges)
            spanning += len({int(i[1:]) // (5 if dim else 4) for i in b.ids}) > 1
        assert spanning >= 3  # batches that mix row groups (the merged-chunk path) were exercised


# how a stream too big to stay resident is read: segments of merged row groups (short rows), one
# part per row group (big row groups), row copies (big rows); all must give the resident batches
STREAMING = {
    "segments": {"SEGMENT_MERGE_BYTES": 10**12},
    "small segments": {"SEGMENT_MERGE_BYTES": 10**12, "SEGMENT_BYTES": 1},  # a segment per new group
    "parts per group": {"SEGMENT_MERGE_BYTES": 0},  # segments refused: contiguous runs per group
    "row copies": {"SEGMENT_MERGE_BYTES": 0, "ROW_COPY_MIN": 1},
}


def _ids_table(tmp_path):
    recs = [
        ids_record(i, i % 5 + 1, None if i % 3 else np.array([[0, i % 5]] * (i % 4), np.int32).reshape(-1, 2))
        for i in range(23)
    ]
    return tables.write_table(str(tmp_path / "e"), recs, IdsTokenizer(), rows_per_shard=4).directory


@pytest.mark.parametrize("path", sorted(STREAMING))
def test_streamed_tables_give_the_resident_batches(tmp_path, monkeypatch, path, jit_path):
    from maskloom.pipelines import loader as loader_mod

    vec = make_vec(tmp_path, [(i * 7) % 9 + 1 for i in range(37)], rows_per_shard=5)
    ids = _ids_table(tmp_path)
    kw = dict(batch_size=6, seed=3, bucket_window=2, cache=False)
    for d in (vec, ids):
        resident = TokenLoader(d, **kw, rank=1, world_size=2)
        expected = {ep: list(resident) for ep in (0, 1)}
        with monkeypatch.context() as m:
            m.setattr(loader_mod, "RESIDENT_BYTES", 0)
            for name, value in STREAMING[path].items():
                m.setattr(loader_mod, name, value)
            loader = TokenLoader(d, **kw, rank=1, world_size=2)
            assert not loader.streams[0].resident
            segmented = bool(loader._reader._segments(loader.plan()))
            assert segmented == ("segments" in path)
            workers = (
                TokenLoader(d, **kw, rank=1, world_size=2, num_workers=2) if path == "segments" else None
            )
            for ep in (0, 1):
                got = list(loader)
                if workers is not None:  # each worker segments its own share of the batches
                    assert [b.ids for b in workers] == [b.ids for b in got]
                assert len(got) == len(expected[ep]) > 0
                for a, b in zip(got, expected[ep]):
                    assert a.ids == b.ids and torch.equal(a.labels, b.labels)
                    for col in ("tokens", "positions", "padding", "edges"):
                        x, y = getattr(a, col), getattr(b, col)
                        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), col


@pytest.mark.parametrize("segment_bytes", [1, 10**12])
def test_segments_read_each_row_group_once_per_epoch(tmp_path, monkeypatch, segment_bytes):
    from maskloom.pipelines import loader as loader_mod

    monkeypatch.setattr(loader_mod, "RESIDENT_BYTES", 0)
    monkeypatch.setattr(loader_mod, "SEGMENT_MERGE_BYTES", 10**12)
    monkeypatch.setattr(loader_mod, "SEGMENT_BYTES", segment_bytes)
    d = make_vec(tmp_path, [i % 6 + 1 for i in range(40)], rows_per_shard=4)  # 10 row groups
    loads = []
    real_load = loader_mod._Reader._load
    monkeypatch.setattr(
        loader_mod._Reader, "_load", lambda self, s, g: loads.append(g) or real_load(self, s, g)
    )
    loader = TokenLoader(d, batch_size=3, seed=1, bucket_window=3)
    segments = {id(seg) for seg in loader._reader._segments(loader.plan()).values()}
    assert (len(segments) > 1) == (segment_bytes == 1)  # tiny budget: a segment per new row group
    for _ in range(2):
        loads.clear()
        assert sorted(i for b in loader for i in b.ids) == sorted(f"s{i}" for i in range(40))
        assert sorted(loads) == list(range(10))  # groups shared by two segments are kept, not re-read


def test_rows_of_a_batch_are_in_table_order(tmp_path):
    d = make_vec(tmp_path, [(i * 5) % 7 + 1 for i in range(50)], rows_per_shard=8)
    for kw in ({}, {"max_tokens": 20}, {"shuffle": False}):
        batches = ids_of(TokenLoader(d, batch_size=7, seed=2, bucket_window=3, **kw))
        assert sorted(i for b in batches for i in b) == sorted(f"s{i}" for i in range(50))
        for b in batches:
            rows = [int(i[1:]) for i in b]
            assert rows == sorted(rows)


def test_gather_into_out_equals_gather():
    from maskloom.pipelines.loader import _Chunk

    off = np.array([0, 3, 4, 9, 11])
    c = _Chunk(
        tok_off=off, tok=np.arange(22, dtype=np.int32).reshape(11, 2), pos_off=off,
        pos=np.arange(11, dtype=np.float32)[:, None], edge_off=None, edges=None,
        labels=np.zeros(4, np.int64), ids=np.array(list("abcd"), object),
    )  # fmt: skip
    lens = np.diff(off)
    for rows in ([0, 2], [3, 1], [2, 3, 0]):  # row 3 ends the chunk: its window runs past the end
        st = off[rows]
        L = int(lens[rows].max())
        for dtype in (np.int32, np.int64):  # as stored, and converted (the ext copy)
            want = c.gather("tok", L, st, np.dtype(dtype))
            out = np.full((len(rows), L, 2), -7, dtype)
            assert c.gather("tok", L, st, np.dtype(dtype), out=out) is out
            real = np.arange(L) < lens[rows][:, None]  # past a row's end the values are unspecified
            assert np.array_equal(out[real], want[real])
            assert np.array_equal(out[real], np.concatenate([c.tok[off[r] : off[r + 1]] for r in rows]))


def test_meta_is_parsed_lazily_and_survives_moves_and_pickling(tmp_path):
    import pickle

    from maskloom.pipelines.loader import _MetaJSON

    d = make_vec(tmp_path, [3, 1, 2])
    (b,) = list(TokenLoader(d, batch_size=3, shuffle=False, bucket=False))
    assert isinstance(b.__dict__["_meta"], _MetaJSON)  # not parsed yet
    moved = b.to("cpu")
    assert isinstance(moved.__dict__["_meta"], _MetaJSON) and isinstance(b.__dict__["_meta"], _MetaJSON)
    back = pickle.loads(pickle.dumps(b))
    assert isinstance(back.__dict__["_meta"], _MetaJSON)
    for x in (b, moved, back):
        assert x.meta == [{"i": 0}, {"i": 1}, {"i": 2}] and x.ids == ["s0", "s1", "s2"]
    assert b.__dict__["_meta"] == [{"i": 0}, {"i": 1}, {"i": 2}]  # parsed once, then kept
    b.meta = [{"x": 1}]
    assert b.meta == [{"x": 1}]
    par = list(TokenLoader(d, batch_size=2, seed=1, num_workers=1))
    assert [m for x in par for m in x.meta] == [{"i": int(i[1:])} for x in par for i in x.ids]


@pytest.mark.parametrize("discrete", [False, True])
def test_short_row_fast_path_equals_the_general_collate(discrete, jit_path):
    """The one-chunk fast path (text ids, small graphs) gives exactly the general path's batch."""
    from maskloom.pipelines.loader import _Chunk, collate

    rng = np.random.default_rng(3)
    n = 40
    lens = rng.integers(1, 9, n)
    elens = np.where(rng.random(n) < 0.3, 0, rng.integers(1, 6, n))  # some rows without edges
    off, eoff = np.concatenate([[0], np.cumsum(lens)]), np.concatenate([[0], np.cumsum(elens)])
    spec = IdsTokenizer().spec() if discrete else VecTokenizer({"dim": 3, "dtype": "float16"}).spec()
    tok = (
        rng.integers(0, 1000, off[-1]).astype(np.int32)
        if discrete
        else rng.standard_normal((off[-1], 3)).astype(np.float16)
    )
    width = len(spec.position_axes)

    def chunk():
        return _Chunk(
            tok_off=off,
            tok=tok.copy(),
            pos_off=off,
            pos=np.arange(off[-1] * width, dtype=np.float32).reshape(-1, width),
            edge_off=eoff,
            edges=(np.arange(eoff[-1] * 2) % 7).astype(np.int32).reshape(-1, 2),
            labels=np.arange(n) % 3,
            ids=np.array([f"r{i}" for i in range(n)], object),
            meta=np.array(["{}"] * n, object),
        )

    rows = rng.permutation(n)[:17]
    fast = collate([(chunk(), rows, None)], spec, with_meta=False)
    slots = np.arange(rows.size)
    general = collate([(chunk(), rows[:9], slots[:9]), (chunk(), rows[9:], slots[9:])], spec, with_meta=False)
    # runs of a batch from several chunks (a large table's row groups): the multi-chunk fast path
    runs = collate(
        [(chunk(), rows[:9], slice(0, 9)), (chunk(), rows[9:], slice(9, 17))], spec, with_meta=False
    )
    for name in ("tokens", "positions", "padding", "labels", "edges"):
        a, b, c = getattr(fast, name), getattr(general, name), getattr(runs, name)
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c), name
    assert fast.ids == general.ids == runs.ids == [f"r{i}" for i in rows]
    assert fast.edges.shape == (17, int(elens[rows].max()), 2) and int((fast.edges == -1).sum()) > 0
    # a chunk without edges among them, with meta: its rows' edges are all padding
    bare = dataclasses.replace(chunk(), edge_off=None, edges=None, meta=np.array(['{"m": 1}'] * n, object))
    mixed = [(chunk(), rows[:9], slice(0, 9)), (bare, rows[9:], slice(9, 17))]
    by_index = [(p[0], p[1], np.arange(17)[p[2]]) for p in mixed]
    a, b = collate(mixed, spec, with_meta=True), collate(by_index, spec, with_meta=True)
    for name in ("tokens", "positions", "padding", "labels", "edges"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.edges[9:] == -1).all() and a.meta == b.meta and a.meta[9] == {"m": 1}


@pytest.mark.parametrize("discrete", [False, True])
def test_packing_straight_from_chunks_equals_packing_the_padded_batch(discrete):
    """collate(..., pack=) builds packed rows from the chunks (numba); the same batch, bit for bit,
    as collating padded and packing that (the path without numba): one chunk, runs over several
    chunks, chunks without edges among them."""
    from maskloom import _kernels
    from maskloom.pipelines.loader import _Chunk, _collate_packed_parts, _pack, collate

    if not _kernels.ENABLED:
        pytest.skip("numba is not available")
    rng = np.random.default_rng(11)
    spec = IdsTokenizer().spec() if discrete else VecTokenizer({"dim": 3, "dtype": "float16"}).spec()
    width = len(spec.position_axes)

    def chunk(n, edges=True):
        lens = rng.integers(1, 12, n)
        elens = np.where(rng.random(n) < 0.3, 0, rng.integers(1, 6, n))
        off, eoff = np.concatenate([[0], np.cumsum(lens)]), np.concatenate([[0], np.cumsum(elens)])
        pairs = np.concatenate([rng.integers(0, lens[i], (elens[i], 2)) for i in range(n)]).astype(np.int32)
        return _Chunk(
            tok_off=off,
            tok=(
                rng.integers(0, 1000, off[-1]).astype(np.int32)
                if discrete
                else rng.standard_normal((off[-1], 3)).astype(np.float16)
            ),  # fmt: skip
            pos_off=off,
            pos=rng.standard_normal((off[-1], width)).astype(np.float32),
            edge_off=eoff if edges else None,
            edges=pairs if edges else None,
            labels=np.arange(n) % 3,
            ids=np.array([f"r{i}" for i in range(n)], object),
            meta=np.array([f'{{"i": {i}}}' for i in range(n)], object),
        )

    checked = 0
    for trial in range(40):
        a, b, c = chunk(50), chunk(30), chunk(20, edges=trial % 3 != 0)
        ra, rb, rc = rng.permutation(50)[:17], rng.permutation(30)[:9], rng.permutation(20)[:5]
        layouts = [
            [(a, ra, None)],
            [(a, ra, slice(0, 17)), (b, rb, slice(17, 26)), (c, rc, slice(26, 31))],
            [(c, rc, slice(0, 5)), (a, ra, slice(5, 22))],
        ]
        for parts in layouts:
            row_tokens = int(rng.integers(4, 40))
            assert _collate_packed_parts(parts, spec, True, row_tokens) is not None  # the direct path
            got = collate(parts, spec, with_meta=True, pack=row_tokens)
            ref = _pack(collate(parts, spec, with_meta=True), row_tokens)
            for name in ("tokens", "positions", "padding", "segments", "labels", "edges"):
                x, y = getattr(got, name), getattr(ref, name)
                assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), name
            assert got.ids == ref.ids and got.meta == ref.meta and got.num_samples == ref.num_samples
            checked += 1
    assert checked == 120


def test_big_batch_buffers_are_reused_only_when_released(tmp_path, monkeypatch):
    import pickle

    from maskloom.pipelines import loader as loader_mod

    monkeypatch.setattr(loader_mod._BufferPool, "MIN_BYTES", 0)  # pool every column of this toy table
    monkeypatch.setattr(loader_mod, "ROW_COPY_MIN", 1)  # every row is copied (the big-row path)
    d = make_vec(tmp_path, [3, 1, 2, 3, 2, 1])
    loader = TokenLoader(d, batch_size=2, shuffle=False, bucket=False)
    expected = [(b.tokens.clone(), b.padding.clone()) for b in loader]
    kept = list(loader)  # every batch held: nothing can be reused, contents stay right
    assert len({b.tokens.data_ptr() for b in kept}) == len(kept)
    for b, (tok, pad) in zip(kept, expected):
        assert torch.equal(b.tokens, tok) and torch.equal(b.padding, pad)
    kept_ptrs = {b.tokens.data_ptr() for b in kept}
    del kept, b
    ptrs = []
    for b, (tok, pad) in zip(loader, expected):  # released batches: buffers come back, re-padded
        assert torch.equal(b.tokens, tok) and torch.equal(b.padding, pad)
        ptrs.append(b.tokens.data_ptr())
        del b
    assert set(ptrs) <= kept_ptrs  # every batch of this epoch reused a buffer of the last one
    assert pickle.loads(pickle.dumps(loader._reader.pool)).buffers == []


# ---------------------------------------------------------------------------------------------
# packing: several samples per row
def _same_samples(packed, plain, limit):
    """The packed batch is the plain batch packed by :func:`pack_batch`: the same ids and labels, and
    every sample's tokens, positions and (shifted) edges."""
    from maskloom.batch import pack_batch

    ref = pack_batch(plain, limit)
    assert packed.ids == plain.ids and torch.equal(packed.labels, plain.labels)
    assert torch.equal(packed.segments < 0, packed.padding)
    for col in ("tokens", "positions", "padding", "segments", "edges"):
        x, y = getattr(packed, col), getattr(ref, col)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), col


_PACK = 7


@pytest.mark.parametrize(("num_workers", "pipe_bytes"), [(0, None), (2, None), (2, 0)])
def test_packed_batches_hold_the_unpacked_batches_samples(tmp_path, monkeypatch, num_workers, pipe_bytes):
    from maskloom.pipelines import loader as loader_mod

    if pipe_bytes is not None:  # every batch from the workers as shared-memory tensors
        monkeypatch.setattr(loader_mod, "PIPE_BATCH_BYTES", pipe_bytes)
    ids = _ids_table(tmp_path)
    kw = dict(batch_size=6, seed=3, bucket_window=2)
    plain = list(TokenLoader(ids, **kw))
    packed = list(TokenLoader(ids, **kw, pack=_PACK, num_workers=num_workers))
    assert len(packed) == len(plain) == 4
    for a, b in zip(packed, plain):
        _same_samples(a, b, _PACK)
        assert a.num_samples == b.batch_size and a.sample_lengths.tolist() == b.lengths.tolist()
        assert a.batch_size <= b.batch_size and a.seq_len <= max(_PACK, b.seq_len)
    pad_plain = sum(int(b.padding.sum()) for b in plain)
    pad_packed = sum(int(b.padding.sum()) for b in packed)
    assert (pad_plain, pad_packed) == (25, 7)  # of 66 real tokens


def test_pack_by_modality_and_bad_pack_values(tmp_path):
    ids = _ids_table(tmp_path)
    vec = make_vec(tmp_path, [3, 1, 2, 4])
    batches = list(TokenLoader([ids, vec], batch_size=8, shuffle=False, pack={"loader_test_ids": 9}))
    assert {(b.modality, b.segments is not None) for b in batches} == {
        ("loader_test_ids", True),
        ("loader_test_vec", False),
    }
    with pytest.raises(ValueError, match=r"pack names modalities \['audio'\] that no table has"):
        TokenLoader(ids, pack={"audio": 8})
    for bad in (0, -3, 2.5, {"loader_test_ids": 0}):
        with pytest.raises(ValueError, match="pack must be a number of tokens >= 1"):
            TokenLoader(ids, pack=bad)


def test_packed_resume_and_collate_fn(tmp_path):
    from maskloom.pipelines.loader import _CollateMixin

    ids = _ids_table(tmp_path)
    loader = TokenLoader(ids, batch_size=5, seed=1, pack=8)
    first = list(loader)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = TokenLoader(ids, batch_size=5, seed=1, pack=8)
    rest.load_state_dict(state)
    assert [b.ids for b in rest] == [b.ids for b in first[1:]]
    # the Ray Data collate function packs the same way (called here without Ray)
    t = tables.TokenTable(ids)
    arrow = t.read()
    _same_samples(_CollateMixin(t.spec, pack=8)(arrow), _CollateMixin(t.spec)(arrow), 8)
    with pytest.raises(ValueError, match="pack must be a number of tokens >= 1"):
        collate_fn(ids, pack=0)
