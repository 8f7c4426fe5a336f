"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's layout, images and videos.

Images are tiled any-resolution like LLaVA-NeXT, with OneVision's cap (`vision_aspect_ratio`,
"anyres_max_9": a grid with more than about 9 tiles' worth of tokens is downsampled); the count for
a given size is transformers' own LlavaOnevisionProcessor arithmetic. Videos enter through a second
`masked_scatter` into the rows holding `config.video_token_id` (frames pooled 2x2, plus one newline
token): video rows are visual tokens too. Dynamo breaks the graph inside the vision code, so the
merges may land in other graphs than the decoder: `install` marks the visual tokens (images and
videos) inside the decoder's graph, as for Qwen2-VL (`visual_marks.py`). The
decoder (Qwen2) is at `model.language_model` with plain RoPE, so the eager reference and `fit`
work as for LLaVA.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from .llava_next import LlavaNextFamily
from .visual_marks import MARKED_LAYOUT, mark_visual_tokens


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava-onevision"
    layout = MARKED_LAYOUT

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava_onevision"

    def install(self) -> None:
        """Mark visual tokens in the decoder graph (`visual_marks`): the image and video merges may
        land in other graphs than the decoder (Dynamo breaks the graph in the vision code)."""
        from transformers.models.llava_onevision import modeling_llava_onevision as onevision
        from transformers.models.qwen2 import modeling_qwen2 as qwen2

        mark_visual_tokens(onevision.LlavaOnevisionModel, qwen2.Qwen2Model)

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (self.image_token_id(config), int(config.video_token_id))

    def _base_has_cls(self, config: Any) -> bool:
        return False  # SigLIP has no CLS token: "full" keeps every patch

    def _arithmetic(self, config: Any):
        """transformers' LlavaOnevisionProcessor token arithmetic (its cap included), bound to `config`."""
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        vision = config.vision_config
        arithmetic = SimpleNamespace(
            image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
            num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )
        arithmetic._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(
            arithmetic, *a
        )
        arithmetic.count = lambda h, w, tile: LlavaOnevisionProcessor._get_number_of_features(
            arithmetic, h, w, tile, tile
        )
        return arithmetic

    def visual_tokens_per_image(self, config: Any) -> int:
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2  # one tile: the count fractions refer to

    def embed_prompt(
        self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs
    ) -> Tensor:
        if (input_ids == int(model.config.video_token_id)).any():
            raise NotImplementedError(
                "the eager reference embeds images only; check LLaVA-OneVision videos with "
                "fitprune_fx.masking_reference.MaskingReference"
            )
        return super().embed_prompt(model, input_ids, pixel_values, **image_inputs)
