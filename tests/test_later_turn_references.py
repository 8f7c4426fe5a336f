"""The rule for a later chat turn that brings an image, stated twice and checked against itself:
explicit removal (`fitprune_fx.reference_continuation`) and masking
(`MaskingReference(later_turns=...)`), both written apart from the pass."""

from __future__ import annotations

import copy

import pytest
import torch

from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.reference_continuation import ReferenceContinuation
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

FIRST = {0: 5, 1: 3}  # of the 16 visual tokens of the first turn's image
LATER = {0: 4, 2: 6}  # of the later turn's image


@pytest.mark.parametrize("scorer", ["fitprune", "fastv"])
@pytest.mark.parametrize("images", [1, 2])
def test_a_later_turn_image_is_pruned_alike_by_removal_and_by_masking(scorer, images):
    """A left-padded first turn (pruned), then a turn of text, `images` images and text, pruned by
    `LATER` (counts per image, scaled): the chunk's logits at the rows removal keeps, and the rows
    it deletes, equal masking's; the deletions change the logits (the rule does something)."""
    model = tiny_llava(num_layers=3, seed=7)
    first = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=3)
    turn = make_inputs(model, [PromptSpec(3, 4, images=images)] * 2, seed=4)  # no padding
    assert turn["attention_mask"].all()
    later = {k: v * images for k, v in LATER.items()}
    _, removal = ReferenceContinuation.after_prefill(model, **first, prune=FIRST, scorer=scorer)
    got = removal.extend(turn["input_ids"], turn["pixel_values"], prune=later, scorer=scorer)

    oracle = copy.deepcopy(model)
    mask = torch.cat([first["attention_mask"], turn["attention_mask"]], dim=1)
    results = {}
    for plan in (later, None):
        with torch.no_grad(), MaskingReference(oracle, FIRST, scorer=scorer, later_turns=plan) as masking:
            cache = oracle(**first).past_key_values
            logits = oracle(
                input_ids=turn["input_ids"], pixel_values=turn["pixel_values"], attention_mask=mask,
                past_key_values=cache,
            ).logits  # fmt: skip
        results[plan is not None] = (logits, dict(masking.deleted))
    expected, deleted = results[True]
    length = turn["input_ids"].shape[1]
    for layer, kept in removal.kept.items():
        for b in range(2):
            gone = torch.ones(length, dtype=torch.bool)
            gone[kept[b]] = False
            assert torch.equal(deleted[layer][b], gone), (layer, b)
    kept = ~got.isnan().any(dim=-1)
    assert kept.sum(dim=1).tolist() == [length - sum(later.values())] * 2
    torch.testing.assert_close(got[kept], expected[kept], atol=1e-4, rtol=1e-4)
    unpruned = results[False][0]
    assert (unpruned[kept] - expected[kept]).abs().max() > 1e-3
