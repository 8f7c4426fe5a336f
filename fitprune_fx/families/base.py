"""The seam every model family implements (see `fitprune_fx.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fitprune_fx.passes.layout import DecoderLayout


@dataclass(frozen=True)
class TokenGrid:
    """One view of an image among a prompt's visual tokens: its token at row r, column c is the
    prompt's visual token number start + r * stride + c (stride > cols: newline tokens end rows).
    `square`: the view covers the image resized (or cropped) to a square, the processor's first
    pixel tile; else the whole image at its own aspect."""

    image: int  # which image of the prompt (0-based)
    start: int
    rows: int
    cols: int
    stride: int
    square: bool


class UnknownModel(TypeError):
    """No registered family claims the model."""


class ModelFamily:
    """One kind of multimodal model. Subclasses set `name` and `layout` and override what differs."""

    name: str = ""
    layout: DecoderLayout
    counts_vary_with_image: bool = False  # visual count depends on image size (recipes in fractions)
    positions_from_model: bool = False  # M-RoPE: the eager reference takes positions from the model
    fits: bool = True  # `fit` models its decoder (statistics from the model's own layers)
    fits_not_why: str = ""

    def claims(self, config: Any) -> bool:
        """True when this family knows models with this config."""
        raise NotImplementedError

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack: `.layers` (each with `.self_attn`, `.mlp`, norms), `.norm`, `.rotary_emb`.

        Default: `model.model.language_model` (transformers' multimodal layout), or refuse."""
        lm = getattr(getattr(model, "model", model), "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise TypeError(
                f"{type(model).__name__} does not look like a {self.name} model: expected "
                ".model.language_model.layers"
            )
        return lm

    def image_token_id(self, config: Any) -> int:
        """The token id that marks visual tokens in `input_ids`."""
        raise NotImplementedError

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        """Every token id whose rows hold visual features (images, and videos where a model has them)."""
        return (self.image_token_id(config),)

    def visual_tokens_per_image(self, config: Any) -> int:
        """Visual tokens of one image (for varying counts: the count a recipe's numbers refer to)."""
        raise NotImplementedError

    def image_tokens(self, config: Any, height: int, width: int) -> int:
        """Visual tokens an image of `height` x `width` pixels puts in the prompt."""
        return self.visual_tokens_per_image(config)

    def token_grids(self, config: Any, inputs: dict) -> list[TokenGrid] | None:
        """Where each image's views sit among the prompt's visual tokens, in prompt order (the picture
        of `fitprune-fx inspect --image`); `inputs`: the processor's outputs. None (default): the
        family does not map tokens back to image regions."""
        return None

    def residual_addends(self, text_model_kwargs: dict) -> Tensor | None:
        """Features the decoder adds to the residual stream after its first layers, from the kwargs
        of the text model's call: [b, S, L, C] (zero at rows they do not touch), or None (default)."""
        return None

    def install(self) -> None:
        """Patch what the family needs patched in transformers (class-wide, idempotent); called when
        a backend is created, before any graph is traced. Default: nothing."""

    def embed_prompt(
        self, model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None, **image_inputs
    ) -> Tensor:
        """Token embeddings with the image features merged in: [B, S, C] (the decoder's input)."""
        raise NotImplementedError
