"""LLaVA-OneVision on a tiny model, with inputs from the real `LlavaOnevisionProcessor`: visual counts
against the processor, the pass against the eager reference (images) and against pruning as masking
(images with a video, greedy generate on a left-padded batch)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.families import family_for
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny_onevision import IMAGE, VIDEO, onevision_video_inputs, tiny_llava_onevision
from fitprune_fx.testbed.tiny_processors import onevision_processor
from graph_harness import (
    KeptRecorder,
    assert_greedy_generate_matches_masking,
    assert_pass_matches_reference,
    compose_kept,
)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
FRACTIONS = {0: 0.3, 2: 0.25}


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def processed(model, prompts: list[str], sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """What a user's script gets: the real processor on text and images (left padding)."""
    out = onevision_processor(model)(
        text=prompts, images=[image(h, w, seed + i) for i, (h, w) in enumerate(sizes)],
        return_tensors="pt", padding=True,
    )  # fmt: skip
    return dict(out)


def fraction_recipe(model, fractions) -> Recipe:
    return Recipe.from_fractions(ModelInfo.from_config(model.config), fractions)


def plan(model, inputs, fractions) -> dict[int, int]:
    visual = torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE, VIDEO]))
    info = dataclasses.replace(ModelInfo.from_config(model.config), num_visual_tokens=int(visual.sum()))
    return dict(Recipe.from_fractions(info, fractions).prune)


@pytest.mark.parametrize("size", [(32, 32), (40, 60), (90, 30), (200, 150), (500, 80)])
def test_visual_counts_are_the_processors(size):
    """The family's count for an image size (used by the FLOPs model and recipes) is the number of
    image tokens the real processor puts in the prompt, and the model accepts that prompt."""
    model = tiny_llava_onevision(num_layers=1)
    inputs = processed(model, ["w1 <image> what is in the image ?"], [size])
    count = int((inputs["input_ids"] == IMAGE).sum())
    assert family_for(model).image_tokens(model.config, *size) == count
    with torch.no_grad():
        model(**inputs)  # raises if features and image tokens disagree


def test_prefill_equals_the_eager_reference_on_processor_inputs():
    """Two prompts of different lengths (left padding), images of one size: kept sets after every
    pruning layer and logits at the kept positions equal the eager reference (fp32 1e-4)."""
    model = tiny_llava_onevision(num_layers=4, seed=1)
    inputs = processed(model, ["w1 w2 w3 <image> what is in the image ?", "<image> what ?"], [(40, 60)] * 2)
    prune = plan(model, inputs, FRACTIONS)
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, FRACTIONS), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs)
    assert recorder.backend.pruned_graphs[0].result.deletions == prune
    ref = reference_prefill(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune,
        image_sizes=inputs["image_sizes"],
    )  # fmt: skip
    assert_pass_matches_reference(inputs, out, recorder, ref, prune)


def test_any_prompt_length_graph_equals_the_eager_reference():
    """Compiled for any prompt length (as Dynamo does after a second length): two batches of other
    lengths run on one graph, each sizing the kept counts from its own length."""
    model = tiny_llava_onevision(num_layers=4, seed=1)
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, FRACTIONS), compiler="eager"))
    compiled = torch.compile(model, backend=recorder, dynamic=True)
    for prompts in (
        ["w1 w2 w3 <image> what is in the image ?", "<image> what ?"],
        ["w1 <image> what is it ?", "<image> a b c d e f g h ?"],
    ):
        inputs = processed(model, prompts, [(40, 60)] * 2)
        prune = plan(model, inputs, FRACTIONS)
        recorder.kept.clear()
        with torch.no_grad():
            out = compiled(**inputs)
        ref = reference_prefill(
            model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune,
            image_sizes=inputs["image_sizes"],
        )  # fmt: skip
        assert_pass_matches_reference(inputs, out, recorder, ref, prune)
    assert [r.result.seq_len for r in recorder.backend.pruned_graphs] == ["S"]


def test_an_image_and_a_video_are_pruned_together():
    """Two merges (images, then videos) read as one visual mask: kept sets and logits vs masking."""
    model = tiny_llava_onevision(num_layers=3, seed=2)
    oracle = copy.deepcopy(model)
    inputs = processed(model, ["w1 <image> w2 w3", "w4 w5 <image> w6"], [(32, 32)] * 2)
    video = onevision_video_inputs(model, [1, 1], [3, 3], frames=2, seed=3)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], video["input_ids"][:, 1:]], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], video["attention_mask"][:, 1:]], dim=1)
    inputs["pixel_values_videos"] = video["pixel_values_videos"]
    recorder = KeptRecorder(fitprune_backend(fraction_recipe(model, {1: 0.5}), compiler="eager"))
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    result = recorder.backend.pruned_graphs[0].result
    image_tokens = family_for(model).image_tokens(model.config, 32, 32)
    assert result.visual_tokens == image_tokens + 9  # the image + a video of 2 frames x 4 + 1 newline
    with torch.no_grad(), MaskingReference(oracle, result.deletions) as masking:
        expected = oracle(**inputs).logits
    batch, seq_len = inputs["input_ids"].shape
    kept = compose_kept(recorder.kept, seq_len, batch)[-1]
    for b in range(batch):
        assert torch.equal(kept[b], (~masking.deleted[1][b]).nonzero().squeeze(1))
        torch.testing.assert_close(out[b], expected[b, kept[b]], atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_masking_on_a_left_padded_batch():
    model = tiny_llava_onevision(num_layers=4, seed=4)
    inputs = processed(model, ["w1 w2 w3 <image> what is in the image ?", "<image> what ?"], [(40, 60)] * 2)
    prune = plan(model, inputs, FRACTIONS)
    assert_greedy_generate_matches_masking(
        model, fraction_recipe(model, FRACTIONS), inputs, prune, "llava-onevision"
    )


def test_zero_recipe_reproduces_the_model():
    model = tiny_llava_onevision(num_layers=3, seed=5)
    inputs = processed(model, ["w1 <image> what ?"], [(90, 30)])
    backend = fitprune_backend(fraction_recipe(model, {1: 0.0}), compiler="eager")
    with torch.no_grad():
        expected = model(**inputs).logits
        out = torch.compile(model, backend=backend)(**inputs).logits
    assert len(backend.pruned_graphs) == 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_fit_on_processor_inputs_gives_a_recipe_that_prunes():
    model = tiny_llava_onevision(num_layers=4, seed=6)
    calibration = [
        processed(model, ["w1 <image> what is in the image ?"], [(40, 60)], seed=s) for s in range(4)
    ]
    recipe = fitprune_fx.fit(model, calibration, 0.4)
    assert recipe.reference_reduction() >= 0.4
    backend = fitprune_backend(recipe, compiler="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(**calibration[0])
    assert backend.pruned_graphs[0].result.deletions == recipe.pruning_plan(70)  # 70 tokens at 40x60
