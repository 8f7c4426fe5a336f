"""`shapes-llava`: a small LLaVA trained here on the synthetic shapes QA task (see `synthetic.py`).

The shipped folder `fitprune_fx/testbed/models/shapes-llava/` loads offline with
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`. This module
builds the tokenizer, processor and untrained model (for `benchmarks/train_shapes_llava.py`),
loads the shipped model and measures answer accuracy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import synthetic

MODEL_DIR = Path(__file__).parent / "models" / "shapes-llava"
CLUTTER_DIR = Path(__file__).parent / "models" / "clutter-llava"  # synthetic.CLUTTER, 576 tokens
MODEL_DIRS = {"shapes": MODEL_DIR, "clutter": CLUTTER_DIR}
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]  # ids 0..4
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 3
PATCH = 4  # 48x48 image / 4x4 patches -> 12x12 = 144 visual tokens (96x96: 24x24 = 576)


def build_tokenizer(task: synthetic.Task = synthetic.SHAPES) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's vocabulary; prepends <s>, pads on the left."""
    words = SPECIALS + task.vocab
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512 if task.image_size <= 48 else 1024,
    )
    # "<image>" must be one token even inside "USER: <image>\n...".
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _image_processor(size: int):
    """CLIP preprocessing (resize/crop to the task's size, CLIP mean/std) that needs no torchvision."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # transformers >= 5.2x names the PIL/numpy backend explicitly
            from transformers import CLIPImageProcessorPil as cls
        except ImportError:
            from transformers import CLIPImageProcessor as cls
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# A user turn with the question before the image (synthetic.QUESTION_FIRST_PROMPT), whatever the
# order of the content items: saved with question-first models, so that every prompt built through
# the chat template (lmms-eval, `fitprune-fx fit --questions`) matches the training prompt.
QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }} {% endfor %}"
    "{% for c in message['content'] if c['type'] == 'image' %}<image> {% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_processor(task: synthetic.Task = synthetic.SHAPES) -> LlavaProcessor:
    """LlavaProcessor that expands one <image> into (image_size / 4)^2 image tokens (144, 576).
    Question-first tasks (clutter) carry `QUESTION_FIRST_TEMPLATE` as chat template; the others
    none, so callers fall back to LLaVA-1.5's image-first prompt, which is theirs."""
    return LlavaProcessor(
        image_processor=_image_processor(task.image_size),
        tokenizer=build_tokenizer(task),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
        chat_template=QUESTION_FIRST_TEMPLATE if task.question_first else None,
    )


def build_model(
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    intermediate_size: int = 512,
    vision_layers: int = 2,
    vision_hidden: int = 64,
    seed: int = 0,
    rope_theta: float = 1e6,
    task: synthetic.Task = synthetic.SHAPES,
    vision_feature_layer: int = -1,
) -> LlavaForConditionalGeneration:
    """Untrained shapes-llava (or clutter-llava): tiny CLIP tower + 2-layer projector + Llama decoder.

    A large `rope_theta` keeps most rotary frequencies slow over the ~160 (~600) token prompt, so
    a question word can match visual tokens by content whatever their distance. With
    `vision_feature_layer` -2 and one vision layer (clutter-llava) the features are the tower's
    patch embeddings (+ positions): each visual token sees only its own 4x4 pixels.
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=task.image_size,
        patch_size=PATCH,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        vocab_size=len(SPECIALS) + len(task.vocab),
        max_position_embeddings=256 if task.image_size <= 48 else 1024,
        rope_theta=rope_theta,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=PAD_ID,
    )
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def load_shapes_llava(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The shipped trained model (eval mode, sdpa attention) and its processor."""
    folder = str(path or MODEL_DIR)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CLIPImageProcessor requires torchvision" fallback
        processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor


def encode(processor: LlavaProcessor, examples: list) -> dict[str, torch.Tensor]:
    """Left-padded batch: input_ids/attention_mask [B, S], pixel_values [B, 3, side, side]."""
    texts = [ex.text for ex in examples]
    images = [ex.image for ex in examples]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def answer_ids(processor: LlavaProcessor, examples: list) -> torch.Tensor:
    """[B] token id of each single-word answer."""
    return torch.tensor(processor.tokenizer.convert_tokens_to_ids([ex.answer for ex in examples]))


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list,
    batch_size: int = 32,
) -> list[str]:
    """Greedy next word after each prompt."""
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        batch = encode(processor, examples[i : i + batch_size])
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        logits = model(**batch, logits_to_keep=1).logits  # [B, 1, V]
        out += processor.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
    return out


def answer_accuracy(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    examples: list,
    batch_size: int = 32,
) -> float:
    """Fraction of examples whose greedy next token equals the answer token."""
    preds = predict(model, processor, examples, batch_size)
    return sum(p == ex.answer for p, ex in zip(preds, examples, strict=True)) / max(len(examples), 1)
