"""Write the ViTmiX recipe grid: every 1-, 2- and 3-way combination of gradcam, lrp, saliency and rollout, fused
by geometric mean at the model's input resolution and thresholded by Otsu, with no refinement (ViTmiX slides,
shared/papers/001). Run from the repository root: ``python scripts/make_vitmix_recipes.py``."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

METHODS = ("gradcam", "lrp", "saliency", "rollout")
OUT = Path(__file__).resolve().parents[1] / "recipes" / "vitmix"


def recipe(names: tuple[str, ...]) -> str:
    tables = "\n".join(f"[explainers.{n}]" for n in names)
    return f'''# ViTmiX grid: {" x ".join(names)} ({len(names)}-way), written by scripts/make_vitmix_recipes.py
name = "vitmix-{"+".join(names)}"
description = "ViTmiX ablation: geometric mean of {", ".join(names)}, Otsu threshold, no refinement"

{tables}

[fusion]
method = "geometric"
grid = "input"

[threshold]
method = "otsu"

[refine]
method = "none"
'''


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for k in (1, 2, 3):
        for names in combinations(METHODS, k):
            (OUT / f"{'+'.join(names)}.toml").write_text(recipe(names))


if __name__ == "__main__":
    main()
