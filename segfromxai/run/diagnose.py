"""Why a run gave no mask at all: the likely cause, read from the resolved recipe and the run's counts.

A run whose every image ends without a mask still exits 0 (it wrote a valid, empty dataset); :func:`empty_run_cause`
gives the line the CLI prints as a warning and ``run.json`` keeps under ``warnings["no_mask"]``.
"""

from __future__ import annotations

from typing import Any

CONSTANT_EXPLAINERS = frozenset({"uniform"})
"""Explainers whose map is the same number on every token (no explanation is read)."""


def _ncut_cause(recipe: dict[str, Any], constant: bool) -> str:
    refine, features = recipe["refine"], recipe.get("features", {})
    if refine.get("foreground") in ("eigvec", "corners"):
        tau = (f"its tau_quantile {refine['tau_quantile']}" if refine.get("tau_quantile") is not None
               else f"tau = {refine.get('tau')}")
        fix = "a [refine] tau_quantile" if features.get("drop_key_bias") else (
            "[features] drop_key_bias = true (keys with a large shared bias, as DINOv2's, do this) or a [refine] "
            "tau_quantile")
        return ("the ncut graph most likely had no cut: every pair of token features was more similar than "
                f"{tau}, so the graph was complete; try {fix}")
    if constant:
        return ("the fused map was constant (its explainers read no explanation), so the threshold kept every "
                "token or none, and ncut's explanation-guided side had nothing to choose by: use foreground = "
                "\"eigvec\" or \"corners\", or an explainer")
    return ("the threshold kept no token of the feature grid, or every cut's foreground side missed the thresholded "
            "explanation")


def empty_run_cause(recipe: dict[str, Any], counts: dict[str, int]) -> str | None:
    """The warning for a run in which no image got a mask, naming the likely cause; ``None`` when some image did
    (``counts["labelled"] > 0``) or none was labelled or skipped.

    Parameters
    ----------
    recipe : the resolved recipe (:meth:`segfromxai.recipe.recipe.Recipe.to_dict`)
    counts : the run summary's counts (``labelled``, ``no_mask``, ``skipped``, ``failed``)
    """
    if counts.get("labelled", 0) or not (counts.get("no_mask", 0) or counts.get("skipped", 0)):
        return None
    head = f"no image got a mask ({counts.get('no_mask', 0)} without a mask, {counts.get('skipped', 0)} skipped)"
    if not counts.get("no_mask", 0):
        return (f"{head}: every image was skipped, below [output] min_confidence = "
                f"{recipe['output']['min_confidence']} or without a label")
    if "student" in recipe:  # a student's labels (segfromxai student predict): no explanation, no cut
        return (f"{head}: the student predicted background everywhere, or [masks] min_area = "
                f"{recipe.get('masks', {}).get('min_area')} removed every mask")
    constant = set(recipe.get("explainers", {})) <= CONSTANT_EXPLAINERS
    if recipe["refine"]["method"] == "ncut":
        cause = _ncut_cause(recipe, constant)
    elif constant:
        cause = "the fused map was constant (its explainers read no explanation), so the threshold kept nothing"
    else:
        cause = f"the threshold ({recipe['threshold']['method']}) kept nothing"
    masks = recipe.get("masks", {})
    return f"{head}: {cause} (or [masks] min_area = {masks.get('min_area')} removed every mask)"
