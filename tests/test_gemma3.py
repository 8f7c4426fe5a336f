"""Gemma 3 on tiny models: the pass against pruning as masking (bidirectional attention among image
tokens, several images, left padding), and its real mixed sliding/full layer pattern left unpruned
with one warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.testbed.tiny_gemma3 import make_gemma3_inputs, tiny_gemma3
from graph_harness import KeptRecorder, assert_greedy_generate_matches_masking, compose_kept

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def recipe(model, prune: dict[int, int]) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=prune)  # counts per image (16 tokens)


def test_prefill_keeps_the_oracles_tokens_and_logits():
    """Two images per prompt: the recipe's per-image counts double; image tokens see each other both
    ways, so scoring must read the model's mask as it is (a causal scorer picks other tokens)."""
    model = tiny_gemma3(num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    inputs = make_gemma3_inputs(model, [2, 6], [5, 2], images=2, seed=3)
    recorder = KeptRecorder(fitprune_backend(recipe(model, {0: 6, 2: 4}), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    deletions = recorder.backend.pruned_graphs[0].result.deletions
    assert deletions == {0: 12, 2: 8}
    with torch.no_grad(), MaskingReference(oracle, deletions) as masking:
        expected = oracle(**inputs).logits
    batch, seq_len = inputs["input_ids"].shape
    ours = compose_kept(recorder.kept, seq_len, batch)
    worst = 0.0
    for step, layer in enumerate(sorted(deletions)):
        for b in range(batch):
            assert torch.equal(ours[step][b], (~masking.deleted[layer][b]).nonzero().squeeze(1))
    for b in range(batch):
        kept = ours[-1][b]
        valid = inputs["attention_mask"][b, kept].bool()
        worst = max(worst, (out[b][valid] - expected[b, kept][valid]).abs().max().item())
    assert worst <= 1e-4, worst
    print(f"gemma3: prefill logits at kept positions max |diff| {worst:.2e}")


def test_zero_recipe_reproduces_the_model():
    model = tiny_gemma3(num_layers=3, seed=2)
    inputs = make_gemma3_inputs(model, [3], [4], seed=4)
    backend = fitprune_backend(recipe(model, {1: 0}), compiler="eager")
    with torch.no_grad():
        expected = model(**inputs).logits
        out = torch.compile(model, backend=backend)(**inputs).logits
    assert len(backend.pruned_graphs) == 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_greedy_generate_matches_masking_on_a_left_padded_batch():
    model = tiny_gemma3(num_layers=4, seed=5)
    inputs = make_gemma3_inputs(model, [2, 6], [5, 2], seed=6)
    assert_greedy_generate_matches_masking(model, recipe(model, {0: 6, 2: 4}), inputs, {0: 6, 2: 4}, "gemma3")


def test_the_real_sliding_full_pattern_runs_unpruned_with_one_warning():
    """Gemma 3's own layer pattern (five sliding-window layers, one full): not pruned, one warning
    naming the sliding windows, outputs identical to the uncompiled model."""
    model = tiny_gemma3(num_layers=6, full_attention_only=False, seed=7)
    assert model.config.text_config.layer_types.count("sliding_attention") == 5
    inputs = make_gemma3_inputs(model, [2, 6], [5, 2], seed=8)
    backend = fitprune_backend(recipe(model, {1: 8}), compiler="eager")
    with torch.no_grad():
        expected = model(**inputs).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(model, backend=backend)(**inputs).logits
    ours = [w for w in caught if "fitprune" in str(w.message)]
    assert len(ours) == 1 and "sliding-window attention" in str(ours[0].message), ours
    assert not backend.pruned_graphs
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_fit_is_refused_with_the_reason():
    model = tiny_gemma3(num_layers=2, seed=9)
    with pytest.raises(NotImplementedError, match="Gemma 3's image tokens attend both ways"):
        fitprune_fx.fit(model, [make_gemma3_inputs(model, [2], [3], seed=10)], 0.4)
