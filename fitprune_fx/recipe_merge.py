"""Merge deletions too small to pay for their scoring pass into a neighbouring pruning layer.

Every pruning layer runs one scoring pass (about as costly as a fraction of a decoder layer, see
`benchmarks/speed.py`, "one scoring pass costs"), and a recipe rescaled to few layers can list
layers that delete one or two tokens. The saving of a pruning layer l is the reference FLOPs its
deletions avoid before the next pruning layer would delete them anyway (all later layers when l
is the last), in units of one unpruned decoder layer. While some pruning layer saves less than
`min_saving`, the one that saves least moves its deletions to the previous pruning layer (the
tokens go earlier, so the FLOPs reduction only grows), or to the next one when it is the first,
unless that takes the FLOPs reduction below the recipe's budget.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from .flops import reference_flops_reduction
from .recipe import Recipe


def pruning_layer_savings(recipe: Recipe) -> dict[int, float]:
    """Per pruning layer: FLOPs its deletions save, in unpruned-layer units (see module docstring)."""
    m = recipe.model
    n = m.num_visual_tokens
    counts = {layer: d for layer, d in recipe.deletions_for(n).items() if d}
    layers = sorted(counts)

    def flops(prune: dict[int, int]) -> float:  # pruned FLOPs in unpruned-layer units
        reduction = reference_flops_reduction(prune, m.num_layers, n, m.hidden_size, m.intermediate_size)
        return (1.0 - reduction) * m.num_layers

    base = flops(counts)
    out = {}
    for i, layer in enumerate(layers):
        later = dict(counts)
        d = later.pop(layer)
        if i + 1 < len(layers):
            later[layers[i + 1]] += d
        out[layer] = flops(later) - base
    return out


def merge_small_deletions(recipe: Recipe, min_saving: float) -> Recipe:
    """`recipe` with every pruning layer saving less than `min_saving` (unpruned-layer units)
    merged into a neighbour; the moves are recorded under ``fit["merged_small_deletions"]``.

    A count recipe moves counts; a fraction recipe (format 2) moves fractions, with savings
    judged at the recipe's native visual count. At least one pruning layer always remains.
    """
    if min_saving < 0:
        raise ValueError(f"min_saving is in units of one decoder layer and must be >= 0, got {min_saving!r}")
    fractions = recipe.prune_fraction is not None
    amounts: dict[int, Fraction] = {
        layer: Fraction(str(v)) if fractions else Fraction(v)
        for layer, v in (recipe.prune_fraction or recipe.prune).items()
        if v
    }
    moved: dict[int, int] = {}
    current = recipe
    floor = recipe.budget if recipe.budget is not None else 0.0
    while len(amounts) > 1:
        savings = pruning_layer_savings(current)
        small = sorted((s, layer) for layer, s in savings.items() if s < min_saving and layer in amounts)
        for _, layer in small:
            layers = sorted(amounts)
            i = layers.index(layer)
            target = layers[i - 1] if i > 0 else layers[i + 1]
            trial = dict(amounts)
            trial[target] += trial.pop(layer)
            candidate = _with_amounts(recipe, trial, fractions)
            if i == 0 and candidate.reference_reduction() < floor:
                continue  # moving the first layer's deletions later would miss the recipe's budget
            amounts, current = trial, candidate
            moved[layer] = target
            break
        else:
            break
    if not moved:
        return recipe
    fit = dict(recipe.fit or {})
    fit["merged_small_deletions"] = {"min_saving": min_saving, "moved": {str(k): v for k, v in moved.items()}}
    out = dataclasses.replace(current, fit=fit)
    return dataclasses.replace(out, flops_reduction=round(out.reference_reduction(), 4))


def _with_amounts(recipe: Recipe, amounts: dict[int, Fraction], fractions: bool) -> Recipe:
    if fractions:
        return dataclasses.replace(
            recipe, prune={}, prune_fraction={k: float(v) for k, v in sorted(amounts.items())}
        )
    return dataclasses.replace(recipe, prune={k: int(v) for k, v in sorted(amounts.items())})
