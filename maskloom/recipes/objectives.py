"""Reconstruction objectives, scored on masked tokens only.

Every objective turns the model's predictions and the batch's stored tokens into a per-token error
``(B, L)`` and a scalar loss, the mean of that error over the scored (masked) tokens:

- ``mse``: mean squared error per token, optionally against a per-token normalised target
  ("norm-pix"), as in MAE (He et al., 2021, *Masked Autoencoders Are Scalable Vision Learners*),
  VideoMAE (Tong et al., 2022) and AudioMAE (Huang et al., 2022).
- ``chamfer``: Chamfer L2 distance between the predicted and the true point group of each token,
  as in Point-MAE (Pang et al., 2022, *Masked Autoencoders for Point Cloud Self-supervised Learning*).
- ``sce``: scaled cosine error ``(1 - cos(pred, target)) ** gamma``, as in GraphMAE (Hou et al.,
  2022, *GraphMAE: Self-Supervised Masked Graph Autoencoders*).
- ``cross_entropy``: cross-entropy of predicted logits on the stored ids, as in MAE-LM (Meng et
  al., 2023, *Representation Deficiency in Masked Language Modeling*) and BERT.
- ``auto``: ``mse`` for continuous tokens, ``cross_entropy`` for discrete ones (SMA, Xie et al.,
  2023, *Self-Guided Masked Autoencoders for Domain-Agnostic Self-Supervised Learning*).

Plus :func:`policy_loss`, the AdaMAE sampler term (Bandara et al., 2023, *AdaMAE: Adaptive
Masking for Efficient Spatiotemporal Learning with Masked Autoencoders*).

Objectives are registered in :data:`OBJECTIVES` (name -> class); each class has a frozen
keyword-only ``Config`` dataclass, validated by the recipe loader. Errors are computed in float32
whatever the autocast dtype of the predictions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from maskloom.geometry import chamfer_distance
from maskloom.registry import Registry
from maskloom.tokenizers.base import TableSpec, config_from_dict


class ObjectiveError(ValueError):
    """An objective that cannot be used with a table (wrong token kind, shape) or bad predictions."""


class Objective(ABC):
    """Base class: subclasses implement :meth:`error` on flat rows of scored tokens.

    ``pred`` is the head output ``(B, L, Dout)``: Dout = D for continuous tokens, the vocabulary
    size (logits) for discrete tokens. ``tokens`` are the batch's stored tokens ``(B, L, D)`` (any
    dtype; uint8 pixels stay 0..255) or ``(B, L)`` int64 ids.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any = None, *, spec: TableSpec | None = None) -> None:
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = config_from_dict(self.Config, config, where=f"objective {self.name!r}")
        self.config = config
        self.spec = spec
        if spec is not None:
            self.check_spec(spec)

    def check_spec(self, spec: TableSpec) -> None:  # noqa: B027 - optional hook
        """Raise ObjectiveError if this objective cannot score tokens of ``spec``."""

    # ---- the contract -------------------------------------------------------------------------
    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the head should predict, from stored tokens ``(..., D)`` (float32); identity by default."""
        return tokens.float()

    @abstractmethod
    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token error of flat rows: ``pred (N, Dout)``, ``tokens (N, D)`` or ``(N,)`` -> ``(N,)`` float32."""

    def per_token(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token error at every position: ``pred (B, L, Dout)``, ``tokens (B, L[, D])`` -> ``(B, L)``.

        Padding positions get a finite but meaningless value; callers select with a mask.
        """
        b, l_ = pred.shape[:2]
        flat_pred = rearrange(pred, "b l d -> (b l) d")
        flat_tok = tokens.reshape(b * l_, *tokens.shape[2:])
        return rearrange(self.error(flat_pred, flat_tok), "(b l) -> b l", b=b)

    def loss(self, pred: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Mean per-token error over scored tokens (``target_mask (B, L)`` True); 0 if none is scored.

        Only the scored rows are computed (cheap for large vocabularies and point groups).
        """
        if pred.shape[:2] != target_mask.shape or tokens.shape[:2] != target_mask.shape:
            raise ObjectiveError(
                f"objective {self.name!r}: pred {tuple(pred.shape)}, tokens {tuple(tokens.shape)} and "
                f"target_mask {tuple(target_mask.shape)} disagree on (B, L)"
            )
        if not bool(target_mask.any()):
            return pred.sum() * 0.0  # keeps the graph (DDP) and the dtype
        err = self.error(pred[target_mask], tokens[target_mask])  # (N,)
        return err.mean()

    def __call__(self, pred: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        return self.loss(pred, tokens, target_mask)

    def denormalize(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Map predictions back to the stored token space (for drawing); identity by default.

        ``pred (..., D)``, ``tokens (..., D)`` the true tokens whose statistics normalised the target.
        """
        return pred


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str):
    """Class decorator: register an Objective subclass under ``name`` (duplicates refused)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES.add(name, cls)
        cls.name = name
        return cls

    return deco


def build_objective(
    name: str, options: dict[str, Any] | None = None, *, spec: TableSpec | None = None
) -> Objective:
    """Instantiate objective ``name`` with ``options`` (a dict of its Config fields) for tables of ``spec``."""
    return OBJECTIVES.get(name)(dict(options or {}), spec=spec)


def _require_continuous(obj: Objective, spec: TableSpec) -> None:
    if spec.token_kind != "continuous":
        raise ObjectiveError(
            f"objective {obj.name!r} needs continuous tokens but modality {spec.modality!r} has "
            f"{spec.token_kind} tokens (use 'cross_entropy' or 'auto')"
        )


# ---------------------------------------------------------------------------------------------
# MSE with optional per-token target normalisation (MAE, VideoMAE, AudioMAE, PatchTST)
# ---------------------------------------------------------------------------------------------
def normalize_tokens(tokens: torch.Tensor, *, unbiased: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Per-token normalisation ``(x - mean) / sqrt(var + eps)`` over the last axis; ``(..., D)`` float32.

    MAE (``models_mae.py``) uses ``Tensor.var``'s default, the unbiased estimator, as does VideoMAE
    (which adds eps after the square root instead; the difference is negligible).
    """
    x = tokens.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=unbiased) if x.shape[-1] > 1 else torch.zeros_like(mean)
    return (x - mean) / torch.sqrt(var + eps)


@register_objective("mse")
class MSE(Objective):
    """Mean over the D features of ``(pred - target) ** 2`` per token; target optionally norm-pix."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        norm_pix: bool = True
        """Normalise each target token by its own mean and variance (MAE's norm_pix_loss)."""
        unbiased: bool = True
        """Unbiased (n-1) variance for norm_pix, as torch's default used by MAE and VideoMAE."""
        eps: float = 1e-6
        """Added to the variance before the square root."""

        def __post_init__(self) -> None:
            if not self.eps > 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")

    def check_spec(self, spec: TableSpec) -> None:
        _require_continuous(self, spec)

    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        return normalize_tokens(tokens, unbiased=c.unbiased, eps=c.eps) if c.norm_pix else tokens.float()

    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or pred.shape != tokens.shape:
            raise ObjectiveError(
                f"objective 'mse': pred {tuple(pred.shape)} must match tokens {tuple(tokens.shape)}"
            )
        return (pred.float() - self.target(tokens)).pow(2).mean(dim=-1)

    def denormalize(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not c.norm_pix:
            return pred.float()
        x = tokens.float()
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=c.unbiased) if x.shape[-1] > 1 else torch.zeros_like(mean)
        return pred.float() * torch.sqrt(var + c.eps) + mean


# ---------------------------------------------------------------------------------------------
# Chamfer L2 on point groups (Point-MAE)
# ---------------------------------------------------------------------------------------------
def chamfer_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer L2 between point sets ``a (N, G, C)`` and ``b (N, M, C)`` -> ``(N,)``.

    ``mean_i min_j |a_i - b_j|^2 + mean_j min_i |a_i - b_j|^2`` (Point-MAE's ChamferDistanceL2:
    squared distances, mean over each side, summed), through ``maskloom.geometry.chamfer_distance``
    (exact differences, so a permuted set scores exactly 0).
    """
    return chamfer_distance(a, b, reduction="none")


@register_objective("chamfer")
class Chamfer(Objective):
    """Chamfer L2 between the predicted and the true group of each token (order-free).

    A token of D = G * C values is a group of G points with C channels (xyz first), reshaped
    through the table's ``token_shape`` (G, C); without a spec, ``group_size`` gives G.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config:
        group_size: int | None = None
        """Points per token G; None = from the table's token_shape (G, C)."""
        dims: int | None = None
        """Channels compared by the distance (first ``dims`` of C, e.g. 3 = xyz); None = all C."""

        def __post_init__(self) -> None:
            if self.group_size is not None and self.group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {self.group_size}")
            if self.dims is not None and self.dims < 1:
                raise ValueError(f"dims must be >= 1, got {self.dims}")

    def check_spec(self, spec: TableSpec) -> None:
        _require_continuous(self, spec)
        g = self._group_size(spec.token_dim)
        if spec.token_dim % g:
            raise ObjectiveError(
                f"objective 'chamfer': token_dim {spec.token_dim} is not a multiple of group size {g}"
            )

    def _group_size(self, d: int) -> int:
        if self.config.group_size is not None:
            return self.config.group_size
        shape = self.spec.token_shape if self.spec is not None else None
        if shape and len(shape) == 2:
            return int(shape[0])
        raise ObjectiveError(
            "objective 'chamfer': the table has no token_shape (G, C); set objective option group_size"
        )

    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or pred.shape != tokens.shape:
            raise ObjectiveError(
                f"objective 'chamfer': pred {tuple(pred.shape)} must match tokens {tuple(tokens.shape)}"
            )
        g = self._group_size(tokens.shape[-1])
        p = rearrange(pred.float(), "n (g c) -> n g c", g=g)  # (N, G, C)
        t = rearrange(tokens.float(), "n (g c) -> n g c", g=g)
        if self.config.dims is not None:
            p, t = p[..., : self.config.dims], t[..., : self.config.dims]
        return chamfer_l2(p, t)


# ---------------------------------------------------------------------------------------------
# Scaled cosine error (GraphMAE)
# ---------------------------------------------------------------------------------------------
@register_objective("sce")
class ScaledCosine(Objective):
    """``(1 - cos(pred, target)) ** gamma`` per token; gamma >= 1 down-weights easy tokens."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        gamma: float = 2.0
        """Scaling exponent (GraphMAE: 2 by default, 3 on Cora)."""

        def __post_init__(self) -> None:
            if not self.gamma >= 1:
                raise ValueError(f"gamma must be >= 1, got {self.gamma}")

    def check_spec(self, spec: TableSpec) -> None:
        _require_continuous(self, spec)

    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or pred.shape != tokens.shape:
            raise ObjectiveError(
                f"objective 'sce': pred {tuple(pred.shape)} must match tokens {tuple(tokens.shape)}"
            )
        cos = (F.normalize(pred.float(), dim=-1) * F.normalize(tokens.float(), dim=-1)).sum(dim=-1)
        return (1.0 - cos).clamp_min(0.0).pow(self.config.gamma)


# ---------------------------------------------------------------------------------------------
# Cross-entropy on ids (MAE-LM)
# ---------------------------------------------------------------------------------------------
@register_objective("cross_entropy")
class CrossEntropy(Objective):
    """``-log softmax(pred)[id]`` per token; ``pred`` are logits over the vocabulary."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        label_smoothing: float = 0.0
        """Label smoothing in [0, 1) (0 = plain cross-entropy, as MAE-LM)."""

        def __post_init__(self) -> None:
            if not 0 <= self.label_smoothing < 1:
                raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def check_spec(self, spec: TableSpec) -> None:
        if spec.token_kind != "discrete":
            raise ObjectiveError(
                f"objective 'cross_entropy' needs discrete tokens but modality {spec.modality!r} has "
                "continuous tokens (use 'mse', 'chamfer', 'sce' or 'auto')"
            )

    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.long()

    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 1 or pred.dim() != 2 or pred.shape[0] != tokens.shape[0]:
            raise ObjectiveError(
                f"objective 'cross_entropy': pred {tuple(pred.shape)} must be (N, vocab) logits for ids {tuple(tokens.shape)}"
            )
        return F.cross_entropy(
            pred.float(), tokens.long(), reduction="none", label_smoothing=self.config.label_smoothing
        )

    def denormalize(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted ids ``(...)`` from logits ``(..., V)``."""
        return pred.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# auto: MSE for vectors, cross-entropy for ids (SMA: one recipe on any table)
# ---------------------------------------------------------------------------------------------
@register_objective("auto")
class Auto(Objective):
    """``mse`` for continuous tokens, ``cross_entropy`` for discrete tokens (decided per batch)."""

    @dataclass(frozen=True, kw_only=True)
    class Config:
        norm_pix: bool = False
        """Per-token target normalisation for continuous tokens (SMA reconstructs raw values)."""

    def __init__(self, config: Any = None, *, spec: TableSpec | None = None) -> None:
        super().__init__(config, spec=spec)
        self._mse = MSE({"norm_pix": self.config.norm_pix})
        self._ce = CrossEntropy()

    def _pick(self, tokens: torch.Tensor) -> Objective:
        return self._mse if torch.is_floating_point(tokens) or tokens.dtype == torch.uint8 else self._ce

    def target(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._pick(tokens).target(tokens)

    def error(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._pick(tokens).error(pred, tokens)

    def denormalize(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._pick(tokens).denormalize(pred, tokens)


# ---------------------------------------------------------------------------------------------
# AdaMAE policy term
# ---------------------------------------------------------------------------------------------
def policy_loss(log_prob: torch.Tensor, error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AdaMAE sampler loss ``-mean(log_prob[mask] * error[mask].detach())``.

    ``log_prob (B, L)`` log-probability of each token under the sampler, ``error (B, L)`` the
    per-token reconstruction error (detached here: the sampler is pushed towards masking tokens
    that are hard to reconstruct), ``mask (B, L)`` bool, True = masked. Returns a scalar; 0 if no
    token is masked. The caller multiplies it by a small weight (AdaMAE: 1e-4).
    """
    if not bool(mask.any()):
        return log_prob.sum() * 0.0
    return -(log_prob[mask].float() * error[mask].detach().float()).mean()


def finite_or_raise(loss: torch.Tensor, *, where: str) -> None:
    """Raise a clear error when a loss is NaN/inf (diverged training or bad inputs)."""
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"{where}: the loss is {float(loss)} (diverged; lower the learning rate)")
