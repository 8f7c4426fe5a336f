"""LLaVA-HR: the port against the official implementation's recorded outputs, the converter's
errors, and FitPrune on it (converted official checkpoint and `tiny_llava_hr`) against pruning as
masking and the eager reference.

The official outputs in tests/data/llava_hr_official were produced outside the project (its
README says how); nothing here shares code with the official implementation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.cli import main
from fitprune_fx.families import family_for
from fitprune_fx.models.llava_hr import LlavaHrConfig, LlavaHrForConditionalGeneration
from fitprune_fx.reference import reference_prefill
from fitprune_fx.tiny import PromptSpec, make_inputs, tiny_llava_hr
from graph_harness import KeptRecorder, assert_greedy_generate_matches_masking, assert_pass_matches_reference

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
OFFICIAL = Path(__file__).parent / "data" / "llava_hr_official"


def formula_pixels(batch: int, side: int) -> torch.Tensor:
    """The closed-form images the official run used: [batch, 3, side, side]."""
    i = torch.arange(side, dtype=torch.float64)
    y, x = torch.meshgrid(i, i, indexing="ij")
    images = []
    for n in range(batch):
        channels = [
            torch.sin(0.013 * (c + 1) * x + 0.021 * (n + 1) * y + c)
            + 0.5 * torch.cos(0.007 * x * (n + 2) - 0.011 * y)
            for c in range(3)
        ]
        images.append(torch.stack(channels))
    return torch.stack(images).float()


def formula_image(height: int, width: int) -> Image.Image:
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([(xx * 5 + yy * 3) % 256, (xx * 7) % 256, (yy * 11 + 40) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def convert(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"{case}-hf"
    assert main(["convert-llava-hr", str(OFFICIAL / case), str(dst)]) == 0
    return dst


def official_inputs(model, record: dict) -> dict:
    """The recorded prompts with the image placeholder expanded to the model's visual tokens."""
    n = record["vision_tower_output"].shape[1]
    image = torch.full((2, n), model.config.image_token_id)
    input_ids = torch.cat([record["text_before"], image, record["text_after"]], dim=1)
    return {"input_ids": input_ids, "pixel_values": formula_pixels(2, model.config.image_size)}


@pytest.mark.parametrize("case", ["pool", "upsample"])
def test_converted_checkpoint_reproduces_the_official_outputs(case, tmp_path, capsys):
    """Fused vision features, projected features and logits equal the official ones (fp32, 1e-5)."""
    dst = convert(case, tmp_path)
    assert "visual tokens each" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    assert isinstance(model, LlavaHrForConditionalGeneration)
    record = load_file(OFFICIAL / case / "official_outputs.safetensors")
    inputs = official_inputs(model, record)
    assert torch.equal(inputs["pixel_values"][:, :, ::97, ::89], record["pixel_samples"])
    n = record["vision_tower_output"].shape[1]
    assert family_for(model).visual_tokens_per_image(model.config) == n
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"])
        projected = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    before = record["text_before"].shape[1]
    text = torch.cat([logits[:, :before], logits[:, before + n :]], dim=1)
    errors = {
        "tower": (tower - record["vision_tower_output"]).abs().max().item(),
        "projected": (torch.stack(projected) - record["projected_features"]).abs().max().item(),
        "text logits": (text - record["logits_text"]).abs().max().item(),
        "visual logits": (logits[:, before : before + n : 7] - record["logits_visual_every_7th"])
        .abs()
        .max()
        .item(),
    }
    print(case, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors


def test_image_processor_equals_the_official_preprocessing(tmp_path):
    """Pad to a square with the mean colour, resize, crop, normalise: equal to the official output
    (recorded at 64 px) for a wide and a tall image."""
    dst = convert("pool", tmp_path)
    processor = AutoImageProcessor.from_pretrained(
        dst, size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )
    record = load_file(OFFICIAL / "official_preprocessing.safetensors")
    for name, (h, w) in {"wide": (30, 50), "tall": (70, 40)}.items():
        pixels = processor(images=formula_image(h, w), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, record[name], atol=1e-6, rtol=0)


def _official_copy(tmp_path: Path, edit_config=None) -> Path:
    src = tmp_path / "official"
    shutil.copytree(OFFICIAL / "pool", src)
    if edit_config:
        config = json.loads((src / "config.json").read_text())
        edit_config(config)
        (src / "config.json").write_text(json.dumps(config))
    return src


def test_converter_errors_name_the_problem_and_the_fix(tmp_path, capsys):
    not_hr = _official_copy(tmp_path, lambda c: c.pop("is_multipath_encoder"))
    assert main(["convert-llava-hr", str(not_hr), str(tmp_path / "a")]) == 2
    assert "not a LLaVA-HR config" in capsys.readouterr().err

    shutil.rmtree(not_hr)
    for key, value in [("rope_scaling", {"type": "linear", "factor": 2.0}), ("mm_use_im_start_end", True)]:
        changed = _official_copy(tmp_path, lambda c, key=key, value=value: c.update({key: value}))
        assert main(["convert-llava-hr", str(changed), str(tmp_path / "r")]) == 2
        assert f"{key}=" in capsys.readouterr().err and not (tmp_path / "r").exists()
        shutil.rmtree(changed)
    unknown_clip = _official_copy(tmp_path, lambda c: c.update(mm_vision_tower="someone/clip-h"))
    assert main(["convert-llava-hr", str(unknown_clip), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "someone/clip-h" in err and "--clip-config" in err
    with_clip = ["--clip-config", str(unknown_clip / "clip")]
    assert main(["convert-llava-hr", str(unknown_clip), str(tmp_path / "b"), *with_clip]) == 0

    state = torch.load(unknown_clip / "pytorch_model.bin", weights_only=True)
    state["model.vision_tower.extra_adapter.weight"] = torch.zeros(2)
    torch.save(state, unknown_clip / "pytorch_model.bin")
    assert (
        main(
            [
                "convert-llava-hr",
                str(unknown_clip),
                str(tmp_path / "c"),
                "--clip-config",
                str(unknown_clip / "clip"),
            ]
        )
        == 2
    )
    assert "unknown weight 'model.vision_tower.extra_adapter.weight'" in capsys.readouterr().err


@pytest.mark.parametrize("side, tokens", [(768, 576), (1024, 1024), (1536, 2304)])
def test_visual_counts_of_the_released_geometry(side, tokens):
    """CLIP ViT-L/14 at max(S/32*14, 336) px: 576, 1024, 2304 tokens; the FLOPs model agrees."""
    config = LlavaHrConfig(image_size=side)
    assert family_for(config).visual_tokens_per_image(config) == tokens
    assert config.fast_grid() ** 2 == tokens and config.slow_grid() ** 2 == tokens
    assert ModelInfo.from_config(config).num_visual_tokens == tokens


def test_a_converted_official_checkpoint_prunes_and_generates_like_masking(tmp_path):
    """A new user's path: convert, compile with a recipe, generate; one pruned prefill, tokens and
    per-step logits equal pruning as masking."""
    model = AutoModelForImageTextToText.from_pretrained(convert("upsample", tmp_path)).eval()
    record = load_file(OFFICIAL / "upsample" / "official_outputs.safetensors")
    inputs = official_inputs(model, record)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.5, 1: 0.25})
    prune = recipe.pruning_plan(576)
    assert prune == {0: 288, 1: 144}
    assert_greedy_generate_matches_masking(model, recipe, inputs, prune, "llava-hr (official weights)")
    assert "pruned with fitprune after layers [0:-288, 1:-144]" in model.fitprune_backend.summary()


def test_zero_recipe_reproduces_tiny_llava_hr_exactly():
    model = tiny_llava_hr(seed=3)
    inputs = make_inputs(model, [PromptSpec(before=4, after=3), PromptSpec(before=1, after=2)], seed=1)
    backend = fitprune_backend(
        Recipe(model=ModelInfo.from_config(model.config), prune={0: 0, 2: 0}), compiler="eager"
    )
    with torch.no_grad():
        expected = model(**inputs).logits
        out = torch.compile(model, backend=backend)(**inputs).logits
    assert len(backend.pruned_graphs) == 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_tiny_llava_hr_prefill_equals_the_eager_reference():
    """Left-padded batch, two images in one prompt: kept sets after every pruning layer and logits
    at kept positions equal the eager reference (fp32, 1e-4)."""
    model = tiny_llava_hr(num_layers=4, seed=4)
    prompts = [PromptSpec(before=5, after=3, images=2), PromptSpec(before=0, after=2, images=2)]
    inputs = make_inputs(model, prompts, seed=2)
    prune = {0: 20, 2: 15, 3: 3}  # per image; two images per prompt double them
    recorder = KeptRecorder(
        fitprune_backend(Recipe(model=ModelInfo.from_config(model.config), prune=prune), compiler="eager")
    )
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs)
    applied = dict(
        sorted(Recipe(model=ModelInfo.from_config(model.config), prune=prune).pruning_plan(128).items())
    )
    ref = reference_prefill(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=applied
    )
    assert_pass_matches_reference(inputs, out, recorder, ref, applied)


def test_tiny_llava_hr_greedy_generate_matches_masking_on_a_left_padded_batch():
    model = tiny_llava_hr(num_layers=3, seed=5)
    inputs = make_inputs(model, [PromptSpec(before=6, after=4), PromptSpec(before=1, after=2)], seed=3)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={0: 24, 1: 16})
    assert_greedy_generate_matches_masking(model, recipe, inputs, {0: 24, 1: 16}, "tiny llava-hr")


def test_fit_on_tiny_llava_hr_meets_the_budget_and_prunes():
    model = tiny_llava_hr(num_layers=4, seed=6)
    calibration = [make_inputs(model, [PromptSpec(before=3, after=5)], seed=s) for s in range(4)]
    recipe = fitprune_fx.fit(model, calibration, 0.4)
    assert recipe.model.num_visual_tokens == 64
    assert recipe.reference_reduction() >= 0.4
    backend = fitprune_backend(recipe, compiler="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend)(**calibration[0])
    assert backend.pruned_graphs[0].result.deletions == dict(recipe.prune)


def test_a_new_user_converts_fits_and_prunes_from_the_command_line(tmp_path, capsys):
    """Official folder with a tokenizer -> convert (a LlavaProcessor with <image>) -> `fitprune-fx
    fit` on a question file -> compile with the recipe -> processor inputs -> one pruned prefill."""
    from test_cli import char_tokenizer
    from transformers import AutoProcessor

    src = tmp_path / "official"
    shutil.copytree(OFFICIAL / "upsample", src)
    char_tokenizer().save_pretrained(src)
    dst = tmp_path / "llava-hr-hf"
    assert main(["convert-llava-hr", str(src), str(dst)]) == 0
    assert "LlavaProcessor, <image> is token 3, 576 per image" in capsys.readouterr().out

    images = tmp_path / "images"
    images.mkdir()
    questions = []
    for i, (h, w) in enumerate([(300, 420), (500, 260), (384, 384)]):
        formula_image(h, w).save(images / f"img{i}.png")
        questions.append({"question_id": i, "image": f"img{i}.png", "text": "What is in the picture?"})
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    out = tmp_path / "recipe.json"
    argv = ["fit", "--model", str(dst), "--data", str(data), "--images", str(images)]
    assert main([*argv, "--budget", "0.5", "-o", str(out), "--batch-size", "3"]) == 0
    recipe = Recipe.from_json(out)
    assert recipe.model.num_visual_tokens == 576 and recipe.flops_reduction >= 0.49

    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    inputs = processor(
        text=["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nAnd this one, in detail? ASSISTANT:"],
        images=[formula_image(300, 420), formula_image(500, 260)],
        return_tensors="pt",
        padding=True,
    )
    assert (inputs["input_ids"] == 3).sum(dim=1).tolist() == [576, 576]
    prune = recipe.pruning_plan(576)
    assert_greedy_generate_matches_masking(
        model, recipe, dict(inputs), prune, "llava-hr (converted, processor)"
    )
