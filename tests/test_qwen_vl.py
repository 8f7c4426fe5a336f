"""Qwen2-VL and Qwen2.5-VL: the pass against pruning as masking (`MaskingReference`, which runs the
models' own code: M-RoPE positions, rope deltas, transformers' generate), on tiny models built in code."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny_qwen import IMAGE, VIDEO, make_qwen_inputs, tiny_qwen_vl
from graph_harness import KeptRecorder, assert_greedy_generate_matches_masking, compose_kept

VARIANTS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
NEWER = ["qwen2_5_vl", "qwen3_vl"]  # for the slower tests: Qwen2-VL's decoder and marks are Qwen2.5-VL's
FRACTIONS = {0: 0.375, 2: 0.25}  # of 16 visual tokens per example: 6 after layer 0, 4 after layer 2


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def fraction_recipe(model, fractions) -> Recipe:
    """What a user writes: a fraction recipe (counts vary with the image size) for this model."""
    return Recipe.from_fractions(ModelInfo.from_config(model.config), fractions)


def plan(model, inputs, fractions) -> dict[int, int]:
    n = int((inputs["input_ids"][0] == IMAGE).sum())
    info = dataclasses.replace(ModelInfo.from_config(model.config), num_visual_tokens=n)
    return dict(Recipe.from_fractions(info, fractions).prune)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_keeps_the_oracles_tokens_and_logits(variant):
    model = tiny_qwen_vl(variant, num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    inputs = make_qwen_inputs(model, [2, 6], [5, 2], seed=3)  # row 0 left-padded by 1
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, FRACTIONS), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    prune = plan(model, inputs, FRACTIONS)
    assert prune == {0: 6, 2: 4}
    with torch.no_grad(), MaskingReference(oracle, prune) as masking:
        expected = oracle(**inputs).logits
    batch, seq_len = inputs["input_ids"].shape
    ours = compose_kept(recorder.kept, seq_len, batch)  # original positions kept after each layer
    worst = 0.0
    for step, layer in enumerate(sorted(prune)):
        for b in range(batch):
            assert torch.equal(ours[step][b], (~masking.deleted[layer][b]).nonzero().squeeze(1))
    for b in range(batch):
        kept = ours[-1][b]
        valid = inputs["attention_mask"][b, kept].bool()
        diff = (out[b][valid] - expected[b, kept][valid]).abs().max().item()
        worst = max(worst, diff)
    assert worst <= 1e-4, worst
    print(f"{variant}: prefill logits at kept positions max |diff| {worst:.2e}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_recipe_reproduces_the_model(variant):
    model = tiny_qwen_vl(variant, num_layers=3, seed=2)
    inputs = make_qwen_inputs(model, [3], [4], seed=4)
    with torch.no_grad():
        expected = model(**inputs).logits
        backend = fitprune_backend(fraction_recipe(model, {1: 0.0}), compiler="eager")
        out = torch.compile(model, backend=backend)(**inputs).logits
    assert len(backend.pruned_graphs) == 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_matches_masking_on_a_left_padded_batch(variant):
    """Tokens identical and per-step logits within 1e-4: decode positions continue exactly (rope
    deltas, cache length read from layer 0) over the pruned cache."""
    model = tiny_qwen_vl(variant, num_layers=4, seed=5)
    inputs = make_qwen_inputs(model, [2, 6], [5, 2], seed=6)
    prune = plan(model, inputs, FRACTIONS)
    assert_greedy_generate_matches_masking(model, fraction_recipe(model, FRACTIONS), inputs, prune, variant)


def test_a_user_sees_tokens_per_layer_and_a_mixed_batch_is_pruned():
    """Compile with a fraction recipe as the README says; summary() shows the per-layer lengths. A
    first call whose images give different visual counts is pruned, not refused (each example
    against masking: `tests/test_any_visual_count.py`)."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=3, seed=7)
    backend = fitprune_backend(fraction_recipe(model, {1: 0.5}))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**make_qwen_inputs(model, [3], [4], seed=8))
    assert "tokens per layer 25 -> 25 -> 17 -> 17" in backend.summary()  # 16 visual tokens, 8 go
    torch._dynamo.reset()
    small = make_qwen_inputs(model, [3], [16], grid=(4, 4), seed=9)  # 4 visual tokens, 25 in all
    big = make_qwen_inputs(model, [3], [4], seed=9)  # 16 visual tokens, 25 in all
    mixed = {k: torch.cat([small[k], big[k]]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    mixed.update(pixel_values=torch.cat([small["pixel_values"], big["pixel_values"]]),
                 image_grid_thw=torch.cat([small["image_grid_thw"], big["image_grid_thw"]]))  # fmt: skip
    eager = fitprune_backend(fraction_recipe(model, {1: 0.5}), compiler="eager")
    with torch.no_grad():
        logits = torch.compile(model, backend=eager)(**mixed).logits
    assert eager.pruned_runs == 1 and eager.pruned_graphs[0].result.padded
    assert logits.shape[1] == 25 - 2  # the longer example keeps 25 - 4 / 2 tokens; the other is padded


def test_any_prompt_length_graph_prunes_like_masking():
    """Compiled for any prompt length (as Dynamo does after a second length), the kept counts are
    sized per call from the call's S; two lengths on one graph, each against pruning as masking."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, FRACTIONS), compiler="eager"))
    compiled = torch.compile(model, backend=recorder, dynamic=True)
    for before, after in (([2, 6], [5, 2]), ([1, 3], [9, 4])):
        inputs = make_qwen_inputs(model, before, after, seed=3)
        prune = plan(model, inputs, FRACTIONS)
        recorder.kept.clear()
        with torch.no_grad():
            out = compiled(**inputs).logits
        with torch.no_grad(), MaskingReference(oracle, prune) as masking:
            expected = oracle(**inputs).logits
        batch, seq_len = inputs["input_ids"].shape
        kept = compose_kept(recorder.kept, seq_len, batch)[-1]
        for b in range(batch):
            deleted = masking.deleted[0][b] | masking.deleted[2][b]
            assert torch.equal(kept[b], (~deleted).nonzero().squeeze(1))
            valid = inputs["attention_mask"][b, kept[b]].bool()
            torch.testing.assert_close(out[b][valid], expected[b, kept[b]][valid], atol=1e-4, rtol=1e-4)
    assert [r.result.seq_len for r in recorder.backend.pruned_graphs] == ["S"]


def test_inductor_per_layer_compile_prunes_like_masking():
    """Inductor, compiled per layer (M-RoPE and the visual marks inside the partitions): layers 0
    and 2 (pruning) share one compile, layers 1 and 3 (unpruned, after a deletion) another, and the
    logits at the kept positions are pruning as masking's. Batch 1: a graph for several examples
    reads their counts per call and pads (`padded_compaction`), and is compiled whole."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=1)
    oracle = copy.deepcopy(model)
    backend = fitprune_backend(fraction_recipe(model, FRACTIONS), progress=False)
    inputs = make_qwen_inputs(model, [2], [5], seed=3)
    prune = plan(model, inputs, FRACTIONS)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs).logits
    with torch.no_grad(), MaskingReference(oracle, prune) as masking:
        expected = oracle(**inputs).logits
    assert backend.pruned_graphs[0].partitions == (6, 4), backend.summary()
    for b in range(inputs["input_ids"].shape[0]):
        kept = (~(masking.deleted[0][b] | masking.deleted[2][b])).nonzero().squeeze(1)
        valid = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(out[b][valid], expected[b, kept][valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", NEWER)
def test_an_image_and_a_video_are_pruned_together(variant):
    """Video tokens are visual tokens: a prompt with an image (16) and a video (8) prunes from all 24."""
    model = tiny_qwen_vl(variant, num_layers=3, seed=10)
    oracle = copy.deepcopy(model)
    inputs = make_qwen_inputs(model, [2, 4], [3, 1], video=(2, 4, 4), seed=11)
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, {1: 0.5}), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    assert recorder.backend.pruned_graphs[0].result.visual_tokens == 24
    with torch.no_grad(), MaskingReference(oracle, {1: 12}) as masking:
        expected = oracle(**inputs).logits
    batch, seq_len = inputs["input_ids"].shape
    kept = compose_kept(recorder.kept, seq_len, batch)[-1]
    for b in range(batch):
        assert torch.equal(kept[b], (~masking.deleted[1][b]).nonzero().squeeze(1))
        valid = inputs["attention_mask"][b, kept[b]].bool()
        torch.testing.assert_close(out[b][valid], expected[b, kept[b]][valid], atol=1e-4, rtol=1e-4)


def test_beam_search_and_sampling_match_masking():
    """Beams (cache reorder over pruned layers) and seeded sampling: same tokens as the oracle."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=3, seed=12)
    oracle = copy.deepcopy(model)
    inputs = make_qwen_inputs(model, [2, 6], [5, 2], seed=13)
    fitprune_fx.compile(model, fraction_recipe(model, FRACTIONS), compiler="eager")
    prune = plan(model, inputs, FRACTIONS)
    for gen in (dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)):
        torch.manual_seed(0)
        with torch.no_grad():
            got = model.generate(**inputs, max_new_tokens=5, **gen)
        torch.manual_seed(0)
        with torch.no_grad(), MaskingReference(oracle, prune):
            expected = oracle.generate(**inputs, max_new_tokens=5, **gen)
        assert torch.equal(got, expected), gen


def test_qwen3_dense_deepstack_is_the_models_own_arithmetic(monkeypatch):
    """The family's DeepStack rewrite (dense addends, `visual_residual_add`) against transformers' own
    boolean-indexed DeepStack, restored from the wrapped originals: logits bitwise equal."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    model = tiny_qwen_vl("qwen3_vl", num_layers=3, seed=14)
    fitprune_backend(fraction_recipe(model, {1: 0.5}))  # installs the family's wrappers
    inputs = make_qwen_inputs(model, [2, 4], [3, 1], video=(2, 4, 4), seed=15)
    with torch.no_grad():
        ours = model(**inputs).logits
    for cls, name in ((qwen3.Qwen3VLModel, "forward"), (qwen3.Qwen3VLTextModel, "forward"),
                      (qwen3.Qwen3VLTextModel, "_deepstack_process")):  # fmt: skip
        function = getattr(cls, name)
        assert getattr(function, "_fitprune", False), (cls, name)
        while hasattr(function, "__wrapped__") and getattr(function, "_fitprune", False):
            function = function.__wrapped__
        monkeypatch.setattr(cls, name, function)
    with torch.no_grad():
        stock = model(**inputs).logits
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("variant", NEWER)
def test_processor_inputs_prune_like_masking(variant):
    """Inputs from the real processor class (`Qwen2VLProcessor` ...: prompt expansion, image_grid_thw,
    mm_token_type_ids), two image shapes that give the same count, left padding: kept sets vs masking."""
    import numpy as np

    from fitprune_fx.testbed.tiny_processors import qwen_vl_processor

    model = tiny_qwen_vl(variant, num_layers=3, seed=16)
    oracle = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (100, 150, 3), dtype=np.uint8),
        rng.integers(0, 256, (120, 90, 3), dtype=np.uint8),
    ]
    prompts = ["w1 w2 <|vision_start|><|image_pad|><|vision_end|> what is in the image ?",
               "w3 <|vision_start|><|image_pad|><|vision_end|> what ?"]  # fmt: skip
    inputs = dict(qwen_vl_processor(model)(text=prompts, images=images, return_tensors="pt", padding=True))
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 6]]  # 12 visual tokens each
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, {0: 0.25, 1: 0.25}), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    assert recorder.backend.pruned_graphs[0].result.deletions == {0: 3, 1: 3}
    with torch.no_grad(), MaskingReference(oracle, {0: 3, 1: 3}) as masking:
        expected = oracle(**inputs).logits
    batch, seq_len = inputs["input_ids"].shape
    kept = compose_kept(recorder.kept, seq_len, batch)[-1]
    for b in range(batch):
        assert torch.equal(kept[b], (~masking.deleted[1][b]).nonzero().squeeze(1))
        valid = inputs["attention_mask"][b, kept[b]].bool()
        torch.testing.assert_close(out[b][valid], expected[b, kept[b]][valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", NEWER)
def test_fit_runs_the_models_own_layers_and_its_recipe_prunes(variant):
    """fit's layer runner reproduces the model layer by layer (M-RoPE positions of an image and a
    video, Qwen3-VL's DeepStack features travelling with the rows; 1e-6 against transformers' own
    hidden states), and `fit` returns a fraction recipe meeting the budget that then prunes."""
    from fitprune_fx.fitting import FitSession

    model = tiny_qwen_vl(variant, num_layers=4, seed=17)
    batch = make_qwen_inputs(model, [2, 5], [6, 3], video=(2, 4, 4), seed=18)
    session = FitSession(model, [batch])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states  # layer outputs before DeepStack
    valid = batch["attention_mask"].bool()
    for layer in range(3):
        ours = session.root_out[layer]
        if session.start.deepstack is not None:
            ours = ours - session.start.deepstack[:, :, layer]  # what the next layer sees, minus the add
        assert (ours[valid] - hidden[layer + 1][valid]).abs().max() <= 1e-6, layer
    assert (session.start.deepstack is not None) == (variant == "qwen3_vl")

    calibration = [make_qwen_inputs(model, [2, 5], [6, 3], seed=s) for s in range(4)]
    recipe = fitprune_fx.fit(model, calibration, 0.4)
    assert recipe.prune_fraction and recipe.reference_reduction() >= 0.4
    backend = fitprune_backend(recipe, compiler="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(**calibration[0])
    assert backend.pruned_graphs[0].result.deletions == plan(model, calibration[0], recipe.prune_fraction)


@st.composite
def fraction_recipes(draw):
    layers = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    return {layer: draw(st.sampled_from([0.0, 0.125, 0.25, 0.3])) for layer in sorted(layers)}  # sum <= 0.9


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    variant=st.sampled_from(VARIANTS),
    video=st.booleans(),
    seed=st.integers(0, 3),
    fractions=fraction_recipes(),
)
@example(variant="qwen3_vl", video=True, seed=0, fractions={0: 0.25, 2: 0.25})  # DeepStack after a deletion
@example(variant="qwen2_5_vl", video=False, seed=1, fractions={1: 0.375, 3: 0.125})
def test_pass_equals_the_eager_reference_for_random_recipes(variant, video, seed, fractions):
    """Kept sets after every pruning layer and logits at kept positions (fp32 1e-4) equal the eager
    reference's, which runs its own attention over M-RoPE positions and DeepStack from the model."""
    torch._dynamo.reset()
    model = tiny_qwen_vl(variant, num_layers=4, seed=20 + seed)
    inputs = make_qwen_inputs(model, [2, 5], [4, 2], video=(2, 4, 4) if video else None, seed=seed)
    prune = plan_all(model, inputs, fractions)
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, fractions), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    ref = reference_prefill(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                            prune=prune, **extra)  # fmt: skip
    batch, seq_len = inputs["input_ids"].shape
    ours = compose_kept(recorder.kept, seq_len, batch)
    for step in range(len(prune)):
        for b in range(batch):
            assert torch.equal(ours[step][b], ref.kept[b][step]), (step, b)
    for b in range(batch):
        kept = ours[-1][b]
        valid = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(out[b][valid], ref.logits[b, kept][valid], atol=1e-4, rtol=1e-4)


def plan_all(model, inputs, fractions) -> dict[int, int]:
    """The plan for every visual token of an example (images and videos)."""
    n = int(torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE, VIDEO])).sum())
    info = dataclasses.replace(ModelInfo.from_config(model.config), num_visual_tokens=n)
    return dict(Recipe.from_fractions(info, fractions).prune)


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "qwen3_vl"])
def test_multi_turn_chat_and_assisted_decoding_match_masking(variant):
    """Turn 2 brings new text to the returned pruned cache (positions continue by the model's own
    rope-delta code): tokens equal the oracle's in both turns. Prompt-lookup assisted decoding
    (candidates, crop(-k) rollback of the pruned cache) gives plain greedy's tokens."""
    model = tiny_qwen_vl(variant, num_layers=3, seed=19)
    oracle = copy.deepcopy(model)
    inputs = make_qwen_inputs(model, [2, 6], [5, 2], seed=20)
    fitprune_fx.compile(model, fraction_recipe(model, FRACTIONS), compiler="eager")
    prune = plan(model, inputs, FRACTIONS)
    gen = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    turns = []
    for m in (model, oracle):
        with torch.no_grad(), MaskingReference(oracle, prune):
            first = m.generate(**inputs, **gen)
            text = torch.randint(8, 128, (2, 4), generator=torch.Generator().manual_seed(21))
            ids = torch.cat([first.sequences, text], dim=1)
            grow = ids.shape[1] - inputs["input_ids"].shape[1]
            follow = dict(
                input_ids=ids,
                attention_mask=torch.cat(
                    [inputs["attention_mask"], torch.ones(2, grow, dtype=torch.long)], 1
                ),
                mm_token_type_ids=torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros(2, grow, dtype=torch.long)], 1
                ),
                past_key_values=first.past_key_values,
            )
            second = m.generate(**follow, **gen)
        turns.append((first.sequences, second.sequences))
    assert torch.equal(turns[0][0], turns[1][0]) and torch.equal(turns[0][1], turns[1][1])
    one = make_qwen_inputs(model, [3], [6], seed=22)  # transformers assists batch 1 only
    with torch.no_grad():
        greedy = model.generate(**one, max_new_tokens=10, do_sample=False)
        assisted = model.generate(**one, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)
