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

from .base import TokenGrid
from .llava import LlavaFamily


class LlavaNextFamily(LlavaFamily):
    name = "llava-next"
    counts_vary_with_image = True

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava_next"

    def _base_has_cls(self, config: Any) -> bool:
        """Whether the vision tower's CLS token stays in the base tile's features (CLIP, "full")."""
        return getattr(config, "vision_feature_select_strategy", "default") == "full"

    def _arithmetic(self, config: Any):
        """transformers' LlavaNextProcessor token arithmetic, bound to `config` (no processor needed)."""
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
        arithmetic.count = lambda h, w, tile: LlavaNextProcessor._get_number_of_features(
            arithmetic, h, w, tile, tile
        )
        return arithmetic

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Visual tokens of a `height` x `width` image, by transformers' processor arithmetic."""
        return self._arithmetic(config).count(height, width, config.vision_config.image_size)

    def token_grids(self, config: Any, inputs: dict) -> list[TokenGrid] | None:
        """Two views per image, as transformers' `pack_image_features` lays them out: the base tile
        (the image resized to one square tile, side x side tokens), then the tiles' grid with its
        padding cut away (rows x cols over the whole image, a newline token after each row). None
        with the CLS token kept (the base view is then no grid)."""
        from transformers.image_processing_utils import select_best_resolution

        if self._base_has_cls(config):
            return None
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        arithmetic = self._arithmetic(config)
        grids, start = [], 0
        for i, (h, w) in enumerate(inputs["image_sizes"].tolist()):
            best_h, best_w = select_best_resolution([h, w], config.image_grid_pinpoints)
            unpadded, rows = arithmetic._get_unpadded_features(
                h, w, side, side, best_h // tile, best_w // tile
            )
            cols = unpadded // rows
            grids.append(TokenGrid(i, start, side, side, side, square=True))
            grids.append(TokenGrid(i, start + side * side, rows, cols, cols + 1, square=False))
            start += arithmetic.count(h, w, tile)
        return grids

    def embed_prompt(
        self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs
    ) -> Tensor:
        if pixel_values is not None and image_inputs.get("image_sizes") is None:
            raise ValueError("a LLaVA-NeXT model needs image_sizes ([num_images, 2], height and width)")
        return super().embed_prompt(model, input_ids, pixel_values, **image_inputs)
