"""Tiny randomly initialised LLaVA models and prompts, for tests, examples and benchmarks.

No weights can be downloaded here, so everything that needs a LLaVA model without caring about
what it learned builds one of these. The text model can be Llama (LLaVA-1.5), Mistral or Qwen2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

from fitprune_fx.families import family_for

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

IMAGE_TOKEN_ID = 3  # small ids are reserved: 0 pad, 1 bos, 2 eos, 3 image
PAD_TOKEN_ID = 0


def tiny_llava(
    text_model: str = "llama",
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
) -> LlavaForConditionalGeneration:
    """A LLaVA with a 2-layer CLIP tower and a small decoder; (image_size/patch_size)^2 visual tokens.
    `sliding_window` (Mistral or Qwen2 decoders): every layer attends within that window."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text_kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    if text_model in ("mistral", "qwen2"):
        text_kwargs["sliding_window"] = sliding_window
        if text_model == "qwen2" and sliding_window is not None:
            text_kwargs.update(use_sliding_window=True, max_window_layers=0)
    elif sliding_window is not None:
        raise ValueError(f"a {text_model} decoder has no sliding window; use mistral or qwen2")
    text = TEXT_CONFIGS[text_model](**text_kwargs)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = "sdpa"
    return _sharpen_attention(LlavaForConditionalGeneration(config)).to(dtype).eval()


def _sharpen_attention(model):
    """Random init gives near-uniform attention; a larger q/k scale makes scores distinct so that
    kept-token sets are well defined (no near-ties) in tests."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def num_image_tokens(model: LlavaForConditionalGeneration) -> int:
    """Visual tokens one image contributes to the prompt (the model family's count)."""
    return family_for(model).visual_tokens_per_image(model.config)


def image_side(model: LlavaForConditionalGeneration) -> int:
    """Pixel side of the images the model takes: LLaVA-HR's `config.image_size` (its slow
    pathway's input), else the CLIP tower's."""
    return getattr(model.config, "image_size", None) or model.config.vision_config.image_size


@dataclass
class PromptSpec:
    """One prompt: text tokens before the image(s), between images and after the last image."""

    before: int
    after: int
    images: int = 1
    between: int = 2


def make_inputs(
    model: LlavaForConditionalGeneration,
    prompts: list[PromptSpec],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask` and `pixel_values` for a batch of prompts."""
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(model)
    vocab = model.config.text_config.vocab_size
    rows = []
    for p in prompts:
        ids: list[int] = [1]
        ids += torch.randint(4, vocab, (p.before,), generator=g).tolist()
        for i in range(p.images):
            if i:
                ids += torch.randint(4, vocab, (p.between,), generator=g).tolist()
            ids += [IMAGE_TOKEN_ID] * n_img
        ids += torch.randint(4, vocab, (p.after,), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = torch.tensor(r)
        attention_mask[b, length - len(r) :] = 1
    side = image_side(model)
    total_images = sum(p.images for p in prompts)
    pixel_values = torch.randn((total_images, 3, side, side), generator=g).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT (any-resolution tiling): the visual count depends on the image size

NEXT_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
"""Tile layouts (height, width) of the tiny NeXT model: 1x2, 2x1, 2x2, 1x3 and 3x1 tiles of 32."""


def tiny_llava_next(
    text_model: str = "llama",
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: list[list[int]] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A LlavaNextForConditionalGeneration with the decoder of :func:`tiny_llava`.

    Tiles are ``image_size`` pixels square with ``(image_size / patch_size)^2`` tokens each; the
    visual count of an image (base tile + unpadded grid + one newline token per grid row) depends
    on its size through ``grid_pinpoints`` (default :data:`NEXT_GRID_PINPOINTS`); see
    :func:`next_image_tokens`.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    plain = tiny_llava(
        text_model,
        num_layers,
        hidden_size,
        num_heads,
        num_kv_heads,
        intermediate_size,
        vocab_size,
        image_size,
        patch_size,
        seed=seed,
    )
    config = LlavaNextConfig(
        vision_config=plain.config.vision_config.to_dict(),
        text_config=plain.config.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in (grid_pinpoints or NEXT_GRID_PINPOINTS)],
        pad_token_id=PAD_TOKEN_ID,
    )
    config.vision_config.model_type = "clip_vision_model"
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return _sharpen_attention(LlavaNextForConditionalGeneration(config)).to(dtype).eval()


def next_image_tokens(config, height: int, width: int) -> int:
    """Visual tokens a LLaVA-NeXT image of ``height x width`` pixels puts in the prompt.

    Arithmetic of ``LlavaNextModel.pack_image_features`` (``spatial_unpad``): the base tile,
    then the grid of the best-fitting ``image_grid_pinpoints`` layout with the rows or columns
    that only hold letterbox padding removed, plus one ``image_newline`` token per remaining row.
    ``config`` is a ``LlavaNextConfig``.
    """
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    side = vc.image_size // vc.patch_size  # tokens per tile side
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = best_h // vc.image_size * side, best_w // vc.image_size * side
    if width / height > cols / rows:  # wider than the grid: padding rows top and bottom
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    return base + rows * (cols + 1)


def next_num_tiles(config, height: int, width: int) -> int:
    """Tiles (base + grid) the vision tower sees for a ``height x width`` image."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    return 1 + (best_h // config.vision_config.image_size) * (best_w // config.vision_config.image_size)


def make_next_inputs(
    model,
    prompts: list[PromptSpec],
    image_sizes: list[tuple[int, int]],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded inputs for a LLaVA-NeXT batch: one ``(height, width)`` per image, in order.

    ``pixel_values`` is ``[num_images, max_tiles, 3, tile, tile]`` (random pixels, unused tiles
    zero), ``image_sizes`` is ``[num_images, 2]``; each image gets :func:`next_image_tokens`
    image tokens. No image processor is needed.
    """
    config = model.config
    total_images = sum(p.images for p in prompts)
    if len(image_sizes) != total_images:
        raise ValueError(f"{total_images} images in the prompts but {len(image_sizes)} image sizes")
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    counts = [next_image_tokens(config, h, w) for h, w in image_sizes]
    rows, image = [], 0
    for p in prompts:
        ids: list[int] = [1]
        ids += torch.randint(4, vocab, (p.before,), generator=g).tolist()
        for i in range(p.images):
            if i:
                ids += torch.randint(4, vocab, (p.between,), generator=g).tolist()
            ids += [IMAGE_TOKEN_ID] * counts[image]
            image += 1
        ids += torch.randint(4, vocab, (p.after,), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = torch.tensor(r)
        attention_mask[b, length - len(r) :] = 1
    tile = config.vision_config.image_size
    tiles = [next_num_tiles(config, h, w) for h, w in image_sizes]
    pixel_values = torch.zeros(total_images, max(tiles), 3, tile, tile)
    for i, n in enumerate(tiles):
        pixel_values[i, :n] = torch.randn((n, 3, tile, tile), generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values.to(model.dtype),
        "image_sizes": torch.tensor(image_sizes, dtype=torch.long),
    }
