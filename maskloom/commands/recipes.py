"""`maskloom recipes`: list the built-in recipes, one line each; ``--show NAME`` prints a file to copy.

A new recipe is a copy of a built-in: ``maskloom recipes --show mae-image > my.toml``, edit it, then
``maskloom train my.toml ...``. ``--check FILE`` validates a recipe file without training.
"""

from __future__ import annotations

import argparse
import sys

from maskloom.recipes.recipe import RecipeError, builtin_names, load_recipe, recipe_path

HELP = "list the built-in recipes (name, modality, masking, objective, preset); --show NAME prints one"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show", metavar="NAME", help="print the TOML file of a built-in recipe (copy and edit it)"
    )
    parser.add_argument(
        "--check", metavar="FILE", help="validate a recipe file (or built-in name) and summarise it"
    )


def _error(msg: str) -> int:
    print(f"maskloom recipes: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.show:
        try:
            path = recipe_path(args.show)
        except RecipeError as e:
            return _error(str(e))
        with open(path, encoding="utf-8") as f:
            sys.stdout.write(f.read())
        return 0
    if args.check:
        try:
            r = load_recipe(args.check)
        except RecipeError as e:
            return _error(str(e))
        print(f"{r.path}: ok")
        print(r.summary())
        return 0
    print(f"{'NAME':<10} {'MODALITY':<14} {'MASKING':<14} {'OBJECTIVE':<30} PRESET")
    status = 0
    for name in builtin_names():
        try:
            print(load_recipe(name).summary())
        except RecipeError as e:  # a built-in whose modality is not installed: say so, list the rest
            print(f"{name:<10} (unavailable: {e.problem})")
            status = 1
    return status
