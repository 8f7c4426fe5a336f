"""Tiny randomly initialised LLaVA models and prompts, for tests, examples and benchmarks.

No weights can be downloaded here, so everything that needs a LLaVA model without caring about
what it learned builds one of these. The text model can be Llama (LLaVA-1.5), Mistral or Qwen2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

IMAGE_TOKEN_ID = 3  # small ids are reserved: 0 pad, 1 bos, 2 eos, 3 image
PAD_TOKEN_ID = 0


def tiny_llava(
    text_model: str = "llama",
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """A LLaVA with a 2-layer CLIP tower and a small decoder; (image_size/patch_size)^2 visual tokens."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text_kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    if text_model in ("mistral", "qwen2"):
        text_kwargs["sliding_window"] = None
    text = TEXT_CONFIGS[text_model](**text_kwargs)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    # Random init gives near-uniform attention; a larger q/k scale makes scores distinct so that
    # kept-token sets are well defined (no near-ties) in tests.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.to(dtype).eval()


def num_image_tokens(model: LlavaForConditionalGeneration) -> int:
    """Visual tokens one image contributes to the prompt."""
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if model.config.vision_feature_select_strategy == "full" else n


@dataclass
class PromptSpec:
    """One prompt: text tokens before the image(s), between images and after the last image."""

    before: int
    after: int
    images: int = 1
    between: int = 2


def make_inputs(
    model: LlavaForConditionalGeneration,
    prompts: list[PromptSpec],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask` and `pixel_values` for a batch of prompts."""
    g = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(model)
    vocab = model.config.text_config.vocab_size
    rows = []
    for p in prompts:
        ids: list[int] = [1]
        ids += torch.randint(4, vocab, (p.before,), generator=g).tolist()
        for i in range(p.images):
            if i:
                ids += torch.randint(4, vocab, (p.between,), generator=g).tolist()
            ids += [IMAGE_TOKEN_ID] * n_img
        ids += torch.randint(4, vocab, (p.after,), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = torch.tensor(r)
        attention_mask[b, length - len(r) :] = 1
    vc = model.config.vision_config
    total_images = sum(p.images for p in prompts)
    pixel_values = torch.randn(
        (total_images, 3, vc.image_size, vc.image_size), generator=g
    ).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
