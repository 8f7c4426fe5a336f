"""Build the shipped LLaVA-1.5-7B recipes (recipes/llava-1.5-7b/*.json) from the published file.

The published file maps a labelled FLOPs reduction in percent ("60") to per-layer deletion
counts. Each non-empty entry becomes one recipe in our format: ``budget`` is the label / 100,
``flops_reduction`` is what our reference FLOPs model computes from the counts (it can differ
from the label: see the printed table), ``fit`` records the provenance only (the fitting
alpha and calibration set are not published). Labels absent from the file are not invented.

    python benchmarks/make_shipped_recipes.py [--published PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fitprune_fx.recipe import FORMAT, Recipe

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_NAME = "llava-1.5-7b-published-recipes.json"
DEFAULT_PUBLISHED = REPO / "benchmarks" / "data" / PUBLISHED_NAME  # copy of shared/reference
DEFAULT_OUT = REPO / "recipes" / "llava-1.5-7b"
MODEL_KEYS = ("name", "num_layers", "num_visual_tokens", "hidden_size", "intermediate_size")
SOURCE = (
    "published FitPrune recipe for LLaVA-1.5-7B (per-layer counts from the authors' code, "
    "arXiv 2409.10197); budget is the published label"
)


def build_recipes(published: dict) -> dict[str, Recipe]:
    """One Recipe per non-empty published label, keyed by the label string ("60")."""
    model = {k: published["model"][k] for k in MODEL_KEYS}
    recipes = {}
    for label, prune in sorted(published["recipes"].items(), key=lambda kv: float(kv[0])):
        if not prune:  # "0" is the unpruned model, nothing to ship
            continue
        recipe = Recipe.from_dict(
            {
                "format": FORMAT,
                "model": model,
                "scorer": "fitprune",
                "prune": prune,
                "budget": float(label) / 100,
                "fit": {"source": SOURCE},
            }
        )
        recipes[label] = dataclasses.replace(recipe, flops_reduction=round(recipe.reference_reduction(), 4))
    return recipes


def main(argv: list[str] | None = None) -> int:
    """Write ``<out>/<label>.json`` for every published label and print label vs computed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, default=DEFAULT_PUBLISHED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.published.is_file():
        print(f"published recipes not found at {args.published}: pass --published", file=sys.stderr)
        return 2
    published = json.loads(args.published.read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    for label, recipe in build_recipes(published).items():
        recipe.to_json(args.out / f"{label}.json")
        print(
            f"{label:>3}%: deletes {sum(recipe.prune.values()):3d} tokens, "
            f"reference FLOPs reduction {100 * recipe.reference_reduction():6.2f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
