"""A tiny random LLaVA-OneVision (SigLIP tower, Qwen2 decoder) and hand-made video inputs for it.

Images go through the real processor (`testbed.tiny_processors.onevision_processor`): any-resolution
tiling over `GRID_PINPOINTS` of 32-pixel tiles, 16 tokens per tile, newline tokens, `image_sizes`.
Videos: frames of one tile each, pooled 2x2 to 4 tokens, plus one newline token per video.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE, VIDEO = 3, 4  # the ids `tiny_processors.tiny_tokenizer(["<image>", "<video>"])` gives
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]


def tiny_llava_onevision(num_layers: int = 3, seed: int = 0) -> nn.Module:
    """A LlavaOnevisionForConditionalGeneration: 2-layer SigLIP on 32-px tiles (patch 8), Qwen2 decoder."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, sliding_window=None,
                max_position_embeddings=1024)  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )
    config._attn_implementation = "sdpa"
    config.pad_token_id = config.text_config.pad_token_id = 0
    return LlavaOnevisionForConditionalGeneration(config).eval()


def onevision_video_inputs(
    model: nn.Module, before: list[int], after: list[int], frames: int = 2, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded prompts with one video each (`frames` frames: frames * 4 + 1 visual tokens)."""
    g = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    per_frame = ((side // model.config.vision_config.patch_size + 1) // 2) ** 2  # pooled 2x2 (ceil)
    rows = []
    for b, a in zip(before, after, strict=True):
        text = lambda n: torch.randint(8, 128, (n,), generator=g).tolist()  # noqa: E731
        rows.append([1] + text(b) + [VIDEO] * (frames * per_frame + 1) + text(a))
    length = max(len(r) for r in rows)
    return dict(
        input_ids=torch.tensor([[0] * (length - len(r)) + r for r in rows]),
        attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
        pixel_values_videos=torch.randn(len(rows), frames, 3, side, side, generator=g),
    )
