"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA's decoder layout, any-resolution images.

Each image is tiled (base tile + the unpadded grid of the best `image_grid_pinpoints` layout + one
newline token per grid row), so its visual count depends on its size; newline tokens are visual
tokens too. Recipes for it default to fractions of the visual tokens present. The count for a
given size is transformers' own processor arithmetic.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from .llava import LlavaFamily


class LlavaNextFamily(LlavaFamily):
    name = "llava-next"
    counts_vary_with_image = True

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava_next"

    def token_grids(self, config: Any, inputs: dict) -> None:
        """None: a base image grid, then crops with a newline token per row (no one grid per image)."""
        return None

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Visual tokens of a `height` x `width` image, by transformers' LlavaNextProcessor arithmetic."""
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        vision = config.vision_config
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        arithmetic = SimpleNamespace(
            image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
            patch_size=vision.patch_size,
            num_additional_image_tokens=1 if full else 0,
        )
        arithmetic._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(
            arithmetic, *a
        )
        tile = vision.image_size
        return LlavaNextProcessor._get_number_of_features(arithmetic, height, width, tile, tile)

    def embed_prompt(
        self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs
    ) -> Tensor:
        if pixel_values is not None and image_inputs.get("image_sizes") is None:
            raise ValueError("a LLaVA-NeXT model needs image_sizes ([num_images, 2], height and width)")
        return super().embed_prompt(model, input_ids, pixel_values, **image_inputs)
