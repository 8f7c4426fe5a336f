"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Layout: the decoder is `model.language_model` (`layers.N`, `norm`, `rotary_emb`, M-RoPE: cos/sin
come out of `rotary_emb` as [B, S, D], so kept tokens keep their 3-D positions by the same gather
as LLaVA's RoPE). Images and videos enter through `masked_scatter` into the rows holding
`config.image_token_id` / `config.video_token_id`; both are visual tokens.

The merge never shares a Dynamo graph with the decoder (the M-RoPE position code in between breaks
the graph), so `install` marks the visual tokens inside the decoder's graph (`visual_marks.py`).
Positions after a pruned prefill continue exactly: transformers derives them from the cache length
(layer 0, never pruned) and its `rope_deltas`.

Visual counts depend on the image size (dynamic resolution), so recipes use fractions like
LLaVA-NeXT's. The eager reference and `fit` take embeddings and 3-D positions from the model's own
call (`fitprune_fx.decoder_inputs`); the reference's prefill models M-RoPE, its own decode loop
does not (rope deltas): generation is checked against `MaskingReference`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import ModelFamily, TokenGrid
from .visual_marks import MARKED_LAYOUT, mark_visual_tokens

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class QwenVLFamily(ModelFamily):
    name = "qwen2-vl"
    layout = MARKED_LAYOUT
    counts_vary_with_image = True
    positions_from_model = True  # M-RoPE positions (and Qwen3-VL's DeepStack) come from the model's call

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in MODEL_TYPES

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.video_token_id))

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Visual tokens of a `height` x `width` image (already resized to multiples of patch x merge)."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        return max(1, round(height / unit)) * max(1, round(width / unit))

    def token_grids(self, config: Any, inputs: dict) -> list[TokenGrid] | None:
        """Each image's patch grid (`image_grid_thw`, one frame) merged spatial_merge_size x
        spatial_merge_size into a token, over the whole image (resized, not cropped); videos are not
        drawn (None when the prompt holds one)."""
        if "image_grid_thw" not in inputs or "video_grid_thw" in inputs:
            return None
        merge = config.vision_config.spatial_merge_size
        grids, start = [], 0
        for i, (_, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
            rows, cols = int(h) // merge, int(w) // merge
            grids.append(TokenGrid(i, start, rows, cols, cols, square=False))
            start += rows * cols
        return grids

    def visual_tokens_per_image(self, config: Any) -> int:
        return self.image_tokens(config, 448, 448)  # the count a recipe's numbers refer to by default

    def embed_prompt(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs):
        """The model's own merge (images and videos), captured at its decoder's call."""
        from fitprune_fx.decoder_inputs import capture_decoder_inputs

        batch = dict(input_ids=input_ids, pixel_values=pixel_values, **image_inputs)
        return capture_decoder_inputs(model, batch, self).embeds

    def install(self) -> None:
        """Mark visual tokens in the decoder graph (`visual_marks`), class-wide, once."""
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
        from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2

        mark_visual_tokens(qwen2.Qwen2VLModel, qwen2.Qwen2VLTextModel)
        mark_visual_tokens(qwen25.Qwen2_5_VLModel, qwen25.Qwen2_5_VLTextModel)
