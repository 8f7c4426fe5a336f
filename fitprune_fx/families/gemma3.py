"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower pooled to a fixed count per image, Gemma 3
decoder at `model.language_model`, images merged by `masked_scatter` into `config.image_token_id` rows.

Two things differ from LLaVA:

* Image tokens attend to each other bidirectionally inside an image (the mask is built from
  `token_type_ids`), so the layout is not causal: scoring reads the model's own mask as it is,
  and the layout names Gemma 3's layer class so that LLaVA's causal layout never claims its graphs.
* Real Gemma 3 configurations mix sliding-window layers (five of every six) with full ones. They are
  pruned: each pruned cache layer records its keys' original positions, and the window is counted
  in them (`fitprune_fx.positioned_cache`). The first full-attention layer (layer 5) may be pruned,
  and transformers sizes every full-attention mask from it, so the cache reports its length in
  original positions.

The eager reference does not model Gemma 3's extra norms around attention and MLP; pruning as
masking (`fitprune_fx.masking_reference.MaskingReference`) runs the model's own code and is its oracle.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fitprune_fx.passes.layout import DecoderLayout

from .base import ModelFamily

GEMMA3_LAYOUT = DecoderLayout(
    decoder="language_model",
    merge_methods=("masked_scatter",),
    causal=False,
    layer_classes=("Gemma3DecoderLayer",),
)


class Gemma3Family(ModelFamily):
    name = "gemma3"
    layout = GEMMA3_LAYOUT
    fits = False
    fits_not_why = (
        "its statistics runner uses a causal mask, and Gemma 3's image tokens attend both ways; "
        "write the recipe by hand (fractions or counts) or fit it on another model"
    )

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "gemma3"

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def visual_tokens_per_image(self, config: Any) -> int:
        return int(config.mm_tokens_per_image)

    def embed_prompt(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs):
        raise NotImplementedError(
            "the eager reference does not model Gemma 3's norms around attention and MLP; check Gemma 3 "
            "with fitprune_fx.masking_reference.MaskingReference (it runs the model's own code)"
        )
