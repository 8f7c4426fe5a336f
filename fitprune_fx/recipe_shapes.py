"""Recipes of a fixed shape at a FLOPs budget: the published methods' schedules.

FitPrune fits where to delete (`fitting.fit`); the methods it is compared with delete on a fixed
schedule. These build such schedules for any model at a reference FLOPs reduction, so methods are
compared at matched FLOPs with the same pass doing the deleting:

  * `one_layer_recipe`: FastV's, every deletion after one layer (Chen et al., 2024, "An Image is
    Worth 1/2 Tokens After Layer 2": K = 2 in 1-based numbering, after layer 1 here);
  * `staged_recipe`: PyramidDrop's, the decoder cut into equal stages and a fixed share of the
    visual tokens still present deleted at the end of each (Xing et al., 2024: 4 stages).
"""

from __future__ import annotations

from .recipe import ModelInfo, Recipe


def one_layer_recipe(
    model: ModelInfo, budget: float, layer: int = 1, scorer: str = "fastv", **fields
) -> Recipe:
    """The fewest deletions after `layer` whose reference FLOPs reduction reaches `budget`; if
    deleting every visual token there falls short, the layer moves earlier (`Recipe.prune` says where)."""
    n = model.num_visual_tokens
    for k in range(min(layer, model.num_layers - 1), -1, -1):
        recipe = Recipe(model=model, prune={k: n}, scorer=scorer, budget=budget, **fields)
        if recipe.reference_reduction() < budget - 1e-9:
            continue
        lo, hi = 0, n  # the smallest count that reaches the budget: the reduction grows with it
        while lo < hi:
            mid = (lo + hi) // 2
            if Recipe(model=model, prune={k: mid}, budget=budget).reference_reduction() >= budget - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        return Recipe(model=model, prune={k: lo}, scorer=scorer, budget=budget, **fields)
    raise ValueError(
        f"one deletion after any layer cannot reach a {budget:.0%} FLOPs reduction on {model.name}"
    )


def stage_ends(num_layers: int, stages: int) -> list[int]:
    """The layers after which a staged recipe deletes: the last layer of every stage but the last."""
    if not 2 <= stages <= num_layers:
        raise ValueError(
            f"stages must be in [2, {num_layers}] for a {num_layers}-layer decoder, got {stages}"
        )
    return sorted({round(num_layers * i / stages) - 1 for i in range(1, stages)})


def staged_counts(num_visual: int, ends: list[int], keep: float) -> dict[int, int]:
    """Deletions when each stage end keeps the share `keep` of the visual tokens present."""
    counts, present = {}, num_visual
    for i, layer in enumerate(ends, start=1):
        left = round(num_visual * keep**i)
        if present - left:
            counts[layer] = present - left
        present = left
    return counts


def staged_recipe(
    model: ModelInfo, budget: float, stages: int = 4, scorer: str = "last_token", **fields
) -> Recipe:
    """PyramidDrop's schedule: the largest share kept per stage (searched to 1e-4) whose reference
    FLOPs reduction reaches `budget`."""
    ends = stage_ends(model.num_layers, stages)

    def reduction(keep: float) -> float:
        counts = staged_counts(model.num_visual_tokens, ends, keep)
        return Recipe(model=model, prune=counts, budget=budget).reference_reduction()

    if reduction(0.0) < budget - 1e-9:
        raise ValueError(
            f"{stages} stages cannot reach a {budget:.0%} FLOPs reduction on {model.name}: at most "
            f"{reduction(0.0):.1%} (every visual token deleted after layer {ends[0]}); use more stages"
        )
    lo, hi = 0.0, 1.0  # reduction(lo) >= budget > reduction(hi) (or hi is never needed)
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if reduction(mid) >= budget - 1e-9:
            lo = mid
        else:
            hi = mid
    counts = staged_counts(model.num_visual_tokens, ends, lo)
    return Recipe(model=model, prune=counts, scorer=scorer, budget=budget, **fields)
