"""One pruned graph for every visual count and batch size: a run of calls whose image sizes and batch
sizes change, each call against pruning as masking (`MaskingReference`, the models' own code)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.testbed.tiny_qwen import IMAGE, make_qwen_inputs, tiny_qwen_vl
from graph_harness import KeptRecorder, assert_pass_matches_masking

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FRACTIONS = {1: 0.25, 2: 0.25}
GRIDS = [(4, 4), (4, 6), (6, 6), (4, 8), (6, 8), (8, 8), (8, 10), (6, 12), (10, 10), (8, 12), (10, 12), (12, 12)]


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
    calls += [batch_of(model, GRIDS[3], 3, 20), batch_of(model, GRIDS[7], 2, 21), batch_of(model, GRIDS[0], 3, 22)]
    for step, inputs in enumerate(calls):
        check_call(compiled, oracle, recorder, inputs)
        if step == len(GRIDS) - 1:  # every size at batch 1 served by 2 graphs
            graphs = recorder.backend.pruned_graphs
            assert [r.result.any_visual_count for r in graphs] == [False, True], recorder.backend.summary()
    # Batches add graphs for Dynamo's own guards on the frame (the list of per-image features has one
    # entry per example), as they do unpruned; each of them serves any visual count.
    assert all(r.result.any_visual_count for r in recorder.backend.pruned_graphs[1:])
    assert "for any visual count and batch size" in recorder.backend.summary()


def mixed_batch(model, grids: list[tuple[int, int]], seed: int) -> tuple[dict, list[dict]]:
    """One prompt per grid (different visual counts) left-padded into one batch, and each alone."""
    alone = [make_qwen_inputs(model, [2 + i], [3 + 2 * i], grid=g, seed=seed + i) for i, g in enumerate(grids)]
    length = max(a["input_ids"].shape[1] for a in alone)

    def pad(x):
        return torch.cat([x.new_zeros(1, length - x.shape[1]), x], dim=1)

    batch = {k: torch.cat([pad(a[k]) for a in alone]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch["pixel_values"] = torch.cat([a["pixel_values"] for a in alone])
    batch["image_grid_thw"] = torch.cat([a["image_grid_thw"] for a in alone])
    return batch, alone


def test_a_batch_of_different_image_sizes_is_pruned_like_each_example_alone():
    """A batch of 3 prompts whose images give 4, 16 and 9 visual tokens (after a first call of another
    composition, so the graph serves any count): each example keeps its own fraction of its own
    visual tokens; its logits at its kept tokens equal pruning as masking on the example alone."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
    backend = fitprune_backend(recipe, compiler="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for grids, seed in (([(6, 6), (6, 6), (6, 6)], 40), ([(4, 4), (8, 8), (6, 6)], 50), ([(8, 6), (4, 6), (4, 4)], 60)):
            batch, alone = mixed_batch(model, grids, seed)
            runs = backend.pruned_runs
            logits = compiled(**batch).logits
            assert backend.pruned_runs == runs + 1
            for e, inputs in enumerate(alone):
                prune = masking_plan(oracle, inputs, FRACTIONS)
                with MaskingReference(oracle, prune) as masking:
                    expected = oracle(**inputs).logits[0]
                deleted = torch.zeros_like(masking.deleted[min(prune)][0])
                for layer in prune:
                    deleted |= masking.deleted[layer][0]
                kept = (~deleted).nonzero().squeeze(1)
                ours = logits[e, logits.shape[1] - len(kept) :]  # real tokens are right-aligned
                torch.testing.assert_close(ours, expected[kept], atol=1e-4, rtol=1e-4)
    assert backend.pruned_graphs[-1].result.any_visual_count, backend.summary()


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
