"""Recipes: TOML into frozen dataclasses, every value checked against its function's declaration (``recipe``), and
the checks of a recipe against the model it will run on, made before any image is read (``checks``).

May import everything below it: the base modules, ops, io, models, explainers and stages.
"""
