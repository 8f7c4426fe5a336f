"""Prompts made one by one as one left-padded batch: what a processor gives for a batch whose images
differ in size or number (any family of the test bed)."""

from __future__ import annotations

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def batch_prompts(prompts: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch of `prompts` (each a model's inputs for one example): the per-token tensors [1, L]
    left-padded to the longest (`pad_token_id` in `input_ids`, zeros elsewhere), the per-image
    tensors (pixels, grids, image sizes) concatenated in prompt order, a tile dim padded with zeros
    where images have different tile counts (LLaVA-NeXT's `pixel_values` [n, tiles, 3, h, w])."""
    length = max(p["input_ids"].shape[1] for p in prompts)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:  # [n, L] -> [n, length], `value` at the left
        return torch.cat([x.new_full((x.shape[0], length - x.shape[1]), value), x], dim=1)

    batch = {
        k: torch.cat([pad(p[k], pad_token_id if k == "input_ids" else 0) for p in prompts])
        for k in SEQUENCE_KEYS
        if k in prompts[0]
    }
    for k in dict.fromkeys(k for p in prompts for k in p):  # every key, in first-seen order
        if k in batch:
            continue
        parts = [p[k] for p in prompts if p.get(k) is not None]
        if parts and parts[0].dim() == 5:  # [n, tiles, 3, h, w]: pad tiles
            tiles = max(t.shape[1] for t in parts)
            parts = [
                torch.cat([t, t.new_zeros(t.shape[0], tiles - t.shape[1], *t.shape[2:])], 1) for t in parts
            ]
        batch[k] = torch.cat(parts)
    return batch
