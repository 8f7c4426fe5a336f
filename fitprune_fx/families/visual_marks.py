"""Mark the visual tokens inside the decoder's graph, for families whose image merge may not share
a Dynamo graph with the decoder (see `passes/visual_token_marks.py`).

`mark_visual_tokens(outer, text)` wraps two forwards, class-wide and once: the multimodal model's,
which on a prompt with pixels computes the [B, S] visual mask (every visual token id: images and
videos) and its count per example from `input_ids` (a CPU tensor: the backend reads it before each
call to size the compaction of a batch whose examples hold different counts), and the text
model's, which marks its input embeddings with them (`fitprune::visual_token_mark`) inside the
decoder's graph. The mark does not depend on how Dynamo splits the model into graphs, nor on how
many merges (images, videos) there are. Decode steps carry no pixels and stay unmarked.
"""

from __future__ import annotations

import functools

import torch

from fitprune_fx.passes.layout import DecoderLayout
from fitprune_fx.passes.visual_token_marks import VISUAL_TOKEN_MARKS

MARKED_LAYOUT = DecoderLayout(decoder="language_model", merge_ops=VISUAL_TOKEN_MARKS)
_VISUAL, _COUNT, _COUNTS = "fitprune_visual_tokens", "fitprune_visual_count", "fitprune_visual_counts"


def mark_visual_tokens(outer: type, text: type) -> None:
    """Wrap `outer.forward` (multimodal model) and `text.forward` (its decoder); idempotent."""
    if not getattr(outer.forward, "_fitprune_marks", False):
        outer.forward = _find_visual_tokens(outer.forward)
    if not getattr(text.forward, "_fitprune_marks", False):
        text.forward = _mark_input_embeddings(text.forward)


def _find_visual_tokens(forward):
    """Multimodal forward: on a prompt with pixels, pass the visual mask and count to the text model."""

    @functools.wraps(forward)
    def wrapper(self, input_ids=None, *args, **kwargs):
        encoded = kwargs.get("mm_encoder_outputs") or {}  # e.g. Qwen3-VL's generate encodes images first
        has_pixels = (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or any(v is not None for v in encoded.values())
        )
        if input_ids is not None and has_pixels:
            visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            counts = visual.sum(dim=1).cpu()  # per example, on the host: sizes a mixed batch's compaction
            kwargs[_VISUAL] = visual
            kwargs[_COUNTS] = counts
            kwargs[_COUNT] = int(counts.sum())  # host value: a size of the pruned graph
        return forward(self, input_ids, *args, **kwargs)

    wrapper._fitprune = wrapper._fitprune_marks = True
    return wrapper


def _mark_input_embeddings(forward):
    """Text-model forward: mark the input embeddings with the visual mask (inside the decoder graph)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        visual, count, counts = kwargs.pop(_VISUAL, None), kwargs.pop(_COUNT, None), kwargs.pop(_COUNTS, None)
        if visual is not None and kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = torch.ops.fitprune.visual_token_mark(
                kwargs["inputs_embeds"], visual, count, counts
            )
        return forward(self, *args, **kwargs)

    wrapper._fitprune = wrapper._fitprune_marks = True
    return wrapper
