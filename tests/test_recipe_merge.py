"""Merging deletions too small to pay for a scoring pass (`merge_small_deletions`, `fit --merge-below`).

The savings are checked against FLOPs written out here by hand (attention 3nh^2 + 2n^2h on the
tokens entering a layer, output projection and MLP nh^2 + 3nhm on the tokens leaving it).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitprune_fx import ModelInfo, Recipe, merge_small_deletions
from fitprune_fx.recipe_merge import pruning_layer_savings

H, M, N = 64, 172, 100
INFO = ModelInfo(name="m", num_layers=6, num_visual_tokens=N, hidden_size=H, intermediate_size=M)


def hand_flops(prune: dict[int, int], layers: int = 6) -> float:
    """Visual-token FLOPs of all layers, in units of one unpruned layer."""
    unit = 3 * N * H * H + 2 * N * N * H + N * H * H + 3 * N * H * M
    n, total = N, 0.0
    for layer in range(layers):
        after = n - prune.get(layer, 0)
        total += 3 * n * H * H + 2 * n * n * H + after * H * H + 3 * after * H * M
        n = after
    return total / unit


def test_savings_are_the_flops_a_layer_avoids_before_the_next_one_deletes():
    recipe = Recipe(model=INFO, prune={0: 40, 2: 3, 5: 2})
    savings = pruning_layer_savings(recipe)
    base = hand_flops({0: 40, 2: 3, 5: 2})
    assert savings[0] == pytest.approx(hand_flops({2: 43, 5: 2}) - base)
    assert savings[2] == pytest.approx(hand_flops({0: 40, 5: 5}) - base)
    assert savings[5] == pytest.approx(hand_flops({0: 40, 2: 3}) - base)  # last: only its own MLP
    assert savings[5] < savings[2] < savings[0]


def test_small_layers_move_to_the_previous_pruning_layer():
    recipe = Recipe(model=INFO, prune={0: 40, 2: 3, 5: 2}, budget=0.3)
    # Savings: layer 5 0.012, layer 2 0.093 (by hand); once layer 5's 2 tokens go to layer 2,
    # layer 2 deletes 5 and saves 0.184 (its tokens skip layers 3..5).
    merged = merge_small_deletions(recipe, min_saving=0.1)
    assert dict(merged.prune) == {0: 40, 2: 5}
    assert merged.fit["merged_small_deletions"] == {"min_saving": 0.1, "moved": {"5": 2}}
    assert merged.reference_reduction() >= recipe.reference_reduction()
    assert merged.flops_reduction == round(merged.reference_reduction(), 4)
    assert merged.budget == 0.3 and merged.scorer == recipe.scorer
    deeper = merge_small_deletions(recipe, min_saving=0.2)
    assert dict(deeper.prune) == {0: 45}
    assert deeper.fit["merged_small_deletions"]["moved"] == {"5": 2, "2": 0}


def test_a_small_first_layer_moves_forward_and_one_layer_always_remains():
    recipe = Recipe(model=INFO, prune={0: 1, 3: 30})
    assert dict(merge_small_deletions(recipe, min_saving=0.05).prune) == {3: 31}
    assert dict(merge_small_deletions(recipe, min_saving=100).prune) == {3: 31}


def test_a_first_layer_stays_when_moving_it_later_would_miss_the_budget():
    recipe = Recipe(model=INFO, prune={0: 1, 3: 30})
    with_budget = Recipe(model=INFO, prune={0: 1, 3: 30}, budget=recipe.reference_reduction())
    assert merge_small_deletions(with_budget, min_saving=0.05) is with_budget
    lower = Recipe(model=INFO, prune={0: 1, 3: 30}, budget=recipe.reference_reduction() - 0.01)
    assert dict(merge_small_deletions(lower, min_saving=0.05).prune) == {3: 31}


def test_nothing_to_merge_returns_the_recipe_and_bad_thresholds_are_refused():
    recipe = Recipe(model=INFO, prune={0: 40, 2: 30})
    assert merge_small_deletions(recipe, 0.0) is recipe
    assert merge_small_deletions(recipe, 0.01) is recipe
    with pytest.raises(ValueError, match="decoder layer"):
        merge_small_deletions(recipe, -1)


def test_fraction_recipes_move_fractions():
    recipe = Recipe.from_fractions(INFO, {0: 0.4, 2: 0.03, 5: 0.02})
    merged = merge_small_deletions(recipe, min_saving=0.2)
    assert merged.units == "fraction"
    assert dict(merged.prune_fraction) == pytest.approx({0: 0.45})
    assert dict(merged.prune) == {0: 45}


@settings(max_examples=60, deadline=None)
@given(
    counts=st.dictionaries(st.integers(0, 5), st.integers(1, 15), min_size=1, max_size=6),
    min_saving=st.floats(0.0, 1.0),
    with_budget=st.booleans(),
)
def test_merging_keeps_the_deletions_and_leaves_no_small_layer(counts, min_saving, with_budget):
    plain = Recipe(model=INFO, prune=counts)
    recipe = Recipe(model=INFO, prune=counts, budget=plain.reference_reduction()) if with_budget else plain
    merged = merge_small_deletions(recipe, min_saving)
    assert sum(merged.prune.values()) == sum(counts.values())
    assert set(merged.prune) <= set(counts) and merged.prune
    savings = pruning_layer_savings(merged)
    if with_budget:  # a small first layer may stay (moving it would miss the budget); no other
        assert merged.reference_reduction() >= recipe.budget - 1e-12
        first = min(merged.prune)
        assert all(v >= min_saving for layer, v in savings.items() if layer != first), savings
    else:
        assert len(savings) == 1 or min(savings.values()) >= min_saving
    first = min(counts)
    if first in merged.prune:  # nothing moved later than where the recipe put it
        assert merged.reference_reduction() >= recipe.reference_reduction() - 1e-12
