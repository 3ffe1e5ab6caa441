"""Recipes: declarative, validated, copyable TOML files that pick a combination of parts.

A recipe binds, for each modality it trains on, a tokenizer configuration (used by
``maskloom preprocess``), adapter options, a masking strategy and an objective; and, for the whole
run, a backbone preset (+ decoder), the optimisation and the training loop settings. It never
defines model code (torchtitan's recipes are the model: they only choose components).

File layout (every table and key is optional unless marked; see ``builtin/*.toml``)::

    name = "mae-image"                       # required
    description = "..."
    [model]        preset = "base"           # required: tiny | small | base | large
    [model.encoder]  ...                     # EncoderConfig fields overriding the preset
    [model.decoder]  kind, dim, depth, heads, reconstruct_fraction, ...
    [optim]        base_lr, batch_size, steps | epochs, warmup_steps | warmup_fraction, ...
    [train]        seed, log_every, checkpoint_every, keep_checkpoints, compile, precision
    [modality.image]                         # one table per modality; "*" matches any table
    weight = 1.0                             # share of steps when several modalities are mixed
    pack = 256                               # optional: pack batches into rows of <= 256 tokens
    tokenizer = { patch_size = 16 }          # the modality's tokenizer Config
    adapter = { input_norm = true }          # AdapterConfig fields beyond the table's spec
    masking = { kind = "random", ratio = 0.75 }   # MaskingConfig fields (+ policy_weight)
    objective = { name = "mse", norm_pix = true } # an objective name + its Config fields

Loading (:func:`load_recipe`) checks every key and value and names the file, the key and the
problem for any mistake; ``overrides`` ({"optim.steps": 100}) are applied before validation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from maskloom.backbone.config import (
    MASKING_KINDS,
    PRESETS,
    AdapterConfig,
    DecoderConfig,
    EncoderConfig,
    MaskingConfig,
)
from maskloom.recipes.objectives import OBJECTIVES, ObjectiveError
from maskloom.tokenizers.base import TOKENIZERS, TableSpec

ANY_MODALITY = "*"
"""The modality key that matches a table of any modality (SMA)."""

_ADAPTER_RESERVED = ("token_kind", "token_dim", "vocab_size", "position_dim", "position_kind")


class RecipeError(ValueError):
    """A recipe mistake: names the file, the key and the problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------
# the typed recipe
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimisation: AdamW, warm-up + cosine, learning rate scaled by the effective batch size."""

    base_lr: float = 1.5e-4
    """Learning rate per 256 samples: lr = base_lr * batch_size * accumulation * world_size / 256 (MAE)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay, per 256 samples like base_lr."""
    batch_size: int = 256
    """Samples per process per micro-step (the loader's batch)."""
    accumulation: int = 1
    """Micro-steps accumulated into one optimiser step."""
    steps: int | None = None
    """Optimiser steps of the whole run; exactly one of steps and epochs is set."""
    epochs: float | None = None
    """Passes over the tables (summed rows) instead of steps."""
    warmup_steps: int | None = None
    """Linear warm-up length in steps; None = warmup_fraction of the run."""
    warmup_fraction: float = 0.05
    """Warm-up as a share of the run when warmup_steps is not set (MAE: 40 of 800 epochs)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to norms, biases, mask tokens and embeddings' biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (MAE: 0.95 for the second moment)."""
    clip_grad: float = 0.0
    """Clip the gradient norm to this value; 0 = no clipping."""

    def __post_init__(self) -> None:
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"min_lr must lie in [0, base_lr], got {self.min_lr}")
        if self.batch_size < 1 or self.accumulation < 1:
            raise ValueError("batch_size and accumulation must be >= 1")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("weight_decay and clip_grad must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop's settings (the command line can cap steps and time on top)."""

    seed: int = 0
    """Seed of parameters, masking, dropout and the loader's shuffling."""
    log_every: int = 10
    """Write a metrics line (and advance the progress bar's postfix) every this many steps."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints (0 = keep all)."""
    compile: bool = False
    """Run the model through torch.compile."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 elsewhere."""

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 0:
            raise ValueError("log_every and checkpoint_every must be >= 1, keep_checkpoints >= 0")


@dataclass(frozen=True, kw_only=True)
class ModalityRecipe:
    """What one modality contributes: tokenizer, adapter options, masking, objective, mixing weight."""

    modality: str
    """A registered modality, or "*" for tables of any modality."""
    weight: float = 1.0
    """Relative share of steps (batches) of this modality when several are mixed."""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """The tokenizer Config fields (preprocessing)."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """AdapterConfig fields beyond those given by the table's spec (input_norm, position_encoding ...)."""
    masking: MaskingConfig = MaskingConfig()
    """How tokens are hidden from the encoder."""
    policy_weight: float = 1e-4
    """Weight of the AdaMAE policy term (adaptive masking only)."""
    objective: str = "mse"
    """Registered objective name."""
    objective_options: dict[str, Any] = field(default_factory=dict)
    """The objective's Config fields."""
    pack: int | None = None
    """Pack each batch's samples into rows of at most this many tokens (``LoaderConfig.pack``): for
    short, uneven samples such as small graphs. Needs random masking."""


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """The backbone: an encoder preset (+ field overrides) and a decoder."""

    preset: str
    """tiny | small | base | large."""
    encoder: EncoderConfig
    """The preset with the overrides applied."""
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    """EncoderConfig fields set in [model.encoder]."""
    decoder: DecoderConfig = DecoderConfig()
    """The decoder."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated recipe."""

    name: str
    """The recipe's name."""
    description: str = ""
    """One paragraph for people."""
    path: str = "<memory>"
    """The file it was loaded from."""
    model: ModelRecipe
    """Backbone."""
    optim: OptimConfig
    """Optimisation."""
    train: TrainConfig = TrainConfig()
    """Loop settings."""
    modalities: tuple[ModalityRecipe, ...]
    """One entry per modality (order as in the file)."""

    def for_modality(self, modality: str) -> ModalityRecipe:
        """The section for ``modality``: its own, else the "*" one; RecipeError if neither."""
        by = {m.modality: m for m in self.modalities}
        if modality in by:
            return by[modality]
        if ANY_MODALITY in by:
            return dataclasses.replace(by[ANY_MODALITY], modality=modality)
        raise RecipeError(
            self.path,
            "modality",
            f"no section for modality {modality!r} (recipe has: {', '.join(by)}); add [modality.{modality}]",
        )

    def check_table(self, spec: TableSpec) -> ModalityRecipe:
        """The modality section for a table of ``spec``, with its objective checked against the spec."""
        mod = self.for_modality(spec.modality)
        try:
            OBJECTIVES.get(mod.objective)(dict(mod.objective_options), spec=spec)
        except (ObjectiveError, ValueError) as e:
            raise RecipeError(self.path, f"modality.{mod_key(mod, self)}.objective", str(e)) from None
        return mod

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as TOML-ready data (load_recipe of its dump gives an equal recipe)."""
        d: dict[str, Any] = {"name": self.name, "description": self.description}
        d["model"] = {
            "preset": self.model.preset,
            "encoder": dict(self.model.encoder_overrides),
            "decoder": dataclasses.asdict(self.model.decoder),
        }
        d["optim"] = _asdict(self.optim)
        d["train"] = _asdict(self.train)
        d["modality"] = {}
        for m in self.modalities:
            masking = _asdict(m.masking)
            if m.masking.kind == "adaptive":
                masking["policy_weight"] = m.policy_weight
            d["modality"][m.modality] = {
                "weight": m.weight,
                "tokenizer": dict(m.tokenizer),
                "adapter": dict(m.adapter),
                "masking": masking,
                "objective": {"name": m.objective, **m.objective_options},
            }
            if m.pack is not None:
                d["modality"][m.modality]["pack"] = m.pack
        return d

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def summary(self) -> str:
        """One line: name, modality, masking, objective, preset."""
        mods = self.modalities
        modality = mods[0].modality if len(mods) == 1 else f"{len(mods)} modalities"
        if len(mods) == 1 and mods[0].modality == ANY_MODALITY:
            modality = "any"
        kinds = sorted({f"{m.masking.kind} {m.masking.ratio:g}" for m in mods})
        objs = sorted({m.objective for m in mods})
        masking = kinds[0] if len(kinds) == 1 else "mixed"
        return f"{self.name:<10} {modality:<14} {masking:<14} {'/'.join(objs):<30} {self.model.preset}"


def mod_key(mod: ModalityRecipe, recipe: Recipe) -> str:
    names = {m.modality for m in recipe.modalities}
    return mod.modality if mod.modality in names else ANY_MODALITY


def _asdict(obj: Any) -> dict[str, Any]:
    """A config dataclass as TOML-ready data: None values dropped (TOML has no null), tuples as lists."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin")


def builtin_names() -> list[str]:
    """Names of the built-in recipes (files ``builtin/<name>.toml``)."""
    files = resources.files("maskloom.recipes").joinpath("builtin")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def recipe_path(name_or_path: str) -> str:
    """The file of a built-in recipe name, or ``name_or_path`` itself when it is a file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        raise RecipeError(name_or_path, "", "no such recipe file")
    p = os.path.join(BUILTIN_DIR, f"{name_or_path}.toml")
    if not os.path.isfile(p):
        raise RecipeError(
            name_or_path, "", f"no such built-in recipe or file; built-ins: {', '.join(builtin_names())}"
        )
    return p


def load_recipe(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe from a built-in name or a TOML file.

    ``overrides`` maps dotted keys to values (``{"optim.steps": 100, "model.preset": "tiny"}``);
    string values are parsed as TOML values when they look like one (``"0.5"`` -> 0.5).
    Raises :class:`RecipeError` naming the file, the key and the problem.
    """
    path = recipe_path(name_or_path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # tomllib reads UTF-8 only
        raise RecipeError(path, "", f"not valid TOML ({e})") from None
    for key, value in (overrides or {}).items():
        # optim takes exactly one of steps and epochs: overriding one replaces the other
        other = {"optim.steps": "epochs", "optim.epochs": "steps"}.get(key.strip())
        if other and isinstance(data.get("optim"), dict):
            data["optim"].pop(other, None)
        _set_dotted(data, key, _parse_value(value), path)
    return recipe_from_dict(data, path=path)


def loads_recipe(text: str, *, path: str = "<string>") -> Recipe:
    """Validate a recipe given as TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(path, "", f"not valid TOML ({e})") from None
    return recipe_from_dict(data, path=path)


def parse_overrides(items: list[str] | None, *, where: str = "--set") -> dict[str, Any]:
    """``["optim.steps=100", "model.preset=tiny"]`` -> ``{"optim.steps": 100, "model.preset": "tiny"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(where, item, "expected KEY=VALUE (e.g. optim.steps=100)")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # a bare string


def _set_dotted(data: dict[str, Any], key: str, value: Any, path: str) -> None:
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise RecipeError(path, ".".join(parts[: i + 1]), f"override {key!r}: not a table")
        node = nxt
    node[parts[-1]] = value


_TOP = {"name", "description", "model", "optim", "train", "modality"}
_MODALITY_KEYS = {"weight", "pack", "tokenizer", "adapter", "masking", "objective"}


def recipe_from_dict(data: Mapping[str, Any], *, path: str = "<memory>") -> Recipe:
    """Validate raw recipe data (from TOML) into a :class:`Recipe`."""
    _no_unknown(data, _TOP, "", path)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(path, "name", "required: a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(path, "description", f"expected a string, got {_tname(description)}")

    # ---- model
    model = _table(data, "model", path, required=True)
    _no_unknown(model, {"preset", "encoder", "decoder"}, "model", path)
    preset = model.get("preset")
    if preset not in PRESETS:
        raise RecipeError(path, "model.preset", f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    enc_over = _table(model, "encoder", path, prefix="model")
    _check_fields(EncoderConfig, enc_over, "model.encoder", path)
    encoder = _construct(
        lambda: dataclasses.replace(PRESETS[preset], **_tuples(enc_over)), "model.encoder", path
    )
    dec = _table(model, "decoder", path, prefix="model")
    decoder = _build(DecoderConfig, dec, "model.decoder", path)
    model_recipe = ModelRecipe(
        preset=preset, encoder=encoder, encoder_overrides=dict(enc_over), decoder=decoder
    )

    optim = _build(OptimConfig, _table(data, "optim", path, required=True), "optim", path)
    train = _build(TrainConfig, _table(data, "train", path), "train", path)

    # ---- modalities
    mods_raw = _table(data, "modality", path, required=True)
    if not mods_raw:
        raise RecipeError(path, "modality", "at least one [modality.NAME] table is required")
    modalities = tuple(_modality(m, v, path) for m, v in mods_raw.items())
    return Recipe(
        name=name,
        description=description,
        path=path,
        model=model_recipe,
        optim=optim,
        train=train,
        modalities=modalities,
    )


def _modality(name: str, raw: Any, path: str) -> ModalityRecipe:
    key = f"modality.{name}"
    if not isinstance(raw, dict):
        raise RecipeError(path, key, f"expected a table, got {_tname(raw)}")
    _no_unknown(raw, _MODALITY_KEYS, key, path)
    if name != ANY_MODALITY and name not in TOKENIZERS:
        raise RecipeError(
            path, key, f'unknown modality {name!r}; registered: {", ".join(TOKENIZERS.names())} (or "*")'
        )
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise RecipeError(path, f"{key}.weight", f"expected a number > 0, got {weight!r}")

    tok = _table(raw, "tokenizer", path, prefix=key)
    if name == ANY_MODALITY:
        if tok:
            raise RecipeError(
                path, f"{key}.tokenizer", 'the "*" section matches any table; it has no tokenizer'
            )
    else:
        cfg_cls = TOKENIZERS.get(name).Config
        _build(cfg_cls, tok, f"{key}.tokenizer", path)

    adapter = _table(raw, "adapter", path, prefix=key)
    reserved = sorted(set(adapter) & set(_ADAPTER_RESERVED))
    if reserved:
        raise RecipeError(
            path, f"{key}.adapter.{reserved[0]}", "comes from the token table's spec; it cannot be set"
        )
    adapter = _check_fields(AdapterConfig, adapter, f"{key}.adapter", path, skip=_ADAPTER_RESERVED)

    masking_raw = dict(_table(raw, "masking", path, prefix=key))
    policy_weight = masking_raw.pop("policy_weight", 1e-4)
    if isinstance(policy_weight, bool) or not isinstance(policy_weight, int | float) or policy_weight < 0:
        raise RecipeError(
            path, f"{key}.masking.policy_weight", f"expected a number >= 0, got {policy_weight!r}"
        )
    if "kind" in masking_raw and masking_raw["kind"] not in _masking_kinds():
        raise RecipeError(
            path,
            f"{key}.masking.kind",
            f"unknown masking kind {masking_raw['kind']!r}; known: {', '.join(_masking_kinds())}",
        )
    ratio = masking_raw.get("ratio", MaskingConfig().ratio)
    if not isinstance(ratio, bool) and isinstance(ratio, int | float) and not 0 < ratio < 1:
        raise RecipeError(path, f"{key}.masking.ratio", f"must lie in (0, 1), got {ratio}")
    masking = _build(MaskingConfig, masking_raw, f"{key}.masking", path)
    pack = raw.get("pack")
    if pack is not None:
        if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
            raise RecipeError(path, f"{key}.pack", f"expected a number of tokens >= 1, got {pack!r}")
        if masking.kind != "random":
            raise RecipeError(
                path,
                f"{key}.pack",
                f"packed batches need random masking; this modality uses {masking.kind!r}",
            )

    obj = dict(_table(raw, "objective", path, prefix=key))
    obj_name = obj.pop("name", None)
    if obj_name is None:
        raise RecipeError(
            path, f"{key}.objective.name", f"required; known objectives: {', '.join(OBJECTIVES.names())}"
        )
    if obj_name not in OBJECTIVES:
        raise RecipeError(
            path,
            f"{key}.objective.name",
            f"unknown objective {obj_name!r}; known: {', '.join(OBJECTIVES.names())}",
        )
    _build(OBJECTIVES.get(obj_name).Config, obj, f"{key}.objective", path)
    return ModalityRecipe(
        modality=name,
        weight=float(weight),
        tokenizer=dict(tok),
        adapter=dict(adapter),
        masking=masking,
        policy_weight=float(policy_weight),
        objective=obj_name,
        objective_options=obj,
        pack=pack,
    )


def _masking_kinds() -> tuple[str, ...]:
    return MASKING_KINDS


def _table(d: Mapping[str, Any], key: str, path: str, *, prefix: str = "", required: bool = False) -> dict:
    full = f"{prefix}.{key}" if prefix else key
    if key not in d:
        if required:
            raise RecipeError(path, full, f"required table [{full}] is missing")
        return {}
    v = d[key]
    if not isinstance(v, dict):
        raise RecipeError(path, full, f"expected a table, got {_tname(v)} {v!r}")
    return v


def _no_unknown(d: Mapping[str, Any], known: set[str], where: str, path: str) -> None:
    for k in d:
        if k not in known:
            full = f"{where}.{k}" if where else k
            raise RecipeError(
                path,
                full,
                f"unknown key; valid keys{' in [' + where + ']' if where else ''}: "
                f"{', '.join(sorted(known))}",
            )


def _tname(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check a TOML value against a (simple) annotation; return (ok, converted value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            conv = [_type_ok(x, args[0]) for x in value]
        else:
            if len(args) != len(value):
                return False, value
            conv = [_type_ok(x, a) for x, a in zip(value, args)]
        return all(ok for ok, _ in conv), tuple(v for _, v in conv)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, dict), value
    if origin is list:
        return isinstance(value, list), value
    return True, value  # anything fancier: leave it to the dataclass' own checks


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}.get(
            tp.__name__, tp.__name__
        )
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def _check_fields(
    cls: type, d: Mapping[str, Any], where: str, path: str, *, skip: tuple[str, ...] = ()
) -> dict:
    """Unknown keys and value types of ``d`` against dataclass ``cls``; return converted values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    out = {}
    for k, v in d.items():
        if k not in names:
            raise RecipeError(
                path, f"{where}.{k}", f"unknown key; valid keys in [{where}]: {', '.join(sorted(names))}"
            )
        ok, conv = _type_ok(v, hints[k])
        if not ok:
            raise RecipeError(path, f"{where}.{k}", f"expected {_describe(hints[k])}, got {_tname(v)} {v!r}")
        out[k] = conv
    return out


def _construct(fn, where: str, path: str) -> Any:
    try:
        return fn()
    except (TypeError, ValueError) as e:
        msg = str(e)
        for prefix in ("MaskingConfig: ", "DecoderConfig: ", "EncoderConfig: ", "AdapterConfig: "):
            msg = msg.removeprefix(prefix)
        raise RecipeError(path, where, msg) from None


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _build(cls: type, d: Mapping[str, Any], where: str, path: str) -> Any:
    kw = _check_fields(cls, d, where, path)
    return _construct(lambda: cls(**kw), where, path)


# ---------------------------------------------------------------------------------------------
# writing (the resolved recipe of a run)
# ---------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else _toml_value(k)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write nested dicts of TOML-able values (no None) as TOML text; tables after plain keys."""
    lines: list[str] = []

    def emit(d: Mapping[str, Any], prefix: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{'.'.join(_toml_key(p) for p in prefix)}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, [*prefix, k])

    emit(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"
