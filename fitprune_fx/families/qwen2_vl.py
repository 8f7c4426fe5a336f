"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Layout: the decoder is `model.language_model` (`layers.N`, `norm`, `rotary_emb`, M-RoPE: cos/sin
come out of `rotary_emb` as [B, S, D], so kept tokens keep their 3-D positions by the same gather
as LLaVA's RoPE). Images and videos enter through `masked_scatter` into the rows holding
`config.image_token_id` / `config.video_token_id`; both are visual tokens.

The merge never shares a Dynamo graph with the decoder (the M-RoPE position code in between breaks
the graph), so `install` wraps two forwards, class-wide: the multimodal model's, which computes
the visual mask and its count from `input_ids` on a prompt that carries pixels, and the text
model's, which marks its input embeddings with them (`fitprune::visual_token_mark`, see
`passes/visual_token_marks.py`) inside the decoder's graph. Decode steps carry no pixels and stay
unmarked. Positions after a pruned prefill continue exactly: transformers derives them from the
cache length (layer 0, never pruned) and its `rope_deltas`.

Visual counts depend on the image size (dynamic resolution), so recipes use fractions like
LLaVA-NeXT's. The eager reference (`fitprune_fx.reference`) does not model M-RoPE;
`fitprune_fx.masking_reference.MaskingReference` runs these models' own code and is their oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from fitprune_fx.passes.layout import DecoderLayout
from fitprune_fx.passes.visual_token_marks import VISUAL_TOKEN_MARKS

from .base import ModelFamily

QWEN_VL_LAYOUT = DecoderLayout(decoder="language_model", merge_ops=VISUAL_TOKEN_MARKS)
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_VISUAL, _COUNT = "fitprune_visual_tokens", "fitprune_visual_count"


class QwenVLFamily(ModelFamily):
    name = "qwen2-vl"
    layout = QWEN_VL_LAYOUT
    counts_vary_with_image = True

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) in MODEL_TYPES

    def text_model(self, model: nn.Module) -> nn.Module:
        lm = getattr(getattr(model, "model", model), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise TypeError(f"{type(model).__name__} does not look like a {self.name} model")
        return lm

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.video_token_id))

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Visual tokens of a `height` x `width` image (already resized to multiples of patch x merge)."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        return max(1, round(height / unit)) * max(1, round(width / unit))

    def visual_tokens_per_image(self, config: Any) -> int:
        return self.image_tokens(config, 448, 448)  # the count a recipe's numbers refer to by default

    def embed_prompt(self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs):
        raise NotImplementedError(
            "the eager reference does not model Qwen2-VL's M-RoPE positions; check these models with "
            "fitprune_fx.masking_reference.MaskingReference (it runs the model's own code)"
        )

    def install(self) -> None:
        """Wrap the multimodal and text models' forwards (class-wide, once) to mark visual tokens."""
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
        from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2

        for outer, text in (
            (qwen2.Qwen2VLModel, qwen2.Qwen2VLTextModel),
            (qwen25.Qwen2_5_VLModel, qwen25.Qwen2_5_VLTextModel),
        ):
            if not getattr(outer.forward, "_fitprune", False):
                outer.forward = _find_visual_tokens(outer.forward)
                text.forward = _mark_visual_tokens(text.forward)


def _find_visual_tokens(forward):
    """Multimodal forward: on a prompt with pixels, pass the visual mask and count to the text model."""

    @functools.wraps(forward)
    def wrapper(self, input_ids=None, *args, **kwargs):
        encoded = kwargs.get("mm_encoder_outputs") or {}  # Qwen3-VL's generate encodes images up front
        has_pixels = (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or any(v is not None for v in encoded.values())
        )
        if input_ids is not None and has_pixels:
            visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            kwargs[_VISUAL] = visual
            kwargs[_COUNT] = int(visual.sum())  # host value: a static count for the pruned graph
        return forward(self, input_ids, *args, **kwargs)

    wrapper._fitprune = True
    return wrapper


def _mark_visual_tokens(forward):
    """Text-model forward: mark the input embeddings with the visual mask (inside the decoder graph)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        visual, count = kwargs.pop(_VISUAL, None), kwargs.pop(_COUNT, None)
        if visual is not None and kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = torch.ops.fitprune.visual_token_mark(
                kwargs["inputs_embeds"], visual, count
            )
        return forward(self, *args, **kwargs)

    wrapper._fitprune = True
    return wrapper
