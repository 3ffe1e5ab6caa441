"""The masked model end to end: shapes, invisibility of masked tokens, padding invariance,
gradients, determinism, save/load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from backbone_testkit import LAYOUTS, gen, make_batch, make_model

from maskloom.backbone import (
    MASKING_KINDS,
    PRESETS,
    AdapterConfig,
    DecoderConfig,
    MaskedModel,
    MaskingConfig,
    ModelConfig,
    num_masked,
    preset,
)
from maskloom.tokenizers.base import TableSpec

LENGTHS = (20, 13, 6)


def masking(kind: str, ratio: float = 0.75) -> MaskingConfig:
    return MaskingConfig(kind=kind, ratio=ratio, num_queries=8, sampler_dim=16, block_size=(2,))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_shapes_every_kind_and_layout(kind, layout):
    if kind == "tube" and LAYOUTS[layout][1] == 1:
        pytest.skip("tube masking needs two position axes (tested in test_tube_mask_needs_two_axes)")
    model = make_model(layout, masking(kind))
    batch = make_batch(layout, LENGTHS)
    out = model(batch, generator=gen(0))
    b, n = batch.padding.shape
    assert out.pred.shape == (b, n, 6)
    assert out.mask.shape == out.target_mask.shape == (b, n)
    assert not (out.mask & batch.padding).any()
    assert torch.equal(out.target_mask, out.mask)
    if kind != "tube":  # tube counts whole tubes
        assert out.mask.sum(1).tolist() == num_masked(batch.lengths, 0.75).tolist()
    assert ((~out.mask & ~batch.padding).sum(1) >= 1).all()
    assert torch.isfinite(out.pred).all()
    assert (out.log_prob is not None) == (kind == "adaptive")
    v = int((~out.mask & ~batch.padding).sum(1).max())
    assert out.aux["encoded"].shape == (b, v, 32)
    f = model.features(batch)
    assert f.pooled.shape == (b, 32) and f.tokens.shape == (b, n, 32) and torch.isfinite(f.pooled).all()


@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_discrete_tokens_and_cross_decoder(kind):
    model = make_model("grid2d", masking(kind, 0.5), decoder="cross", fraction=0.5, discrete=True, vocab=11)
    batch = make_batch("grid2d", (20, 13, 6), discrete=True, vocab=11)
    out = model(batch, generator=gen(0))
    assert out.pred.shape == (3, 20, 11)
    k = out.mask.sum(1)
    if kind != "tube":
        assert k.tolist() == num_masked(batch.lengths, 0.5).tolist()
    assert out.target_mask.sum(1).tolist() == torch.round(k * 0.5).long().clamp(min=1).tolist()
    assert not (out.target_mask & ~out.mask).any()
    assert (out.pred[~out.target_mask] == 0).all()  # only targets are predicted


@pytest.mark.parametrize("decoder", ["mae", "cross"])
@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_masked_tokens_invisible_to_encoder(kind, decoder):
    model = make_model("grid2d", masking(kind), decoder=decoder).eval()
    batch = make_batch("grid2d", LENGTHS)
    mask = model(batch, generator=gen(0)).mask
    changed = dataclasses.replace(batch, tokens=batch.tokens + 5.0 * mask[..., None])
    a = model(batch, generator=gen(1), mask=mask)
    c = model(changed, generator=gen(1), mask=mask)
    assert torch.equal(a.mask, c.mask)
    real = ~a.aux["visible_padding"]
    assert torch.allclose(a.aux["encoded"][real], c.aux["encoded"][real], atol=1e-6)
    # no decoder reads the masked tokens' content either: predictions are unchanged
    assert torch.allclose(a.pred[~batch.padding], c.pred[~batch.padding], atol=1e-5)


def test_random_masking_invisible_without_given_mask():
    model = make_model("grid2d", masking("random")).eval()
    batch = make_batch("grid2d", LENGTHS)
    a = model(batch, generator=gen(4))
    changed = dataclasses.replace(batch, tokens=torch.where(a.mask[..., None], -batch.tokens, batch.tokens))
    c = model(changed, generator=gen(4))
    assert torch.equal(a.mask, c.mask)
    real = ~a.aux["visible_padding"]  # padded slots hold garbage
    assert torch.allclose(a.aux["encoded"][real], c.aux["encoded"][real], atol=1e-6)
    # and the visible tokens do matter
    changed_vis = dataclasses.replace(
        batch, tokens=torch.where(a.mask[..., None], batch.tokens, -batch.tokens)
    )
    d = model(changed_vis, generator=gen(4)).aux["encoded"][real]
    assert not torch.allclose(a.aux["encoded"][real], d, atol=1e-3)


@pytest.mark.parametrize("kind", MASKING_KINDS)
@pytest.mark.parametrize("decoder", ["mae", "cross"])
def test_padding_invariance(kind, decoder):
    model = make_model("grid2d", masking(kind), decoder=decoder).eval()
    batch = make_batch("grid2d", (20, 9, 14))
    alone = dataclasses.replace(
        batch,
        tokens=batch.tokens[1:2, :9],
        positions=batch.positions[1:2, :9],
        padding=batch.padding[1:2, :9],
    )
    f_batch, f_alone = model.features(batch), model.features(alone)
    assert torch.allclose(f_batch.pooled[1], f_alone.pooled[0], atol=1e-5)
    assert torch.allclose(f_batch.tokens[1, :9], f_alone.tokens[0], atol=1e-5)
    mask = model(batch, generator=gen(0)).mask
    out_b = model(batch, generator=gen(0), mask=mask)
    out_a = model(alone, generator=gen(0), mask=mask[1:2, :9])
    t = out_a.target_mask[0]
    if decoder == "mae":
        assert torch.allclose(out_b.pred[1, :9], out_a.pred[0], atol=1e-5)
    else:
        assert torch.equal(out_b.target_mask[1, :9], t)
        assert torch.allclose(out_b.pred[1, :9][t], out_a.pred[0][t], atol=1e-5)


def objective(model: MaskedModel, out, batch) -> torch.Tensor:
    err = ((out.pred - batch.tokens) ** 2).mean(-1)  # (B, L)
    loss = err[out.target_mask].mean()
    if out.log_prob is not None:
        loss = loss - 1e-2 * (out.log_prob[out.mask] * err.detach()[out.mask]).mean()
    return loss


@pytest.mark.parametrize("decoder", ["mae", "cross"])
@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_gradients_reach_every_parameter(kind, decoder):
    model = make_model("spectral", masking(kind, 0.5), decoder=decoder, edge_bias=True)
    batch = make_batch("spectral", LENGTHS)
    batch.edges = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 4], [-1, -1]]] * 3)
    out = model.train()(batch, generator=gen(0), progress=0.9)
    objective(model, out, batch).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_adaptive_sampler_gradient_only_through_policy_term():
    model = make_model("grid2d", masking("adaptive"))
    batch = make_batch("grid2d", LENGTHS)
    out = model(batch, generator=gen(0))
    err = ((out.pred - batch.tokens) ** 2).mean(-1)
    sampler = {n for n, _ in model.named_parameters() if n.startswith("maskers.")}
    assert sampler
    # main loss: no gradient into the sampler
    err[out.target_mask].mean().backward(retain_graph=True)
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not (got & sampler) and got
    model.zero_grad(set_to_none=True)
    # policy term: gradient into the sampler only
    (-(out.log_prob[out.mask] * err.detach()[out.mask]).mean()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == sampler


def test_learned_mask_depends_on_tokens_and_curriculum():
    model = make_model("grid1d", masking("learned"))
    batch = make_batch("grid1d", (24, 24))
    late = model(batch, generator=gen(0), progress=1.0)
    assert "mask_score" in late.aux
    score = late.aux["mask_score"].masked_fill(batch.padding, -1)
    k = num_masked(batch.lengths, 0.75)
    top = score.argsort(1, descending=True)
    for i in range(2):  # fully learned: the mask is the top-k of the attention score
        assert set(top[i, : int(k[i])].tolist()) == set(late.mask[i].nonzero().flatten().tolist())


@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_seed_determinism(kind):
    model = make_model("grid3d", masking(kind), drop_path=0.2).train()
    batch = make_batch("grid3d", (27, 19))
    a, b = model(batch, generator=gen(7)), model(batch, generator=gen(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred)
    c = model(batch, generator=gen(8))
    assert not torch.equal(a.pred, c.pred)


def test_spectral_sign_flip_only_in_training():
    model = make_model("spectral", masking("random"))
    batch = make_batch("spectral", (10,))
    model.eval()
    assert torch.equal(model.features(batch).tokens, model.features(batch).tokens)
    model.train()
    outs = [model(batch, generator=gen(s), mask=torch.zeros(1, 10, dtype=torch.bool)).pred for s in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_edges_change_attention():
    model = make_model("grid1d", masking("random"), edge_bias=True).eval()
    with torch.no_grad():
        model.edge_bias.fill_(3.0)
    batch = make_batch("grid1d", (8, 8))
    plain = model.features(batch).tokens
    batch.edges = torch.tensor([[[0, 5], [-1, -1]], [[-1, -1], [-1, -1]]])
    graph = model.features(batch).tokens
    assert not torch.allclose(plain[0], graph[0]) and torch.allclose(plain[1], graph[1], atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = make_model("continuous", masking("learned"), decoder="cross", fraction=0.5).eval()
    batch = make_batch("continuous", LENGTHS)
    model.save(str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = MaskedModel.load(str(tmp_path / "m")).eval()
    assert loaded.config == model.config
    a, b = model(batch, generator=gen(2)), loaded(batch, generator=gen(2))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        MaskedModel.load(str(tmp_path))
    make_model().save(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: corrupt"):
        MaskedModel.load(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "maskloom.backbone", "config": {"encoder": {}}})
    )
    with pytest.raises(ValueError, match="config.json: invalid"):
        MaskedModel.load(str(tmp_path))


def test_config_json_round_trip_and_from_spec():
    spec = TableSpec(
        modality="text", token_kind="discrete", token_dim=1, token_dtype="int32",
        position_axes=("index",), position_kind="grid", vocab_size=100,
    )  # fmt: skip
    adapter = AdapterConfig.from_spec(spec, input_norm=False)
    assert (adapter.out_dim, adapter.position_dim, adapter.input_norm) == (100, 1, False)
    cfg = ModelConfig(
        encoder=preset("tiny"),
        decoder=DecoderConfig(kind="cross", dim=64, depth=2, heads=4, reconstruct_fraction=0.25),
        adapters=(("text", adapter),),
        masking=(("text", MaskingConfig(kind="block", ratio=0.15, block_size=(3,))),),
    )
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_json({**cfg.to_json(), "encoder": {"dim": 8, "depth": 1, "heads": 1, "bogus": 1}})


def test_presets_and_config_errors():
    assert {k: (v.dim, v.depth, v.heads) for k, v in PRESETS.items()} == {
        "tiny": (128, 4, 4), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown backbone preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="kind must be one of"):
        MaskingConfig(kind="zebra")
    with pytest.raises(ValueError, match="needs kind='cross'"):
        DecoderConfig(reconstruct_fraction=0.5)


def test_bad_batches_give_clear_errors():
    model = make_model("grid2d")
    batch = make_batch("grid2d", (4, 3))
    with pytest.raises(ValueError, match="no adapter for modality 'audio'"):
        model(dataclasses.replace(batch, modality="audio"))
    with pytest.raises(ValueError, match="position axes"):
        model(dataclasses.replace(batch, positions=batch.positions[..., :1]))
    with pytest.raises(ValueError, match="tokens"):
        model(dataclasses.replace(batch, tokens=batch.tokens[..., :2]))
