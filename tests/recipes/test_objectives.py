"""Objectives against hand-computed values; masked-only scoring; the AdaMAE policy term."""

import math

import pytest
import torch

from maskloom.recipes import objectives as O
from maskloom.tokenizers.base import TableSpec


def spec(kind="continuous", dim=6, shape=None, vocab=None):
    return TableSpec(
        modality="x",
        token_kind=kind,
        token_dim=dim if kind == "continuous" else 1,
        token_dtype="float32" if kind == "continuous" else "int32",
        position_axes=("i",),
        position_kind="grid",
        vocab_size=vocab,
        token_shape=shape,
    )


def test_registry_has_every_objective():
    assert O.OBJECTIVES.names() == ["auto", "chamfer", "cross_entropy", "mse", "sce"]
    with pytest.raises(KeyError, match="unknown objective 'l1'; known: auto, chamfer"):
        O.build_objective("l1")


def test_norm_pix_exact_on_tiny_tensor():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, unbiased var = (4+1+0+9)/3 = 14/3
    got = O.normalize_tokens(x)
    want = (x - 3.0) / math.sqrt(14 / 3 + 1e-6)
    assert torch.allclose(got, want, atol=1e-7)
    biased = O.normalize_tokens(x, unbiased=False)  # var = 14/4
    assert torch.allclose(biased, (x - 3.0) / math.sqrt(3.5 + 1e-6), atol=1e-7)


def test_mse_norm_pix_masked_only():
    tokens = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]]])  # (B=1, L=2, D=4)
    pred = torch.zeros(1, 2, 4)
    mse = O.build_objective("mse")
    tgt = (tokens[0, 0] - 3) / math.sqrt(14 / 3 + 1e-6)
    per = mse.per_token(pred, tokens)
    assert per.shape == (1, 2)
    assert per[0, 0].item() == pytest.approx(float(tgt.pow(2).mean()), rel=1e-6)
    assert per[0, 1].item() == 0.0  # constant token normalises to 0
    only_second = torch.tensor([[False, True]])
    assert mse(pred, tokens, only_second).item() == 0.0
    # unnormalised MSE: ((1+4+9+36)/4) for token 0
    raw = O.build_objective("mse", {"norm_pix": False})
    assert raw(pred, tokens, torch.tensor([[True, False]])).item() == pytest.approx(12.5)
    # uint8 pixels are scored as floats
    assert raw(pred, tokens.to(torch.uint8), torch.tensor([[True, False]])).item() == pytest.approx(12.5)


def test_mse_denormalize_inverts_target():
    tokens = torch.rand(3, 5, 8) * 255
    mse = O.build_objective("mse")
    back = mse.denormalize(mse.target(tokens), tokens)
    assert torch.allclose(back, tokens, atol=1e-3)


def test_chamfer_permuted_set_is_zero_and_hand_value():
    g = torch.randn(2, 3, 4, 3)  # (B, L, G=4 points, 3)
    perm = g[:, :, torch.tensor([2, 0, 3, 1])]
    ch = O.build_objective("chamfer", spec=spec(dim=12, shape=(4, 3)))
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert ch(perm.reshape(2, 3, 12), g.reshape(2, 3, 12), mask).item() == 0.0
    # one point set {0}, {1}: squared distance x^2 both ways -> 1 + 1 = 2; with 2 vs 1 points:
    a = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]])  # pred group
    b = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]]])  # true group
    ch2 = O.build_objective("chamfer", {"group_size": 2})
    # a->b: mean(1, 1) = 1; b->a: mean(1, 1) = 1; total 2
    assert ch2.error(a.reshape(1, 6), b.reshape(1, 6)).item() == pytest.approx(2.0)


def test_chamfer_needs_group_shape():
    with pytest.raises(O.ObjectiveError, match="no token_shape"):
        O.build_objective("chamfer", spec=spec(dim=12))
    with pytest.raises(O.ObjectiveError, match="needs continuous tokens"):
        O.build_objective("chamfer", spec=spec(kind="discrete", vocab=5))


def test_sce_gamma_behaviour():
    t = torch.tensor([[1.0, 0.0]])
    p_orth = torch.tensor([[0.0, 3.0]])  # cos 0 -> error 1 for any gamma
    p_close = torch.tensor([[math.cos(0.5), math.sin(0.5)]])  # 1 - cos = 1 - 0.8776 = 0.1224
    d = 1 - math.cos(0.5)
    for gamma in (1.0, 2.0, 3.0):
        sce = O.build_objective("sce", {"gamma": gamma})
        assert sce.error(p_orth, t).item() == pytest.approx(1.0)
        assert sce.error(p_close, t).item() == pytest.approx(d**gamma, rel=1e-5)
    # scale invariance and opposite vectors: (1 - (-1))^2 = 4
    sce = O.build_objective("sce")
    assert sce.error(-5 * t, t).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        O.build_objective("sce", {"gamma": 0.5})


def test_cross_entropy_exact():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # (1, 2, V=2)
    ids = torch.tensor([[1, 0]])
    ce = O.build_objective("cross_entropy", spec=spec(kind="discrete", vocab=2))
    # p(1) = 3/4 -> -log(0.75); second: log 2
    per = ce.per_token(logits, ids)
    assert per[0, 0].item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert per[0, 1].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert ce(logits, ids, torch.tensor([[True, True]])).item() == pytest.approx(
        (-math.log(0.75) + math.log(2)) / 2
    )
    with pytest.raises(O.ObjectiveError, match="needs discrete tokens"):
        O.build_objective("cross_entropy", spec=spec())


def test_auto_dispatches_on_token_kind():
    auto = O.build_objective("auto")
    assert auto.error(torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(5.0)
    assert auto.error(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))


def test_no_scored_token_gives_zero_with_grad():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = O.build_objective("mse")(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() == 0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(O.ObjectiveError, match="disagree on"):
        O.build_objective("mse")(
            torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="unknown key"):
        O.build_objective("mse", {"norm_pixel": True})


def test_policy_loss_value_and_gradient():
    log_prob = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).requires_grad_()
    err = torch.tensor([[2.0, 4.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    loss = O.policy_loss(log_prob, err, mask)
    want = -(math.log(0.5) * 2 + math.log(0.25) * 8) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert err.grad is None or err.grad.abs().sum() == 0  # the error is detached
    assert log_prob.grad.tolist() == [[-1.0, 0.0, -4.0]]


def test_uint8_and_float16_tokens_train_exactly_like_their_float32_values():
    """The loader hands tokens over in their stored dtype; the model and objective cast them, so a
    step sees the same numbers as with float32 tokens: the same loss and the same gradients."""
    import dataclasses

    from maskloom.backbone import (
        AdapterConfig,
        DecoderConfig,
        MaskedModel,
        MaskingConfig,
        ModelConfig,
        preset,
    )
    from maskloom.batch import TokenBatch

    torch.manual_seed(0)
    pos = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
    cfg = ModelConfig(
        encoder=preset("tiny"),
        decoder=DecoderConfig(dim=32, depth=1, heads=2),
        adapters=(
            (
                "image",
                AdapterConfig(token_kind="continuous", token_dim=12, position_dim=2, position_kind="grid"),
            ),
        ),
        masking=(("image", MaskingConfig(kind="random", ratio=0.75)),),
    )
    model = MaskedModel(cfg).train()
    stored = {
        "uint8": torch.randint(0, 256, (2, 16, 12), dtype=torch.uint8),
        "float16": (torch.randn(2, 16, 12) * 3).half(),
    }
    for name, tok in stored.items():
        base = TokenBatch(
            tokens=tok,
            positions=pos.expand(2, -1, -1).float(),
            padding=torch.zeros(2, 16, dtype=torch.bool),
            modality="image",
        )
        results = []
        for b in (base, dataclasses.replace(base, tokens=tok.float())):
            out = model(b, generator=torch.Generator().manual_seed(0), progress=1.0)
            loss = O.MSE({"norm_pix": True}).loss(out.pred, b.tokens, out.target_mask)
            model.zero_grad()
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert results[0][0] == results[1][0], name
        assert all(torch.equal(a, c) for a, c in zip(results[0][1], results[1][1])), name
