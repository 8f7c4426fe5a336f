"""What a multimodal model hands its decoder, captured at the decoder's call (used by `fit` and the
eager reference).

The model's own code merges the visual features and computes the positions, for every family the
same way: a forward pre-hook on the text model records its keyword arguments and stops the call,
so the vision tower runs once and the decoder not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fitprune_fx.families.base import ModelFamily

_NOT_MODEL_INPUTS = {"labels"}


@dataclass
class DecoderInputs:
    """The decoder's inputs for one batch."""

    embeds: Tensor  # [b, S, C] text + visual features
    positions: Tensor | None  # [b, S, 3] M-RoPE (t, h, w) positions, or None: plain RoPE positions
    deepstack: Tensor | None  # [b, S, L, C] DeepStack features added after layers 0..L-1 (Qwen3-VL)


class _Captured(Exception):
    """Raised by the hook to stop the model's forward once the decoder inputs exist."""

    def __init__(self, kwargs: dict) -> None:
        super().__init__()
        self.kwargs = kwargs


@torch.no_grad()
def capture_decoder_inputs(
    model: nn.Module, batch: Mapping[str, Tensor], family: ModelFamily
) -> DecoderInputs:
    """Run `model`'s multimodal model on `batch` (every processor output: image sizes, grids, token
    types, videos) up to its decoder's call; return what the decoder was given. `family` is the
    model's family (`fitprune_fx.families.family_for(model)`)."""
    lm = family.text_model(model)

    def hook(_module, args, kwargs):
        raise _Captured(kwargs)

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inner = getattr(model, "model", model)
        inner(**{k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS and v is not None})
    except _Captured as e:
        return _decoder_inputs(e.kwargs, family)
    finally:
        handle.remove()
    raise RuntimeError("the language model was never called; cannot capture its inputs")


def _decoder_inputs(kwargs: dict, family: ModelFamily) -> DecoderInputs:
    embeds = kwargs["inputs_embeds"]
    positions = kwargs.get("position_ids")
    if positions is not None and positions.dim() == 3:  # M-RoPE: [3, b, S], or [4, b, S] with text first
        positions = positions[-3:].permute(1, 2, 0)  # [b, S, 3]
    else:
        positions = None
    return DecoderInputs(embeds, positions, family.residual_addends(kwargs))
