"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and left-padded prompts for them (built in code)."""

from __future__ import annotations

import torch
from torch import nn

from .tiny_processors import WORDS

IMAGE, VIDEO, VISION_START, VISION_END = 3, 4, 5, 6  # special token ids of the tiny models
PATCH, MERGE, TEMPORAL = 14, 2, 2


def tiny_qwen_vl(variant: str = "qwen2_vl", num_layers: int = 3, seed: int = 0) -> nn.Module:
    """A Qwen2-VL (`variant="qwen2_vl"`), Qwen2.5-VL (`"qwen2_5_vl"`, both with a 1-block vision tower)
    or Qwen3-VL (`"qwen3_vl"`: 3 vision blocks, DeepStack into decoder layers 0-2)."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        rope_parameters=rope,
    )
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)  # fmt: skip
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)  # fmt: skip
        config, cls = (
            Qwen2VLConfig(vision_config=vision, text_config=text, **ids),
            Qwen2VLForConditionalGeneration,
        )
    elif variant == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                      window_size=56, fullatt_block_indexes=[0])  # fmt: skip
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    elif variant == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        # 3 vision blocks, each feeding a DeepStack level (added after decoder layers 0, 1, 2)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])  # fmt: skip
        text.update(
            head_dim=16, rope_parameters={**rope, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        )
        config = Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"variant must be 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl', not {variant!r}")
    config._attn_implementation = "sdpa"
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    config.text_config.bos_token_id = config.text_config.eos_token_id = None
    return cls(config).eval()


def make_qwen_inputs(
    model: nn.Module,
    before: list[int],
    after: list[int],
    grid: tuple[int, int] = (8, 8),
    seed: int = 0,
    video: tuple[int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts, one image each (`grid` patches, (h/2)*(w/2) visual tokens), text around it;
    with `video=(t, h, w)` also a video after the image (t*(h/2)*(w/2) visual tokens; for Qwen3-VL
    each of the t frames after its own text, as its processor puts timestamps between frames).

    Returns input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids (and
    pixel_values_videos, video_grid_thw): the tensors Qwen2-VL's processor produces.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    tokens = (h // MERGE) * (w // MERGE)
    frames = 0 if video is None else video[0] * (video[1] // MERGE) * (video[2] // MERGE)
    rows = []
    for b, a in zip(before, after, strict=True):
        text = lambda n: torch.randint(8, 128, (n,), generator=g).tolist()  # noqa: E731
        row = text(b) + [VISION_START] + [IMAGE] * tokens + [VISION_END]
        if video is not None and model.config.model_type == "qwen3_vl":  # a timestamp before each frame
            for _ in range(video[0]):
                row += text(2) + [VISION_START] + [VIDEO] * (frames // video[0]) + [VISION_END]
        elif video is not None:
            row += text(2) + [VISION_START] + [VIDEO] * frames + [VISION_END]
        rows.append(row + text(a))
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    channels = 3 * TEMPORAL * PATCH * PATCH
    out = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.randn(len(rows) * h * w, channels, generator=g),
        image_grid_thw=torch.tensor([[1, h, w]] * len(rows)),
        mm_token_type_ids=(ids == IMAGE).long() + 2 * (ids == VIDEO).long(),  # text 0, image 1, video 2
    )
    if video is not None:
        t, vh, vw = video
        out["pixel_values_videos"] = torch.randn(len(rows) * t * vh * vw, channels, generator=g)
        out["video_grid_thw"] = torch.tensor([[t, vh, vw]] * len(rows))
    return out


# Image grids (patches, height x width) of 12 distinct visual counts: (h/2)*(w/2) tokens each.
IMAGE_GRIDS = [
    (4, 4),
    (4, 6),
    (6, 6),
    (4, 8),
    (6, 8),
    (8, 8),
    (8, 10),
    (6, 12),
    (10, 10),
    (8, 12),
    (10, 12),
    (12, 12),
]


def tiny_qwen_answering(variant: str = "qwen2_5_vl", num_layers: int = 4, seed: int = 1):
    """A tiny Qwen-VL and its real processor (`tiny_processors.qwen_vl_processor`) whose greedy answer is
    always a word of the tokenizer and depends on the image: what an evaluation over a task needs to
    tell runs apart, without training. The output rows of special and out-of-vocabulary ids are zero
    (their logit is 0, below the best word's) and q/k are scaled up, so attention is peaked and the
    visual tokens a run keeps decide the answer."""
    from .tiny_processors import qwen_vl_processor

    model = tiny_qwen_vl(variant, num_layers=num_layers, seed=seed)
    processor = qwen_vl_processor(model)
    first_word = len(processor.tokenizer) - len(WORDS)
    with torch.no_grad():
        model.lm_head.weight[:first_word] = 0
        model.lm_head.weight[len(processor.tokenizer) :] = 0
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model, processor
