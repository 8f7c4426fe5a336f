"""Real processor classes on a tokenizer built in code: the inputs users get, without downloads.

`tiny_tokenizer` is a word-level `PreTrainedTokenizerFast` (ids 0 pad, 1 bos, 2 eos, then the
model's special tokens, then words); `onevision_processor` and `qwen_vl_processor` wrap it with the
model's own image processor in the real processor classes, so prompt expansion (how many image
tokens an image gets), `image_sizes`, `image_grid_thw` and `mm_token_type_ids` are transformers'.

Video processors need torchvision, which this project does not install; transformers then refuses
to build the processor at all (its argument check looks the missing video processor class up), so
the processors here are built with that check skipped and no video processor. Video inputs in the
tests are made by hand (`make_qwen_inputs(video=...)`, `onevision_video_inputs`).
"""

from __future__ import annotations

import contextlib
from unittest import mock

WORDS = [f"w{i}" for i in range(64)] + ["what", "is", "in", "the", "image", "?", "USER:", "ASSISTANT:"]


def tiny_tokenizer(specials: list[str]):
    """Word-level fast tokenizer: <pad> 0, <s> 1, </s> 2, then `specials` (from id 3), then `WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", *specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.padding_side = "left"
    return tokenizer


@contextlib.contextmanager
def _without_video_processor_check():
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a, **k: None):
        yield


def onevision_processor(model):
    """`LlavaOnevisionProcessor` for a tiny LLaVA-OneVision (`testbed.tiny_onevision`)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = model.config
    side = config.vision_config.image_size
    images = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
    )
    tokenizer = tiny_tokenizer(["<image>", "<video>"])
    with _without_video_processor_check():
        return LlavaOnevisionProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=(side // config.vision_config.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )


def qwen_vl_processor(model):
    """`Qwen2VLProcessor` / `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` for a tiny Qwen-VL (`tiny_qwen`);
    all three use Qwen2-VL's image processor, as transformers' own processors do."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    config = model.config
    vision = config.vision_config
    kind = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[config.model_type]
    unit = vision.patch_size * vision.spatial_merge_size
    images = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": unit * unit, "longest_edge": 16 * unit * unit},
    )
    tokenizer = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    with _without_video_processor_check():
        return getattr(transformers, f"{kind}Processor")(
            image_processor=images, tokenizer=tokenizer, video_processor=None
        )
