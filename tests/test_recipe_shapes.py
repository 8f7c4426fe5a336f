"""Fixed-shape recipes at a FLOPs budget (`recipe_shapes`): they reach the budget with no spare deletion."""

from __future__ import annotations

import pytest

from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.recipe_shapes import one_layer_recipe, stage_ends, staged_counts, staged_recipe

LLAVA_7B = ModelInfo("llava-1.5-7b", 32, 576, 4096, 11008, 32, 32)
TESTBED = ModelInfo("clutter-llava", 4, 576, 256, 688, 4, 4)


def reduction(model: ModelInfo, prune: dict[int, int]) -> float:
    return Recipe(model=model, prune=prune).reference_reduction()


@pytest.mark.parametrize("model", [LLAVA_7B, TESTBED])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_one_layer_recipe_is_the_fewest_deletions_after_its_layer(model, budget):
    recipe = one_layer_recipe(model, budget)
    ((layer, d),) = recipe.prune.items()
    reachable = reduction(model, {1: model.num_visual_tokens}) >= budget
    assert layer == (1 if reachable else 0) and recipe.scorer == "fastv"
    assert reduction(model, {layer: d}) >= budget
    assert reduction(model, {layer: d - 1}) < budget


def test_one_layer_recipe_moves_earlier_when_its_layer_cannot_reach_the_budget():
    recipe = one_layer_recipe(TESTBED, 0.8)  # after layer 1 of 4, at most ~0.7 on this model
    assert reduction(TESTBED, {1: 576}) < 0.8
    assert list(recipe.prune) == [0] and recipe.reference_reduction() >= 0.8
    with pytest.raises(ValueError, match="cannot reach"):
        one_layer_recipe(TESTBED, 0.99)


def test_stage_ends_cut_the_decoder_into_equal_stages():
    assert stage_ends(32, 4) == [7, 15, 23]
    assert stage_ends(4, 4) == [0, 1, 2]
    with pytest.raises(ValueError, match="stages must be"):
        stage_ends(4, 5)


@pytest.mark.parametrize("model", [LLAVA_7B, TESTBED])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_staged_recipe_keeps_one_share_per_stage_and_meets_the_budget(model, budget):
    recipe = staged_recipe(model, budget)
    assert recipe.scorer == "last_token" and recipe.reference_reduction() >= budget
    present, kept = model.num_visual_tokens, []
    for layer in stage_ends(model.num_layers, 4):
        present -= recipe.prune.get(layer, 0)
        kept.append(present)
    share = kept[0] / model.num_visual_tokens
    for i, k in enumerate(kept, start=1):  # the same share at every stage (rounded)
        assert abs(k - model.num_visual_tokens * share**i) <= 1.0 + i
    # a clearly larger share (fewer deletions) falls short of the budget
    looser = staged_counts(model.num_visual_tokens, stage_ends(model.num_layers, 4), min(1.0, share + 0.01))
    assert reduction(model, looser) < budget
