"""LLaVA-HR (`LlavaHrForConditionalGeneration`, ported in `fitprune_fx.models.llava_hr`).

After its dual-pathway vision tower the model is transformers' LLaVA: the same decoder layout and
image merge, so the LLaVA family's layout and prompt embedding apply unchanged. What differs is the
visual count: the fast pathway's grid, (max(int(S / 32 * 14), 336) / patch)^2 for S-pixel images
(1024 tokens at 1024 px).
"""

from __future__ import annotations

from typing import Any

from .llava import LlavaFamily


class LlavaHrFamily(LlavaFamily):
    name = "llava_hr"

    def claims(self, config: Any) -> bool:
        return getattr(config, "model_type", None) == "llava_hr"

    def visual_tokens_per_image(self, config: Any) -> int:
        return config.fast_grid() ** 2  # LlavaHrConfig: the fast pathway's patch grid
