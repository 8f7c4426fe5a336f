"""The shipped shapes-llava model, its processor and the synthetic QA generator."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fitprune_fx.testbed import shapes_model, synthetic

FOLDER = shapes_model.MODEL_DIR


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return shapes_model.load_shapes_llava()


def test_folder_loads_offline_with_stock_classes():
    model = LlavaForConditionalGeneration.from_pretrained(FOLDER, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoProcessor.from_pretrained(FOLDER, local_files_only=True)
    cfg = model.config
    assert cfg.text_config.num_hidden_layers >= 4
    assert cfg.vision_feature_select_strategy == "default"
    assert model.config._attn_implementation == "sdpa"
    size = sum(f.stat().st_size for f in FOLDER.glob("*.safetensors"))
    assert size <= 10 * 2**20
    ex = synthetic.make_dataset(1, seed=0, split="test")
    batch = shapes_model.encode(processor, ex)
    assert (batch["input_ids"] == cfg.image_token_id).sum() == 144  # 12x12 patches, CLS dropped
    assert batch["pixel_values"].shape == (1, 3, 48, 48)


def test_prompt_tokens(shipped):
    _, processor = shipped
    tok = processor.tokenizer
    ids = tok("USER: <image>\nhow many red shapes are there ? ASSISTANT:")["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "<s>" and words[2] == "<image>" and words[-1] == "ASSISTANT:"
    assert tok.unk_token_id not in ids
    assert tok.padding_side == "left"


TARGET_ACCURACY = 0.9  # requirement for the unpruned model
SHIPPED_FLOOR = 0.95  # the committed weights reach 1.0 on this set; guards loading and preprocessing


@pytest.fixture(scope="module")
def held_out():
    return synthetic.make_dataset(128, seed=123, split="test")


@pytest.fixture(scope="module")
def held_out_accuracy(shipped, held_out):
    model, processor = shipped
    return shapes_model.answer_accuracy(model, processor, held_out, batch_size=64)


def test_held_out_accuracy_above_shipped_floor(held_out_accuracy):
    assert held_out_accuracy >= SHIPPED_FLOOR


def test_held_out_accuracy_target(held_out_accuracy):
    assert held_out_accuracy >= TARGET_ACCURACY


def test_answers_need_the_image(shipped, held_out):
    """With the images blanked out the text alone must not get close to the target."""
    model, processor = shipped
    blank = Image.new("RGB", (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE), synthetic.BACKGROUND)
    blind = [synthetic.Example(blank, ex.question, ex.answer, ex.kind) for ex in held_out]
    assert shapes_model.answer_accuracy(model, processor, blind, batch_size=64) < 0.5


def test_cell_names_are_single_words():
    assert len(synthetic.CELL_NAMES) == synthetic.GRID**2
    tok = shapes_model.build_tokenizer()
    for name in synthetic.CELL_NAMES:
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1


def test_batching_and_padding_do_not_change_answers(shipped):
    model, processor = shipped
    examples = synthetic.make_dataset(16, seed=5, split="test")
    one_by_one = shapes_model.predict(model, processor, examples, batch_size=1)
    batched = shapes_model.predict(model, processor, examples, batch_size=16)
    assert one_by_one == batched


def test_generator_is_deterministic():
    a = synthetic.make_dataset(20, seed=3, split="train")
    b = synthetic.make_dataset(20, seed=3, split="train")
    c = synthetic.make_dataset(20, seed=3, split="test")
    assert [(x.question, x.answer, x.image.tobytes()) for x in a] == [
        (x.question, x.answer, x.image.tobytes()) for x in b
    ]
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]
    im1, q1, a1 = synthetic.make_example(random.Random(7))
    im2, q2, a2 = synthetic.make_example(random.Random(7))
    assert (q1, a1, im1.tobytes()) == (q2, a2, im2.tobytes())
    assert im1.size == (48, 48)


def test_every_question_kind_has_one_word_answers_in_the_vocabulary():
    rng = random.Random(0)
    for kind in synthetic.QUESTION_WEIGHTS:
        for _ in range(20):
            _, question, answer = synthetic.make_example(rng, kind)
            assert answer in synthetic.VOCAB
            assert all(w in synthetic.VOCAB for w in question.split())


@pytest.mark.parametrize("task", [synthetic.SHAPES, synthetic.CLUTTER], ids=lambda t: t.name)
def test_question_file_round_trip(tmp_path, task):
    """Questions, answers, images and the prompt (the task's template: clutter's is question-first)."""
    examples = synthetic.make_dataset(5, seed=1, split="test", task=task)
    paths = synthetic.write_question_file(examples, tmp_path)
    lines = paths["questions"].read_text().splitlines()
    assert len(lines) == 5 and '"question_id"' in lines[0] and '"image"' in lines[0]
    back = synthetic.read_question_file(paths["questions"], paths["images"], paths["answers"], task=task)
    for a, b in zip(examples, back, strict=True):
        assert (a.question, a.answer, a.text) == (b.question, b.answer, b.text)
        assert a.image.tobytes() == b.image.tobytes()  # PNG is lossless
    assert back[0].text.startswith("USER: <image>") != task.question_first
