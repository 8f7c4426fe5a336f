"""The FX pass against the eager reference, on the transformed graph run without Inductor."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitprune_fx.backend import fitprune_backend
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID, PromptSpec, make_inputs, num_image_tokens, tiny_llava
from fitprune_fx.testbed.tiny_llava_hr import tiny_llava_hr
from graph_harness import (
    CapturedDecoder,
    KeptRecorder,
    assert_pass_matches_reference,
    compose_kept,
    plain_graph,
)

torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096

MODELS = {  # name -> tiny_llava kwargs (llava-hr: tiny_llava_hr's); GQA in all but one
    "llama": dict(text_model="llama", num_layers=3),
    "llava-hr": dict(num_layers=3),
    "llama-mha": dict(text_model="llama", num_layers=3, num_kv_heads=4),
    "mistral": dict(text_model="mistral", num_layers=3),
    "qwen2": dict(text_model="qwen2", num_layers=3),
}


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float32):
    build = tiny_llava_hr if name == "llava-hr" else tiny_llava
    return build(**MODELS[name], seed=7, dtype=dtype)


@functools.cache
def captured(name: str, batch: int, images: int, dtype: torch.dtype = torch.float32) -> CapturedDecoder:
    """One static Dynamo capture per model, batch size and image count (the length is fixed too)."""
    return CapturedDecoder(model(name, dtype))


TEXT = 8  # text tokens around the image(s) in the longest prompt of a batch: fixes the length


def recipe_for(m, prune: dict[int, int], scorer: str = "fitprune", seed: int = 0) -> Recipe:
    return Recipe(
        model=ModelInfo.from_config(m.config), prune=prune, scorer=scorer, scorer_options={"seed": seed}
    )


@st.composite
def batches(draw):
    """A model name, and a left-padded batch with the image(s) anywhere in each prompt."""
    name = draw(st.sampled_from(sorted(MODELS)))
    batch = draw(st.sampled_from([1, 3]))
    images = draw(st.sampled_from([1, 1, 2]))
    prompts = []
    for i in range(batch):
        total = TEXT if i == 0 else draw(st.integers(1, TEXT))  # first prompt is the longest
        after = draw(st.integers(1, total))
        prompts.append(PromptSpec(before=total - after, after=after, images=images))
    return name, draw(st.permutations(prompts)), draw(st.integers(0, 2**16))


@st.composite
def recipes(draw, num_layers: int, num_visual: int):
    """Random deletions (total <= the visual tokens of one image) at random layers."""
    layers = draw(st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True))
    prune, left = {}, num_visual
    for layer in sorted(layers):
        d = draw(st.integers(0, left))
        prune[layer] = d
        left -= d
    return prune


def run_pass(name, prompts, seed, prune, scorer="fitprune", dtype=torch.float32):
    """Compile with a recipe (counts per image) and run; returns the per-example counts applied."""
    m = model(name, dtype)
    inputs = make_inputs(m, prompts, seed=seed)
    cap = captured(name, len(prompts), prompts[0].images, dtype)
    recipe = recipe_for(m, prune, scorer)
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    out = cap.run(recorder, **inputs)
    applied = recipe.pruning_plan(num_image_tokens(m) * prompts[0].images)
    return m, inputs, out, recorder, dict(sorted(applied.items()))


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), case=batches())
def test_zero_recipes_change_nothing_and_random_recipes_equal_the_reference(data, case):
    """On one batch: scoring + identity compaction at random layers changes no output bit (logits
    and caches); a random recipe's kept-token sets and logits at kept positions equal the eager
    reference, text is never deleted, and each layer caches what entered it. (One test, so the two
    properties share each batch's Dynamo capture, which costs most of their time.)"""
    name, prompts, seed = case
    m = model(name)
    layers = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    inputs = make_inputs(m, prompts, seed=seed)
    cap = captured(name, len(prompts), prompts[0].images)
    backend = fitprune_backend(recipe_for(m, dict.fromkeys(layers, 0)), compiler="eager")
    pruned = cap.run(backend, **inputs)
    assert [r.action for r in backend.reports] == ["pruned"]
    original = cap.run(plain_graph, **inputs)
    assert torch.equal(pruned.logits, original.logits)
    for a, b in zip(pruned.past_key_values.layers, original.past_key_values.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    recipe = data.draw(recipes(m.config.text_config.num_hidden_layers, num_image_tokens(m)))
    _, inputs, out, recorder, prune = run_pass(name, prompts, seed, recipe)
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune
    )
    assert_pass_matches_reference(inputs, out, recorder, ref, prune)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [t for t in ref.tokens_per_layer[0][:-1]]


@pytest.mark.parametrize("scorer", ["fastv", "random"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_other_scorers_match_reference(scorer, name):
    prompts = [PromptSpec(2, 4), PromptSpec(5, 2), PromptSpec(0, 3)]
    prune = {1: 8}
    _, inputs, out, recorder, prune = run_pass(name, prompts, 3, prune, scorer=scorer)
    m = model(name)
    ref = reference_prefill(
        m,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["attention_mask"],
        prune=prune,
        scorer=scorer,
        scorer_options={"seed": 0},
    )
    ours = compose_kept(recorder.kept, inputs["input_ids"].shape[1], 3)
    for b in range(3):
        assert torch.equal(ours[0][b], ref.kept[b][0])
        torch.testing.assert_close(out.logits[b], ref.logits[b, ref.kept_final[b]], atol=1e-4, rtol=1e-4)


def test_bfloat16_keeps_text_and_tracks_reference():
    """bf16: same machinery; scores differ in rounding, so compare agreement loosely."""
    prompts = [PromptSpec(3, 5), PromptSpec(1, 2)]
    prune = {0: 4, 1: 4}
    m, inputs, out, recorder, prune = run_pass("llama", prompts, 1, prune, dtype=torch.bfloat16)
    assert out.logits.dtype == torch.bfloat16
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 8
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune
    )
    ours = compose_kept(recorder.kept, inputs["input_ids"].shape[1], 2)
    for b in range(2):
        text = (inputs["input_ids"][b] != IMAGE_TOKEN_ID).nonzero().flatten()
        assert set(text.tolist()) <= set(ours[-1][b].tolist())
        overlap = len(set(ours[-1][b].tolist()) & set(ref.kept_final[b].tolist())) / len(ref.kept_final[b])
        assert overlap >= 0.8
        if torch.equal(ours[-1][b], ref.kept_final[b]):
            diff = (out.logits[b].float() - ref.logits[b, ref.kept_final[b]].float()).abs().max()
            assert diff < 0.1


def test_no_compaction_reads_a_compacted_tensor():
    """Each pruning layer gathers the per-token tensors (RoPE, mask, visual mask) from their
    uncompacted originals at the kept tokens' original positions (composed with the decoder
    entry's identity positions, `entry_compaction`), and the residual stream through
    an op Inductor does not fuse. A gather of a gather would put one more indirection into every
    later layer's kernels, so that no two pruning layers could share them. The numbers are the
    reference's all the same."""
    from fitprune_fx.passes.token_ops import gather_tokens

    prompts = [PromptSpec(2, 5, images=2), PromptSpec(4, 1, images=2)]
    m, inputs, out, recorder, prune = run_pass("llama", prompts, 5, {0: 3, 1: 5, 2: 2})
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune
    )
    assert_pass_matches_reference(inputs, out, recorder, ref, prune)

    ops = torch.ops.fitprune
    nodes = list(recorder.graph_module.graph.nodes)
    gathers = [n for n in nodes if n.target is gather_tokens]
    for n in gathers:  # a multi-dim gather (the 4-D mask: rows, then columns) uses one index twice
        src = n.args[0]
        assert src.target is not gather_tokens or src.args[1] is n.args[1], n.format_node()
        assert src.target is not ops.gather_residual.default, n.format_node()
    positions = [n for n in nodes if n.target is ops.kept_positions.default]
    assert len(positions) == 3  # every layer composes its kept indices with the earlier positions
    (entry,) = [n for n in nodes if n.target is ops.entry_positions.default]  # 0..S-1, S counted
    assert positions[0].args[0] is entry
    per_token = [n for n in gathers if n.args[1] in positions]
    assert len(per_token) == 3 * 5  # RoPE cos and sin, mask rows and columns, visual mask, per layer
    originals = {n.args[0] for n in per_token if n.args[0].target is not gather_tokens}
    assert len(originals) == 4  # cos, sin, mask, visual mask: each read where it was made
    # At the decoder's entry the same four and the residual stream are copied, sized by the
    # entry count (what a gather at 0..S-1 gives), from the same originals.
    entered = [n for n in nodes if n.target is ops.enter_tokens.default]
    assert len(entered) == 5 and {n.args[1] for n in entered} == {entry.args[0]}
    assert originals < {n.args[0] for n in entered}
    residual = [n for n in nodes if n.target is ops.gather_residual.default]
    assert len(residual) == 3  # one per pruning layer
