"""A tiny random Gemma 3 (`Gemma3ForConditionalGeneration`: SigLIP tower, 4x4 average-pooled to
`mm_tokens_per_image` tokens (16 here), Gemma 3 decoder) and left-padded prompts for it.

`layer_types=None` gives Gemma 3's own pattern (five sliding-window layers, then one full layer);
`full_attention_only=True` makes every layer full attention. Image tokens attend to each other
bidirectionally inside an image (the mask comes from `token_type_ids`).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE, BOI, EOI = 3, 4, 5  # image placeholder, begin/end of image
TOKENS_PER_IMAGE = 16  # 32-px image, patch 8: 4x4 patches (the pooling keeps them all)


def tiny_gemma3(
    num_layers: int = 3, full_attention_only: bool = True, window: int = 16, seed: int = 0
) -> nn.Module:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128, query_pre_attn_scalar=16,
                sliding_window=window, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)  # fmt: skip
    if full_attention_only:
        text["layer_types"] = ["full_attention"] * num_layers
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return Gemma3ForConditionalGeneration(config).eval()


def make_gemma3_inputs(
    model: nn.Module, before: list[int], after: list[int], images: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded prompts: text, then `images` images (<boi> 4 image tokens <eoi> each), then text;
    input_ids, attention_mask, token_type_ids (1 at image tokens) and pixel_values, as the processor."""
    g = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.image_size
    rows = []
    for b, a in zip(before, after, strict=True):
        text = lambda n: torch.randint(8, 128, (n,), generator=g).tolist()  # noqa: E731
        row = [1] + text(b)
        for _ in range(images):
            row += [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]
        rows.append(row + text(a))
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    return dict(
        input_ids=ids,
        attention_mask=torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows]),
        token_type_ids=(ids == IMAGE).long(),
        pixel_values=torch.randn(len(rows) * images, 3, side, side, generator=g),
    )
