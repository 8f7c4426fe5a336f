"""Gemma 3 on tiny models: the pass against pruning as masking (bidirectional attention among image
tokens, several images, left padding, and its released pattern of sliding-window and full layers)."""

from __future__ import annotations

import copy

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


def test_the_released_layer_pattern_is_pruned_and_decodes_64_steps_past_the_window():
    """Gemma 3's own layer pattern (five sliding-window layers, then one full) with a window of 8,
    shorter than the prompt: pruned through fitprune_fx.compile, and 64 greedy steps (the window
    slides past every pruned token) equal pruning as masking, per-step logits within 1e-4. The
    first full-attention layer is pruned, so the masks transformers sizes from it must count
    original positions."""
    model = tiny_gemma3(num_layers=6, full_attention_only=False, window=8, seed=7)
    assert model.config.text_config.layer_types.count("sliding_attention") == 5
    oracle = copy.deepcopy(model)
    inputs = make_gemma3_inputs(model, [2, 6], [5, 2], seed=8)
    prune = {1: 6, 4: 4}  # layer 5 (full attention) and layers 2-4 (sliding) hold pruned caches
    fitprune_fx.compile(model, recipe(model, prune), compiler="eager")
    gen = dict(max_new_tokens=64, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(**inputs, **gen)
    with torch.no_grad(), MaskingReference(oracle, prune):
        expected = oracle.generate(**inputs, **gen)
    assert model.fitprune_backend.pruned_runs == 1
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((a - e).abs().max().item() for a, e in zip(got.scores, expected.scores, strict=True))
    assert worst <= 1e-4, worst
    lengths = [layer.keys.shape[-2] for layer in got.past_key_values.layers]
    assert lengths[:5] == [7] * 5 and lengths[5] == inputs["input_ids"].shape[1] + 63 - 10
    print(f"gemma3 released pattern: 64 steps, per-step logits max |diff| {worst:.2e}")


def test_fit_is_refused_with_the_reason():
    model = tiny_gemma3(num_layers=2, seed=9)
    with pytest.raises(NotImplementedError, match="Gemma 3's image tokens attend both ways"):
        fitprune_fx.fit(model, [make_gemma3_inputs(model, [2], [3], seed=10)], 0.4)
