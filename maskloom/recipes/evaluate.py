"""Evaluation of a pretrained run: frozen-feature probes and a forecasting head.

Classification (every labelled table): the frozen encoder's pooled features (``model.features(batch)
.pooled``: mean over real tokens of the final encoder output, no masking) of every sample are split
into train/test and scored by

* a **linear probe**: logistic regression on standardised features (the protocol of MAE's linear
  probing, He et al., 2022, with scikit-learn's L-BFGS instead of LARS-SGD);
* a **kNN classifier**: cosine similarity to the training features (centred on their mean), majority
  vote of the ``k`` nearest (k = 20, or all training samples when fewer), as in the kNN monitor of
  Wu et al., 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination") and
  DINO (Caron et al., 2021); ties go to the class with the larger summed similarity.

Each probe runs on three feature sets, printed side by side:

* ``pretrained``: the run's encoder;
* ``random_init``: a freshly initialised model of the same config, built after
  ``torch.manual_seed(train.seed)`` exactly as training builds it (i.e. the run's own starting point);
* ``raw_tokens``: the tokens themselves, mean-pooled over the real tokens of a sample (continuous
  tokens: the mean token vector, as stored, e.g. uint8 pixels; discrete tokens: the normalised
  bag-of-ids histogram, i.e. the mean of the one-hot vectors, of width ``vocab_size``).

Split rule (:func:`split_indices`): when every sample's source path, after the path prefix common to
all sources is removed, names ``train`` or ``test`` as a separate word (CIFAR ``train/``/``test/``
folders, UCR ``GunPoint_TRAIN.tsv``/``_TEST.tsv``) and both occur, that split is used; otherwise
stratified k-fold cross-validation (``EvalConfig.folds``, default 5, :func:`fold_indices`): inside
each class, samples ordered by ``sha256(f"{seed}:{relative id}")`` are dealt to the folds in turn,
and the accuracy counts every sample once, as a test sample of its fold. With ``folds=1``, a single
deterministic stratified split: the first ``round(0.7 * n)`` of each class (at least one, leaving at
least one) go to train. Records cut from one sample (the windows of a recording or of a series, the
clips of a video, the chunks of a document: :func:`group_keys`) count as one sample in both, so none
is trained on and tested at once; a table of one record per sample splits as it did before.

Forecasting (unlabelled time-series tables, ETT-style; Nie et al., 2023, PatchTST): the table must
have been made by the ``time_series`` tokenizer from table files (CSV/TSV/Parquet) with a ``window``
(and ``stride``), and those source files must still be readable at their recorded paths: the values
of the ``horizon`` steps after each window are read from the raw series (``TimeSeriesTokenizer.future``)
and normalised with the window's RevIN statistics (``TimeSeriesTokenizer.normalize``). A ridge
regression (standardised inputs, penalty by leave-one-out error) maps the flattened per-token frozen features
``(L * dim)`` of a window to its ``(horizon * C)`` normalised future; windows whose future is shorter
than ``horizon`` are dropped. Split: chronological per series: the last 20% of window starts are the
test windows; training windows are those whose future ends before the first test window starts (no
overlap), falling back to all earlier windows when that leaves none. Reported: MSE and MAE in RevIN
space (``mse``, ``mae``) and in the dataset-standardised space of the ETT benchmarks (``mse_std``,
``mae_std``: errors of the de-normalised forecast divided by each channel's standard deviation over
the training part of its series; PatchTST reports ETTh1 horizon-96 MSE 0.370 in that space, with
lookback 336 and windows every step), for the pretrained features, random-init features, ridge on the
raw normalised window (``raw_linear``) and repeating the window's last value (``last_value``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tomllib
import torch
from einops import rearrange

from maskloom.backbone import MaskedModel
from maskloom.batch import TokenBatch
from maskloom.tables import TableError, TokenTable
from maskloom.tokenizers.base import Record, TokenizeError

log = logging.getLogger(__name__)

FEATURE_SETS = ("pretrained", "random_init", "raw_tokens")
"""Rows of a classification result, in print order."""
FORECASTERS = ("pretrained", "random_init", "raw_linear", "last_value")
"""Rows of a forecasting result, in print order."""


class EvalError(ValueError):
    """A user mistake in an evaluation request (run directory, tables); the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Options of :func:`evaluate_run`."""

    device: str = "cpu"
    """torch device of the forward passes."""
    batch_size: int = 64
    """Samples per forward pass."""
    seed: int = 0
    """Seed of the hash split (and of the random-init model when the run has no recipe file)."""
    k: int = 20
    """Neighbours of the kNN classifier (fewer when the training set is smaller)."""
    train_fraction: float = 0.7
    """Share of each class in the training part of a hash split."""
    horizon: int = 96
    """Forecasting horizon in steps (ETT: 96, 192, 336, 720)."""
    test_fraction: float = 0.2
    """Share of each series' windows (the latest) in the forecasting test split."""
    folds: int = 5
    """Without a train/test split in the sources: stratified k-fold cross-validation with this many
    folds (every sample is tested once, so small demo tables give steadier figures than one hold-out
    split); 1 = a single hash split of ``train_fraction``."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.k < 1 or self.horizon < 1 or self.folds < 1:
            raise EvalError("batch_size, k, horizon and folds must be >= 1")
        if not 0 < self.train_fraction < 1 or not 0 < self.test_fraction < 1:
            raise EvalError("train_fraction and test_fraction must lie in (0, 1)")


# ---------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------
def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, max_iter: int = 1000
) -> float:
    """Test accuracy of logistic regression on standardised features.

    ``train_x (N, F)``, ``train_y (N,)`` int labels, ``test_x (M, F)``, ``test_y (M,)``. The scaler is
    fitted on the training features only. A training set of one class predicts that class.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = _as_features(train_x), _as_features(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(test_y) == 0:
        return float("nan")
    classes = np.unique(train_y)
    if classes.size < 2:
        return float(np.mean(test_y == classes[0])) if classes.size else float("nan")
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float(np.mean(clf.predict(scaler.transform(test_x)) == test_y))


def knn_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, k: int = 20
) -> float:
    """Test accuracy of a cosine kNN classifier (majority vote of the ``min(k, N)`` nearest).

    Features are centred on the training mean, then L2-normalised; ties between classes go to the
    larger summed similarity. ``train_x (N, F)``, ``test_x (M, F)``, labels int.
    """
    train_x, test_x = _as_features(train_x), _as_features(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(test_y) == 0 or len(train_y) == 0:
        return float("nan")
    classes, ytr = np.unique(train_y, return_inverse=True)
    mu = train_x.mean(axis=0, keepdims=True)
    a = torch.nn.functional.normalize(torch.from_numpy(train_x - mu), dim=1)  # (N, F)
    b = torch.nn.functional.normalize(torch.from_numpy(test_x - mu), dim=1)  # (M, F)
    kk = min(k, a.shape[0])
    ytr_t = torch.from_numpy(ytr)
    preds = []
    for start in range(0, b.shape[0], 1024):  # bounded memory: (chunk, N) similarities
        sim = b[start : start + 1024] @ a.T  # (m, N)
        top_sim, top_idx = sim.topk(kk, dim=1)  # (m, k)
        votes = torch.zeros(sim.shape[0], classes.size, dtype=torch.float64)
        weight = 1.0 + 1e-6 * top_sim.double()  # a vote each; similarity only breaks ties
        votes.scatter_add_(1, ytr_t[top_idx], weight)
        preds.append(votes.argmax(dim=1))
    pred = classes[torch.cat(preds).numpy()]
    return float(np.mean(pred == test_y))


def _as_features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a (N, F) array, got shape {x.shape}")
    return x


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
_ROLE = re.compile(r"(?:^|[/\\_.\-\s])(train|test)(?=[/\\_.\-\s]|$)", re.IGNORECASE)


def split_role(relative_source: str) -> str | None:
    """``train``/``test`` when a path names one as a separate word (last occurrence wins), else None."""
    found = _ROLE.findall(relative_source)
    return found[-1].lower() if found else None


def _relative_sources(sources: Sequence[str]) -> list[str]:
    """Sources with the path prefix common to all of them removed (so a tmp dir named test_x is ignored)."""
    uniq = sorted(set(sources))
    if len(uniq) < 2:
        return ["" for _ in sources]
    try:
        common = os.path.commonpath(uniq)
    except ValueError:  # mixed absolute and relative paths
        return list(sources)
    return [os.path.relpath(s, common) if common else s for s in sources]


def split_indices(
    sources: Sequence[str],
    ids: Sequence[str],
    labels: np.ndarray,
    *,
    seed: int = 0,
    train_fraction: float = 0.7,
    groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train indices, test indices, rule) of labelled samples; rule is ``source`` or ``hash``.

    See the module docstring for the rule. Deterministic: depends on the sources, ids, labels and seed
    only (not on the order of the samples). ``groups`` (:func:`group_keys`): records with one key
    are one sample, split together (default: each id its own).
    """
    labels = np.asarray(labels)
    roles = [split_role(s) for s in _relative_sources(list(sources))]
    if all(r is not None for r in roles) and {"train", "test"} <= set(roles):
        r = np.array(roles)
        return np.flatnonzero(r == "train"), np.flatnonzero(r == "test"), "source"
    keys = list(ids) if groups is None else list(groups)
    train: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ranked = _ranked_groups(keys, members, seed)  # (rank of each member's group, number of groups)
        n_groups = int(ranked.max()) + 1  # members: a class present among the labels, never empty
        n_train = int(round(train_fraction * n_groups))
        if n_groups >= 2:
            n_train = min(max(n_train, 1), n_groups - 1)
        train.append(members[ranked < n_train])
    tr = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    te = np.setdiff1d(np.arange(labels.size), tr)
    return tr, te, "hash"


def _ranked_groups(keys: Sequence[str], members: np.ndarray, seed: int) -> np.ndarray:
    """For each of ``members`` (indices into ``keys``), the rank of its key among the distinct keys
    of ``members`` ordered by ``sha256(f"{seed}:{key}")`` (ties by key): samples sharing a key (the
    windows of one recording) share a rank, so they land on the same side of a split."""
    uniq = sorted({keys[m] for m in members})
    h = [int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") for k in uniq]
    rank = {k: r for r, (_, k) in enumerate(sorted(zip(h, uniq)))}
    return np.array([rank[keys[m]] for m in members], dtype=np.int64)


def group_keys(ids: Sequence[str], metas: Sequence[dict[str, Any]]) -> list[str]:
    """The sample each record belongs to, for splits: records cut from one recording (audio
    ``max_windows``: meta ``window`` and ``offset``), one video (``max_clips``: ``clip``), one
    document (text: ``doc`` and ``chunk``) or one series (time series windows: ``series``) of a
    source are one sample, keyed by the first of their ids; any other record is its own sample,
    keyed by its id (so a table of such records splits as it did without groups). A plug-in
    tokenizer that cuts one input into several samples of one thing gets the same by setting one of
    these meta keys."""
    raw = []
    for i, m in zip(ids, metas):
        head = i.rsplit("#", 1)[0]
        if ("window" in m and "offset" in m) or "clip" in m:
            raw.append((head,))
        elif "chunk" in m and "doc" in m:
            raw.append((head, "doc", m["doc"]))
        elif "series" in m:
            raw.append((head, "series", m["series"]))
        else:
            raw.append((i,))
    first: dict[tuple[Any, ...], str] = {}
    for i, g in zip(ids, raw):
        if g not in first or i < first[g]:
            first[g] = i
    return [first[g] for g in raw]


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def fold_indices(
    sources: Sequence[str],
    ids: Sequence[str],
    labels: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold (train, test) index pairs of labelled samples, deterministic by a hash of each
    sample's id relative to the common source prefix (so moving the data does not change the folds).
    Within a class, samples ordered by hash are dealt to folds in turn; every sample is tested once.
    ``groups`` (:func:`group_keys`): records with one key are one sample, dealt to one fold (the
    windows of a recording are never both trained on and tested)."""
    labels = np.asarray(labels)
    keys = [
        r + i[len(s) :] if i.startswith(s) else i
        for r, s, i in zip(_relative_sources(list(sources)), sources, ids if groups is None else groups)
    ]
    fold_of = np.zeros(labels.size, np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        fold_of[members] = _ranked_groups(keys, members, seed) % folds
    out = []
    for f in range(folds):
        te = np.flatnonzero(fold_of == f)
        tr = np.flatnonzero(fold_of != f)
        if te.size and tr.size:
            out.append((tr, te))
    return out


def raw_token_features(batch: TokenBatch, vocab_size: int | None = None) -> torch.Tensor:
    """(B, F) mean over real tokens of the raw tokens: the mean token vector (F = D) for continuous
    tokens, the normalised bag-of-ids histogram (F = vocab_size, the mean one-hot) for discrete ones."""
    real = (~batch.padding).float()  # (B, L)
    n = real.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1)
    if batch.is_discrete:
        v = int(vocab_size or int(batch.tokens.max()) + 1)
        hist = torch.zeros(batch.batch_size, v, device=batch.tokens.device)
        hist.scatter_add_(1, batch.tokens.long().clamp(0, v - 1), real)
        return hist / n
    return (batch.tokens.float() * real[..., None]).sum(1) / n


def random_init_model(model: MaskedModel, seed: int) -> MaskedModel:
    """A freshly initialised model of ``model``'s config, built after ``torch.manual_seed(seed)`` as
    training does (the caller's global RNG state is restored afterwards)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = MaskedModel(model.config)
    finally:
        torch.random.set_rng_state(state)
    device = next(model.parameters()).device
    return fresh.to(device).eval()


@dataclass
class TableFeatures:
    """Frozen features of every sample of a table, in loader order."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    features: dict[str, np.ndarray]  # name -> (N, F) float32
    meta: list[dict]  # per-sample meta (forecasting only; else empty)


def extract_features(
    models: dict[str, MaskedModel],
    table: TokenTable,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    per_token: bool = False,
    with_meta: bool = False,
) -> TableFeatures:
    """Features of every sample of ``table`` for each model (pooled ``(N, dim)``, or flattened per-token
    ``(N, L * dim)`` when ``per_token``; the latter needs equal lengths), plus ``raw_tokens`` (mean-pooled,
    or the flattened tokens when ``per_token``)."""
    from maskloom.pipelines.loader import TokenLoader

    loader = TokenLoader(
        table, batch_size=batch_size, shuffle=False, bucket=not per_token, with_meta=with_meta
    )
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*models, "raw_tokens"]}
    ids: list[str] = []
    labels: list[np.ndarray] = []
    metas: list[dict] = []
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for batch in loader:
            if per_token and bool(batch.padding.any()):
                raise EvalError(
                    f"{table.directory}: samples differ in length; per-token features need equal lengths"
                )
            b = batch.to(device)
            for name, m in models.items():
                f = m.features(b)
                x = rearrange(f.tokens, "b l d -> b (l d)") if per_token else f.pooled
                out[name].append(x.float().cpu().numpy())
            if per_token:
                raw = b.tokens.float().reshape(b.batch_size, -1)  # (B, L * D)
            else:
                raw = raw_token_features(b, table.spec.vocab_size)
            out["raw_tokens"].append(raw.cpu().numpy().astype(np.float32))
            ids.extend(batch.ids)
            labels.append(batch.labels.numpy() if batch.labels is not None else np.full(batch.batch_size, -1))
            metas.extend(batch.meta)
    feats = {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in out.items()}
    return TableFeatures(
        ids=ids,
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        features=feats,
        meta=metas,
    )


# ---------------------------------------------------------------------------------------------
# classification of one table
# ---------------------------------------------------------------------------------------------
def _class_name(table: TokenTable, label: int) -> str:
    names = table.label_names
    return repr(names[label]) if names and 0 <= label < len(names) else str(label)


def classify_table(models: dict[str, MaskedModel], table: TokenTable, cfg: EvalConfig) -> dict[str, Any]:
    """Probe results of one labelled table (see :func:`evaluate_run` for the structure)."""
    tf = extract_features(models, table, batch_size=cfg.batch_size, device=cfg.device)
    keep = np.flatnonzero(tf.labels >= 0)
    if keep.size == 0:
        return {"modality": table.modality, "kind": "skipped", "reason": "the table has no labels"}
    classes = np.unique(tf.labels[keep])
    if classes.size < 2:  # every probe would score 1.000: nothing to tell the feature sets apart
        return {"modality": table.modality, "kind": "skipped",
                "reason": f"every labelled sample has the same class ({_class_name(table, int(classes[0]))})"}  # fmt: skip
    src_of, group_of = _sources(table)
    ids = [tf.ids[i] for i in keep]
    labels = tf.labels[keep]
    srcs = [src_of[i] for i in ids]
    groups = [group_of[i] for i in ids]
    tr, te, rule = split_indices(
        srcs, ids, labels, seed=cfg.seed, train_fraction=cfg.train_fraction, groups=groups
    )
    splits = [(tr, te)]
    if rule == "hash" and cfg.folds > 1:
        splits = fold_indices(srcs, ids, labels, folds=cfg.folds, seed=cfg.seed, groups=groups)
        rule = f"{len(splits)}-fold"
        tr = splits[0][0] if splits else tr
    if not splits or tr.size == 0 or te.size == 0:
        return {
            "modality": table.modality,
            "kind": "skipped",
            "reason": f"too few labelled samples to split ({keep.size})",
        }
    probes = {}
    for name in FEATURE_SETS:
        x = tf.features[name][keep]
        correct = {"linear": 0.0, "knn": 0.0}
        tested = 0
        for a, b in splits:  # accuracy over all test samples of all folds
            correct["linear"] += linear_probe(x[a], labels[a], x[b], labels[b]) * b.size
            correct["knn"] += knn_accuracy(x[a], labels[a], x[b], labels[b], k=cfg.k) * b.size
            tested += b.size
        probes[name] = {k: v / tested for k, v in correct.items()}
    te = np.concatenate([b for _, b in splits])
    return {
        "modality": table.modality,
        "kind": "classification",
        "split": {
            "rule": rule,
            "train": int(tr.size),
            "test": int(te.size),
            "classes": int(np.unique(labels).size),
            "k": int(min(cfg.k, tr.size)),
        },
        "probes": probes,
    }


def _sources(table: TokenTable) -> tuple[dict[str, str], dict[str, str]]:
    """{id: source} and {id: group key} (:func:`group_keys`) of a table's records."""
    t = table.read(columns=["id", "source", "meta"])
    ids = t.column("id").to_pylist()
    metas = [json.loads(m) for m in t.column("meta").to_pylist()]
    return dict(zip(ids, t.column("source").to_pylist())), dict(zip(ids, group_keys(ids, metas)))


# ---------------------------------------------------------------------------------------------
# forecasting
# ---------------------------------------------------------------------------------------------
ALPHAS: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
"""Ridge penalties tried by :func:`ridge_forecast` (on standardised inputs)."""


def ridge_forecast(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    alphas: Sequence[float] = ALPHAS,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Ridge regression ``(N, F) -> (N, T)`` on standardised inputs (centred targets, free intercept),
    the penalty chosen among ``alphas`` by exact leave-one-out error (as scikit-learn's ``RidgeCV``),
    or, with ``validation = (fit rows, validation rows)`` of the training set, by the error on the
    validation rows of a fit on the fit rows (use it for overlapping time windows, whose neighbours
    make leave-one-out far too optimistic); predicts ``(M, T)``.

    One symmetric eigendecomposition, of the Gram matrix ``X X^T`` when ``N <= F`` or of ``X^T X``
    otherwise, serves every penalty; float32 torch, so flattened per-token features (F = L * dim in
    the thousands) stay CPU-fast.
    """
    if validation is not None and len(alphas) > 1:
        fit, val = validation
        if fit.size >= 2 and val.size >= 1:
            errs = [
                float(
                    np.mean(
                        (ridge_forecast(train_x[fit], train_y[fit], train_x[val], alphas=(a,)) - train_y[val])
                        ** 2
                    )
                )
                for a in alphas
            ]
            alphas = (alphas[int(np.argmin(errs))],)
    x = torch.from_numpy(np.asarray(train_x, np.float32))
    y = torch.from_numpy(np.asarray(train_y, np.float32))
    xt = torch.from_numpy(np.asarray(test_x, np.float32))
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    x, xt = (x - mu) / sd, (xt - mu) / sd  # (N, F), (M, F)
    y_mu = y.mean(0)
    y = y - y_mu  # (N, T)
    n, f = x.shape
    best: tuple[float, torch.Tensor] | None = None
    if n <= f:  # dual: K = X X^T = U diag(s) U^T
        s, u = torch.linalg.eigh(x @ x.T)  # (N,), (N, N)
        s = s.clamp(min=0)
        uty = u.T @ y  # (N, T)
        for a in alphas:
            shrink = s / (s + a)  # (N,) eigenvalues of the hat matrix
            fitted = u @ (shrink[:, None] * uty)  # (N, T)
            h = (u**2) @ shrink  # (N,) hat diagonal
            loo = ((y - fitted) / (1 - h).clamp(min=1e-6)[:, None]).pow(2).mean()
            if best is None or float(loo) < best[0]:
                coef = u @ (uty / (s + a)[:, None])  # (N, T) dual coefficients
                best = (float(loo), x.T @ coef)  # (F, T) weights
    else:  # primal: X^T X = V diag(s) V^T
        s, v = torch.linalg.eigh(x.T @ x)  # (F,), (F, F)
        s = s.clamp(min=0)
        xv = x @ v  # (N, F)
        q = v.T @ (x.T @ y)  # (F, T)
        for a in alphas:
            inv = 1.0 / (s + a)  # (F,)
            fitted = xv @ (inv[:, None] * q)  # (N, T)
            h = (xv**2) @ inv  # (N,)
            loo = ((y - fitted) / (1 - h).clamp(min=1e-6)[:, None]).pow(2).mean()
            if best is None or float(loo) < best[0]:
                best = (float(loo), v @ (inv[:, None] * q))
    assert best is not None
    return (xt @ best[1] + y_mu).double().numpy()


def forecast_metrics(pred: np.ndarray, true: np.ndarray, scale: np.ndarray | None = None) -> dict[str, float]:
    """MSE and MAE of ``pred`` vs ``true`` (same shape); with ``scale`` (broadcastable), also of the
    errors divided by it (``mse_std``, ``mae_std``)."""
    err = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    out = {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}
    if scale is not None:
        e = err / scale
        out.update(mse_std=float(np.mean(e**2)), mae_std=float(np.mean(np.abs(e))))
    return out


def forecast_eval(
    features: dict[str, np.ndarray],
    targets: np.ndarray,
    last_value: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    window_std: np.ndarray | None = None,
    series_std: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Score ridge forecasters on each feature set and the repeat-last-value baseline.

    ``features``: name -> ``(N, F)`` inputs (one ridge head each; the name ``raw_tokens`` is reported
    as ``raw_linear``); ``targets (N, H, C)`` normalised futures; ``last_value (N, C)`` the last
    normalised value of each window; ``window_std (N, C)`` RevIN std of each window and
    ``series_std (N, C)`` the dataset std of the window's channels (both optional) give the
    dataset-standardised metrics; ``validation`` (positions within ``train_idx``) picks the ridge
    penalty chronologically. Returns name -> {mse, mae[, mse_std, mae_std]}.
    """
    n, h, c = targets.shape
    y = targets.reshape(n, h * c)
    scale = None
    if window_std is not None and series_std is not None:
        scale = (series_std / window_std)[test_idx][:, None, :]  # (M, 1, C): normalised err -> dataset std
    out: dict[str, dict[str, float]] = {}
    for name, x in features.items():
        pred = ridge_forecast(x[train_idx], y[train_idx], x[test_idx], validation=validation).reshape(
            -1, h, c
        )
        out["raw_linear" if name == "raw_tokens" else name] = forecast_metrics(pred, targets[test_idx], scale)
    rep = np.repeat(last_value[test_idx][:, None, :], h, axis=1)  # (M, H, C)
    out["last_value"] = forecast_metrics(rep, targets[test_idx], scale)
    return out


def chronological_split(
    keys: Sequence[tuple[str, int]],
    starts: np.ndarray,
    lengths: np.ndarray,
    horizon: int,
    test_fraction: float,
) -> tuple[np.ndarray, np.ndarray, dict[tuple[str, int], int]]:
    """(train idx, test idx, cutoff step per series) of forecasting windows: per series ``key``, the
    latest ``ceil(test_fraction * starts)`` distinct window starts are test; train windows are those whose
    future ends by the first test start (all earlier ones if none does)."""
    keys_arr = np.array([f"{s}\x00{i}" for s, i in keys])
    train, test, cutoffs = [], [], {}
    for key in np.unique(keys_arr):
        members = np.flatnonzero(keys_arr == key)
        uniq = np.unique(starts[members])
        if uniq.size < 2:
            continue
        cut = int(uniq[uniq.size - max(1, math.ceil(test_fraction * uniq.size))])
        st = starts[members]
        te = members[st >= cut]
        tr = members[st + lengths[members] + horizon <= cut]
        if tr.size == 0:
            tr = members[st < cut]
        train.append(tr)
        test.append(te)
        src, _, si = key.partition("\x00")
        cutoffs[(src, int(si))] = cut
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(test), cutoffs


def forecast_table(models: dict[str, MaskedModel], table: TokenTable, cfg: EvalConfig) -> dict[str, Any]:
    """Forecasting result of one unlabelled time-series table (see :func:`evaluate_run`)."""
    from maskloom.tokenizers.time_series import TimeSeriesTokenizer, record_span

    skip = lambda why: {"modality": table.modality, "kind": "skipped", "reason": why}  # noqa: E731
    tok = table.tokenizer()
    if not isinstance(tok, TimeSeriesTokenizer):
        return skip("forecasting needs a time_series table")
    tf = extract_features(
        models, table, batch_size=cfg.batch_size, device=cfg.device, per_token=True, with_meta=True
    )
    if not tf.ids:
        return skip("the table has no rows")
    src_of, _ = _sources(table)
    raws: dict[str, Any] = {}
    h = cfg.horizon
    targets, last, keep, wstd, keys, starts, lengths, chans = [], [], [], [], [], [], [], []
    raw_tokens = tf.features["raw_tokens"]
    for i, (rid, meta) in enumerate(zip(tf.ids, tf.meta)):  # one step per window, not per token
        src = src_of[rid]
        if src not in raws:
            try:
                raws[src] = tok.read(src)
            except TokenizeError as e:
                return skip(f"forecasting reads the future values from the source series, which failed: {e}")
            if raws[src].labelled:
                return skip(f"{src}: a labelled (UCR) file has no future to forecast")
        rec = Record(id=rid, source=src, tokens=np.zeros((0, 1)), positions=np.zeros((0, 2)), meta=meta)
        fut = TimeSeriesTokenizer.future(raws[src], rec, h)  # (H', C)
        if fut.shape[0] < h or not np.isfinite(fut).all():
            continue
        targets.append(TimeSeriesTokenizer.normalize(fut, rec))
        n_c, n_p, pl = len(meta["channels"]), int(meta["patches"]), int(meta["patch_len"])
        z = raw_tokens[i].reshape(n_c, n_p, pl)  # channel-major, patch order as stored
        last.append(z[:, -1, -1])
        keep.append(i)
        wstd.append(meta["std"])
        keys.append((src, int(meta["series"])))
        starts.append(record_span(rec)[0])
        lengths.append(int(meta["length"]))
        chans.append(meta["channels"])
    if not keep:
        return skip(f"no window has {h} future steps in its source series (lower --horizon)")
    keep_a = np.asarray(keep)
    y = np.stack(targets).astype(np.float64)  # (N, H, C)
    starts_a, lengths_a = np.asarray(starts), np.asarray(lengths)
    tr, te, cutoffs = chronological_split(keys, starts_a, lengths_a, h, cfg.test_fraction)
    if tr.size == 0 or te.size == 0:
        return skip("too few windows for a chronological train/test split (each series needs >= 2)")
    # dataset std of each window's channels over the training part of its series (ETT standardisation)
    series_std = np.stack(
        [
            np.nanstd(raws[s].series[si][: max(2, cutoffs.get((s, si), 0))][:, ch], axis=0)
            for (s, si), ch in zip(keys, chans)
        ]
    )
    series_std = np.where(series_std > 0, series_std, 1.0)
    feats = {name: tf.features[name][keep_a] for name in [*models, "raw_tokens"]}
    # the ridge penalty is chosen on the latest training windows of each series (chronologically, as
    # the test split): neighbouring windows overlap, so leave-one-out would pick too small a penalty
    fit, val, _ = chronological_split(
        [keys[i] for i in tr], starts_a[tr], lengths_a[tr], h, cfg.test_fraction
    )
    results = forecast_eval(
        feats,
        y,
        np.stack(last),
        tr,
        te,
        window_std=np.asarray(wstd, np.float64),
        series_std=series_std,
        validation=(fit, val) if fit.size and val.size else None,
    )
    return {
        "modality": table.modality,
        "kind": "forecast",
        "split": {
            "rule": "chronological",
            "train": int(tr.size),
            "test": int(te.size),
            "horizon": h,
            "dropped_short": len(tf.ids) - len(keep),
        },
        "forecast": {name: results[name] for name in FORECASTERS},
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def load_run_model(run_dir: str, device: str = "cpu") -> MaskedModel:
    """The run's final model (``RUN/model``), else its newest checkpoint; EvalError when neither exists."""
    from maskloom.recipes.train import MODEL_DIR, TrainError, list_checkpoints, pick_device

    try:
        device = str(pick_device(device))  # not "model.safetensors: corrupt" for a device not here
    except TrainError as e:
        raise EvalError(str(e)) from None
    if not os.path.isdir(run_dir):
        raise EvalError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, MODEL_DIR)
    if not os.path.isfile(os.path.join(path, "config.json")):
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise EvalError(
                f"{run_dir}: no model/ and no checkpoint: not a trained run (maskloom train --out RUN)"
            )
        path = ckpts[-1][1]
        log.warning("%s: no final model; evaluating the newest checkpoint %s", run_dir, path)
    try:
        return MaskedModel.load(path, map_location=device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None


def run_seed(run_dir: str, default: int = 0) -> int:
    """``train.seed`` of the run's recipe file (the seed its model was initialised with), else ``default``."""
    from maskloom.recipes.train import RECIPE_FILE

    path = os.path.join(run_dir, RECIPE_FILE)
    try:
        with open(path, "rb") as f:
            return int(tomllib.load(f).get("train", {}).get("seed", default))
    except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return default


def evaluate_run(
    run_dir: str,
    tables: Sequence[str],
    *,
    device: str = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    k: int = 20,
    horizon: int = 96,
    folds: int = 5,
) -> dict[str, Any]:
    """Evaluate a trained run on token tables.

    Returns::

        {"run": run_dir, "seed": seed, "init_seed": int,
         "tables": {table_dir: result, ...}}          # in the order given

    where ``result`` is one of

    * ``{"modality", "kind": "classification", "split": {"rule": "source"|"hash"|"<k>-fold", "train", "test",
      "classes", "k"}, "probes": {"pretrained"|"random_init"|"raw_tokens": {"linear": acc, "knn": acc}}}``
    * ``{"modality", "kind": "forecast", "split": {"rule": "chronological", "train", "test", "horizon",
      "dropped_short"}, "forecast": {"pretrained"|"random_init"|"raw_linear"|"last_value":
      {"mse", "mae", "mse_std", "mae_std"}}}``
    * ``{"modality", "kind": "skipped", "reason": str}`` (no labels and not a forecasting table, no
      adapter for the modality, too few samples ...).

    Accuracies are fractions in [0, 1]. Labelled tables are probed; unlabelled time-series tables are
    forecast (``horizon`` steps); other unlabelled tables are skipped with a reason.
    """
    cfg = EvalConfig(device=device, batch_size=batch_size, seed=seed, k=k, horizon=horizon, folds=folds)
    if not tables:
        raise EvalError("no token tables given (--tables T [T ...])")
    opened = []
    for t in tables:
        try:
            opened.append(TokenTable(os.fspath(t)))
        except TableError as e:
            raise EvalError(str(e)) from None
    model = load_run_model(run_dir, device)
    init_seed = run_seed(run_dir, seed)
    models = {"pretrained": model, "random_init": random_init_model(model, init_seed)}
    adapters = {m for m, _ in model.config.adapters}
    results: dict[str, Any] = {}
    for t in opened:
        key = t.directory
        if t.modality not in adapters:
            results[key] = {
                "modality": t.modality,
                "kind": "skipped",
                "reason": f"the run has no adapter for modality {t.modality!r} (it has {sorted(adapters)})",
            }
        elif t.num_rows == 0:
            results[key] = {"modality": t.modality, "kind": "skipped", "reason": "the table has no rows"}
        elif _has_labels(t):
            results[key] = classify_table(models, t, cfg)
        elif t.modality == "time_series":
            results[key] = forecast_table(models, t, cfg)
        else:
            results[key] = {"modality": t.modality, "kind": "skipped", "reason": "the table has no labels"}
        if results[key]["kind"] == "skipped":
            log.warning("%s: skipped: %s", key, results[key]["reason"])
    return {"run": run_dir, "seed": seed, "init_seed": init_seed, "tables": results}


def _has_labels(table: TokenTable) -> bool:
    col = table.read(columns=["label"]).column("label")
    return col.null_count < len(col) and bool(np.any(np.asarray(col.fill_null(-1).to_numpy()) >= 0))


# ---------------------------------------------------------------------------------------------
# text output
# ---------------------------------------------------------------------------------------------
_ROW_NAMES = {
    "pretrained": "pretrained",
    "random_init": "random-init",
    "raw_tokens": "raw-tokens",
    "raw_linear": "linear-on-raw",
    "last_value": "repeat-last",
}


def format_results(results: dict[str, Any]) -> str:
    """The evaluation as plain-text tables, one per table (modality)."""
    lines = [f"run {results['run']}"]
    for path, r in results["tables"].items():
        head = f"\n{r['modality']}  ({path})"
        if r["kind"] == "skipped":
            lines.append(f"{head}: skipped: {r['reason']}")
            continue
        s = r["split"]
        if r["kind"] == "classification":
            lines.append(
                f"{head}: {s['train']} train / {s['test']} test, split by {s['rule']}, "
                f"{s['classes']} classes, kNN k={s['k']}"
            )
            lines.append(f"  {'':<14}{'linear':>8}{'kNN':>8}")
            for name in FEATURE_SETS:
                p = r["probes"][name]
                lines.append(f"  {_ROW_NAMES[name]:<14}{p['linear']:>8.3f}{p['knn']:>8.3f}")
        else:
            lines.append(
                f"{head}: horizon {s['horizon']}, {s['train']} train / {s['test']} test windows "
                f"(chronological); MSE/MAE in RevIN space and dataset-standardised (std)"
            )
            lines.append(f"  {'':<14}{'MSE':>8}{'MAE':>8}{'MSE std':>9}{'MAE std':>9}")
            for name in FORECASTERS:
                m = r["forecast"][name]
                lines.append(
                    f"  {_ROW_NAMES[name]:<14}{m['mse']:>8.3f}{m['mae']:>8.3f}"
                    f"{m.get('mse_std', float('nan')):>9.3f}{m.get('mae_std', float('nan')):>9.3f}"
                )
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str) -> None:
    """Write the results as JSON (NaN becomes null)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(results), f, indent=1)
