"""A later chat turn that brings an image continues the cache and is pruned by the recipe, against
pruning as masking with the same rule for later turns (`MaskingReference(later_turns=...)`,
whose rule `tests/test_later_turn_references.py` checks against explicit removal)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fitprune_fx
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.positioned_cache import cache_update_gets_attention_keywords
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, PromptSpec, make_inputs, tiny_llava
from fitprune_fx.testbed.tiny_gemma3 import make_gemma3_inputs, tiny_gemma3
from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl
from graph_harness import right_padded

pytestmark = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.skipif(
        not cache_update_gets_attention_keywords(), reason="later turns need transformers' keyword channel"
    ),
]

PRUNE = {0: 5, 1: 3}  # of the 16 visual tokens per image
GEN = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)


def _two_turns(model, oracle, first: dict, turn: dict, prune: dict, later: dict, scorer: str = "fitprune"):
    """generate on `first`, then on the returned cache with `turn` appended (ids, mask, pixels):
    the compiled model and the oracle under masking; returns both runs' (first, second) outputs."""
    results = []
    for runner in (model, oracle):
        with torch.no_grad(), MaskingReference(oracle, prune, scorer=scorer, later_turns=later):
            a = runner.generate(**first, **GEN)
            batch = a.sequences.shape[0]
            ids = torch.cat([a.sequences, turn["input_ids"]], dim=1)
            mask = torch.cat(
                [first["attention_mask"], torch.ones(batch, GEN["max_new_tokens"], dtype=torch.long),
                 turn["attention_mask"]], dim=1,
            )  # fmt: skip
            extra = {k: v for k, v in turn.items() if k not in ("input_ids", "attention_mask")}
            for k, v in extra.items():  # per-token inputs (token types) span the whole sequence:
                if v.shape == turn["input_ids"].shape:  # earlier turns' tokens typed as text
                    extra[k] = torch.cat([v.new_zeros(batch, ids.shape[1] - v.shape[1]), v], dim=1)
            b = runner.generate(
                input_ids=ids, attention_mask=mask, past_key_values=a.past_key_values, **extra, **GEN
            )
        results.append((a, b))
    return results


def _assert_same(got, expected) -> float:
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((a - e).abs().max().item() for a, e in zip(got.scores, expected.scores, strict=True))
    assert worst <= 1e-4, worst
    return worst


@pytest.mark.parametrize(
    "first_turn,images,scorer",
    [("text", 1, "fitprune"), ("image", 2, "fastv")],  # (one image after one: test_generation_modes)
    ids=["after-text-only", "two-images-fastv"],
)
def test_a_later_turn_image_is_pruned_like_masking(first_turn, images, scorer):
    """LLaVA: a left-padded first turn (an image, pruned; or text only, a cache that records no
    positions), then a turn with `images` images: the second turn is pruned (counts scaled to its
    images) and generate's tokens and per-step logits equal masking's."""
    model = tiny_llava(num_layers=3, seed=7)
    oracle = copy.deepcopy(model)
    fitprune_fx.compile(model, Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE, scorer=scorer),
                        compiler="eager")  # fmt: skip
    if first_turn == "image":
        first = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=3)
    else:
        first = {"input_ids": torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3)),
                 "attention_mask": torch.tensor([[0, 0] + [1] * 7, [1] * 9])}  # fmt: skip
    turn = make_inputs(model, [PromptSpec(3, 4, images=images)] * 2, seed=4)
    later = {k: v * images for k, v in PRUNE.items()}
    (got1, got2), (exp1, exp2) = _two_turns(model, oracle, first, turn, PRUNE, later, scorer)
    _assert_same(got1, exp1)
    worst = _assert_same(got2, exp2)
    runs = model.fitprune_backend.pruned_runs
    assert runs == (2 if first_turn == "image" else 1)
    summary = model.fitprune_backend.summary()
    assert f"{16 * images} visual tokens/example" in summary, summary
    print(f"later turn ({first_turn} first, {images} image(s), {scorer}): logits max |diff| {worst:.2e}")


def test_gemma3_released_pattern_later_turn_image():
    """Gemma 3's five sliding layers (window 8) and one full layer: the second turn's image is
    pruned in sliding and full layers alike, against masking."""
    model = tiny_gemma3(num_layers=6, full_attention_only=False, window=8, seed=7)
    oracle = copy.deepcopy(model)
    prune = {1: 6, 4: 4}
    fitprune_fx.compile(
        model, Recipe(model=ModelInfo.from_config(model.config), prune=prune), compiler="eager"
    )
    first = make_gemma3_inputs(model, [2, 6], [5, 2], seed=8)
    turn = make_gemma3_inputs(model, [3, 3], [2, 2], seed=9)
    assert turn["attention_mask"].all()
    (got1, got2), (exp1, exp2) = _two_turns(model, oracle, first, turn, prune, prune)
    _assert_same(got1, exp1)
    worst = _assert_same(got2, exp2)
    assert model.fitprune_backend.pruned_runs == 2
    print(f"gemma3 later turn: logits max |diff| {worst:.2e}")


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_later_turn_image(variant):
    """Qwen2.5-VL (M-RoPE) and Qwen3-VL (DeepStack features added to the visual rows): the second
    turn's image is pruned (the plan the backend reports for each turn), against masking. The first
    turn's image tokens are typed as text in the second call (transformers numbers the new turn's
    M-RoPE positions from the images it is given)."""
    model = tiny_qwen_vl(variant, num_layers=4, seed=5)
    oracle = copy.deepcopy(model)
    fitprune_fx.compile(model, Recipe(model=ModelInfo.from_config(model.config), prune={0: 80, 2: 70}),
                        compiler="eager")  # fmt: skip
    first = make_qwen_inputs(model, [2, 6], [5, 2], seed=6)
    turn = make_qwen_inputs(model, [3, 3], [4, 4], seed=7)
    with torch.no_grad():
        model.generate(**first, **GEN)  # the plan for a 16-token image, read off the backend
    plan = model.fitprune_backend.pruned_graphs[0].result.deletions
    assert sum(plan.values()) > 0
    (got1, got2), (exp1, exp2) = _two_turns(model, oracle, first, turn, plan, plan)
    _assert_same(got1, exp1)
    worst = _assert_same(got2, exp2)
    assert model.fitprune_backend.pruned_runs == 3
    print(f"{variant} later turn: logits max |diff| {worst:.2e}")


HYP_MODEL = tiny_llava(num_layers=3, seed=11)
HYP_ORACLE = copy.deepcopy(HYP_MODEL)


@st.composite
def later_turns(draw):
    """A recipe, a first turn (image or text, padding on either side), then a turn of text around
    1-2 images whose rows may differ in length (padding inside the sequence)."""
    layers = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    prune = {}
    for layer in sorted(layers):
        prune[layer] = draw(st.integers(0, 16 - sum(prune.values()) - 1))
    batch = draw(st.integers(1, 2))
    first = [PromptSpec(draw(st.integers(0, 4)), draw(st.integers(1, 4))) for _ in range(batch)]
    turn = PromptSpec(draw(st.integers(0, 3)), draw(st.integers(1, 3)), images=draw(st.integers(1, 2)))
    return (prune, first, draw(st.booleans()), draw(st.sampled_from(["left", "right"])), turn,
            draw(st.integers(0, 2)), draw(st.integers(0, 99)))  # fmt: skip


HYP_EXAMPLES = [  # (prune, first turn, its image?, padding side, later turn, its padding, seed)
    ({0: 3, 2: 5}, [PromptSpec(3, 2), PromptSpec(0, 4)], True, "right", PromptSpec(2, 3, images=2), 2, 5),
    ({1: 6}, [PromptSpec(1, 3), PromptSpec(4, 1)], False, "left", PromptSpec(0, 2), 0, 7),
]  # fmt: skip


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))  # a compile each
@given(later_turns())
@example(HYP_EXAMPLES[0]).via("right-padded image turn, then two images in a padded turn")
@example(HYP_EXAMPLES[1]).via("text first, an image right after the cache")
def test_random_later_turns_match_masking(case):
    """Direct calls on the model compiled for the example's recipe: a first turn, then a turn with
    images (its first row padded inside the sequence when `pads` > 0), then a decode step: the
    turn's last-row logits and the step's equal masking with the same deletions for later turns
    (fp32, 1e-4)."""
    prune, first_specs, image_first, side, turn_spec, pads, seed = case
    torch._dynamo.reset()  # graphs hold their recipe: compile afresh for this one
    model = fitprune_fx.compile(HYP_MODEL, Recipe(model=ModelInfo.from_config(HYP_MODEL.config), prune=prune),
                                compiler="eager")  # fmt: skip
    first = make_inputs(HYP_MODEL, first_specs, seed=seed)
    if not image_first:
        text = torch.where(first["input_ids"] == IMAGE_TOKEN_ID, 9, first["input_ids"])  # no image
        first = {"input_ids": text, "attention_mask": first["attention_mask"]}
    if side == "right":
        first = right_padded(first)
    batch = len(first_specs)
    turn = make_inputs(HYP_MODEL, [turn_spec] * batch, seed=seed + 1)
    ids, turn_mask = turn["input_ids"].clone(), turn["attention_mask"].clone()
    if pads:  # the first row's leading text tokens become padding inside the sequence
        pads = min(pads, turn_spec.before)
        ids[0, 1 : 1 + pads], turn_mask[0, 1 : 1 + pads] = PAD_TOKEN_ID, 0
    later = {k: v * turn_spec.images for k, v in prune.items()}
    outs = []
    for runner in (model, HYP_ORACLE):
        with torch.no_grad(), MaskingReference(HYP_ORACLE, prune, later_turns=later):
            a = runner(**first)
            mask = torch.cat([first["attention_mask"], turn_mask], dim=1)
            b = runner(input_ids=ids, pixel_values=turn["pixel_values"], attention_mask=mask,
                       past_key_values=a.past_key_values)  # fmt: skip
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            c = runner(
                input_ids=torch.full((batch, 1), 9), attention_mask=mask, past_key_values=b.past_key_values
            )
        outs.append((b.logits[:, -1], c.logits[:, -1]))
    (turn_got, step_got), (turn_exp, step_exp) = outs
    torch.testing.assert_close(turn_got, turn_exp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_got, step_exp, atol=1e-4, rtol=1e-4)


def test_a_custom_scorer_leaves_a_later_turn_unpruned_with_the_reason():
    """A registered scorer may assume its keys are the chunk's own: a later turn's image is then
    left unpruned (exact, one warning naming the scorer), while first prompts are pruned with it."""
    from fitprune_fx.passes.scorers import fastv_score, register_scorer

    register_scorer("test_fastv_copy", fastv_score)
    model = tiny_llava(num_layers=3, seed=7)
    oracle = copy.deepcopy(model)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE, scorer="test_fastv_copy")
    fitprune_fx.compile(model, recipe, compiler="eager")
    first = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=3)
    turn = make_inputs(model, [PromptSpec(3, 4)] * 2, seed=4)
    with pytest.warns(UserWarning, match="scorer 'test_fastv_copy' is not one of the built-ins"):
        (_, got), (_, expected) = _two_turns(model, oracle, first, turn, PRUNE, None, "fastv")
    _assert_same(got, expected)
    assert model.fitprune_backend.pruned_runs == 1


@pytest.mark.parametrize("family", ["llava_next", "llava_hr"])
def test_llava_next_and_llava_hr_later_turn_image(family):
    """LLaVA-NeXT (the later image of another size: another visual count) and LLaVA-HR, direct calls
    with a fraction recipe: the second turn is pruned (the plan the backend reports for it) and its
    last-row logits equal masking's. The LLaVA-HR turn is as long as the cached prompt, so the
    cache's own inputs share a size with the chunk: they are the layer's, not per-token tensors."""
    from fitprune_fx.testbed.tiny import make_next_inputs, tiny_llava_next
    from fitprune_fx.testbed.tiny_llava_hr import tiny_llava_hr

    if family == "llava_next":
        model = tiny_llava_next(num_layers=3, seed=3)
        first = make_next_inputs(model, [PromptSpec(2, 3), PromptSpec(4, 1)], [(32, 32)] * 2, seed=1)
        turn = make_next_inputs(model, [PromptSpec(2, 3)] * 2, [(32, 64)] * 2, seed=2)
    else:
        model = tiny_llava_hr(num_layers=3, seed=3)
        first = make_inputs(model, [PromptSpec(2, 3), PromptSpec(4, 1)], seed=1)
        turn = make_inputs(model, [PromptSpec(2, 3)] * 2, seed=2)
        assert turn["input_ids"].shape == first["input_ids"].shape
    oracle = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.3, 1: 0.25})
    fitprune_fx.compile(model, recipe, compiler="eager")
    mask = torch.cat([first["attention_mask"], turn["attention_mask"]], dim=1)
    later = {k: v for k, v in turn.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        cache = model(**first).past_key_values
        got = model(input_ids=turn["input_ids"], attention_mask=mask, past_key_values=cache, **later)
    assert model.fitprune_backend.pruned_runs == 2
    plans = [g.result.deletions for g in model.fitprune_backend.pruned_graphs]
    with torch.no_grad(), MaskingReference(oracle, plans[0], later_turns=plans[-1]):
        cache = oracle(**first).past_key_values
        expected = oracle(input_ids=turn["input_ids"], attention_mask=mask, past_key_values=cache, **later)
    outs = [got, expected]
    torch.testing.assert_close(outs[0].logits[:, -1], outs[1].logits[:, -1], atol=1e-4, rtol=1e-4)
