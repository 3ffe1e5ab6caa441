"""Recipe loading: every built-in loads, round-trips, and every mistake names file, key and problem."""

import re

import pytest

from maskloom.recipes.recipe import (
    RecipeError,
    builtin_names,
    load_recipe,
    loads_recipe,
    parse_overrides,
    recipe_path,
)
from maskloom.tokenizers.base import TableSpec

GOOD = """
name = "tiny-image"
[model]
preset = "tiny"
[model.decoder]
dim = 64
depth = 1
heads = 2
[optim]
steps = 10
batch_size = 4
[modality.image]
tokenizer = { image_size = 32, patch_size = 8 }
masking = { kind = "random", ratio = 0.75 }
objective = { name = "mse" }
"""


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_builtins_are_the_documented_set():
    assert builtin_names() == [
        "audiomae",
        "graphmae",
        "mae-image",
        "mae-lm",
        "omni",
        "patchtst",
        "point-mae",
        "sma",
        "videomae",
    ]


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_loads_and_round_trips(name):
    r = load_recipe(name)
    assert r.name == name and r.path.endswith(f"{name}.toml")
    assert loads_recipe(r.to_toml(), path=r.path) == r
    assert all(0 < m.masking.ratio < 1 for m in r.modalities)


def test_builtin_reference_values():
    mae = load_recipe("mae-image")
    m = mae.for_modality("image")
    assert (m.masking.kind, m.masking.ratio, m.objective, m.objective_options) == (
        "random",
        0.75,
        "mse",
        {"norm_pix": True},
    )
    assert mae.optim.betas == (0.9, 0.95) and mae.optim.weight_decay == 0.05 and mae.optim.base_lr == 1.5e-4
    assert (mae.model.decoder.dim, mae.model.decoder.depth, mae.model.decoder.heads) == (512, 8, 16)
    assert mae.model.encoder.dim == 768
    v = load_recipe("videomae").for_modality("video").masking
    assert (v.kind, v.ratio, v.tube_axis) == ("tube", 0.9, 0)
    assert load_recipe("point-mae").modalities[0].objective == "chamfer"
    assert load_recipe("graphmae").modalities[0].objective_options == {"gamma": 2.0}
    omni = load_recipe("omni")
    assert len(omni.modalities) == 7 and omni.model.preset == "tiny"


def test_good_recipe_and_star_section(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.optim.steps == 10 and r.model.decoder.dim == 64 and r.model.encoder.dim == 128
    assert r.for_modality("image").tokenizer == {"image_size": 32, "patch_size": 8}
    with pytest.raises(RecipeError, match=r"no section for modality 'text' \(recipe has: image\)"):
        r.for_modality("text")
    sma = load_recipe("sma")
    assert sma.for_modality("text").modality == "text" and sma.for_modality("text").masking.kind == "learned"


def test_overrides(tmp_path):
    p = write(tmp_path, GOOD)
    r = load_recipe(
        p, overrides={"optim.steps": "25", "modality.image.masking.ratio": 0.5, "model.preset": "small"}
    )
    assert r.optim.steps == 25 and r.for_modality("image").masking.ratio == 0.5 and r.model.encoder.dim == 384
    assert parse_overrides(["optim.base_lr=1e-3", "model.preset=tiny", "optim.betas=[0.9, 0.99]"]) == {
        "optim.base_lr": 1e-3,
        "model.preset": "tiny",
        "optim.betas": [0.9, 0.99],
    }
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_overrides(["optim.steps"])
    with pytest.raises(RecipeError, match=re.escape(f"{p}: optim.stepz: unknown key; valid keys in [optim]")):
        load_recipe(p, overrides={"optim.stepz": 3})


BAD = [
    # (edit: (old, new) replacing text in GOOD, expected "key: problem" fragment)
    (
        ('name = "tiny-image"', 'name = "x"\nflavour = 1'),
        "flavour: unknown key; valid keys: description, modality, model",
    ),
    (
        ("steps = 10", "steps = 10\nlr = 3"),
        "optim.lr: unknown key; valid keys in [optim]: accumulation, base_lr",
    ),
    (("batch_size = 4", 'batch_size = "big"'), "optim.batch_size: expected an integer, got a string 'big'"),
    (("batch_size = 4", "batch_size = 4.5"), "optim.batch_size: expected an integer, got a number 4.5"),
    (("steps = 10", "steps = 10\nepochs = 2"), "optim: set exactly one of steps and epochs"),
    (("ratio = 0.75", "ratio = 1.5"), "modality.image.masking.ratio: must lie in (0, 1), got 1.5"),
    (("ratio = 0.75", "ratio = 0"), "modality.image.masking.ratio: must lie in (0, 1), got 0"),
    (
        ('kind = "random"', 'kind = "checkerboard"'),
        "modality.image.masking.kind: unknown masking kind 'checkerboard'; known: random, tube, block, learned, adaptive",
    ),
    (('kind = "random"', 'kind = "random", span = 3'), "modality.image.masking.span: unknown key"),
    (
        ('name = "mse"', 'name = "l1"'),
        "modality.image.objective.name: unknown objective 'l1'; known: auto, chamfer",
    ),
    (
        ('name = "mse"', 'name = "mse", norm_pix = "yes"'),
        "modality.image.objective.norm_pix: expected a boolean, got a string 'yes'",
    ),
    (('name = "mse"', 'name = "sce", gamma = 0.5'), "modality.image.objective: gamma must be >= 1, got 0.5"),
    (
        ('objective = { name = "mse" }', "objective = { norm_pix = true }"),
        "modality.image.objective.name: required",
    ),
    (
        ('preset = "tiny"', 'preset = "huge"'),
        "model.preset: unknown preset 'huge'; known: tiny, small, base, large",
    ),
    (("dim = 64", "dim = 65"), "model.decoder: dim 65 not divisible by heads 2"),
    (("[modality.image]", "[modality.smell]"), "modality.smell: unknown modality 'smell'; registered:"),
    (
        ("patch_size = 8 }", "patch_size = 7 }"),
        "modality.image.tokenizer: image_size (32) must be a multiple of patch_size (7)",
    ),
    (("patch_size = 8 }", "patch_sise = 8 }"), "modality.image.tokenizer.patch_sise: unknown key"),
    (
        ("[modality.image]", "[modality.image]\nadapter = { token_dim = 3 }"),
        "modality.image.adapter.token_dim: comes from the token table's spec; it cannot be set",
    ),
    (
        ("[modality.image]", "[modality.image]\nweight = -1"),
        "modality.image.weight: expected a number > 0, got -1",
    ),
    (
        ("[optim]\nsteps = 10\nbatch_size = 4", "[train]\nseed = 1"),
        "optim: required table [optim] is missing",
    ),
    (
        ('preset = "tiny"', 'preset = "tiny"\nencoder = 3'),
        "model.encoder: expected a table, got an integer 3",
    ),
    (
        ("[model.decoder]", "[model.encoder]\nheads = 3\n[model.decoder]"),
        "model.encoder: dim 128 not divisible by heads 3",
    ),
    (('name = "tiny-image"', "name = "), "not valid TOML"),
    (
        ("[modality.image]", "[modality.image]\npack = 0"),
        "modality.image.pack: expected a number of tokens >= 1, got 0",
    ),
    (
        (
            'masking = { kind = "random", ratio = 0.75 }',
            'masking = { kind = "block", ratio = 0.75 }\npack = 64',
        ),
        "modality.image.pack: packed batches need random masking; this modality uses 'block'",
    ),
]


@pytest.mark.parametrize(("edit", "fragment"), BAD, ids=[b[1][:40] for b in BAD])
def test_validation_errors_name_file_and_key(tmp_path, edit, fragment):
    old, new = edit
    assert old in GOOD
    p = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and fragment in msg, msg


def test_pack_is_kept_and_round_trips(tmp_path):
    p = write(tmp_path, GOOD.replace("[modality.image]", "[modality.image]\npack = 64", 1))
    r = load_recipe(p)
    assert r.modalities[0].pack == 64 and r.to_dict()["modality"]["image"]["pack"] == 64
    assert load_recipe(write(tmp_path, GOOD, "plain.toml")).modalities[0].pack is None
    assert "pack" not in load_recipe(write(tmp_path, GOOD, "plain.toml")).to_dict()["modality"]["image"]


def test_missing_recipe_names_builtins(tmp_path):
    with pytest.raises(RecipeError, match="no such built-in recipe or file; built-ins: audiomae, graphmae"):
        recipe_path("mae-imagee")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(str(tmp_path / "nope.toml"))
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))  # not UTF-8
    with pytest.raises(RecipeError) as e:
        load_recipe(str(tmp_path / "latin1.toml"))
    assert str(e.value) == (
        f"{tmp_path / 'latin1.toml'}: not valid TOML ('utf-8' codec can't decode byte 0xe9 in position 11: "
        "invalid continuation byte)"
    )


def test_check_table_objective_against_spec(tmp_path):
    text = (
        GOOD.replace("[modality.image]", '[modality."*"]')
        .replace("tokenizer = { image_size = 32, patch_size = 8 }\n", "")
        .replace('name = "mse"', 'name = "chamfer"')
    )
    r = load_recipe(write(tmp_path, text))
    ids = TableSpec(
        modality="text",
        token_kind="discrete",
        token_dim=1,
        token_dtype="int32",
        vocab_size=9,
        position_axes=("index",),
        position_kind="grid",
    )
    with pytest.raises(
        RecipeError, match=r"modality\.\*\.objective: objective 'chamfer' needs continuous tokens"
    ):
        r.check_table(ids)
    with pytest.raises(RecipeError, match="has no tokenizer"):
        load_recipe(write(tmp_path, GOOD.replace("[modality.image]", '[modality."*"]'), "s.toml"))


def test_steps_override_replaces_epochs_and_back():
    from maskloom.recipes.recipe import load_recipe

    r = load_recipe("mae-image", overrides={"optim.steps": 500, "model.preset": "tiny"})
    assert r.optim.steps == 500 and r.optim.epochs is None
    r = load_recipe("omni", overrides={"optim.epochs": 2})
    assert r.optim.epochs == 2 and r.optim.steps is None
