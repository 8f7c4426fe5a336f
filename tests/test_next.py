"""LLaVA-NeXT: visual counts that depend on the image size, fraction recipes, pass vs reference."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

from fitprune_fx import ModelInfo, Recipe, RecipeError, fit, fitprune_backend
from fitprune_fx.cli import main as cli_main
from fitprune_fx.generation import compile as fitprune_compile
from fitprune_fx.reference import reference_generate, reference_prefill
from fitprune_fx.testbed.tiny import (
    PromptSpec,
    make_next_inputs,
    next_image_tokens,
    next_num_tiles,
    tiny_llava_next,
)
from graph_harness import CapturedDecoder, KeptRecorder, assert_pass_matches_reference, plain_graph

torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096

# (height, width) -> visual tokens of the tiny model: base tile 16 + rows * (cols + 1)
SIZES = {(32, 64): 52, (64, 64): 88, (40, 64): 70, (30, 90): 68, (100, 20): 52}


@functools.cache
def model():
    return tiny_llava_next(num_layers=3, seed=11)


@functools.cache
def captured() -> CapturedDecoder:
    """One compiled model; every (image size, prompt) case gets its own static decoder graph."""
    return CapturedDecoder(model())


# Cases: batch 1 at three image sizes; a batch of two images whose sizes give the same count.
CASES = {
    "32x64": ([PromptSpec(2, 4)], [(32, 64)]),
    "64x64": ([PromptSpec(0, 3)], [(64, 64)]),
    "30x90": ([PromptSpec(3, 2)], [(30, 90)]),
    "pair-52": ([PromptSpec(2, 4), PromptSpec(1, 2)], [(32, 64), (100, 20)]),
}


@functools.cache
def inputs_for(case: str, seed: int) -> dict[str, torch.Tensor]:
    prompts, sizes = CASES[case]
    return make_next_inputs(model(), prompts, sizes, seed=seed)


def info() -> ModelInfo:
    return ModelInfo.from_config(model().config)


def reference(inputs: dict, prune: dict[int, int], **kw):
    m = model()
    return reference_prefill(
        m,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["attention_mask"],
        prune=prune,
        image_sizes=inputs["image_sizes"],
        **kw,
    )


# ------------------------------------------------------------------------- visual counts
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(height=st.integers(8, 200), width=st.integers(8, 200))
def test_visual_count_formula_matches_the_models_packing(height, width):
    """next_image_tokens/next_num_tiles agree with LlavaNextModel.get_image_features (newlines included)."""
    m = model()
    inputs = make_next_inputs(m, [PromptSpec(1, 1)], [(height, width)])
    assert inputs["pixel_values"].shape[1] == next_num_tiles(m.config, height, width)
    with torch.no_grad():
        out = m.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            return_dict=True,
        )
    assert [f.shape[0] for f in out.pooler_output] == [next_image_tokens(m.config, height, width)]


def test_known_counts_tiny_and_llava_next_7b_dimensions():
    m = model()
    assert {hw: next_image_tokens(m.config, *hw) for hw in SIZES} == SIZES
    # LLaVA-NeXT-7B geometry (336 tiles, patch 14): 576 base + 48 rows x (48 + 1 newline) at 672x672.
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
        text_config=LlamaConfig(),
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )
    assert next_image_tokens(config, 672, 672) == 576 + 48 * 49
    assert next_image_tokens(config, 336, 672) == 576 + 24 * 49  # 1x2 tiles: 24 rows of 48 + newline


# ----------------------------------------------------------------------------- recipes v2
def test_fraction_recipe_round_trips_and_scales_per_count():
    r = Recipe.from_fractions(info(), {0: 0.25, 1: 0.2, 2: 0.0}, budget=0.3)
    data = json.loads(r.to_json())
    assert data["format"] == "fitprune-recipe/2" and "prune" not in data
    assert data["prune_fraction"] == {"0": 0.25, "1": 0.2, "2": 0.0}
    again = Recipe.from_json(r.to_json())
    assert again == r and again.units == "fraction"
    assert r.prune == {0: 4, 1: 3, 2: 0}  # counts at the recipe's num_visual_tokens (16)
    # running sums 0.25 n and 0.45 n, rounded half up: the total never exceeds n
    assert r.deletions_for(52) == {0: 13, 1: 10}
    assert r.deletions_for(88) == {0: 22, 1: 18}
    assert r.deletions_for(70) == {0: 18, 1: 14}  # 17.5 -> 18, 31.5 -> 32
    for n in range(0, 200):
        assert sum(r.deletions_for(n).values()) <= n
    deeper = r.rescaled_to(ModelInfo(**{**info().to_dict(), "num_layers": 6}))
    assert deeper.prune_fraction == {0: 0.25, 2: 0.2, 4: 0.0}


def test_version_1_recipes_load_and_behave_as_before():
    d = {"format": "fitprune-recipe/1", "model": info().to_dict(), "prune": {"0": 4, "1": 3}}
    r = Recipe.from_dict(d)
    assert r.units == "count" and r.prune_fraction is None
    assert r.deletions_for(52) == {0: 13, 1: 10}  # proportional scaling with cumulative rounding
    assert json.loads(r.to_json())["format"] == "fitprune-recipe/1"
    # format 2 may still state counts; it is written back as format 1 (the lowest that expresses it)
    r2 = Recipe.from_dict({**d, "format": "fitprune-recipe/2"})
    assert r2 == r and json.loads(r2.to_json())["format"] == "fitprune-recipe/1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "fitprune-recipe/1"}, r'"prune_fraction" needs "format": "fitprune-recipe/2"'),
        ({"prune": {"0": 1}}, r'both "prune" and "prune_fraction"'),
        ({"prune_fraction": {"0": 0.7, "1": 0.5}}, r"sum to at most 1"),
        ({"prune_fraction": {"0": 1.5}}, r"fraction in \[0, 1\]"),
        ({"prune_fraction": {"7": 0.1}}, r"layer 7 is not a decoder layer"),
        ({"format": "fitprune-recipe/3"}, r"unknown recipe format.*fitprune-recipe/1, fitprune-recipe/2"),
    ],
)
def test_bad_fraction_recipes_are_refused(change, message):
    d = {"format": "fitprune-recipe/2", "model": info().to_dict(), "prune_fraction": {"0": 0.2}}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({**d, **change})


# ---------------------------------------------------------------- pass vs eager reference
@st.composite
def fraction_recipes(draw):
    layers = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    left, fractions = 100, {}
    for layer in sorted(layers):
        pct = draw(st.integers(0, left))
        fractions[layer] = pct / 100
        left -= pct
    return fractions


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(sorted(CASES)), seed=st.integers(0, 3), data=st.data())
def test_zero_recipe_reproduces_original_outputs_exactly(case, seed, data):
    layers = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    inputs = inputs_for(case, seed)
    backend = fitprune_backend(Recipe.from_fractions(info(), dict.fromkeys(layers, 0.0)), compiler="eager")
    pruned = captured().run(backend, **inputs)
    assert [r.action for r in backend.reports] == ["pruned"]
    original = captured().run(plain_graph, **inputs)
    assert torch.equal(pruned.logits, original.logits)
    for a, b in zip(pruned.past_key_values.layers, original.past_key_values.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(sorted(CASES)), seed=st.integers(0, 3), fractions=fraction_recipes())
def test_pass_equals_eager_reference_for_random_fraction_recipes(case, seed, fractions):
    """Counts come from the visual count in the graph; kept sets and logits equal the reference."""
    inputs = inputs_for(case, seed)
    recipe = Recipe.from_fractions(info(), fractions)
    n = next_image_tokens(model().config, *CASES[case][1][0])
    prune = recipe.pruning_plan(n)
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    out = captured().run(recorder, **inputs)
    assert recorder.backend.pruned_graphs[0].result.visual_tokens == n
    assert recorder.backend.pruned_graphs[0].result.deletions == dict(sorted(prune.items()))
    ref = reference(inputs, prune)

    assert_pass_matches_reference(inputs, out, recorder, ref, prune)


# ------------------------------------------------------------------ Dynamo path, end to end
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_three_image_sizes_one_graph_for_any_visual_count(fresh_dynamo):
    """The first size compiles a graph of its own; the second, one that serves every visual count
    (its deletions sized per call), which then runs the other sizes, each exact."""
    m = model()
    recipe = Recipe.from_fractions(info(), {0: 0.25, 1: 0.2})
    backend = fitprune_backend(recipe, compiler="eager")
    compiled = torch.compile(m, backend=backend)
    for hw in [(32, 64), (64, 64), (30, 90), (64, 64), (100, 20)]:  # counts 52, 88, 68, 88, 52
        inputs = make_next_inputs(m, [PromptSpec(2, 3)], [hw], seed=1)
        with torch.no_grad():
            out = compiled(**inputs)
        prune = recipe.deletions_for(SIZES[hw])
        ref = reference(inputs, prune)
        assert out.logits.shape[1] == inputs["input_ids"].shape[1] - sum(prune.values())
        torch.testing.assert_close(out.logits[0], ref.logits[0, ref.kept_final[0]], atol=1e-4, rtol=1e-4)
    graphs = backend.pruned_graphs
    assert [r.result.any_visual_count for r in graphs] == [False, True], backend.summary()
    assert [r.result.visual_tokens for r in graphs] == [52, 88]  # the counts of the calls that compiled
    assert "1 for any visual count and batch size, 1 for one visual count each [52]" in backend.summary()
    assert not [r for r in backend.reports if "not understood" in r.reason]


def test_any_prompt_length_graph_matches_the_reference(fresh_dynamo):
    """Compiled for any prompt length: three lengths at one image size run on one graph, then the
    first again (the size-only inputs follow each call's length, not the last one's)."""
    m = model()
    recipe = Recipe.from_fractions(info(), {0: 0.25, 1: 0.2})
    backend = fitprune_backend(recipe, compiler="eager")
    compiled = torch.compile(m, backend=backend, dynamic=True)
    prune = recipe.deletions_for(SIZES[(32, 64)])
    for spec in (PromptSpec(2, 3), PromptSpec(5, 7), PromptSpec(1, 1), PromptSpec(2, 3)):
        inputs = make_next_inputs(m, [spec], [(32, 64)], seed=1)
        with torch.no_grad():
            out = compiled(**inputs)
        ref = reference(inputs, prune)
        assert out.logits.shape[1] == inputs["input_ids"].shape[1] - sum(prune.values())
        torch.testing.assert_close(out.logits[0], ref.logits[0, ref.kept_final[0]], atol=1e-4, rtol=1e-4)
    assert [r.result.seq_len for r in backend.pruned_graphs] == ["S"], backend.summary()


@pytest.mark.parametrize(
    "sizes", [[(32, 64), (64, 32)], [(32, 64), (64, 64), (30, 90)]], ids=["even-total", "uneven-total"]
)
def test_batch_with_different_visual_counts_is_refused_by_a_scorer_that_reads_the_count(fresh_dynamo, sizes):
    """The `random` scorer is told how many tokens to delete, so its graph holds one count per
    example: a batch that mixes counts (52 + 56, or 52 + 88 + 68) fails the run-time check, which
    names the scorers that serve it. (Built-in fitprune/fastv prune such batches:
    `test_mixed_batches_merge_mask.py`.)"""
    m = model()
    backend = fitprune_backend(Recipe.from_fractions(info(), {0: 0.25}), compiler="eager", scorer="random")
    inputs = make_next_inputs(m, [PromptSpec(2, 3)] * len(sizes), sizes)
    with pytest.raises(RuntimeError, match=r"different numbers of visual tokens.*fitprune, fastv.*batch 1"):
        with torch.no_grad():
            torch.compile(m, backend=backend)(**inputs)


def test_generate_is_token_identical_at_two_image_sizes(fresh_dynamo):
    m = tiny_llava_next(num_layers=3, seed=11)  # own copy: fitprune_compile compiles in place
    recipe = Recipe.from_fractions(info(), {0: 0.25, 1: 0.2})
    fitprune_compile(m, recipe, compiler="eager")
    for hw in [(32, 64), (64, 64)]:
        inputs = make_next_inputs(m, [PromptSpec(2, 3)], [hw], seed=2)
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = reference_generate(
            m,
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["attention_mask"],
            prune=recipe.deletions_for(SIZES[hw]),
            max_new_tokens=6,
            image_sizes=inputs["image_sizes"],
        )
        assert torch.equal(out, expected)
    assert [r.result.visual_tokens for r in m.fitprune_backend.pruned_graphs] == [52, 88]


# --------------------------------------------------------------------------- fit and CLI
def test_fit_on_next_gives_a_fraction_recipe_that_meets_the_budget():
    m = model()
    sizes = [(32, 64), (64, 64), (40, 64), (30, 90), (64, 32), (20, 100)]
    calibration = [make_next_inputs(m, [PromptSpec(2, 5)], [hw], seed=i) for i, hw in enumerate(sizes)]
    recipe = fit(m, calibration, 0.4)
    assert recipe.units == "fraction" and recipe.prune_fraction
    mean = round(sum(next_image_tokens(m.config, *hw) for hw in sizes) / len(sizes))
    assert recipe.model.num_visual_tokens == mean
    assert recipe.reference_reduction() >= 0.4
    assert Recipe.from_json(recipe.to_json()) == recipe
    counts = fit(m, calibration, 0.4, units="count")
    assert counts.units == "count" and counts.prune == recipe.prune


def test_cli_inspect_at_image_sizes(tmp_path, capsys):
    model().config.save_pretrained(tmp_path / "model")
    path = tmp_path / "r.json"
    Recipe.from_fractions(info(), {0: 0.25, 1: 0.2}).to_json(path)
    args = ["inspect", str(path), "--config", str(tmp_path / "model")]
    assert cli_main([*args, "--image-size", "32x64", "--image-size", "64x64"]) == 0
    out = capsys.readouterr().out
    assert "image 32x64 (height x width): 52 visual tokens; deleted per layer {0: 13, 1: 10} (frac" in out
    assert "image 64x64 (height x width): 88 visual tokens; deleted per layer {0: 22, 1: 18} (frac" in out
    assert cli_main(["inspect", str(path), "--image-size", "32x64"]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert cli_main([*args, "--image-size", "32*64"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
