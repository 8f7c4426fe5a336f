"""LLaVA-1.5, LLaVA-HR, LLaVA-NeXT and Gemma 3 batches whose examples hold different visual counts
(different image counts, or NeXT images whose sizes give different counts): each example is pruned
by the recipe for its own count, exact against pruning as masking on the example alone.

These families have no visual-token mark: the host reads each example's count off the merge's mask,
which arrives as a graph input (transformers' image-placeholder check breaks the graph just before
the merge; contract item `example-counts`)."""

from __future__ import annotations

import copy

import pytest
import torch

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.testbed.batching import batch_prompts
from fitprune_fx.testbed.tiny import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    PromptSpec,
    make_inputs,
    make_next_inputs,
    tiny_llava,
    tiny_llava_next,
)
from fitprune_fx.testbed.tiny_llava_hr import tiny_llava_hr
from graph_harness import assert_each_example_pruned_like_alone

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def llava_batch(model, images: list[int], seed: int) -> tuple[dict, list[dict]]:
    """One prompt per entry of `images` (that many images each), alone and left-padded as one batch."""
    alone = [
        make_inputs(model, [PromptSpec(1 + (seed + e) % 3, 2 + e, images=n)], seed=seed + e)
        for e, n in enumerate(images)
    ]
    return batch_prompts(alone, PAD_TOKEN_ID), alone


def next_batch(model, sizes: list[tuple[int, int]], seed: int) -> tuple[dict, list[dict]]:
    """One prompt per LLaVA-NeXT image size (different visual counts), alone and as one batch."""
    alone = [
        make_next_inputs(model, [PromptSpec(2 + e, 3)], [hw], seed=seed + e) for e, hw in enumerate(sizes)
    ]
    return batch_prompts(alone, PAD_TOKEN_ID), alone


@pytest.mark.parametrize("family, compiler", [("llava", "eager"), ("llava-hr", "eager")])
def test_a_batch_with_different_image_counts_is_pruned_like_each_example_alone(family, compiler):
    """Count recipe (format 1): an example with two images deletes the recipe's counts scaled to its
    own visual tokens, one with one image the recipe's own. The first call already mixes counts
    (a static graph that reads them per call), the second on the graph for any count. (Inductor on
    padded LLaVA graphs, per layer: `test_backend.py`'s Inductor test at batch 2.)"""
    model = tiny_llava(num_layers=3, seed=4) if family == "llava" else tiny_llava_hr(num_layers=3, seed=4)
    oracle = copy.deepcopy(model)
    info = ModelInfo.from_config(model.config)
    recipe = Recipe(model=info, prune={0: info.num_visual_tokens // 4, 1: info.num_visual_tokens // 8})
    backend = fitprune_backend(recipe, compiler=compiler, progress=False)
    calls = [
        llava_batch(model, [1, 2, 1], 10),
        llava_batch(model, [2, 1], 20),
        llava_batch(model, [1, 1, 3], 30),
    ]
    hr = family == "llava-hr"  # LLaVA's decoder and merge after a heavier vision tower: one mixed call
    calls = calls[:1] if hr else calls
    assert_each_example_pruned_like_alone(
        model, oracle, backend, calls, [IMAGE_TOKEN_ID], recipe, first_static=hr
    )
    assert backend.pruned_graphs[0].result.padded, backend.summary()


def test_next_batches_of_different_image_sizes_are_pruned_like_each_example_alone():
    """LLaVA-NeXT (fraction recipe): a first call mixing three sizes whose counts (52 + 88 + 68) do not
    split evenly, then two more mixes; every example keeps its own fraction of its own tokens."""
    model = tiny_llava_next(num_layers=3, seed=11)
    oracle = copy.deepcopy(model)
    fractions = {0: 0.25, 1: 0.2}
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), fractions)
    backend = fitprune_backend(recipe, compiler="eager")
    calls = [
        next_batch(model, [(32, 64), (64, 64), (30, 90)], 1),
        next_batch(model, [(64, 64), (32, 64)], 2),
        next_batch(model, [(100, 20), (40, 64), (64, 64)], 3),
    ]
    assert_each_example_pruned_like_alone(model, oracle, backend, calls, [IMAGE_TOKEN_ID], fractions)
    assert all(r.result.padded for r in backend.pruned_graphs), backend.summary()


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_next_generate_on_a_mixed_batch_matches_each_example_alone(mode):
    """generate on a LLaVA-NeXT batch of two image sizes. Greedy: each example's tokens and every
    step's logits equal masking's on the example alone. Sampling with a seed: the batch draws its
    own tokens; masking on each example alone, made to take the same tokens, sees the same logits
    at every step (so each draw came from the distribution the example alone would have had)."""
    import fitprune_fx

    model = tiny_llava_next(num_layers=3, seed=12)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.25, 1: 0.2})
    fitprune_fx.compile(model, recipe, compiler="eager")
    sampling = dict(do_sample=True, temperature=0.8, top_k=20) if mode == "sample" else dict(do_sample=False)
    gen = dict(max_new_tokens=5, pad_token_id=PAD_TOKEN_ID, output_logits=True, return_dict_in_generate=True)
    batch, alone = next_batch(model, [(32, 64), (64, 64)], 5)
    with torch.no_grad():
        torch.manual_seed(0)
        got = model.generate(**batch, **gen, **sampling)
        for e, inputs in enumerate(alone):
            new = got.sequences[e, batch["input_ids"].shape[1] :]
            n = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum())
            forced = [_Force(new)] if mode == "sample" else []
            with MaskingReference(oracle, dict(recipe.deletions_for(n))):
                expected = oracle.generate(**inputs, **gen, do_sample=False, logits_processor=forced)
            assert torch.equal(new, expected.sequences[0, inputs["input_ids"].shape[1] :]), (e, new, expected)
            for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits, strict=True)):
                torch.testing.assert_close(ours[e], theirs[0], atol=1e-4, rtol=1e-4, msg=f"step {step}")
    if mode == "sample":  # the draws were no greedy choice in disguise
        drawn = got.sequences[:, batch["input_ids"].shape[1] :]
        assert (torch.stack(got.logits, 1).argmax(-1) != drawn).any()
    assert model.fitprune_backend.pruned_graphs[-1].result.padded


class _Force:
    """A logits processor that makes greedy search take `tokens` in order (raw logits are kept in
    `output_logits`, so the reference's own logits stay visible)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[self.step]] = 0.0
        self.step += 1
        return forced


def test_an_empty_recipe_answers_a_mixed_batch_unchanged():
    """`fitprune-fx eval`'s unpruned run compiles through the backend with an empty recipe: a batch
    that mixes visual counts is answered as the model answers it (no count check to fail)."""
    model = tiny_llava_next(num_layers=2, seed=13)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={})
    batch, _ = next_batch(model, [(32, 64), (64, 64)], 6)
    with torch.no_grad():
        expected = model(**batch).logits
        got = torch.compile(model, backend=fitprune_backend(recipe, compiler="eager"))(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("released", [False, True], ids=["full-layers", "released-pattern"])
def test_gemma3_batch_with_different_image_counts_is_pruned_like_each_example_alone(released):
    """Gemma 3 (image tokens attend both ways): prompts with 1, 2 and 1 images in one batch read their
    counts off the merge's mask like LLaVA's; prefill, then greedy `generate` with every step's
    logits, each example against masking on it alone. With all layers full attention, and with the
    released pattern (5 sliding : 1 full, window 8): void slots and a window that slides past them."""
    from fitprune_fx.testbed.tiny_gemma3 import IMAGE, make_gemma3_inputs, tiny_gemma3

    if released:
        model = tiny_gemma3(num_layers=6, full_attention_only=False, window=8, seed=5)
    else:
        model = tiny_gemma3(num_layers=4, seed=5)
    oracle = copy.deepcopy(model)
    info = ModelInfo.from_config(model.config)
    recipe = Recipe(model=info, prune={1: 5, 3: 3} if released else {0: 5, 2: 3})  # per image
    alone = [make_gemma3_inputs(model, [2 + e], [3], images=n, seed=20 + e) for e, n in enumerate([1, 2, 1])]
    batch = batch_prompts(alone)
    backend = fitprune_backend(recipe, compiler="eager")
    assert_each_example_pruned_like_alone(model, oracle, backend, [(batch, alone)], [IMAGE], recipe, True)
    assert backend.pruned_graphs[0].result.padded

    import fitprune_fx

    torch._dynamo.reset()
    fitprune_fx.compile(model, recipe, compiler="eager")
    steps = 12 if released else 4  # past the window
    gen = dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(**batch, **gen)
        for e, inputs in enumerate(alone):
            n = int((inputs["input_ids"][0] == IMAGE).sum())
            with MaskingReference(oracle, dict(recipe.deletions_for(n))):
                expected = oracle.generate(**inputs, **gen)
            new = got.sequences[e, batch["input_ids"].shape[1] :]
            assert torch.equal(new, expected.sequences[0, inputs["input_ids"].shape[1] :]), (e, new, expected)
            for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits, strict=True)):
                torch.testing.assert_close(ours[e], theirs[0], atol=1e-4, rtol=1e-4, msg=f"step {step}")
