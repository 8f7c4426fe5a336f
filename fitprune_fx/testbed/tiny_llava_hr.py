"""Tiny randomly initialised LLaVA-HR models (the port in `fitprune_fx.models.llava_hr`).

Both pathways are real but small: a 4-layer CLIP (patch 7) sees the 128-px image at 56 px, an
8x8 grid = 64 visual tokens, and a 4-stage ConvNeXt sees it at 128 px (a 4x4 map, upsampled into
the fast grid by the fusion modules). Prompts come from `fitprune_fx.testbed.tiny.make_inputs`.
"""

from __future__ import annotations

import torch

from fitprune_fx.models.llava_hr import LlavaHrConfig, LlavaHrForConditionalGeneration

from .tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, _sharpen_attention


def tiny_llava_hr(
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlavaHrForConditionalGeneration:
    """A LLaVA-HR with 64 visual tokens per 128x128 image and a small Llama decoder."""
    torch.manual_seed(seed)
    config = LlavaHrConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            image_size=28, patch_size=7, projection_dim=32,
        ),  # positions for a 4x4 grid: resampled to the 8x8 the 56-px image gives
        slow_vision_config=dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
        text_config=dict(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
            max_position_embeddings=1024, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        image_size=128,
        fast_image_size_min=56,
        pad_token_id=PAD_TOKEN_ID,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = LlavaHrForConditionalGeneration(config)
    with torch.no_grad():  # a zero gate bias lets (almost) no slow features through: open the gates
        for fusion in model.model.vision_tower.stage_fusions:
            fusion.gate[-1].bias.fill_(0.5)
    return _sharpen_attention(model).to(dtype).eval()
