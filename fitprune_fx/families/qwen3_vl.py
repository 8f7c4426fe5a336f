"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's layout and visual-token marks, plus DeepStack.

DeepStack adds features from intermediate vision layers to the hidden states of the first decoder
layers, at the visual rows: after decoder layer k (k < number of DeepStack levels),
`hidden[visual_pos_masks] += deepstack_visual_embeds[k]` ([N_visual, C], in visual-row order).
transformers does that by boolean indexing, which has a data-dependent shape in a graph.

The exact rule under pruning: a kept visual token receives its own DeepStack features; a deleted
token's features are dropped with it. `install` makes that a compaction like any other: the text
model's forward turns each level into a dense addend [B, S, C] (the features scattered into the
visual rows, zero elsewhere) and the DeepStack step adds it with `fitprune::visual_residual_add`;
the pass gathers the addend with the kept tokens for the adds after a pruning layer. On unpruned
runs the dense add is bitwise the model's own arithmetic (x + 0 = x at non-visual rows).

Visual counts, videos, M-RoPE positions and rope deltas behave as in Qwen2-VL (`qwen2_vl.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .qwen2_vl import QwenVLFamily
from .visual_marks import mark_visual_tokens


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3-vl"

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "qwen3_vl"

    def residual_addends(self, text_model_kwargs: dict) -> Tensor | None:
        """DeepStack features as [b, S, L, C] (see `dense_deepstack`), or None without visual tokens."""
        levels, rows = (
            text_model_kwargs.get("deepstack_visual_embeds"),
            text_model_kwargs.get("visual_pos_masks"),
        )
        embeds = text_model_kwargs["inputs_embeds"]
        if levels is None or rows is None:
            return None
        if levels and levels[0].dim() == 3:  # already dense (the family's own wrapper ran first)
            return torch.stack(list(levels), dim=2)
        return torch.stack(dense_deepstack(levels, rows, embeds), dim=2)

    def install(self) -> None:
        """Wrap the multimodal and text forwards and the DeepStack step (class-wide, once)."""
        from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

        text = qwen3.Qwen3VLTextModel
        if not getattr(text._deepstack_process, "_fitprune", False):
            text.forward = _dense_deepstack(text.forward)  # inside the mark's wrapper: the mark goes first
            text._deepstack_process = _add_dense_deepstack(text._deepstack_process)
        mark_visual_tokens(qwen3.Qwen3VLModel, text)


def dense_deepstack(levels: list[Tensor], rows: Tensor, embeds: Tensor) -> list[Tensor]:
    """DeepStack levels [N_visual, C] -> dense addends [B, S, C] (the features at the visual rows
    `rows` [B, S], zero elsewhere), in the embeddings' dtype."""
    where = rows[..., None].to(embeds.device)  # [B, S, 1]
    return [
        torch.zeros_like(embeds).masked_scatter(where, level.to(embeds.device, embeds.dtype))
        for level in levels
    ]


def _dense_deepstack(forward):
    """Text forward: DeepStack levels [N_visual, C] -> dense addends [B, S, C] (zero at other rows)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        levels, rows = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        embeds = kwargs.get("inputs_embeds")
        if levels is not None and rows is not None and embeds is not None:
            kwargs["deepstack_visual_embeds"] = dense_deepstack(levels, rows, embeds)
        return forward(self, *args, **kwargs)

    wrapper._fitprune = True
    return wrapper


def _add_dense_deepstack(deepstack_process):
    """DeepStack step: a dense addend goes through `fitprune::visual_residual_add` (the pass sees it)."""

    @functools.wraps(deepstack_process)
    def wrapper(self, hidden_states, visual_pos_masks, visual_embeds):
        if visual_embeds.dim() == 3:  # dense, from `_dense_deepstack`, already in the embeddings' dtype
            return torch.ops.fitprune.visual_residual_add(hidden_states, visual_embeds)
        return deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds)

    wrapper._fitprune = True
    return wrapper
