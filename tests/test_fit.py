"""Tests for the FitPrune fit (fitprune_fx.fitting): statistics, walk, search, rounding, recipe."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fitprune_fx.fitting import (
    VISUAL,
    FitSession,
    fit,
    round_cumulative,
)
from fitprune_fx.flops import projected_reduction, reference_flops_reduction
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import generate_position_ids, reference_prefill
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

torch.set_num_threads(1)

PROMPTS = [PromptSpec(3, 5), PromptSpec(6, 4), PromptSpec(2, 7), PromptSpec(4, 3)]


def calibration(model, batches: int = 3) -> list[dict]:
    """`batches` left-padded batches of 4 prompts each (12 examples)."""
    return [make_inputs(model, PROMPTS, seed=s) for s in range(batches)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=5, image_size=40)  # 25 visual tokens, 5 layers


@pytest.fixture(scope="module")
def data(model):
    return calibration(model)


@pytest.fixture(scope="module")
def session(model, data):
    return FitSession(model, data, batch_size=4)


# ------------------------------------------------------------------ statistics vs the oracle
def test_walk_scores_match_reference_oracle(model):
    """Replaying a fixed recipe through the walk gives the reference's FitPrune scores.

    This checks the attention statistics, the cached unpruned layers and the compaction and
    position handling of pruned layers against `reference_prefill` (independent code).
    """
    inputs = make_inputs(model, PROMPTS[:3], seed=7)
    prune = {0: 3, 1: 0, 2: 5, 3: 2, 4: 0}
    session = FitSession(model, [inputs], batch_size=2)  # chunks of 2 exercise trimming

    def lowest_product(layer, cross, self_, is_vis):
        score = torch.where(is_vis, cross * self_, torch.full_like(cross, float("inf")))
        order = torch.sort(score, dim=1, stable=True).indices
        drop = torch.zeros_like(is_vis)
        drop.scatter_(1, order[:, : prune[layer]], True)
        return drop & is_vis

    trace: list = []
    session.walk(0.0, select=lowest_product, trace=trace)
    mask = inputs["attention_mask"]
    ref = reference_prefill(
        model,
        inputs["input_ids"],
        inputs["pixel_values"],
        mask,
        prune=prune,
        position_ids=generate_position_ids(mask),
    )
    for layer, kind, _pos, cross, self_ in trace:
        for b in range(3):
            vis = kind[b] == VISUAL
            # Reference cross score is an unnormalised sum over the |T| instruction rows.
            num_t = PROMPTS[b].after
            ours = (cross[b] * self_[b])[vis] * num_t
            torch.testing.assert_close(ours, ref.scores[layer][b], rtol=2e-4, atol=1e-7)


def test_alpha_zero_deletes_nothing(session):
    walk = session.walk(0.0)
    assert int(walk.deleted.sum()) == 0
    assert torch.all(walk.kept_cross == 1.0) and torch.all(walk.kept_self == 1.0)
    assert walk.reduction == 0.0 and walk.layers_run == 0  # served from the unpruned cache


@settings(max_examples=15, deadline=None)
@given(alpha=st.floats(0.0, 1.0))
def test_kept_mass_at_least_one_minus_alpha(session, alpha):
    """Where a layer deletes, both kept masses stay >= (1 - alpha) of the original ones."""
    walk = session.walk(alpha)
    deleting = walk.deleted > 0
    assert torch.all(walk.kept_cross[deleting] >= 1 - alpha - 1e-6)
    assert torch.all(walk.kept_self[deleting] >= 1 - alpha - 1e-6)
    left = session.n_visual - walk.deleted.sum(dim=1)
    assert torch.all(left >= 1)  # min_keep


def test_walk_stops_once_budget_met(session):
    walk = session.walk(0.5, budget=0.3)
    assert walk.met and walk.reduction >= 0.3
    walked = len(walk.means)
    shorter = projected_reduction([sum(walk.means[: i + 1]) for i in range(walked - 1)], 5, 25, 64, 128)
    assert walked == 1 or shorter < 0.3  # it did not walk past the first layer meeting it


# ------------------------------------------------------------------ search and recipe
BUDGETS = [0.15, 0.3, 0.45, 0.6, 0.7]


@pytest.fixture(scope="module")
def recipes(session):
    return {b: session.recipe(b) for b in BUDGETS}


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_met(recipes, budget):
    recipe = recipes[budget]
    m = recipe.model
    exact = reference_flops_reduction(
        recipe.prune, m.num_layers, m.num_visual_tokens, m.hidden_size, m.intermediate_size
    )
    assert exact >= budget - 1e-9  # rounding up guarantees the budget itself
    assert recipe.flops_reduction >= budget - 0.01
    assert recipe.budget == budget and recipe.scorer == "fitprune"
    assert recipe.fit["samples"] == 12 and 0.0 < recipe.fit["alpha"] <= 1.0
    assert recipe.fit["seconds"] > 0


def test_more_budget_never_deletes_fewer(recipes):
    totals = [sum(recipes[b].prune.values()) for b in BUDGETS]
    alphas = [recipes[b].fit["alpha"] for b in BUDGETS]
    assert totals == sorted(totals)
    assert alphas == sorted(alphas)
    # Token-layers removed (the quantity FLOPs follow) is strictly increasing too.
    areas = [sum(recipes[b].tokens_per_layer()) for b in BUDGETS]
    assert areas == sorted(areas, reverse=True)


def test_alpha_is_smallest_passing_to_tolerance(session, recipes):
    recipe = recipes[0.45]
    alpha = recipe.fit["alpha"]
    assert session.walk(alpha, budget=0.45).met
    assert not session.walk(max(alpha - 0.01, 0.0), budget=0.45).met


def test_recipe_validates_and_fits_model(model, recipes):
    for recipe in recipes.values():
        recipe.validate()
        recipe.check_model(model.config)
        again = Recipe.from_json(recipe.to_json())
        assert again.prune == recipe.prune and again.fit == recipe.fit


def test_same_inputs_same_recipe(model, data, recipes):
    again = fit(model, data, 0.45, batch_size=4)
    assert again.prune == recipes[0.45].prune
    assert again.fit["alpha"] == recipes[0.45].fit["alpha"]


def test_min_saving_merges_the_fitted_recipe(model, data, recipes):
    """`fit(..., min_saving=x)` is the plain fit followed by `merge_small_deletions(recipe, x)`."""
    from fitprune_fx.recipe_merge import merge_small_deletions

    merged = fit(model, data, 0.45, batch_size=4, min_saving=0.5)
    expected = merge_small_deletions(recipes[0.45], 0.5)
    assert merged.prune == expected.prune and len(merged.prune) < len(recipes[0.45].prune)
    assert merged.fit["merged_small_deletions"] == expected.fit["merged_small_deletions"]
    assert sum(merged.prune.values()) == sum(recipes[0.45].prune.values())


def test_recipe_independent_of_batching(model, data, recipes):
    """Examples are scored as if alone: one example per batch gives the same recipe."""
    singles = []
    for batch in data:
        for b in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][b].bool()
            singles.append(
                {
                    "input_ids": batch["input_ids"][b][keep],
                    "attention_mask": batch["attention_mask"][b][keep],
                    "pixel_values": batch["pixel_values"][b],
                }
            )
    again = fit(model, singles, 0.45, batch_size=3)
    assert again.prune == recipes[0.45].prune


def test_unreachable_budget_raises(session):
    with pytest.raises(ValueError, match="out of reach"):
        session.recipe(0.99)
    with pytest.raises(ValueError, match="fraction"):
        session.recipe(1.5)


def test_walk_deletes_what_masking_deletes_with_a_sliding_window():
    """Every layer slides (a Mistral decoder, window 6, shorter than every prompt): replaying a
    fixed recipe through the walk deletes, per example and layer, the tokens pruning as masking
    deletes with the window counted in original positions (the model's own sliding mask)."""
    model = tiny_llava("mistral", num_layers=4, image_size=40, seed=3, sliding_window=6)
    inputs = make_inputs(model, PROMPTS[:3], seed=7)
    prune = {0: 3, 2: 5, 3: 2}
    session = FitSession(model, [inputs], batch_size=2)
    dropped = []

    def lowest_product(layer, cross, self_, is_vis):
        score = torch.where(is_vis, cross * self_, torch.full_like(cross, float("inf")))
        order = torch.sort(score, dim=1, stable=True).indices
        drop = torch.zeros_like(is_vis)
        drop.scatter_(1, order[:, : prune.get(layer, 0)], True)
        dropped.append(drop & is_vis)
        return drop & is_vis

    trace: list = []
    session.walk(0.0, select=lowest_product, trace=trace)
    mask = inputs["attention_mask"]
    with torch.no_grad(), MaskingReference(model, prune) as masking:
        model(**inputs, position_ids=generate_position_ids(mask))
    pads = (mask == 0).sum(dim=1)
    gone = torch.zeros_like(mask, dtype=torch.bool)
    for (layer, _, pos, _, _), drop in zip(trace, dropped, strict=True):
        for b in range(3):
            gone[b, pos[b][drop[b]] + pads[b]] = True
        if layer in prune:
            assert torch.equal(gone, masking.deleted[layer]), layer


@pytest.mark.parametrize(
    "text_model,dtype",
    [("mistral", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)],
)
def test_other_models_and_bfloat16(text_model, dtype):
    model = tiny_llava(
        text_model,
        num_layers=4,
        hidden_size=96,
        num_heads=6,
        num_kv_heads=3,
        intermediate_size=160,
        dtype=dtype,
    )
    recipe = fit(model, calibration(model, 2), 0.5)
    assert recipe.flops_reduction >= 0.49
    assert recipe.model.hidden_size == 96 and recipe.model.num_layers == 4
    recipe.check_model(model.config)


def test_multi_image_examples_are_normalised(model):
    """Two-image prompts count each deletion as d * N / n_e in the layer means."""
    data = [make_inputs(model, [PromptSpec(2, 5, images=2), PromptSpec(3, 4)], seed=1)]
    session = FitSession(model, data)
    walk = session.walk(0.4)
    n = ModelInfo.from_config(model.config).num_visual_tokens
    weights = n / session.n_visual.double()
    expected = (walk.deleted.double() * weights[:, None]).mean(dim=0)
    torch.testing.assert_close(torch.tensor(walk.means, dtype=torch.float64), expected)
    assert session.n_visual.tolist() == [2 * n, n]


# ------------------------------------------------------------------ FLOPs and rounding
@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 20), min_size=1, max_size=8),
    hidden=st.integers(8, 512),
)
def test_projected_reduction_matches_flops_module(counts, hidden):
    layers, n = 8, 200
    prune = {i: c for i, c in enumerate(counts)}
    cumulative = [float(sum(counts[: i + 1])) for i in range(len(counts))]
    ours = projected_reduction(cumulative, layers, n, hidden, 3 * hidden)
    assert ours == pytest.approx(reference_flops_reduction(prune, layers, n, hidden, 3 * hidden))


@settings(max_examples=100, deadline=None)
@given(means=st.lists(st.floats(0.0, 12.0), min_size=1, max_size=10))
@example(means=[2.1797468255472855e-07])  # below the slack: the default rounding deletes nothing
def test_round_cumulative_keeps_budget(means):
    n, layers = 100, 10
    cumulative = [sum(means[: i + 1]) for i in range(len(means))]
    real = projected_reduction(cumulative, layers, n, 64, 192)
    strict = reference_flops_reduction(round_cumulative(means, n, slack=0.0), layers, n, 64, 192)
    assert strict >= real - 1e-12  # a strict ceiling never saves less than the real means
    prune = round_cumulative(means, n)  # the slack only forgives float noise of up to 1e-6 token
    rounded = reference_flops_reduction(prune, layers, n, 64, 192)
    assert rounded >= projected_reduction([c - 1e-6 for c in cumulative], layers, n, 64, 192) - 1e-12
    assert -1e-6 * len(means) <= sum(prune.values()) - sum(means) < 1 + 1e-6
    assert all(v > 0 for v in prune.values())


# ------------------------------------------------------------------ the backend
def test_fitted_recipe_compiles_in_backend(model, recipes):
    """The fitted recipe loads into the backend, prunes, and matches the reference oracle."""
    if importlib.util.find_spec("fitprune_fx.backend") is None:
        pytest.skip("fitprune_fx.backend not available yet")
    from fitprune_fx.backend import fitprune_backend

    torch._dynamo.reset()
    recipe = recipes[0.45]
    backend = fitprune_backend(recipe.to_json(), compiler="eager")
    inputs = make_inputs(model, [PromptSpec(3, 5)], seed=3)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        logits = compiled(**inputs).logits
    assert backend.pruned_graphs
    ref = reference_prefill(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=recipe.prune
    )
    torch.testing.assert_close(logits[:, -1], ref.logits[:, -1], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_guided_search_agrees_with_bisection(session, budget):
    """Both strategies bracket the answer to the tolerance; guided needs fewer exact walks."""
    guided = session.search(budget, strategy="guided")
    bisect = session.search(budget, strategy="bisect")
    for result in (guided, bisect):
        assert result.walk.met and result.walk.alpha == result.alpha
        failing = [w.alpha for w in result.walks if not w.met and w.alpha < result.alpha]
        assert result.alpha <= 0.01 + 1e-9 or max(failing) >= result.alpha - 0.01 - 1e-9
    assert abs(guided.alpha - bisect.alpha) <= 0.02
    assert len(bisect.walks) == 7
    assert len(guided.walks) <= len(bisect.walks)
