"""One pruned graph for every visual count and batch size: a run of calls whose image sizes and batch
sizes change, each call against pruning as masking (`MaskingReference`, the models' own code)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.testbed.batching import batch_prompts
from fitprune_fx.testbed.tiny_qwen import (
    IMAGE,
    IMAGE_GRIDS,
    VIDEO,
    make_qwen_inputs,
    tiny_qwen_vl,
)
from graph_harness import KeptRecorder, assert_each_example_pruned_like_alone, assert_pass_matches_masking

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FRACTIONS = {1: 0.25, 2: 0.25}
GRIDS = IMAGE_GRIDS


def masking_plan(model, inputs, fractions) -> dict[int, int]:
    """The recipe's deletions for this call's visual count per example (every example holds the same)."""
    n = int((inputs["input_ids"][0] == IMAGE).sum())
    info = dataclasses.replace(ModelInfo.from_config(model.config), num_visual_tokens=n)
    return dict(Recipe.from_fractions(info, fractions).prune)


def batch_of(model, grid: tuple[int, int], size: int, seed: int) -> dict:
    """`size` prompts with one image of `grid` each (the same visual count), left-padded."""
    before = [2 + (seed + i) % 3 for i in range(size)]
    after = [3 + (seed * 7 + i) % 4 for i in range(size)]
    return make_qwen_inputs(model, before, after, grid=grid, seed=seed)


def check_call(model, oracle, recorder: KeptRecorder, inputs: dict) -> None:
    recorder.kept.clear()
    with torch.no_grad():
        logits = model(**inputs).logits
    prune = masking_plan(oracle, inputs, FRACTIONS)
    assert len(recorder.kept) == len(FRACTIONS), "the call ran no pruned graph"
    with torch.no_grad(), MaskingReference(oracle, prune) as masking:
        expected = oracle(**inputs).logits
    assert_pass_matches_masking(inputs, logits, recorder.kept, masking, expected, prune)


def test_twelve_image_sizes_and_three_batch_sizes_on_one_graph():
    """12 image sizes at batch 1, then batches of 3 and 2: every call pruned exactly, and the pruned
    decoder graphs number 3 (the first call's, the one for any visual count Dynamo compiles after
    the first size change, and the one after the first batch-size change), not one per size."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    compiled = torch.compile(model, backend=recorder)
    calls = [batch_of(model, grid, 1, seed) for seed, grid in enumerate(GRIDS)]
    calls += [
        batch_of(model, GRIDS[3], 3, 20),
        batch_of(model, GRIDS[7], 2, 21),
        batch_of(model, GRIDS[0], 3, 22),
    ]
    for step, inputs in enumerate(calls):
        check_call(compiled, oracle, recorder, inputs)
        if step == len(GRIDS) - 1:  # every size at batch 1 served by 2 graphs
            graphs = recorder.backend.pruned_graphs
            assert [r.result.any_visual_count for r in graphs] == [False, True], recorder.backend.summary()
    # Each new batch size adds a graph: Qwen2.5-VL's decoder frame resumes after a graph break with
    # the per-image feature list on its stack, and Dynamo guards the list's length. Plain Inductor's
    # decoder frame recompiles per batch size too (at the same recompile limit; at the default 8 it
    # stops compiling). Each of ours serves any visual count.
    assert all(r.result.any_visual_count for r in recorder.backend.pruned_graphs[1:])
    assert "for any visual count and batch size" in recorder.backend.summary()


def mixed_batch(
    model, grids: list[tuple[int, int]], seed: int, videos: list | None = None
) -> tuple[dict, list]:
    """One prompt per grid (different visual counts; with `videos`, a video each too) left-padded
    into one batch, and each prompt alone."""
    alone = [
        make_qwen_inputs(model, [2 + i], [3 + 2 * i], grid=g, seed=seed + i, video=videos and videos[i])
        for i, g in enumerate(grids)
    ]
    return batch_prompts(alone), alone


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_batch_of_different_image_sizes_is_pruned_like_each_example_alone(variant):
    """Batches of 3 prompts whose images give different visual counts (after a first call of one
    size, so the graph serves any count): each example keeps its own fraction of its own visual
    tokens; its logits at its kept tokens equal pruning as masking on the example alone. Qwen3-VL
    adds DeepStack features into the residual stream of the first layers."""
    model = tiny_qwen_vl(variant, num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    grids = ([(6, 6), (6, 6), (6, 6)], [(4, 4), (8, 8), (6, 6)], [(8, 6), (4, 6), (4, 4)])
    calls = [mixed_batch(model, g, seed) for g, seed in zip(grids, (40, 50, 60), strict=True)]
    backend = fitprune_backend(recipe, compiler="eager")
    assert_each_example_pruned_like_alone(model, oracle, backend, calls, [IMAGE], FRACTIONS)


def test_a_batch_of_an_image_and_a_video_with_different_counts():
    """Qwen2.5-VL, one prompt with an image and a video, the other with another image and a longer
    video: one visual mask over both, each example pruned like itself alone."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=3)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    calls = [mixed_batch(model, [(6, 6), (6, 6)], 90, [(2, 4, 4), (2, 4, 4)])]
    calls.append(mixed_batch(model, [(4, 4), (6, 8)], 91, [(2, 4, 4), (4, 4, 6)]))
    backend = fitprune_backend(recipe, compiler="eager")
    assert_each_example_pruned_like_alone(model, oracle, backend, calls, [IMAGE, VIDEO], FRACTIONS)


def test_onevision_processor_batch_of_two_image_sizes():
    """LLaVA-OneVision through its real processor: one batch holding images of two sizes (different
    any-resolution tilings, so different visual counts) and each prompt processed alone."""
    from fitprune_fx.testbed.tiny_onevision import IMAGE as OV_IMAGE
    from fitprune_fx.testbed.tiny_onevision import VIDEO as OV_VIDEO
    from fitprune_fx.testbed.tiny_onevision import tiny_llava_onevision
    from fitprune_fx.testbed.tiny_processors import onevision_processor

    model = tiny_llava_onevision(num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    processor = onevision_processor(model)

    def processed(prompts, images):
        return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))

    prompts = ["w1 w2 <image> what is in the image ?", "<image> what ?"]
    calls = []
    for sizes, seed in (([(40, 60), (40, 60)], 0), ([(40, 60), (200, 150)], 1)):
        rng = np.random.default_rng(seed)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
        alone = [processed([p], [i]) for p, i in zip(prompts, images, strict=True)]
        calls.append((processed(prompts, images), alone))
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.3, 2: 0.25})
    backend = fitprune_backend(recipe, compiler="eager")
    assert_each_example_pruned_like_alone(
        model, oracle, backend, calls, [OV_IMAGE, OV_VIDEO], {0: 0.3, 2: 0.25}
    )


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_generate_on_a_batch_of_different_image_sizes_matches_each_example_alone(mode):
    """generate on a mixed batch (after a first call, so the graph serves any count): the tokens
    of each example equal masking's on the example alone (greedy, with every step's logits, and
    2 beams)."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=5)
    oracle = copy.deepcopy(model)
    import fitprune_fx

    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    fitprune_fx.compile(model, recipe, compiler="eager")
    options = {
        "greedy": dict(do_sample=False),
        "beams": dict(do_sample=False, num_beams=2),
    }[mode]
    gen = dict(max_new_tokens=5, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **options)
    with torch.no_grad():
        model.generate(**mixed_batch(model, [(6, 6), (6, 6)], 70)[0], **gen)  # a first composition
        batch, alone = mixed_batch(model, [(4, 4), (8, 8)], 80)
        torch.manual_seed(0)
        got = model.generate(**batch, **gen)
        for e, inputs in enumerate(alone):
            prune = masking_plan(oracle, inputs, FRACTIONS)
            with MaskingReference(oracle, prune):
                expected = oracle.generate(**inputs, **gen)
            new = got.sequences[e, batch["input_ids"].shape[1] :]
            assert torch.equal(new, expected.sequences[0, inputs["input_ids"].shape[1] :]), (e, new, expected)
            if mode == "greedy":  # every decode step's logits, not only their argmax
                for step, (ours, theirs) in enumerate(zip(got.scores, expected.scores, strict=True)):
                    torch.testing.assert_close(ours[e], theirs[0], atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert model.fitprune_backend.pruned_graphs[-1].result.any_visual_count


def test_a_first_generate_on_equal_length_prompts_of_different_image_sizes():
    """Prompts of equal length whose images differ in size: nothing is padded, so generate hands
    SDPA no mask (`is_causal=True`), and the pass writes the causal mask itself to hide the void
    slots of the smaller example (`passes/causal_mask.py`). Each example's tokens and every step's
    logits equal masking's on the example alone; before, the run-time count check refused the call."""
    import fitprune_fx

    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=2)
    oracle = copy.deepcopy(model)
    fitprune_fx.compile(
        model, Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS), compiler="eager"
    )
    alone = [
        make_qwen_inputs(model, [2], [15], grid=(4, 4), seed=1),  # 4 visual tokens, a longer question
        make_qwen_inputs(model, [2], [3], grid=(8, 8), seed=2),  # 16 visual tokens
    ]
    batch = batch_prompts(alone)
    assert bool(batch["attention_mask"].all())  # equal lengths: no padding
    gen = dict(
        max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        got = model.generate(**batch, **gen)
        for e, inputs in enumerate(alone):
            with MaskingReference(oracle, masking_plan(oracle, inputs, FRACTIONS)):
                expected = oracle.generate(**inputs, **gen)
            assert torch.equal(got.sequences[e, 23:], expected.sequences[0, 23:]), e
            for step, (ours, theirs) in enumerate(zip(got.scores, expected.scores, strict=True)):
                torch.testing.assert_close(ours[e], theirs[0], atol=1e-4, rtol=1e-4, msg=f"step {step}")
    (graph,) = model.fitprune_backend.pruned_graphs
    assert graph.result.padded


_SHARED: dict = {}  # one compiled model for every hypothesis example (graphs are reused across them)


def _shared_model():
    if not _SHARED:
        torch._dynamo.reset()
        model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=11)
        oracle = copy.deepcopy(model)
        recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.3, 2: 0.4})
        backend = fitprune_backend(recipe, compiler="eager")
        _SHARED.update(
            model=torch.compile(model, backend=backend), oracle=oracle, backend=backend, batches=set()
        )
    return _SHARED


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    grids=st.lists(st.sampled_from(GRIDS[:9]), min_size=1, max_size=3),
    texts=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=3, max_size=3),
)
@example(grids=[(4, 4)], texts=[(2, 3)] * 3)  # batch 1 first: the static graph
@example(grids=[(6, 6), (4, 8), (8, 8)], texts=[(1, 6), (5, 2), (3, 3)])  # three counts, padding
@example(grids=[(8, 10), (8, 10)], texts=[(2, 2), (6, 5)])  # one count, padding
@example(grids=[(4, 6), (10, 10)], texts=[(3, 4), (1, 1)])  # a small and a large image
def test_random_batches_are_pruned_like_each_example_alone(grids, texts):
    """Random batch compositions, image sizes and text around them on one compiled model: every
    example's logits at its kept tokens equal pruning as masking on it alone, and every graph after
    the first serves any visual count. (Dynamo adds a graph per new batch size here, from its guard
    on the length of Qwen2.5-VL's per-image feature list, as it does for plain Inductor; the graph
    count at batch 1 is checked by `test_twelve_image_sizes_and_three_batch_sizes_on_one_graph`.)"""
    shared = _shared_model()
    alone = [
        make_qwen_inputs(shared["oracle"], [b], [a], grid=g, seed=i)
        for i, (g, (b, a)) in enumerate(zip(grids, texts[: len(grids)], strict=True))
    ]
    batch = batch_prompts(alone)
    backend = shared["backend"]
    runs = backend.pruned_runs
    with torch.no_grad():
        logits = shared["model"](**batch).logits
    assert backend.pruned_runs == runs + 1
    fractions = {0: 0.3, 2: 0.4}
    with torch.no_grad():
        for e, inputs in enumerate(alone):
            prune = masking_plan(shared["oracle"], inputs, fractions)
            with MaskingReference(shared["oracle"], prune) as masking:
                expected = shared["oracle"](**inputs).logits[0]
            deleted = masking.deleted[0][0] | masking.deleted[2][0]
            kept = (~deleted).nonzero().squeeze(1)
            torch.testing.assert_close(
                logits[e, logits.shape[1] - len(kept) :], expected[kept], atol=1e-4, rtol=1e-4
            )
    assert all(r.result.any_visual_count for r in backend.pruned_graphs[1:]), backend.summary()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_a_first_call_that_mixes_image_sizes_is_pruned(compiler):
    """The very first call is a batch of two image sizes (what an evaluation harness sends): its
    graph, static in every size, reads the examples' counts per call and pads; then a second split
    of the same total on that graph (Inductor: its four layers differ, so it compiles whole)."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=2)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    backend = fitprune_backend(recipe, compiler=compiler, progress=False)
    calls = [mixed_batch(model, [(4, 4), (8, 8)], 30), mixed_batch(model, [(8, 8), (4, 4)], 31)]
    assert_each_example_pruned_like_alone(
        model, oracle, backend, calls, [IMAGE], FRACTIONS, first_static=True
    )
    assert backend.pruned_graphs[0].result.padded and not backend.pruned_graphs[0].result.any_visual_count
