"""`fitprune-fx inspect --image`: the picture of what a recipe keeps, against the pass's own kept sets."""

from __future__ import annotations

import pytest
import torch

from fitprune_fx.backend import fitprune_backend
from fitprune_fx.cli import main
from fitprune_fx.families import family_for
from fitprune_fx.kept_picture import kept_picture
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.testbed import synthetic
from fitprune_fx.testbed.shapes_model import MODEL_DIR, load_shapes_llava
from fitprune_fx.testbed.tiny import tiny_llava
from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl
from graph_harness import KeptRecorder, compose_kept


def test_picture_shows_what_the_pass_keeps():
    """Each panel's kept patches are the image tokens the compiled model (the pass, eager graph)
    keeps after that layer, laid out row-major over the 12 x 12 grid."""
    model, processor = load_shapes_llava()
    example = synthetic.make_dataset(1, seed=3, split="test")[0]
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={0: 50, 2: 40}, scorer="fastv")
    picture = kept_picture(model, processor, recipe, example.image, example.text)
    (view,) = picture.views
    assert (view.grid.rows, view.grid.cols) == (12, 12) and picture.layers == [0, 2]
    assert [int(k.sum()) for k in view.kept] == [94, 54]

    inputs = processor(images=[example.image], text=[example.text], return_tensors="pt")
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=recorder)(**inputs)
    s = inputs["input_ids"].shape[1]
    image_rows = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()  # 144
    for step, kept in enumerate(compose_kept(recorder.kept, s, 1)):
        expected = torch.isin(image_rows, kept[0]).reshape(12, 12)
        assert torch.equal(view.kept[step], expected), step
    # the picture is the processor's view of the image (48 x 48 px), not a blank
    assert view.image.size == (48, 48) and len(set(view.image.getdata())) > 2


def test_picture_of_a_qwen_vl_image_shows_what_the_pass_keeps():
    """Qwen2.5-VL through its processor: a 100 x 150 image is a 6 x 8 patch grid merged into 3 x 4
    tokens; each panel equals the pass's kept image tokens after that layer."""
    import numpy as np
    from PIL import Image

    from fitprune_fx.testbed.tiny_processors import qwen_vl_processor

    model = tiny_qwen_vl("qwen2_5_vl", num_layers=3, seed=16)
    processor = qwen_vl_processor(model)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    prompt = "w1 <|vision_start|><|image_pad|><|vision_end|> what is in the image ?"
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.25, 1: 0.25})
    picture = kept_picture(model, processor, recipe, image, prompt)
    (view,) = picture.views
    assert (view.grid.rows, view.grid.cols) == (3, 4) and [int(k.sum()) for k in view.kept] == [9, 6]
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=recorder)(**inputs)
    image_rows = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    for step, kept in enumerate(compose_kept(recorder.kept, inputs["input_ids"].shape[1], 1)):
        assert torch.equal(view.kept[step], torch.isin(image_rows, kept[0]).reshape(3, 4)), step
    assert view.image.size == (4 * 112, 3 * 112)  # the image resized to the grid's aspect


def test_inspect_command_draws_the_picture(tmp_path, capsys):
    example = synthetic.make_dataset(1, seed=4, split="test")[0]
    image, out = tmp_path / "image.png", tmp_path / "kept.png"
    example.image.save(image)
    recipe = tmp_path / "r.json"
    info = ModelInfo.from_config(load_shapes_llava()[0].config, name="shapes-llava")
    Recipe(model=info, prune={1: 100}).to_json(recipe)
    args = ["inspect", str(recipe), "--model", str(MODEL_DIR), "--image", str(image)]
    assert main([*args, "--question", example.question, "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12x12 patches; kept after layer 1: 44" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--plot", str(out)]) == 2  # no --question
    assert "needs --model, --image, --question and --plot together" in capsys.readouterr().err


def test_token_grids_of_the_families():
    """LLaVA: one square per image; Qwen-VL: the image grid merged 2 x 2."""
    llava = tiny_llava("llama", num_layers=1)
    ids = torch.tensor([[1] + [llava.config.image_token_id] * 32 + [5]])  # two images of 16 tokens
    grids = family_for(llava).token_grids(llava.config, {"input_ids": ids})
    assert [(g.image, g.start, g.rows, g.cols, g.stride) for g in grids] == [
        (0, 0, 4, 4, 4),
        (1, 16, 4, 4, 4),
    ]
    qwen = tiny_qwen_vl("qwen2_5_vl", num_layers=1)
    inputs = make_qwen_inputs(qwen, [2], [3], grid=(8, 12))
    ((g),) = family_for(qwen).token_grids(qwen.config, inputs)
    assert (g.rows, g.cols, g.square) == (4, 6, False)


@pytest.mark.parametrize("sizes", [[(40, 90), (70, 30)], [(32, 32)]])
def test_next_grids_end_each_row_where_the_model_put_a_newline(sizes):
    """LLaVA-NeXT: read off the merged embeddings themselves, the token after each row of the tiles'
    grid is the model's `image_newline`, and no token of a grid is; the grids of each image end
    where its visual tokens end."""
    from fitprune_fx.testbed.tiny import PromptSpec, make_next_inputs, tiny_llava_next

    model = tiny_llava_next(num_layers=1, seed=2)
    inputs = make_next_inputs(model, [PromptSpec(2, 3, images=len(sizes))], sizes)
    grids = family_for(model).token_grids(model.config, inputs)
    assert len(grids) == 2 * len(sizes)
    embeds = family_for(model).embed_prompt(
        model, inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    )[0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    newline = model.model.image_newline.detach()
    is_newline = (embeds[visual] == newline).all(dim=-1)  # [n] over the prompt's visual tokens
    expected = torch.zeros_like(is_newline)
    for base, tiles in zip(grids[::2], grids[1::2], strict=True):
        assert base.square and not tiles.square and tiles.start == base.start + base.rows * base.cols
        expected[tiles.start + tiles.cols + torch.arange(tiles.rows) * tiles.stride] = True
    assert torch.equal(is_newline, expected)
    last = grids[-1]
    assert last.start + last.rows * last.stride == visual.numel()


def test_onevision_picture_shows_what_the_pass_keeps_in_both_views():
    """LLaVA-OneVision through its processor: the base tile and the tiles' grid (a newline token per
    row, checked on the embeddings as for LLaVA-NeXT) each show the pass's kept tokens."""
    import numpy as np
    from PIL import Image

    from fitprune_fx.testbed.tiny_onevision import tiny_llava_onevision
    from fitprune_fx.testbed.tiny_processors import onevision_processor

    model = tiny_llava_onevision(num_layers=3, seed=1)
    processor = onevision_processor(model)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    prompt = "w1 <image> what is in the image ?"
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.25, 1: 0.25})
    picture = kept_picture(model, processor, recipe, image, prompt)
    base, tiles = picture.views
    assert base.grid.square and not tiles.grid.square
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    embeds = family_for(model).embed_prompt(model, inputs["input_ids"], inputs["pixel_values"],
                                            image_sizes=inputs["image_sizes"])[0]  # fmt: skip
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    g = tiles.grid
    row_ends = visual[g.start + g.cols + torch.arange(g.rows) * g.stride]
    assert (embeds[row_ends] == model.model.image_newline.detach()).all()
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=recorder)(**inputs)
    for step, kept in enumerate(compose_kept(recorder.kept, inputs["input_ids"].shape[1], 1)):
        for view in (base, tiles):
            r, c = torch.arange(view.grid.rows)[:, None], torch.arange(view.grid.cols)[None, :]
            positions = visual[view.grid.start + r * view.grid.stride + c]
            assert torch.equal(view.kept[step], torch.isin(positions, kept[0])), step
