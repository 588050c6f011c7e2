"""Recipes: whole jobs written with the layers below (sample-score-pick preference pairs, the one-command demo).

The top library layer, under `cli.py` only: a recipe may use trainers, evaluation, sampling, data and models.
"""
