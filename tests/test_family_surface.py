"""What the new families show a user outside the compiled model: the model-family table, the FLOPs
report and `fitprune-fx inspect` at image sizes, with counts the models' own processors agree on."""

from __future__ import annotations

import pytest

from fitprune_fx import ModelInfo, Recipe
from fitprune_fx.cli import main as cli_main
from fitprune_fx.families import family_for
from fitprune_fx.testbed.tiny_gemma3 import tiny_gemma3
from fitprune_fx.testbed.tiny_onevision import tiny_llava_onevision
from fitprune_fx.testbed.tiny_qwen import tiny_qwen_vl

BUILDERS = {
    "qwen2-vl": lambda: tiny_qwen_vl("qwen2_vl", num_layers=2),
    "qwen2.5-vl": lambda: tiny_qwen_vl("qwen2_5_vl", num_layers=2),
    "qwen3-vl": lambda: tiny_qwen_vl("qwen3_vl", num_layers=2),
    "llava-onevision": lambda: tiny_llava_onevision(num_layers=2),
    "gemma3": lambda: tiny_gemma3(num_layers=2),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_model_class_has_its_family_and_a_flops_report(name):
    model = BUILDERS[name]()
    family = family_for(model)
    assert family.name == name.replace("qwen2.5-vl", "qwen2-vl")
    info = ModelInfo.from_config(model.config)
    assert (info.num_layers, info.hidden_size) == (2, 64)
    recipe = Recipe(model=info, prune={0: info.num_visual_tokens // 2})
    assert 0 < recipe.reference_reduction() < 1  # the FLOPs model reads the family's dimensions


@pytest.mark.parametrize(
    ("name", "size", "tokens"),
    [("qwen2.5-vl", "448x448", 256), ("qwen2.5-vl", "224x672", 192), ("llava-onevision", "40x60", 70)],
)
def test_cli_inspect_at_image_sizes(tmp_path, capsys, name, size, tokens):
    """Counts per image size: Qwen's (h / 28) * (w / 28) grid, OneVision's any-resolution arithmetic
    (70 is what its real processor gives a 40x60 image, see tests/test_onevision.py)."""
    model = BUILDERS[name]()
    model.config.save_pretrained(tmp_path / "model")
    path = tmp_path / "r.json"
    Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.25, 1: 0.25}).to_json(path)
    assert cli_main(["inspect", str(path), "--config", str(tmp_path / "model"), "--image-size", size]) == 0
    out = capsys.readouterr().out
    quarter = round(tokens * 0.25)
    assert (
        f"image {size} (height x width): {tokens} visual tokens; deleted per layer {{0: {quarter}, 1: " in out
    )
