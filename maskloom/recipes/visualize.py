"""Reconstructions of a trained run: original / masked / reconstructed, drawn per modality.

As MAE's visualisation notebook (He et al., 2022, ``demo/mae_visualize.ipynb``): run the model with
masking on a few samples; take the predictions at the scored masked positions; undo the target
normalisation the run was trained with — for norm-pix MSE the head predicts ``(x - mean) / std`` of
each *true* token, so the prediction is mapped back with that true token's own mean and std
(``Objective.denormalize``); then paste the predictions into the visible tokens and detokenize.

Three records per sample, all detokenized with the table's own tokenizer
(``TokenTable(path).tokenizer()``):

* ``original``: the stored tokens;
* ``masked``: masked tokens replaced by a neutral value (mid-grey 128 for uint8 pixels, 0 otherwise:
  the RevIN / dataset mean of normalised series and spectrograms, the centre of a point group) —
  point clouds drop the masked groups instead;
* ``reconstructed``: visible tokens as stored, scored masked tokens replaced by the de-normalised
  predictions cast to the token dtype (uint8: rounded and clipped to [0, 255]); masked tokens the
  cross decoder did not score stay neutral. Discrete tokens: the argmax of the logits.

Objectives: ``mse`` (norm-pix or not) and ``cross_entropy`` through their ``denormalize``; ``sce``
(GraphMAE) is scale-free, so its prediction is rescaled to the true token's L2 norm; ``chamfer``
predicts point groups directly.

Drawings (one file per sample, ``<out>/<modality>-<i>.png``): images as three panels side by side
(each enlarged ``zoom = max(1, 128 // S)`` times with nearest-neighbour, 4 px white gaps); video as
three rows of frames; spectrograms, time series (masked patches shaded), point clouds (3-D scatter,
masked groups red), graph node features (heatmaps, masked nodes marked) and any other modality
(token heatmaps) through matplotlib at a fixed size; text as ``.txt`` and ``.png`` with masked tokens
as ``[ ]`` and predictions as ``[word]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from maskloom._paths import make_out_dir
from maskloom.backbone import MaskedModel
from maskloom.recipes.evaluate import EvalError, load_run_model
from maskloom.recipes.objectives import Objective, build_objective
from maskloom.tables import TableError, TokenTable
from maskloom.tokenizers.base import Record, TableSpec, Tokenizer

log = logging.getLogger(__name__)

GAP = 4
"""White pixels between panels of an image/video sheet."""
DPI = 100
"""Resolution of matplotlib figures (a figure of (w, h) inches is w*DPI x h*DPI pixels)."""


class ShowError(ValueError):
    """A user mistake in a `show` request; the message names the path and the reason."""


# ---------------------------------------------------------------------------------------------
# de-normalisation and token records
# ---------------------------------------------------------------------------------------------
def denormalize_prediction(objective: Objective, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Predictions in the stored token space: ``pred (..., Dout)``, ``tokens (..., D)`` the true tokens
    (continuous) or ``(...)`` ids. Returns ``(..., D)`` float32 values, or ``(...)`` int64 ids."""
    if objective.name == "sce":  # scale-free objective: give the prediction the true token's norm
        p = pred.float()
        norm = tokens.float().norm(dim=-1, keepdim=True)
        return torch.nn.functional.normalize(p, dim=-1) * norm
    if not torch.is_floating_point(tokens) and tokens.dtype != torch.uint8 and pred.dim() == tokens.dim() + 1:
        return pred.argmax(dim=-1)  # ids from logits
    return objective.denormalize(pred, tokens)


def cast_tokens(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values as the table's token dtype: uint8 rounded and clipped to [0, 255], float16 clipped to its
    finite range, int32 ids as they are."""
    v = np.asarray(values)
    if dtype == "uint8":
        return np.clip(np.rint(v.astype(np.float64)), 0, 255).astype(np.uint8)
    if dtype == "float16":
        fmax = float(np.finfo(np.float16).max)
        return np.clip(v.astype(np.float32), -fmax, fmax).astype(np.float16)
    return v.astype(np.dtype(dtype))


def neutral_value(spec: TableSpec) -> float:
    """The value a masked token is drawn with: mid-grey 128 for uint8, 0 otherwise."""
    return 128.0 if spec.token_dtype == "uint8" else 0.0


@dataclass
class Reconstruction:
    """One sample: its three records and masks (all over the sample's L real tokens)."""

    original: Record
    masked: Record
    reconstructed: Record
    mask: np.ndarray
    """(L,) bool, True = masked (hidden from the encoder)."""
    target: np.ndarray
    """(L,) bool, True = masked and predicted (scored)."""
    predicted: np.ndarray
    """(L, D) or (L,) the de-normalised predictions at every position (meaningful where ``target``)."""


def reconstruct_records(
    records: list[Record], spec: TableSpec, pred: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> list[Reconstruction]:
    """Build the three records of each sample from de-normalised predictions.

    ``records``: the B stored records (in batch order); ``pred (B, L, D)`` de-normalised values (or
    ``(B, L)`` ids), ``mask``/``target (B, L)`` bool. Records are not modified.
    """
    out = []
    pred_np = pred.detach().cpu().numpy()
    mask_np, target_np = mask.cpu().numpy(), target.cpu().numpy()
    neutral = neutral_value(spec)
    for b, rec in enumerate(records):
        n = rec.num_tokens
        m, t = mask_np[b, :n], target_np[b, :n]
        p = cast_tokens(pred_np[b, :n], spec.token_dtype)
        masked_tok = np.array(rec.tokens, copy=True)
        masked_tok[m] = cast_tokens(np.full_like(masked_tok[m], neutral, dtype=np.float64), spec.token_dtype)
        recon_tok = np.array(masked_tok, copy=True)
        recon_tok[t] = p[t]  # visible tokens are already the stored ones
        out.append(
            Reconstruction(
                original=rec,
                masked=dataclasses.replace(rec, tokens=masked_tok),
                reconstructed=dataclasses.replace(rec, tokens=recon_tok),
                mask=m,
                target=t,
                predicted=p,
            )
        )
    return out


def subset_record(rec: Record, keep: np.ndarray) -> Record:
    """The record with only the tokens where ``keep`` (L,) is True (edges dropped)."""
    return dataclasses.replace(rec, tokens=rec.tokens[keep], positions=rec.positions[keep], edges=None)


# ---------------------------------------------------------------------------------------------
# drawing helpers
# ---------------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    return path


def zoom_for(size: int) -> int:
    """Integer enlargement of an image panel of side ``size``: ``max(1, 128 // size)``."""
    return max(1, 128 // max(1, size))


def image_sheet(rows: list[list[np.ndarray]], zoom: int = 1, gap: int = GAP) -> np.ndarray:
    """Tile (H, W, 3) uint8 panels into one sheet: ``rows`` of equal-size panels, ``gap`` white pixels
    between them, each enlarged ``zoom`` times (nearest neighbour)."""
    h, w = rows[0][0].shape[:2]
    hz, wz = h * zoom, w * zoom
    n_r, n_c = len(rows), max(len(r) for r in rows)
    sheet = np.full((n_r * hz + (n_r - 1) * gap, n_c * wz + (n_c - 1) * gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):  # panels, not tokens
        for j, panel in enumerate(row):
            big = np.repeat(np.repeat(panel, zoom, axis=0), zoom, axis=1)
            sheet[i * (hz + gap) : i * (hz + gap) + hz, j * (wz + gap) : j * (wz + gap) + wz] = big
    return sheet


def _save_rgb(sheet: np.ndarray, path: str) -> str:
    from PIL import Image

    Image.fromarray(sheet).save(path, format="PNG")
    return path


TITLES = ("original", "masked", "reconstructed")


# ---------------------------------------------------------------------------------------------
# drawers: (tokenizer, reconstruction, path stem) -> written paths
# ---------------------------------------------------------------------------------------------
Drawer = Callable[[Tokenizer, Reconstruction, str], list[str]]
DRAWERS: dict[str, Drawer] = {}
"""Drawer per modality; modalities without one get :func:`draw_tokens` (token heatmaps)."""


def drawer(modality: str) -> Callable[[Drawer], Drawer]:
    def deco(fn: Drawer) -> Drawer:
        if modality in DRAWERS:
            raise ValueError(f"a drawer for {modality!r} is already registered")
        DRAWERS[modality] = fn
        return fn

    return deco


@drawer("image")
def draw_image(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Three panels side by side: (S*z, 3*S*z + 2*GAP) pixels, z = zoom_for(S)."""
    panels = [np.asarray(tok.detokenize(x)) for x in (r.original, r.masked, r.reconstructed)]
    return [_save_rgb(image_sheet([panels], zoom_for(panels[0].shape[0])), stem + ".png")]


@drawer("video")
def draw_video(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Three rows (original, masked, reconstructed) of the T frames."""
    rows = [list(tok.detokenize(x).frames) for x in (r.original, r.masked, r.reconstructed)]
    return [_save_rgb(image_sheet(rows, zoom_for(rows[0][0].shape[0])), stem + ".png")]


@drawer("audio")
def draw_audio(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Three spectrograms (log-mel filterbanks, detokenized) stacked, one colour scale."""
    fbs = [np.asarray(tok.detokenize(x), np.float32) for x in (r.original, r.masked, r.reconstructed)]
    lo, hi = float(fbs[0].min()), float(fbs[0].max())
    fig = _figure(8, 7)
    for i, (fb, title) in enumerate(zip(fbs, TITLES)):
        ax = fig.add_subplot(3, 1, i + 1)
        ax.imshow(fb.T, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
    ax.set_xlabel("frame")
    fig.tight_layout()
    return [_save(fig, stem + ".png")]


@drawer("time_series")
def draw_time_series(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Three stacked line plots; masked patches shaded, predictions in red."""
    orig = np.asarray(tok.detokenize(r.original), np.float64)  # (length, C)
    recon = np.asarray(tok.detokenize(r.reconstructed), np.float64)
    m = r.original.meta
    pl, ps = int(m["patch_len"]), int(m["patch_stride"])
    patch = np.asarray(r.original.positions)[:, 1].astype(np.int64)  # (L,)
    hidden = np.zeros(orig.shape[0], bool)
    steps = (patch[r.mask][:, None] * ps + np.arange(pl)).reshape(-1)  # steps under masked patches
    hidden[steps] = True
    t = np.arange(orig.shape[0])
    fig = _figure(10, 6)
    axes = [fig.add_subplot(3, 1, i + 1) for i in range(3)]
    gapped = np.where(hidden[:, None], np.nan, orig)
    axes[0].plot(t, orig, lw=0.9)
    axes[1].plot(t, gapped, lw=0.9)
    axes[2].plot(t, gapped, lw=0.9)
    axes[2].plot(t, np.where(hidden[:, None], recon, np.nan), lw=1.2, color="tab:red")
    axes[2].plot(t, np.where(hidden[:, None], orig, np.nan), lw=0.8, color="0.6", ls="--")
    starts = patch[r.mask] * ps
    for ax, title in zip(axes, TITLES):
        for s in starts.tolist():  # one span per masked patch
            ax.axvspan(s, s + pl, color="0.85", lw=0, zorder=0)
        ax.set_title(title, fontsize=9)
    axes[2].set_xlabel("step")
    fig.tight_layout()
    return [_save(fig, stem + ".png")]


@drawer("point_cloud")
def draw_point_cloud(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Three 3-D scatters: all groups (masked in red) / visible groups / visible + predicted (red)."""
    g = r.original.num_tokens
    orig = np.asarray(tok.detokenize(r.original))  # (G*K, 3+C), group-major
    k = orig.shape[0] // g
    group_masked = np.repeat(r.mask, k)  # (G*K,)
    vis = np.asarray(tok.detokenize(subset_record(r.original, ~r.mask)))
    recon = np.asarray(tok.detokenize(r.reconstructed))
    recon_red = np.repeat(r.target, k)
    recon_keep = np.repeat(~r.mask | r.target, k)
    fig = _figure(12, 4)
    lo, hi = orig[:, :3].min(axis=0), orig[:, :3].max(axis=0)
    mid, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    views = [
        (orig, group_masked),
        (vis, np.zeros(len(vis), bool)),
        (recon[recon_keep], recon_red[recon_keep]),
    ]
    for i, ((pts, red), title) in enumerate(zip(views, TITLES)):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        colour = np.where(red[:, None], [[0.85, 0.15, 0.1]], [[0.35, 0.45, 0.6]])
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=colour, s=2, depthshade=False)
        for setter, a in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), range(3)):
            setter(mid[a] - half, mid[a] + half)
        ax.set_title(title, fontsize=9)
    return [_save(fig, stem + ".png")]


@drawer("graph")
def draw_graph(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Node-feature heatmaps (nodes x features); masked nodes marked by a red bar on the left."""
    xs = [np.asarray(tok.detokenize(x).x, np.float32) for x in (r.original, r.masked, r.reconstructed)]
    return [_save(_heatmaps(xs, r.mask, "node", "feature"), stem + ".png")]


def draw_tokens(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """Any modality: the token vectors (L, D) as heatmaps; discrete ids as a one-column map."""
    xs = [
        np.asarray(x.tokens, np.float32).reshape(x.num_tokens, -1)
        for x in (r.original, r.masked, r.reconstructed)
    ]
    return [_save(_heatmaps(xs, r.mask, "token", "value"), stem + ".png")]


def _heatmaps(xs: list[np.ndarray], mask: np.ndarray, rows: str, cols: str):
    lo, hi = float(xs[0].min()), float(xs[0].max())
    fig = _figure(12, 4)
    for i, (x, title) in enumerate(zip(xs, TITLES)):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(
            x, aspect="auto", cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest"
        )
        marked = np.flatnonzero(mask)
        ax.scatter(
            np.full(marked.size, -0.5 - 0.02 * x.shape[1]),
            marked,
            marker="s",
            s=6,
            c="tab:red",
            clip_on=False,
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(cols)
        ax.set_ylabel(rows)
    fig.tight_layout()
    return fig


@drawer("text")
def draw_text(tok: Tokenizer, r: Reconstruction, stem: str) -> list[str]:
    """``.txt`` and ``.png``: the original, the text with masked tokens as ``[ ]``, and with the
    predicted tokens as ``[word]``."""
    original, masked, predicted = text_panels(tok, r)
    with open(stem + ".txt", "w", encoding="utf-8") as f:
        f.write(f"original:\n{original}\n\nmasked:\n{masked}\n\npredicted:\n{predicted}\n")
    fig = _figure(8, 8)
    body = []
    for title, text in zip(TITLES, (original, masked, predicted)):
        body.append(f"--- {title} ---")
        body.extend(textwrap.wrap(text[:1200], 100) or [""])
        body.append("")
    fig.text(0.02, 0.98, "\n".join(body), va="top", ha="left", family="monospace", fontsize=6.5)
    return [stem + ".txt", _save(fig, stem + ".png")]


def text_panels(tok: Tokenizer, r: Reconstruction) -> tuple[str, str, str]:
    """(original, masked with ``[ ]``, predicted with ``[word]``) strings of a text sample.

    Runs of visible tokens are decoded together; masked tokens one by one."""
    ids = np.asarray(r.original.tokens).reshape(-1)
    pred = np.asarray(r.predicted).reshape(-1)

    def dec(x: np.ndarray) -> str:
        return tok.detokenize(
            dataclasses.replace(
                r.original, tokens=x.astype(np.int32), positions=np.zeros((x.size, 1), np.float32)
            )
        )

    change = np.flatnonzero(np.diff(r.mask.astype(np.int8))) + 1
    bounds = [0, *change.tolist(), ids.size]
    masked, predicted = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):  # runs of equal mask state
        if not r.mask[a]:
            s = dec(ids[a:b])
            masked.append(s)
            predicted.append(s)
            continue
        for i in range(a, b):  # masked tokens, each bracketed (after the true token's leading space)
            true = dec(ids[i : i + 1])
            lead = true[: len(true) - len(true.lstrip())]
            masked.append(f"{lead}[ ]")
            predicted.append(f"{lead}[{dec(pred[i : i + 1]).strip()}]" if r.target[i] else f"{lead}[ ]")
    return dec(ids), "".join(masked), "".join(predicted)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_objective(run_dir: str, spec: TableSpec) -> Objective:
    """The objective the run trained ``spec``'s modality with (from ``RUN/recipe.toml``); without a
    recipe file: plain MSE (no norm-pix) for continuous tokens, cross-entropy for ids."""
    from maskloom.recipes.recipe import RecipeError, load_recipe
    from maskloom.recipes.train import RECIPE_FILE

    path = os.path.join(run_dir, RECIPE_FILE)
    if os.path.isfile(path):
        try:
            mod = load_recipe(path).check_table(spec)
            return build_objective(mod.objective, mod.objective_options, spec=spec)
        except (RecipeError, ValueError) as e:
            raise ShowError(f"{path}: {e}") from None
    log.warning("%s: no recipe file; drawing predictions without target de-normalisation", run_dir)
    name = "cross_entropy" if spec.token_kind == "discrete" else "mse"
    return build_objective(name, {} if name == "cross_entropy" else {"norm_pix": False}, spec=spec)


def reconstruct_batch(
    model: MaskedModel,
    table: TokenTable,
    objective: Objective,
    *,
    n: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> list[Reconstruction]:
    """Mask and reconstruct the first ``n`` samples of ``table`` (seeded generator)."""
    from maskloom.pipelines.loader import TokenLoader

    loader = TokenLoader(table, batch_size=n, shuffle=False, bucket=False)
    batch = next(iter(loader))
    records = table.records(limit=batch.batch_size)
    if [r.id for r in records] != batch.ids:  # pragma: no cover - the loader keeps table order
        raise ShowError(f"{table.directory}: loader order differs from the table order")
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        b = batch.to(device)
        out = model(b, generator=generator)
        pred = denormalize_prediction(objective, out.pred, b.tokens)
    return reconstruct_records(records, table.spec, pred, out.mask, out.target_mask)


def show_run(
    run_dir: str, table: str, out_dir: str, *, n: int = 8, seed: int = 0, device: str = "cpu"
) -> list[str]:
    """Draw original / masked / reconstructed for the first ``n`` samples of ``table`` under ``out_dir``;
    return the written paths (``<modality>-<i>.png``, plus ``.txt`` for text)."""
    if n < 1:
        raise ShowError(f"--n must be >= 1, got {n}")
    try:
        tt = TokenTable(os.fspath(table))
    except TableError as e:
        raise ShowError(str(e)) from None
    if tt.num_rows == 0:
        raise ShowError(f"{table}: token table has no rows")
    try:
        model = load_run_model(run_dir, device)
    except EvalError as e:
        raise ShowError(str(e)) from None
    if tt.modality not in {m for m, _ in model.config.adapters}:
        raise ShowError(f"{table}: the run has no adapter for modality {tt.modality!r}")
    objective = run_objective(run_dir, tt.spec)
    recons = reconstruct_batch(model, tt, objective, n=n, seed=seed, device=device)
    tok = tt.tokenizer()
    draw = DRAWERS.get(tt.modality, draw_tokens)
    make_out_dir(out_dir)
    paths: list[str] = []
    for i, r in enumerate(recons):  # one drawing per sample
        paths.extend(draw(tok, r, os.path.join(out_dir, f"{tt.modality}-{i:02d}")))
    return paths


# ---------------------------------------------------------------------------------------------
# loss curves
# ---------------------------------------------------------------------------------------------
def read_metrics(metrics_jsonl: str) -> list[dict[str, Any]]:
    """The metric lines of a run (unreadable lines skipped)."""
    rows = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve_png(metrics_jsonl: str, path: str) -> str:
    """Plot the total and per-modality losses (``loss/<modality>``) of ``metrics.jsonl`` against the
    step (log scale when all are positive) to a 900 x 500 PNG at ``path``; return ``path``."""
    rows = read_metrics(metrics_jsonl)
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    positive = True
    for key in ["loss", *keys]:
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]
        if not pts:
            continue
        s, v = np.asarray(pts, np.float64).T
        positive &= bool((v > 0).all())
        style = {"color": "black", "lw": 1.0, "alpha": 0.5} if key == "loss" else {"lw": 1.3}
        ax.plot(s, v, label="all" if key == "loss" else key.removeprefix("loss/"), **style)
    if positive and rows:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))) or "loss")
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(fig, path)
