"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP tower, a projector, a Llama-like decoder.

Layout: the decoder is `model.language_model` (`layers.N`, `norm`, `rotary_emb`); image features
enter through `masked_scatter` into the rows holding `config.image_token_id`. Every image gives
(image_size / patch_size)^2 visual tokens, plus the CLS token when the projector keeps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fitprune_fx.passes.layout import DecoderLayout

from .base import ModelFamily, TokenGrid

LLAVA_LAYOUT = DecoderLayout(decoder="language_model", merge_methods=("masked_scatter",))


class LlavaFamily(ModelFamily):
    name = "llava"
    layout = LLAVA_LAYOUT

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava"

    def image_token_id(self, config: Any) -> int:
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise TypeError(f"{type(config).__name__} has no image_token_id")

    def visual_tokens_per_image(self, config: Any) -> int:
        vision = config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            tokens += 1  # the CLS token is kept
        return tokens

    def token_grids(self, config: Any, inputs: dict) -> list[TokenGrid] | None:
        """A square grid of patches per image over its resized, cropped square (none with the CLS
        token kept: not a grid)."""
        per_image = self.visual_tokens_per_image(config)
        side = int(round(per_image**0.5))
        if side * side != per_image:
            return None
        images = int((inputs["input_ids"] == self.image_token_id(config)).sum()) // per_image
        return [TokenGrid(i, i * per_image, side, side, side, square=True) for i in range(images)]

    def embed_prompt(
        self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs
    ) -> Tensor:
        """Token embeddings with the image features scattered into the image-token rows: [B, S, C].

        Same steps as the model's forward: vision tower + projector via `get_image_features`, then
        the features, in order, into the positions holding the image token. Extra image inputs
        (LLaVA-NeXT's `image_sizes`) go to `get_image_features`.
        """
        config = model.config
        embeds = model.model.get_input_embeddings()(input_ids)  # [B, S, C]
        if pixel_values is None:
            return embeds
        extra = {k: v for k, v in image_inputs.items() if v is not None}
        out = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        )
        features = getattr(out, "pooler_output", out)  # list of [N_img, C] (or a stacked tensor)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        features = features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype)
        image_mask = input_ids == self.image_token_id(config)  # [B, S]
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(
                f"{int(image_mask.sum())} image tokens but {features.shape[0]} image feature rows"
            )
        return embeds.masked_scatter(image_mask[..., None], features)
