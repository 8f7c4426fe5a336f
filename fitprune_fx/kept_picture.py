"""What a recipe keeps of one image: the image once per pruning layer, deleted patches washed out.

`fitprune-fx inspect RECIPE --model M --image IMG --question Q --plot kept.png` runs the model on
one prompt through the eager reference (`reference.reference_prefill`: explicit removal, whose kept
sets equal the pass's in the tests; it runs the built-in scorers and the published methods), maps
each visual token back to its patch of the image (the family's `token_grids`), and draws one panel
per pruning layer and view. The image drawn is the one the view saw: for a square view (LLaVA's
resized and cropped square, LLaVA-NeXT's and OneVision's base tile) the processor's first pixel
tile, un-normalised; otherwise (Qwen-VL, the any-resolution tiles' grid) the whole image resized to
the token grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .families import family_for
from .families.base import TokenGrid
from .recipe import Recipe
from .reference import SCORERS, reference_prefill


@dataclass
class View:
    """One view of the image: what the model saw of it and its tokens' kept map per pruning layer."""

    image: Image.Image
    grid: TokenGrid
    kept: list[torch.Tensor]  # [rows, cols] bool after each pruning layer


@dataclass
class KeptPicture:
    """What was kept of the prompt's first image, per view (LLaVA-NeXT / OneVision: the base tile and
    the tiles' grid; others: one view)."""

    views: list[View]
    layers: list[int]  # pruning layers, in order
    scorer: str
    reduction: float


class NoTokenGrid(ValueError):
    """The model's visual tokens do not map back to image regions."""


@torch.no_grad()
def kept_picture(model, processor, recipe: Recipe, image: Image.Image, prompt: str) -> KeptPicture:
    """Run one prompt with one image and read which of its patches survive each pruning layer."""
    if recipe.scorer not in SCORERS:
        raise ValueError(
            f"the picture runs the eager reference, which knows the scorers {list(SCORERS)}; "
            f"{recipe.scorer!r} is not one of them"
        )
    inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
    family = family_for(model)
    grids = [g for g in family.token_grids(model.config, inputs) or [] if g.image == 0]
    if not grids:
        raise NoTokenGrid(
            f"a {family.name} model's visual tokens are not mapped back to image regions here (a video, "
            "or a family without token_grids): the picture is drawn for LLaVA-1.5, LLaVA-HR, "
            "LLaVA-NeXT, LLaVA-OneVision and Qwen-VL images"
        )
    ids = inputs["input_ids"]
    visual = torch.isin(ids[0], torch.tensor(family.visual_token_ids(model.config))).nonzero().flatten()
    plan = recipe.pruning_plan(visual.numel())
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    result = reference_prefill(
        model,
        ids,
        inputs.get("pixel_values"),
        inputs.get("attention_mask"),
        prune=plan,
        scorer=recipe.scorer,
        scorer_options=dict(recipe.scorer_options),
        **extra,
    )
    views = []
    for grid in grids:
        r, c = torch.arange(grid.rows)[:, None], torch.arange(grid.cols)[None, :]
        index = grid.start + r * grid.stride + c  # [rows, cols] among the prompt's visual tokens
        if int(index.max()) >= visual.numel():
            raise NoTokenGrid(f"the prompt holds {visual.numel()} visual tokens, fewer than its grids need")
        positions = visual[index]
        kept = [torch.isin(positions, k) for k in result.kept[0]]
        views.append(View(seen_image(processor, inputs, image, grid), grid, kept))
    return KeptPicture(views, sorted(plan), recipe.scorer, recipe.reference_reduction())


def seen_image(processor, inputs: dict, image: Image.Image, grid: TokenGrid) -> Image.Image:
    """The image as the view saw it: for a square view, the processor's first pixel tile
    un-normalised; else the image resized to the grid's aspect."""
    pixels = inputs.get("pixel_values")
    if grid.square and pixels is not None and pixels.dim() in (4, 5):
        tile = pixels[0] if pixels.dim() == 4 else pixels[0, 0]  # [3, H, W]
        proc = getattr(processor, "image_processor", processor)
        mean = torch.tensor(getattr(proc, "image_mean", [0.0] * 3)).view(3, 1, 1)
        std = torch.tensor(getattr(proc, "image_std", [1.0] * 3)).view(3, 1, 1)
        scale = float(getattr(proc, "rescale_factor", 1 / 255))
        rgb = ((tile.float() * std + mean) / scale).clamp(0, 255).to(torch.uint8)
        return Image.fromarray(rgb.permute(1, 2, 0).numpy())
    unit = max(1, 448 // max(grid.rows, grid.cols))
    return image.convert("RGB").resize((grid.cols * unit, grid.rows * unit))


def draw(picture: KeptPicture, path: str, title: str = "") -> None:
    """One row per view, one panel per pruning layer: kept patches as they are, deleted ones washed
    out (light grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = len(picture.layers) + 1
    fig, axes = plt.subplots(
        len(picture.views), panels, figsize=(2.6 * panels, 2.9 * len(picture.views)), squeeze=False
    )
    for view, row in zip(picture.views, axes, strict=True):
        base = np.asarray(view.image.convert("RGB"), dtype=np.float32) / 255.0
        h, w = base.shape[:2]
        rows, cols = view.grid.rows, view.grid.cols
        ys = np.minimum(np.arange(h) * rows // h, rows - 1)  # each pixel's patch
        xs = np.minimum(np.arange(w) * cols // w, cols - 1)
        total = rows * cols
        states = [("input", torch.ones(rows, cols, dtype=torch.bool))]
        states += [(f"after layer {layer}", k) for layer, k in zip(picture.layers, view.kept, strict=True)]
        for ax, (label, kept) in zip(row, states, strict=True):
            mask = kept.numpy()[ys][:, xs][:, :, None]
            ax.imshow(np.where(mask, base, 0.3 * base + 0.7 * np.array([0.86, 0.86, 0.9])))
            ax.set_title(f"{label}\n{int(kept.sum())} of {total} kept", fontsize=9)
            ax.axis("off")
    fig.suptitle(title or f"{picture.scorer}, {100 * picture.reduction:.0f}% FLOPs saved", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens(recipe, path: str, num_visual: int | None = None) -> None:
    """PNG bar chart of the visual tokens kept after each decoder layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = recipe.tokens_per_layer(num_visual)  # [input, after layer 0, ..., after L-1]
    layers = list(range(len(tokens) - 1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(layers) + 3), 3.5), dpi=100)
    ax.bar(layers, tokens[1:], color="tab:blue", alpha=0.7, label="kept after layer")
    ax.axhline(tokens[0], color="gray", linestyle="--", linewidth=1, label=f"input: {tokens[0]}")
    budget = "" if recipe.budget is None else f", budget {100 * recipe.budget:g}%"
    ax.set_title(
        f"{recipe.model.name}: {recipe.scorer}{budget}\n"
        f"{100 * recipe.reference_reduction():.1f}% FLOPs saved (reference model)",
        fontsize=10,
    )
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens kept")
    ax.set_ylim(0, tokens[0] * 1.08)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
