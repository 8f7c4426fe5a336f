"""Every generation mode of transformers 5.x on a pruned model: exact against an oracle, or refused.

Exact means: greedy-type modes token-identical to pruning-as-masking run through transformers' own
`generate` (`MaskingReference`, written apart from the pass and the cache code); sampling with a
fixed seed gives the same per-step logits and tokens; assisted decoding gives the tokens of plain
greedy decoding of the same pruned model. One compiled model serves the whole module, so the
calls also run in sequence on one compiled model with changing batch sizes, paddings, prompt
lengths and image counts (each is compared with an oracle that holds no compiled state).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.positioned_cache import cache_update_gets_attention_keywords
from fitprune_fx.reference import reference_generate
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

PRUNE = {0: 5, 1: 3}  # of the 16 visual tokens per image
NEW = 8
MODEL = tiny_llava(num_layers=3, seed=7)
ORACLE = copy.deepcopy(MODEL)  # never compiled
fitprune_fx.compile(MODEL, Recipe(model=ModelInfo.from_config(MODEL.config), prune=PRUNE), compiler="eager")

ONE = make_inputs(MODEL, [PromptSpec(3, 5)], seed=1)
TWO = make_inputs(MODEL, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=2)  # left-padded
TWO_IMAGES = make_inputs(MODEL, [PromptSpec(0, 3, images=2), PromptSpec(4, 1, images=2)], seed=3)


def _both(inputs: dict, seed: int | None = None, prune: dict | None = None, **kwargs):
    """(pruned model, oracle) outputs of the same generate call; seeded alike when sampling."""
    outs = []
    for model in (MODEL, ORACLE):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), MaskingReference(ORACLE, prune or PRUNE):
            outs.append(
                model.generate(
                    **inputs, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True, **kwargs
                )
            )
    return outs


@pytest.mark.parametrize(
    ("inputs", "kwargs"),
    [
        (ONE, {"do_sample": False}),
        (TWO, {"do_sample": False}),
        (TWO, {"do_sample": False, "num_beams": 3}),
        (ONE, {"do_sample": False, "num_beams": 2, "num_return_sequences": 2}),
        (TWO_IMAGES, {"do_sample": False, "num_beams": 2}),
        (ONE, {"do_sample": False, "num_beams": 2}),
        (TWO, {"do_sample": False}),  # again, after beams changed the batch size: no stale graph
    ],
    ids=[
        "greedy-1",
        "greedy-padded",
        "beam3-padded",
        "beam2-return2",
        "beam-2images",
        "beam2-1",
        "greedy-again",
    ],
)
def test_greedy_type_modes_match_masking_reference(inputs, kwargs):
    images = 2 if inputs is TWO_IMAGES else 1  # the recipe's counts scale with the visual tokens
    pruned, oracle = _both(inputs, prune={k: v * images for k, v in PRUNE.items()}, **kwargs)
    assert torch.equal(pruned.sequences, oracle.sequences)


@pytest.mark.parametrize("kwargs", [{"num_beams": 1}, {"num_beams": 2}], ids=["sample", "beam-sample"])
def test_sampling_with_a_seed_gives_the_same_logits_and_tokens(kwargs):
    pruned, oracle = _both(TWO, seed=123, do_sample=True, top_k=20, temperature=0.9, **kwargs)
    assert torch.equal(pruned.sequences, oracle.sequences)
    for a, b in zip(pruned.logits, oracle.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_oracles_agree_on_greedy():
    """The two references (explicit removal, masking) give the same tokens: neither is off."""
    ref = reference_generate(MODEL, TWO["input_ids"], TWO["pixel_values"], TWO["attention_mask"], PRUNE, NEW)
    _, oracle = _both(TWO, do_sample=False)
    assert torch.equal(ref, oracle.sequences)


@pytest.mark.parametrize(
    "kwargs",
    [{"prompt_lookup_num_tokens": 3}, {"assistant_model": tiny_llava(num_layers=1, seed=3)}],
    ids=["prompt-lookup", "draft-model"],
)
def test_assisted_decoding_gives_plain_greedy_tokens(kwargs):
    with torch.no_grad():
        greedy = MODEL.generate(**ONE, max_new_tokens=12, do_sample=False)
        assisted = MODEL.generate(**ONE, max_new_tokens=12, do_sample=False, **kwargs)
    assert torch.equal(assisted, greedy)
    _, oracle = _both(ONE, do_sample=False)
    assert torch.equal(greedy[:, : oracle.sequences.shape[1]], oracle.sequences)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search"),
        ({"dola_layers": "high"}, "DoLa decoding"),
        ({"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0}, "group (diverse) beam search"),
        ({"num_beams": 2, "force_words_ids": [[5]]}, "constrained beam search"),
        ({"custom_generate": "someone/decoding"}, "custom_generate"),
        ({"assistant_early_exit": 1}, "self-speculative decoding"),
    ],
)
def test_unsupported_modes_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"fitprune: {name}")):
        MODEL.generate(**ONE, max_new_tokens=4, **kwargs)


def test_multi_turn_chat_continues_the_pruned_cache_exactly():
    """Turn 2 brings new text (equal length per row) to the returned cache; turn 3 a new image, which
    is pruned by the recipe like a first prompt's (against masking with the same deletions for
    later turns); without transformers' keyword channel (5.17) it runs unpruned with a warning."""
    channel = cache_update_gets_attention_keywords()
    later = PRUNE if channel else None
    previous = _both(TWO, do_sample=False)
    g = torch.Generator().manual_seed(5)
    for new_image in (False, True):
        text = torch.randint(4, 128, (2, 5), generator=g)
        extra = {}
        if new_image:  # the image tokens sit inside the new turn, which continues the cache
            image = torch.full((2, 16), MODEL.config.image_token_id)
            text = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
            extra = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
        turn = []
        for model, out in zip((MODEL, ORACLE), previous, strict=True):
            ids = torch.cat([out.sequences, text], dim=1)
            pads = TWO["attention_mask"]
            mask = torch.cat([pads, pads.new_ones(2, ids.shape[1] - pads.shape[1])], dim=1)
            inputs = {
                "input_ids": ids,
                "attention_mask": mask,
                "past_key_values": out.past_key_values,
                **extra,
            }
            runs = MODEL.fitprune_backend.pruned_runs
            if new_image and model is MODEL and not channel:
                with pytest.warns(UserWarning, match="continues an existing KV cache"):
                    turn.append(_generate_turn(model, inputs, later))
            else:
                turn.append(_generate_turn(model, inputs, later))
            if model is MODEL:  # the turn with the image is pruned where positions are recorded
                assert MODEL.fitprune_backend.pruned_runs == runs + (new_image and channel)
        assert torch.equal(turn[0].sequences, turn[1].sequences)
        previous = turn


def _generate_turn(model, inputs, later=None):
    with torch.no_grad(), MaskingReference(ORACLE, PRUNE, later_turns=later):
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
