"""Recipes: objectives, recipe definitions, training, evaluation, visualisation."""
