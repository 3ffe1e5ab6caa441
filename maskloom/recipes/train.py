"""Pretraining: a recipe + token tables -> a run directory with metrics, checkpoints and a model.

The loop follows MAE's ``main_pretrain.py`` (He et al., 2022): AdamW with betas (0.9, 0.95) and
no weight decay on norms, biases and mask tokens; linear warm-up then cosine decay of the learning
rate, scaled by the effective batch size (``base_lr * batch * accumulation * world_size / 256``);
optional gradient clipping and accumulation; bf16 autocast on CUDA. One step draws one batch (of
one modality) per micro-step from :class:`maskloom.pipelines.loader.TokenLoader`, which mixes the
tables' modalities by the recipe's weights identically on every rank.

Run directory::

    RUN/recipe.toml              the resolved recipe (what was trained)
    RUN/metrics.jsonl            one line per logged step: step, loss, loss/<modality>, lr, tokens_per_s
    RUN/checkpoints/step-N/      model.safetensors + config.json (a loadable model), optimizer.safetensors
                                 + optimizer.json, rng-rank<R>.safetensors + .json, state.json (step,
                                 scheduler, loader state); written every N steps, on SIGTERM/SIGINT and
                                 on any early stop; nothing is pickled
    RUN/model/                   the final MaskedModel.save (also written on an early stop)

``resume=True`` continues from the newest checkpoint exactly: same batches (loader state), same
masks (generator state), same dropout (torch RNG), same optimiser moments and schedule.

Several processes: under ``torchrun`` (env RANK/WORLD_SIZE/LOCAL_RANK) the process group is
initialised here (gloo on CPU, nccl on GPU), the model is wrapped in DDP and the loader sharded by
rank. :func:`train_ray` runs the same loop on Ray Train workers (``TorchTrainer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maskloom._paths import check_out_dir, make_out_dir
from maskloom._progress import Progress
from maskloom.backbone import AdapterConfig, MaskedModel, ModelConfig
from maskloom.backbone.linear import cpu_matmul
from maskloom.batch import TokenBatch
from maskloom.recipes.objectives import Objective, build_objective, policy_loss
from maskloom.recipes.recipe import ModalityRecipe, Recipe, RecipeError, load_recipe
from maskloom.tables import TableError, TokenTable

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.toml"
TABLES_FILE = "tables.json"
"""The tables a run trains on, by identity (modality, config fingerprint, input set, rows), so that
``--resume`` on other tables is refused: the loader's saved position means nothing there."""
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"


class TrainError(ValueError):
    """A user mistake in a training request (tables, run directory, options): the message says which."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Per-invocation options that are not part of the recipe (the command line's flags)."""

    resume: bool = False
    """Continue from the newest checkpoint in the run directory."""
    max_steps: int | None = None
    """Stop (with a checkpoint) when the global step reaches this; the schedule still spans the recipe."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall-clock time in this invocation."""
    device: str | None = None
    """torch device; None = cuda (this rank's GPU) when available, else cpu."""
    loader_workers: int = 0
    """Worker processes of the loader (0 = build batches in the training process)."""
    compile: bool | None = None
    """Override the recipe's train.compile."""
    progress: bool = True
    """Show progress (rank 0): a tqdm bar on a terminal, a line every 30 s in a log."""
    threads: int | None = None
    """torch intra-op CPU threads of this process (None = torch's default). Small models on a CPU
    gain little from several threads and lose much when other processes share the cores."""


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    run_dir: str
    step: int
    """Global optimiser step reached."""
    total_steps: int
    """Steps of the whole schedule."""
    status: str
    """finished | max_steps | max_minutes | interrupted."""
    losses: list[float] = field(default_factory=list)
    """Loss of every optimiser step run in this invocation (mean over micro-steps and ranks)."""
    seconds: float = 0.0
    """Wall-clock time of the loop."""
    steps_per_second: float = 0.0
    tokens_per_second: float = 0.0
    """Real (non-padding) tokens per second, summed over ranks."""


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def check_run_dir(
    out: str, recipe_text: str, tables: Sequence[TokenTable], resume: bool
) -> list[tuple[int, str]]:
    """Whether ``out`` can take this run: TrainError when it holds a run and not ``resume``, or a run
    of another recipe or other tables; returns its checkpoints. Checked by rank 0 before training,
    and by :func:`train_ray` on the driver before it starts any worker."""
    check_out_dir(out)
    ckpts = list_checkpoints(out)
    if not resume and (ckpts or os.path.isfile(os.path.join(out, METRICS_FILE))):
        raise TrainError(f"{out}: already holds a run; pass --resume to continue it or choose a new --out")
    if resume and os.path.isfile(os.path.join(out, RECIPE_FILE)):
        with open(os.path.join(out, RECIPE_FILE), encoding="utf-8") as f:
            if f.read() != recipe_text:
                raise TrainError(
                    f"{out}/{RECIPE_FILE}: the run was trained with another recipe; "
                    "resume with the same recipe and --set values, or choose a new --out"
                )
    if resume and ckpts and os.path.isfile(os.path.join(out, TABLES_FILE)):
        with open(os.path.join(out, TABLES_FILE), encoding="utf-8") as f:
            before = json.load(f)
        now = [_table_identity(t) for t in tables]
        if [{k: v for k, v in t.items() if k != "directory"} for t in before] != [
            {k: v for k, v in t.items() if k != "directory"} for t in now
        ]:  # the same tables moved elsewhere are the same tables
            raise TrainError(
                f"{out}: the run was trained on other tables ({', '.join(t['directory'] for t in before)}); "
                "resume with the same --tables (in the same order), or choose a new --out"
            )
    return ckpts


def _table_identity(t: TokenTable) -> dict[str, Any]:
    """What makes a table the same table wherever it lies: modality, config fingerprint, rows and its
    shards' bytes (the SHA-256 of each, from the manifest: nothing is read)."""
    shards = hashlib.sha256("".join(s["sha256"] for s in t.manifest.shards).encode()).hexdigest()[:16]
    return {
        "directory": os.path.abspath(t.directory),
        "modality": t.modality,
        "fingerprint": t.meta.get("fingerprint"),
        "rows": t.num_rows,
        "shards": shards,
    }


def open_tables(paths: Sequence[str]) -> list[TokenTable]:
    """Open the token tables; TrainError naming the path for anything that is not a finished table."""
    if not paths:
        raise TrainError("no token tables given (--tables T [T ...])")
    out = []
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise TrainError(
                f"{p}: listed twice in --tables (also as {seen[real]}); each table trains once an epoch"
            )
        seen[real] = os.fspath(p)
        try:
            out.append(TokenTable(os.fspath(p)))
        except TableError as e:
            raise TrainError(str(e)) from None
        if out[-1].num_rows == 0:
            raise TrainError(f"{p}: token table has no rows")
    return out


def model_config(
    recipe: Recipe, tables: Sequence[TokenTable]
) -> tuple[ModelConfig, dict[str, ModalityRecipe]]:
    """The ModelConfig for ``tables`` under ``recipe`` (adapters from the tables' specs, in table order)."""
    specs: dict[str, Any] = {}
    for t in tables:
        prev = specs.setdefault(t.modality, (t.spec, t.directory))
        if prev[0] != t.spec:
            raise TrainError(
                f"{t.directory}: token spec differs from {prev[1]} (same modality {t.modality!r})"
            )
    mods: dict[str, ModalityRecipe] = {}
    adapters, masking = [], []
    for m, (spec, _) in specs.items():
        mod = recipe.check_table(spec)
        mods[m] = mod
        try:
            adapters.append((m, AdapterConfig.from_spec(spec, **mod.adapter)))
        except (TypeError, ValueError) as e:
            raise RecipeError(recipe.path, f"modality.{mod.modality}.adapter", str(e)) from None
        masking.append((m, mod.masking))
    cfg = ModelConfig(
        encoder=recipe.model.encoder,
        decoder=recipe.model.decoder,
        adapters=tuple(adapters),
        masking=tuple(masking),
    )
    return cfg, mods


def total_steps(recipe: Recipe, tables: Sequence[TokenTable], world_size: int = 1) -> int:
    """Optimiser steps of the run: ``optim.steps``, or ``epochs`` over the tables' rows."""
    o = recipe.optim
    if o.steps is not None:
        return o.steps
    rows = sum(t.num_rows for t in tables)
    return max(1, math.ceil(o.epochs * rows / (o.batch_size * o.accumulation * world_size)))


def peak_lr(recipe: Recipe, world_size: int = 1) -> float:
    """``base_lr * effective batch / 256`` (MAE's linear scaling rule)."""
    o = recipe.optim
    return o.base_lr * o.batch_size * o.accumulation * world_size / 256


def lr_at(step: int, *, peak: float, total: int, warmup: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``peak``, cosine to ``min_lr``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_steps(recipe: Recipe, total: int) -> int:
    o = recipe.optim
    return o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_fraction * total))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and other 1-D parameters or
    mask tokens (MAE's ``param_groups_weight_decay``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("mask_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError as e:
            raise TrainError(f"--device {requested!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {requested!r}: CUDA is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# distributed helpers (no-ops for one process)
# ---------------------------------------------------------------------------------------------
def init_distributed(device_type: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, started_here); initialises torch.distributed under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local, True


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _all_mean(values: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is not None:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _sees_run_dir(out: str) -> bool:
    """Whether this process sees the run directory rank 0 made (its recipe file)."""
    return os.path.isfile(os.path.join(out, RECIPE_FILE))


def _check_shared_run_dir(out: str, device: torch.device) -> None:
    """With several processes, every rank must see the run directory rank 0 made: all ranks write
    their part of each checkpoint into it. Checked once, together (every rank raises TrainError naming
    the ranks that do not see it, and its own rank and machine), before the first step: a ``--out`` on
    each node's local disk would otherwise fail one rank at the first checkpoint, after a checkpoint
    interval of training, while the others wait for it. A tensor all-reduce on the training device, as
    the losses' (no object collective: NCCL would want each rank's CUDA device set for that)."""
    dist = _dist()
    if dist is None:
        return
    import socket

    _barrier()  # rank 0 has written the recipe file
    rank = dist.get_rank()
    blind = torch.zeros(dist.get_world_size(), device=device)
    blind[rank] = 0.0 if _sees_run_dir(out) else 1.0
    dist.all_reduce(blind)
    ranks = [r for r, b in enumerate(blind.tolist()) if b]
    if ranks:
        who = f"rank {ranks[0]} does" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} do"
        raise TrainError(
            f"{out}: {who} not see the run directory that rank 0 made (this is rank {rank} on {socket.gethostname()}): "
            "with workers on several machines, --out must be a folder on storage that every worker sees (a shared "
            "filesystem), not a node's local disk"
        )


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------------
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON (everything else)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files`: an ``optimizer.state_dict()``."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in doc.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_files(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a step touches: torch (CPU, CUDA), the masking generator, numpy, python."""
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    doc = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, doc


def rng_from_files(
    tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any], generator: torch.Generator
) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if "cuda" in tensors and torch.cuda.is_available() and len(tensors["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    name, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, st, gauss = doc["python"]
    random.setstate((v, tuple(st), gauss))


def _step_of(name: str) -> int | None:
    m = re.fullmatch(r"step-(\d+)", name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first: (step, directory)."""
    d = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        step = _step_of(name)
        if step is not None and os.path.isfile(os.path.join(d, name, "state.json")):
            found.append((step, os.path.join(d, name)))
    return sorted(found)


def _write_json(path: str, doc: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


def save_checkpoint(
    run_dir: str,
    *,
    step: int,
    model: MaskedModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
    rank: int,
    world_size: int,
    keep: int,
) -> str:
    """Write ``checkpoints/step-N`` atomically (a temporary directory renamed when complete).

    A refused write (no space left, no permission) raises TrainError naming the checkpoint, with the
    temporary directory removed and the earlier checkpoints kept (``--resume`` continues from the
    newest once there is room)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp")
    try:
        if rank == 0:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        _barrier()
        t, doc = rng_to_files(generator)
        save_file(t, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
        _write_json(os.path.join(tmp, f"rng-rank{rank}.json"), doc)
        _barrier()
        if rank == 0:
            model.save(tmp)
            ot, odoc = optimizer_to_files(optimizer)
            save_file(ot, os.path.join(tmp, "optimizer.safetensors"))
            _write_json(os.path.join(tmp, "optimizer.json"), odoc)
            _write_json(os.path.join(tmp, "state.json"), {**state, "step": step, "world_size": world_size})
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep > 0:
                for _, old in list_checkpoints(run_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(
            f"{final}: cannot write the checkpoint ({_reason(e)}); earlier checkpoints are kept: free space "
            "(or fix the permissions), then continue with --resume"
        ) from None


def _reason(e: BaseException) -> str:
    """An I/O error's reason in a few words: ``strerror`` for an OSError, else its message on one line."""
    return (e.strerror if isinstance(e, OSError) and e.strerror else None) or " ".join(str(e).split())


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
class _StopFlag:
    """Set by SIGTERM/SIGINT (main thread only); the loop checkpoints and stops after the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received signal %d: checkpointing after this step", signum)
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _forever(loader: Any) -> Iterator[TokenBatch]:
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise TrainError("the loader yielded no batch (tables too small for batch_size x world_size?)")


def _read_metrics_until(path: str, step: int) -> None:
    """Drop metric lines after ``step`` (they are redone when resuming from that step)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def _tensorboard(run_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


def _loss(
    obj: Objective, out: Any, batch: TokenBatch, mod: ModalityRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction loss) of one forward pass."""
    if out.log_prob is None:
        rec = obj.loss(out.pred, batch.tokens, out.target_mask)
        return rec, rec
    per = obj.per_token(out.pred, batch.tokens)  # (B, L)
    scored = out.target_mask
    rec = per[scored].mean() if bool(scored.any()) else out.pred.sum() * 0.0
    return rec + mod.policy_weight * policy_loss(out.log_prob, per, scored), rec


def train(
    recipe: Recipe | str,
    tables: Sequence[str],
    out: str,
    *,
    options: RunOptions = RunOptions(),
    overrides: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Pretrain a masked model with ``recipe`` on ``tables``; write the run to ``out``.

    Works alone, under torchrun (DDP) and inside a Ray Train worker (process group already up).
    Raises TrainError / RecipeError for user mistakes.
    """
    from maskloom.pipelines.loader import TokenLoader

    if isinstance(recipe, str):
        recipe = load_recipe(recipe, overrides=overrides)
    elif overrides:
        raise TypeError("overrides need a recipe name or path, not a loaded Recipe")
    if options.max_steps is not None and options.max_steps < 1:
        raise TrainError(f"--max-steps must be >= 1, got {options.max_steps}")
    if options.max_minutes is not None and not options.max_minutes > 0:
        raise TrainError(f"--max-minutes must be > 0, got {options.max_minutes}")
    if options.threads is not None and options.threads < 1:
        raise TrainError(f"--threads must be >= 1, got {options.threads}")
    threads_before = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)  # for this run only: restored on return
    try:
        opened = open_tables(tables)
        cfg, mods = model_config(recipe, opened)
        req_type = pick_device(options.device).type  # TrainError for a device this machine lacks
        rank, world, local_rank, started = init_distributed(req_type)
        try:
            return _train(recipe, opened, out, cfg, mods, options, rank, world, local_rank, TokenLoader)
        finally:
            if started:
                import torch.distributed as dist

                dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads_before)


def _train(
    recipe: Recipe,
    tables: list[TokenTable],
    out: str,
    cfg: ModelConfig,
    mods: dict[str, ModalityRecipe],
    options: RunOptions,
    rank: int,
    world: int,
    local_rank: int,
    loader_cls: type,
) -> TrainResult:
    device = pick_device(options.device, local_rank)
    if rank == 0:
        cpu = (
            f", {torch.get_num_threads()} threads, large Linears on {cpu_matmul()}"
            if device.type == "cpu"
            else ""
        )
        log.info("training on %s%s", device, cpu)
    o, tc = recipe.optim, recipe.train
    total = total_steps(recipe, tables, world)
    warm = warmup_steps(recipe, total)
    peak = peak_lr(recipe, world)
    objectives = {
        m: build_objective(mod.objective, mod.objective_options, spec=t.spec)
        for m, mod in mods.items()
        for t in tables
        if t.modality == m
    }

    # ---- run directory
    recipe_text = recipe.to_toml()
    ckpts = list_checkpoints(out) if rank != 0 else check_run_dir(out, recipe_text, tables, options.resume)
    if rank == 0:
        make_out_dir(out, "run directory")
        with open(os.path.join(out, RECIPE_FILE), "w", encoding="utf-8") as f:
            f.write(recipe_text)
        _write_json(os.path.join(out, TABLES_FILE), [_table_identity(t) for t in tables])
    _check_shared_run_dir(out, device)
    if options.resume and not ckpts:
        log.warning("%s: no checkpoint to resume from; starting from step 0", out)

    # ---- model, optimiser, loader, RNG (seeded identically on every rank; masks differ by rank)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = MaskedModel(cfg).to(device)
    generator = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    # fused AdamW: one kernel for all parameters (on CPU ~10x cheaper than the per-parameter loop)
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=peak, betas=o.betas, fused=device.type in ("cpu", "cuda")
    )
    weights = {m: mods[m].weight for m in mods} if len(mods) > 1 else None
    loader = loader_cls(
        [t.directory for t in tables],
        batch_size=o.batch_size,
        seed=tc.seed,
        rank=rank,
        world_size=world,
        num_workers=options.loader_workers,
        weights=weights,
        pin_memory=device.type == "cuda",
        pack={m: mod.pack for m, mod in mods.items() if mod.pack is not None} or None,
    )
    step = 0
    if options.resume and ckpts:
        step, ck = ckpts[-1]
        model.load_state_dict(load_file(os.path.join(ck, "model.safetensors"), device=str(device)))
        with open(os.path.join(ck, "optimizer.json"), encoding="utf-8") as f:
            odoc = json.load(f)
        optimizer.load_state_dict(
            optimizer_from_files(load_file(os.path.join(ck, "optimizer.safetensors")), odoc)
        )
        with open(os.path.join(ck, "state.json"), encoding="utf-8") as f:
            st = json.load(f)
        if st.get("world_size", 1) != world:
            raise TrainError(f"{ck}: written by {st.get('world_size')} processes, resumed with {world}")
        loader.load_state_dict(st["loader"])
        rpath = os.path.join(ck, f"rng-rank{rank}")
        with open(rpath + ".json", encoding="utf-8") as f:
            rng_from_files(load_file(rpath + ".safetensors"), json.load(f), generator)
        if rank == 0:
            _read_metrics_until(os.path.join(out, METRICS_FILE), step)
        log.info("resumed %s at step %d", ck, step)

    net: torch.nn.Module = model
    if _dist() is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # several modalities (other adapters idle at a step) or learned/adaptive masking leave
        # parameters without gradient at some steps
        unused = len(mods) > 1 or any(m.masking.kind in ("learned", "adaptive") for m in mods.values())
        net = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    if options.compile if options.compile is not None else tc.compile:
        net = torch.compile(net)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if use_bf16
        else contextlib.nullcontext
    )

    # ---- logging
    metrics_path = os.path.join(out, METRICS_FILE)
    metrics_f = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    tb = _tensorboard(out) if rank == 0 else None
    bar = None
    if rank == 0 and options.progress:  # a bar on a terminal, a line every 30 s in a log
        bar = Progress(total, initial=step, desc=f"train {recipe.name}", unit="step")

    batches = _forever(loader)
    losses: list[float] = []
    window: dict[str, list[float]] = {}
    tokens_window, t_window = 0.0, time.perf_counter()
    tokens_all = 0.0
    t0 = time.perf_counter()
    status = "finished"
    net.train()
    try:
        with _StopFlag() as stop:
            while step < total:
                reason = None
                if options.max_steps is not None and step >= options.max_steps:
                    reason = "max_steps"
                elif options.max_minutes is not None and time.perf_counter() - t0 >= 60 * options.max_minutes:
                    reason = "max_minutes"
                elif stop.signal is not None:
                    reason = "interrupted"
                flag = _all_mean(torch.tensor([1.0 if reason else 0.0], device=device))
                if float(flag) > 0:
                    status = reason or "interrupted"
                    break
                lr = lr_at(step, peak=peak, total=total, warmup=warm, min_lr=o.min_lr * peak / o.base_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                step_mods = []
                n_tok = 0
                for micro in range(o.accumulation):
                    batch = next(batches).to(device, non_blocking=True)
                    sync = micro == o.accumulation - 1 or not hasattr(net, "no_sync")
                    ctx = contextlib.nullcontext() if sync else net.no_sync()
                    with ctx:
                        with autocast():
                            out_ = net(batch, generator=generator, progress=step / total)
                        total_loss, rec = _loss(objectives[batch.modality], out_, batch, mods[batch.modality])
                        (total_loss / o.accumulation).backward()
                    step_loss += rec.detach() / o.accumulation
                    step_mods.append(batch.modality)
                    n_tok += int((~batch.padding).sum())
                if o.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
                optimizer.step()
                step += 1
                loss_val = float(_all_mean(step_loss.float()[None]))
                if not math.isfinite(loss_val):
                    raise FloatingPointError(
                        f"step {step}: the loss is {loss_val} (diverged; lower optim.base_lr)"
                    )
                losses.append(loss_val)
                for m in step_mods:  # every rank draws the same modality at a step (loader guarantee)
                    window.setdefault(m, []).append(loss_val)
                tokens_window += n_tok * world
                tokens_all += n_tok * world
                if bar is not None:
                    bar.update(1)
                if step % tc.log_every == 0 or step == total:
                    now = time.perf_counter()
                    rec_ = {
                        "step": step,
                        "loss": sum(sum(v) for v in window.values()) / sum(len(v) for v in window.values()),
                        "lr": lr,
                        "tokens_per_s": tokens_window / max(now - t_window, 1e-9),
                        **{f"loss/{m}": sum(v) / len(v) for m, v in sorted(window.items())},
                        "time": round(now - t0, 3),
                    }
                    window, tokens_window, t_window = {}, 0.0, now
                    if metrics_f is not None:
                        metrics_f.write(json.dumps(rec_) + "\n")
                        metrics_f.flush()
                    if tb is not None:
                        for k, v in rec_.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec_['loss']:.4f}", lr=f"{lr:.2e}")
                if step % tc.checkpoint_every == 0 and step < total:
                    _checkpoint(
                        out, step, model, optimizer, generator, loader, rank, world, tc.keep_checkpoints
                    )
        _checkpoint(out, step, model, optimizer, generator, loader, rank, world, tc.keep_checkpoints)
        if rank == 0:
            try:
                model.save(os.path.join(out, MODEL_DIR))
            except (OSError, SafetensorError) as e:
                raise TrainError(
                    f"{os.path.join(out, MODEL_DIR)}: cannot write the model ({_reason(e)}); the last checkpoint "
                    "is kept: free space, then run the same command with --resume to write it"
                ) from None
        _barrier()
    finally:
        if metrics_f is not None:
            metrics_f.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    n = len(losses)
    if status != "finished":
        log.warning("stopped at step %d of %d (%s); resume with --resume", step, total, status)
    return TrainResult(
        run_dir=out,
        step=step,
        total_steps=total,
        status=status,
        losses=losses,
        seconds=seconds,
        steps_per_second=n / seconds if seconds > 0 else 0.0,
        tokens_per_second=tokens_all / seconds if seconds > 0 else 0.0,
    )


def _checkpoint(
    out: str,
    step: int,
    model: MaskedModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loader: Any,
    rank: int,
    world: int,
    keep: int,
) -> None:
    if step == 0:
        return
    state = {"loader": loader.state_dict(), "scheduler": {"step": step}}
    save_checkpoint(
        out,
        step=step,
        model=model,
        optimizer=optimizer,
        generator=generator,
        state=state,
        rank=rank,
        world_size=world,
        keep=keep,
    )


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------
def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the process group is up (gloo/nccl); run the same loop, rank-sharded loader."""
    import ray.train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    recipe = load_recipe(config["recipe_path"], overrides=config["overrides"])
    options = RunOptions(**config["options"])
    if config["use_gpu"]:
        import ray.train.torch

        options = dataclasses.replace(options, device=str(ray.train.torch.get_device()))
    result = train(recipe, config["tables"], config["out"], options=options)
    metrics = {
        "step": result.step,
        "status": result.status,
        "loss": result.losses[-1] if result.losses else None,
        "steps_per_second": result.steps_per_second,
    }
    if ctx.get_world_rank() == 0:
        from ray.train import Checkpoint

        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(os.path.join(config["out"], MODEL_DIR))
        )
    else:
        ray.train.report(metrics)


def train_ray(
    recipe_name_or_path: str,
    tables: Sequence[str],
    out: str,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    ray_address: str | None = None,
    options: RunOptions = RunOptions(),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run :func:`train` on ``num_workers`` Ray Train workers (``TorchTrainer``; gloo on CPU, nccl on GPU).

    Every worker reads the same tables through the rank-sharded loader and writes to ``out`` (a
    path every worker can reach: local disk on one node, a shared filesystem on a cluster).
    Returns rank 0's final metrics (step, status, loss, steps_per_second).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from maskloom.pipelines.ray_utils import init_ray, shutdown_ray

    if num_workers < 1:
        raise TrainError(f"--num-workers must be >= 1, got {num_workers}")
    recipe = load_recipe(recipe_name_or_path, overrides=overrides)  # validate before starting Ray
    out = os.path.abspath(out)
    check_run_dir(out, recipe.to_toml(), open_tables(tables), options.resume)  # and the run directory
    started = init_ray(ray_address, include_dashboard=None)
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={
                "recipe_path": os.path.abspath(recipe.path),
                "overrides": dict(overrides or {}),
                "tables": [os.path.abspath(t) for t in tables],
                "out": out,
                "options": {**dataclasses.asdict(options), "progress": False},
                "use_gpu": use_gpu,
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=RunConfig(name=f"maskloom-{recipe.name}", storage_path=os.path.join(out, "ray")),
        )
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # Ray Train 2 raises a worker's failure from fit()
            error = e
        if error is not None:
            # a user-side error in a worker (a shard damaged mid-run, say) reaches here as traceback
            # text: one line for it, as without Ray; anything else keeps its traceback
            found = re.findall(r"^maskloom\.[\w.]+\.(?:TrainError|TableError|RecipeError|OutDirError): (.*)$",
                               str(error), re.M)  # fmt: skip
            if found:
                raise TrainError(f"a Ray Train worker stopped: {found[-1]}") from error
            raise error
        return dict(result.metrics or {})
    finally:
        shutdown_ray(started)
