"""Tests of the eager reference (the FX pass's oracle) against Hugging Face and brute force."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitprune_fx.reference import (
    generate_position_ids,
    lowest_first,
    reference_generate,
    reference_prefill,
)
from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID, PromptSpec, make_inputs, tiny_llava

torch.set_num_threads(1)

ATOL = 1e-5

# Batches: image at different offsets, left padding, two images in one prompt.
SINGLE = [PromptSpec(before=4, after=6)]
PADDED = [PromptSpec(2, 7), PromptSpec(8, 3, images=2, between=3), PromptSpec(0, 1)]
# Same number of visual tokens per example, so that "delete all visual tokens" is one count.
PADDED_ONE_IMAGE = [PromptSpec(2, 6), PromptSpec(7, 3), PromptSpec(0, 2)]


@cache
def _model(text_model: str = "llama", num_layers: int = 3):
    return tiny_llava(text_model, num_layers=num_layers, seed=1)


@cache
def _eager(text_model: str = "llama", num_layers: int = 3):
    """A copy of the tiny model that uses the eager attention (so it can return probabilities)."""
    model = copy.deepcopy(_model(text_model, num_layers))
    model.set_attn_implementation("eager")
    return model


def _visual_positions(inputs: dict, b: int) -> set[int]:
    return set((inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().squeeze(1).tolist())


# ----------------------------------------------------------------------------------------------
# zero pruning = the model


@pytest.mark.parametrize("text_model", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("prompts", [SINGLE, PADDED], ids=["single", "padded"])
def test_zero_pruning_matches_model(text_model, prompts):
    model = _model(text_model)
    inputs = make_inputs(model, prompts)
    real = inputs["attention_mask"].bool()  # compare non-padding rows only
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    for prune in (None, {}):
        ref = reference_prefill(model, **inputs, prune=prune)
        torch.testing.assert_close(ref.logits[real], out.logits[real], atol=ATOL, rtol=0)
    assert ref.kept == [[], [], []][: len(prompts)]
    S = inputs["input_ids"].shape[1]
    assert all(torch.equal(k, torch.arange(S)) for k in ref.kept_final)
    # the caches hold the same (post-RoPE) keys and values at non-padding columns
    for layer in range(3):
        ours_layer, theirs_layer = (
            ref.past_key_values.layers[layer],
            out.past_key_values.layers[layer],
        )
        for ours, theirs in (
            (ours_layer.keys, theirs_layer.keys),
            (ours_layer.values, theirs_layer.values),
        ):
            for b in range(len(prompts)):
                torch.testing.assert_close(ours[b][:, real[b]], theirs[b][:, real[b]], atol=ATOL, rtol=0)


def test_zero_pruning_explicit_positions():
    """Explicit position_ids reach RoPE: generate's cumsum(mask) - 1 and a non-uniform one."""
    model = _model("qwen2")
    inputs = make_inputs(model, PADDED)
    real = inputs["attention_mask"].bool()
    generate_style = generate_position_ids(inputs["attention_mask"])
    stretched = 2 * generate_style  # not a shift, so it really changes the attention
    for pos in (generate_style, stretched):
        with torch.no_grad():
            expected = model(**inputs, position_ids=pos).logits
        ref = reference_prefill(model, **inputs, position_ids=pos)
        torch.testing.assert_close(ref.logits[real], expected[real], atol=ATOL, rtol=0)
    # RoPE only sees position differences: the shifted generate-style ids give the same logits
    # as the default 0..S-1, the stretched ones do not (so this test can fail)
    default = reference_prefill(model, **inputs)
    assert not torch.allclose(default.logits[real], ref.logits[real], atol=1e-3)


@pytest.mark.parametrize(
    "text_model,prompts",
    [("llama", PADDED), ("llama", SINGLE), ("qwen2", PADDED), ("mistral", SINGLE)],
    ids=["llama-padded", "llama-single", "qwen2-padded", "mistral-single"],
)
def test_zero_pruning_generate_matches_hf(text_model, prompts):
    model = _model(text_model)
    inputs = make_inputs(model, prompts, seed=3)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    ours = reference_generate(model, **inputs, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(ours, expected)


# ----------------------------------------------------------------------------------------------
# identities that hold exactly with pruning


def test_prune_after_last_layer_changes_nothing_kept():
    """Deleting after the last layer's attention leaves the logits of kept rows (and greedy
    generation, whose caches are all full) unchanged."""
    model = _model("llama")
    inputs = make_inputs(model, PADDED)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
    ref = reference_prefill(model, **inputs, prune={2: 10})
    for b in range(len(PADDED)):
        rows = ref.kept_final[b]
        rows = rows[real[b, rows]]
        torch.testing.assert_close(ref.logits[b, rows], expected[b, rows], atol=ATOL, rtol=0)
        assert ref.logits[b].isnan().all(dim=-1).sum() == 10
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    eos = model.generation_config.eos_token_id
    ours = reference_generate(model, **inputs, prune={2: 10}, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(ours, generated)


@pytest.mark.parametrize("text_model", ["llama", "qwen2"])
@pytest.mark.parametrize("layer", [0, 1])
def test_delete_all_visual_equals_text_only_tail(text_model, layer):
    """Deleting every visual token after layer k == running HF layers k+1.. on layer k's output
    at the text rows only, with their original position ids (from the unpruned model)."""
    model = _model(text_model)
    inputs = make_inputs(model, PADDED_ONE_IMAGE)
    text_model_ = model.model.language_model
    captured = {}
    hook = text_model_.layers[layer].register_forward_hook(
        lambda mod, args, out: captured.update(h=out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    n = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    ref = reference_prefill(model, **inputs, prune={layer: n})

    # text rows (padding included) of every example: S - n of them in each row
    B, S = inputs["input_ids"].shape
    rows = torch.stack([(ids != IMAGE_TOKEN_ID).nonzero().squeeze(1) for ids in inputs["input_ids"]])
    batch = torch.arange(B)[:, None]
    tail = copy.deepcopy(text_model_)  # the decoder with layers 0..k removed
    tail.layers = tail.layers[layer + 1 :]
    with torch.no_grad():
        hidden = tail(
            inputs_embeds=captured["h"][batch, rows],
            attention_mask=inputs["attention_mask"][batch, rows],
            position_ids=rows,  # original positions (0..S-1 as in the direct forward call)
            use_cache=False,
        ).last_hidden_state
        expected = model.lm_head(hidden)
    real = inputs["attention_mask"][batch, rows].bool()
    got = ref.logits[batch, rows]
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert ref.logits.isnan().all(dim=-1).sum() == B * n
    # and the visual tokens mattered: the full model's logits differ (so this test can fail)
    with torch.no_grad():
        full = model(**inputs).logits[batch, rows]
    assert not torch.allclose(full[real], expected[real], atol=1e-3)


def test_random_generate_equals_repeated_prefill():
    """The decode loop (per-layer caches of different lengths, padding) equals re-running the
    pruned prefill on prompt + generated tokens: the random scorer deletes the same visual
    tokens whatever the text is, so the two must agree token for token and in the logits."""
    model = _model("llama", 4)
    inputs = make_inputs(model, PADDED, seed=5)
    prune, options = {0: 5, 2: 4}, {"seed": 7}
    ours, our_logits = reference_generate(
        model,
        **inputs,
        prune=prune,
        max_new_tokens=5,
        scorer="random",
        scorer_options=options,
        output_logits=True,
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for step in range(5):
        ref = reference_prefill(
            model,
            ids,
            inputs["pixel_values"],
            mask,
            prune=prune,
            scorer="random",
            scorer_options=options,
            position_ids=generate_position_ids(mask),
        )
        torch.testing.assert_close(our_logits[:, step], ref.logits[:, -1], atol=ATOL, rtol=0)
        if step == 0:
            # pruning really changed the model's output (so this test can fail)
            plain = reference_prefill(model, **inputs)
            assert not torch.allclose(ref.logits[:, -1], plain.logits[:, -1], atol=1e-3)
        next_token = ref.logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(ours, ids)


# ----------------------------------------------------------------------------------------------
# kept sets (property test)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kept_sets_properties(data):
    model = _model("llama", 4)
    inputs = make_inputs(model, PADDED)  # 16, 32 and 16 visual tokens
    budget = 16  # the fewest visual tokens in one example
    layers = data.draw(st.lists(st.integers(0, 3), unique=True, max_size=4))
    prune = {}
    for layer in sorted(layers):
        d = data.draw(st.integers(0, budget))
        budget -= d
        prune[layer] = d
    scorer = data.draw(st.sampled_from(["fitprune", "fastv", "random"]))
    ref = reference_prefill(model, **inputs, prune=prune, scorer=scorer)

    S = inputs["input_ids"].shape[1]
    order = sorted(prune)
    for b in range(len(PADDED)):
        visual = _visual_positions(inputs, b)
        present = list(range(S))
        assert len(ref.kept[b]) == len(order)
        for i, layer in enumerate(order):
            kept = ref.kept[b][i].tolist()
            assert kept == sorted(set(kept))  # sorted, no duplicates
            assert set(kept) <= set(present)
            deleted = set(present) - set(kept)
            assert len(deleted) == prune[layer]  # exactly d per layer
            assert deleted <= visual  # text and padding are never deleted
            assert ref.visual_positions[layer][b].tolist() == [p for p in present if p in visual]
            assert ref.scores[layer][b].shape == ref.visual_positions[layer][b].shape
            present = kept
        assert ref.kept_final[b].tolist() == present
        # logits: NaN exactly on the deleted rows
        deleted_rows = ref.logits[b].isnan().all(dim=-1)
        assert deleted_rows.nonzero().squeeze(1).tolist() == sorted(set(range(S)) - set(present))
        assert not ref.logits[b, present].isnan().any()
        # sequence length per layer and cache lengths
        lengths = [S]
        for layer in range(4):
            lengths.append(lengths[-1] - prune.get(layer, 0))
        assert ref.tokens_per_layer[b] == lengths
        for layer in range(4):
            assert ref.past_key_values.layers[layer].keys.shape[2] == lengths[layer]


# ----------------------------------------------------------------------------------------------
# scorers


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("prompts", [SINGLE, PADDED], ids=["single", "padded"])
def test_fitprune_scores_brute_force(prompts, layer):
    """c_j and s_j by explicit loops over HF eager attention probabilities (no earlier pruning,
    so the unpruned model's attention at this layer is the one the reference scores)."""
    model = _eager("llama")
    inputs = make_inputs(model, prompts)
    with torch.no_grad():
        A = model(**inputs, output_attentions=True).attentions[layer].double()  # [B, H, S, S]
    ref = reference_prefill(_model("llama"), **inputs, prune={layer: 3})
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    H, S = A.shape[1], A.shape[2]
    for b in range(len(prompts)):
        V = [j for j in range(S) if ids[b, j] == IMAGE_TOKEN_ID]
        T = [i for i in range(V[-1] + 1, S) if mask[b, i] == 1]
        expected = []
        for j in V:
            c = sum(max(A[b, h, i, j].item() for h in range(H)) for i in T)
            s = sum(max(A[b, h, i, j].item() for h in range(H)) for i in V) / len(V)
            expected.append(c * s)
        expected = torch.tensor(expected, dtype=torch.float64)
        assert ref.visual_positions[layer][b].tolist() == V
        torch.testing.assert_close(ref.scores[layer][b].double(), expected, atol=1e-6, rtol=1e-4)
        lowest = [V[k] for k in torch.argsort(expected)[:3].tolist()]
        assert sorted(set(range(S)) - set(ref.kept[b][0].tolist())) == sorted(lowest)


def test_fastv_scores_from_last_row():
    model = _eager("qwen2")
    inputs = make_inputs(model, PADDED)
    layer, d = 1, 6
    with torch.no_grad():
        A = model(**inputs, output_attentions=True).attentions[layer]  # [B, H, S, S]
    ref = reference_prefill(_model("qwen2"), **inputs, prune={layer: d}, scorer="fastv")
    for b in range(len(PADDED)):
        V = sorted(_visual_positions(inputs, b))
        expected = A[b, :, -1, V].mean(dim=0)  # last row: left padding puts the last token at S-1
        torch.testing.assert_close(ref.scores[layer][b], expected, atol=1e-6, rtol=1e-4)
        deleted = set(V) - set(ref.kept[b][0].tolist())
        assert deleted == {V[k] for k in torch.argsort(expected)[:d].tolist()}


def test_random_rule():
    model = _model("llama", 4)
    inputs = make_inputs(model, PADDED)
    prune, seed = {1: 5, 3: 7}, 11
    ref = reference_prefill(model, **inputs, prune=prune, scorer="random", scorer_options={"seed": seed})
    for b in range(len(PADDED)):
        before = set(range(inputs["input_ids"].shape[1]))
        for i, (layer, d) in enumerate(sorted(prune.items())):
            positions = ref.visual_positions[layer][b]
            g = torch.Generator().manual_seed(seed + layer)
            chosen = positions[torch.randperm(len(positions), generator=g)[:d]]
            after = set(ref.kept[b][i].tolist())
            assert before - after == set(chosen.tolist())
            before = after
    # the default seed is 0
    default = reference_prefill(model, **inputs, prune=prune, scorer="random")
    g = torch.Generator().manual_seed(0 + 1)
    chosen = default.visual_positions[1][0][torch.randperm(16, generator=g)[:5]]
    assert set(chosen.tolist()).isdisjoint(default.kept[0][0].tolist())


def test_tie_rule_deletes_lower_positions_first():
    # direct: equal scores keep position order
    assert lowest_first(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])).tolist() == [1, 2, 4, 0, 3]
    # end to end: a prompt ending with its image has no instruction tokens, so every cross
    # score (hence every fitprune score) is 0 and the lowest positions go first
    model = _model("llama")
    inputs = make_inputs(model, [PromptSpec(before=3, after=0)])
    ref = reference_prefill(model, **inputs, prune={0: 4, 1: 2})
    assert (ref.scores[0][0] == 0).all()
    V = sorted(_visual_positions(inputs, 0))
    assert sorted(set(V) - set(ref.kept[0][0].tolist())) == V[:4]
    assert sorted(set(V) - set(ref.kept[0][1].tolist())) == V[:6]


def test_bad_arguments():
    model = _model("llama")
    inputs = make_inputs(model, SINGLE)
    with pytest.raises(ValueError, match="cannot delete"):
        reference_prefill(model, **inputs, prune={0: 10, 1: 7})
    with pytest.raises(ValueError, match="unknown scorer"):
        reference_prefill(model, **inputs, prune={0: 1}, scorer="nope")
    with pytest.raises(ValueError, match="bad prune entry"):
        reference_prefill(model, **inputs, prune={3: 1})
