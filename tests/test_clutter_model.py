"""The shipped clutter-llava (LLaVA-1.5's 576-token geometry) and its synthetic task: the geometry,
the scene rules that put each answer in one token, the trained model's accuracy, and that which
tokens are kept decides its answers."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.testbed import shapes_model, synthetic

TASK = synthetic.CLUTTER
FOLDER = shapes_model.CLUTTER_DIR


@pytest.fixture(scope="module")
def shipped():
    return shapes_model.load_shapes_llava(FOLDER)


@pytest.fixture(scope="module")
def held_out():
    return synthetic.make_dataset(128, seed=321, split="test", task=TASK)


def test_folder_loads_offline_at_llava_geometry():
    model = LlavaForConditionalGeneration.from_pretrained(FOLDER, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoProcessor.from_pretrained(FOLDER, local_files_only=True)
    assert sum(f.stat().st_size for f in FOLDER.glob("*.safetensors")) <= 20 * 2**20
    batch = shapes_model.encode(processor, synthetic.make_dataset(1, seed=0, split="test", task=TASK))
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 576  # 24 x 24 patches
    assert batch["pixel_values"].shape == (1, 3, 96, 96)


def test_scenes_hide_few_informative_tokens_among_distractors():
    """Every coloured shape is a unique (colour, kind) pair filling exactly one patch (row 1,
    column 1 of its cell's 4x4 patches); grey distractors fill other cells; no question asks about
    a distractor; the four sprites differ."""
    rng = random.Random(0)
    bg = np.array(synthetic.BACKGROUND)
    for _ in range(30):
        scene = synthetic.make_scene(rng, TASK)
        coloured = {cell: v for cell, v in scene.items() if v[0] != "grey"}
        assert TASK.min_shapes <= len(coloured) <= TASK.max_shapes
        assert len(scene) - len(coloured) == TASK.distractors
        assert len(set(coloured.values())) == len(coloured)
        painted = (np.array(synthetic.render(scene, rng, TASK)) != bg).any(-1)  # [96, 96]
        patches = painted.reshape(24, 4, 24, 4).any((1, 3))  # [24, 24]
        expected = np.zeros((24, 24), dtype=bool)
        for r, c in scene:
            expected[4 * r + 1, 4 * c + 1] = True
        assert (patches == expected).all()
        assert len(coloured) / 576 < 0.015  # at most 8 of the 576 visual tokens answer anything
        for kind in [*TASK.question_weights, "find_cell"]:
            question, answer = synthetic.ask(scene, rng, kind, TASK)
            words = question.split()
            if kind == "find_cell":
                cell = TASK.cell_names.index(answer)
                assert scene[divmod(cell, TASK.grid)] == (words[3], words[4])
            else:
                cell = divmod(TASK.cell_names.index(words[-2]), TASK.grid)
                assert cell in coloured and answer in coloured[cell]


def test_sprites_are_four_distinct_patterns():
    masks = {k: tuple(row) for k, row in synthetic.SPRITES.items()}
    assert set(masks) == set(synthetic.KINDS) and len(set(masks.values())) == 4
    assert all(len(r) == 4 and len(rows) == 4 for rows in masks.values() for r in rows)


def test_every_word_is_one_token_of_the_vocabulary():
    tok = shapes_model.build_tokenizer(TASK)
    rng = random.Random(1)
    for kind in TASK.question_weights:
        for _ in range(20):
            _, question, answer = synthetic.make_example(rng, kind, TASK)
            ids = tok(f"{question} {answer}", add_special_tokens=False)["input_ids"]
            assert len(ids) == len(question.split()) + 1 and tok.unk_token_id not in ids


def test_held_out_accuracy_and_answers_need_the_image(shipped, held_out):
    model, processor = shipped
    assert shapes_model.answer_accuracy(model, processor, held_out, batch_size=32) >= 0.95
    blank = Image.new("RGB", (TASK.image_size, TASK.image_size), synthetic.BACKGROUND)
    blind = [synthetic.Example(blank, ex.question, ex.answer, ex.kind, ex.template) for ex in held_out]
    assert shapes_model.answer_accuracy(model, processor, blind, batch_size=32) < 0.35


def test_which_tokens_are_kept_decides_the_answer(shipped, held_out):
    """At a 50 % FLOPs cut (deletions after layers 0 and 1), random deletion loses at least 10
    points of accuracy on average over 5 seeds: the test bed measures token choice, not noise.
    (The image-first model it replaced lost 7 points here: its answers leaked into layer 0.)"""
    model, processor = shipped
    info = ModelInfo.from_config(model.config)
    unpruned = shapes_model.answer_accuracy(model, processor, held_out, batch_size=32)
    accuracies = []
    for seed in range(5):
        recipe = Recipe(model=info, prune={0: 288, 1: 100}, scorer="random", scorer_options={"seed": seed})
        assert recipe.reference_reduction() >= 0.5
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fitprune_backend(recipe, compiler="eager"))
        right = 0
        for i in range(0, len(held_out), 32):
            chunk = held_out[i : i + 32]
            logits = compiled(**shapes_model.encode(processor, chunk)).logits[:, -1]
            right += int((logits.argmax(-1) == shapes_model.answer_ids(processor, chunk)).sum())
        accuracies.append(right / len(held_out))
    torch._dynamo.reset()
    assert sum(accuracies) / len(accuracies) <= unpruned - 0.10, accuracies


def test_chat_template_puts_the_question_before_the_image(shipped, held_out):
    """Prompts built the generic way (lmms-eval, `fit --questions`) equal the training prompt,
    which holds the whole question before the image and only "ASSISTANT:" after it."""
    from fitprune_fx.calibration import build_prompt

    _, processor = shipped
    for ex in held_out[:8]:
        built = processor(images=[ex.image], text=[build_prompt(processor, ex.question)], return_tensors="pt")
        trained = processor(images=[ex.image], text=[ex.text], return_tensors="pt")
        assert torch.equal(built["input_ids"], trained["input_ids"])
        words = processor.tokenizer.convert_ids_to_tokens(trained["input_ids"][0].tolist())
        first, last = words.index("<image>"), len(words) - 1 - words[::-1].index("<image>")
        assert words[:first] == ["<s>", "USER:", *ex.question.split()] and words[last + 1 :] == ["ASSISTANT:"]
