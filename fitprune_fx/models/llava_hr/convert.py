"""Convert an official LLaVA-HR checkpoint (the LLaVA code base's layout) into a transformers folder.

The official folder holds a Llama config extended with `mm_*` fields and one state dict whose
names follow the official modules (`model.vision_tower.fast_vision_tower...`, `align_stages_latent`,
`model.mm_projector`). The ConvNeXt's widths and depths are read off the weights; the CLIP config
comes from the folder `mm_vision_tower` names (next to the checkpoint or absolute), from
`clip_config`, or is CLIP ViT-L/14-336 when the checkpoint names that model. The result loads with
`LlavaHrForConditionalGeneration.from_pretrained` (or the Auto classes once this package is imported).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, ConvNextConfig, LlamaConfig

from .configuration_llava_hr import LlavaHrConfig, default_clip_config

KNOWN_CLIPS = ("openai/clip-vit-large-patch14-336",)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the official image processor's normalisation
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
)  # fmt: skip

FAST = "model.vision_tower.fast_vision_tower.vision_tower.vision_model."
SLOW = "model.vision_tower.slow_vision_tower.vision_tower."
_SLOW = re.escape(SLOW)
_BLOCK = _SLOW + r"stages\.(\d+)\.blocks\.(\d+)\."  # official ConvNeXt block prefix
OURS_SLOW = "model.vision_tower.slow."
OURS_BLOCK = OURS_SLOW + r"encoder.stages.\1.layers.\2."
RENAMES = [  # (official pattern, ours); applied in order, first match wins
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None),  # recomputed by the model
    (_SLOW + r"head\.norm\.", OURS_SLOW + "layernorm."),  # never used; kept so no weight is missing
    (_SLOW + r"head\..*", None),  # the ConvNeXt's classifier head: never used
    (r"model\.embed_tokens\.", "model.language_model.embed_tokens."),
    (r"model\.layers\.", "model.language_model.layers."),
    (r"model\.norm\.", "model.language_model.norm."),
    (r"model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (re.escape(FAST), "model.vision_tower.fast."),
    (_SLOW + r"stem\.0\.", OURS_SLOW + "embeddings.patch_embeddings."),
    (_SLOW + r"stem\.1\.", OURS_SLOW + "embeddings.layernorm."),
    (_SLOW + r"stages\.(\d+)\.downsample\.", OURS_SLOW + r"encoder.stages.\1.downsampling_layer."),
    (_BLOCK + r"conv_dw\.", OURS_BLOCK + "dwconv."),
    (_BLOCK + r"norm\.", OURS_BLOCK + "layernorm."),
    (_BLOCK + r"mlp\.fc1\.", OURS_BLOCK + "pwconv1."),
    (_BLOCK + r"mlp\.fc2\.", OURS_BLOCK + "pwconv2."),
    (_BLOCK + r"(weight|gamma)$", OURS_BLOCK + "layer_scale_parameter"),  # layer scale
    (r"model\.vision_tower\.align_stages_latent\.", "model.vision_tower.stage_fusions."),
    (r"model\.vision_tower\.align_stages\.0\.", "model.vision_tower.final_fusion."),
    (r"lm_head\.", "lm_head."),
]


class ConversionError(ValueError):
    """The source folder is not an official LLaVA-HR checkpoint this converter understands."""


def load_official_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: safetensors or PyTorch .bin files, single or sharded."""
    files = sorted(src.glob("model*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{src}: no model*.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = (
            load_file(f)
            if f.suffix == ".safetensors"
            else torch.load(f, map_location="cpu", weights_only=True)
        )
        state.update(part)
    return state


def rename_official_key(key: str) -> str | None:
    """Our name for an official weight, None for weights the port does not keep; raises if unknown."""
    for pattern, replacement in RENAMES:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    raise ConversionError(f"unknown weight {key!r}: not part of the LLaVA-HR layout this converter knows")


def _clip_config(src: Path, official: dict, clip_config: Path | None) -> CLIPVisionConfig:
    name = official.get("mm_vision_tower", "")
    if clip_config is not None:
        path = Path(clip_config)
    elif (src / name).is_dir():
        path = src / name
    elif name and Path(name).is_dir():
        path = Path(name)
    elif name in KNOWN_CLIPS:
        return default_clip_config()
    else:
        raise ConversionError(
            f"the checkpoint's CLIP tower {name!r} is neither a folder here nor a known model "
            f"({', '.join(KNOWN_CLIPS)}): pass its config with --clip-config PATH"
        )
    path = path / "config.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    data = data.get("vision_config", data)  # a full CLIP config holds the vision part
    data.pop("model_type", None)
    return CLIPVisionConfig(**data)


def _convnext_config(state: dict[str, torch.Tensor], official: dict) -> ConvNextConfig:
    """Widths, depths and stem patch of the slow pathway, read off its weights."""
    dims, depths = [], []
    while f"{SLOW}stages.{len(dims)}.blocks.0.conv_dw.weight" in state:
        i = len(dims)
        dims.append(state[f"{SLOW}stages.{i}.blocks.0.conv_dw.weight"].shape[0])
        depths.append(
            len(
                {
                    k.split(".")[-3]
                    for k in state
                    if k.startswith(f"{SLOW}stages.{i}.blocks.") and k.endswith("conv_dw.weight")
                }
            )
        )
    if not dims:
        raise ConversionError(
            "no ConvNeXt weights (model.vision_tower.slow_vision_tower...): not a LLaVA-HR checkpoint"
        )
    has_scale = any(re.search(r"blocks\.\d+\.(weight|gamma)$", k) for k in state if k.startswith(SLOW))
    eps = (
        1e-5 if "xxlarge" in official.get("vision_tower_slow", "") else 1e-6
    )  # timm's ConvNeXt-XXL uses 1e-5
    return ConvNextConfig(
        hidden_sizes=dims,
        depths=depths,
        patch_size=state[f"{SLOW}stem.0.weight"].shape[-1],
        layer_norm_eps=eps,
        layer_scale_init_value=1e-6 if has_scale else 0.0,
    )


def llava_hr_config(
    src: Path, state: dict[str, torch.Tensor], clip_config: Path | None = None
) -> LlavaHrConfig:
    """Our config for an official checkpoint folder (its config.json and weights)."""
    official = json.loads((src / "config.json").read_text())
    if not official.get("is_multipath_encoder") or "mm_vision_tower" not in official:
        raise ConversionError(
            f"{src / 'config.json'} is not a LLaVA-HR config "
            "(needs is_multipath_encoder: true and mm_vision_tower)"
        )
    if official.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ConversionError(
            f"projector {official.get('mm_projector_type')!r}: only mlp2x_gelu is supported"
        )
    unsupported = {  # settings that change the prompt or the positions: the port would answer differently
        "rope_scaling": bool(official.get("rope_scaling")),
        "mm_use_im_start_end": bool(official.get("mm_use_im_start_end")),
        "image_aspect_ratio": official.get("image_aspect_ratio") not in (None, "pad", "square"),
    }
    found = [f"{k}={official[k]!r}" for k, bad in unsupported.items() if bad]
    if found:
        raise ConversionError(
            f"{', '.join(found)}: not supported by the port (RoPE scaling, image start/end tokens, "
            "aspect-ratio modes other than pad and square); convert a checkpoint without them"
        )
    text = LlamaConfig(**{k: official[k] for k in TEXT_FIELDS if k in official})
    vision = _clip_config(src, official, clip_config)
    patch = state[f"{FAST}embeddings.patch_embedding.weight"]
    if (patch.shape[0], patch.shape[-1]) != (vision.hidden_size, vision.patch_size):
        raise ConversionError(
            f"CLIP config says hidden {vision.hidden_size}, patch {vision.patch_size}; the weights have "
            f"{patch.shape[0]}, {patch.shape[-1]}: pass the right one with --clip-config"
        )
    return LlavaHrConfig(
        vision_config=vision,
        slow_vision_config=_convnext_config(state, official),
        text_config=text,
        image_token_id=text.vocab_size,  # past the vocabulary: the port never embeds it
        image_size=int(official.get("input_image_size") or 1024),
        stage_fusion=any(k.startswith("model.vision_tower.align_stages_latent.") for k in state),
        tie_word_embeddings=bool(official.get("tie_word_embeddings", False)),
    )


def convert_llava_hr(
    src: str | Path, dst: str | Path, clip_config: str | Path | None = None
) -> tuple[LlavaHrConfig, str]:
    """Write `dst`: config.json, model.safetensors, the image processor and, when `src` has a
    tokenizer, a `LlavaProcessor` with an `<image>` token. Returns the config and a line saying
    what was written for the text side."""
    from .modeling_llava_hr import LlavaHrForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (expected an official LLaVA-HR checkpoint folder)")
    state = load_official_state_dict(src)
    config = llava_hr_config(src, state, None if clip_config is None else Path(clip_config))
    converted = {}
    for key, tensor in state.items():
        new = rename_official_key(key)
        if new is not None:
            converted[new] = tensor.contiguous()
    with torch.device("meta"):
        expected = LlavaHrForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"weights do not match the LLaVA-HR layout: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
        )
    dst.mkdir(parents=True, exist_ok=True)
    images = official_image_processor(src, config.image_size)
    text_side = _write_processor(src, dst, config, images)
    config.architectures = ["LlavaHrForConditionalGeneration"]
    config.save_pretrained(dst)
    save_file(converted, dst / "model.safetensors", metadata={"format": "pt"})
    return config, text_side


def official_image_processor(src: Path, size: int):
    """The official preprocessing as transformers' LLaVA image processor: pad to a square with the
    mean colour (when the checkpoint's image_aspect_ratio is 'pad'), bicubic resize and centre crop
    to `size`, CLIP normalisation."""
    from transformers import LlavaImageProcessor

    pads = json.loads((src / "config.json").read_text()).get("image_aspect_ratio") == "pad"
    return LlavaImageProcessor(
        do_pad=pads,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # bicubic
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _write_processor(src: Path, dst: Path, config: LlavaHrConfig, images) -> str:
    """Save the image processor, and a LlavaProcessor when the checkpoint has a tokenizer; sets
    `config.image_token_id` to the tokenizer's `<image>` id (added when missing)."""
    from transformers import AutoTokenizer, LlavaProcessor

    images.save_pretrained(dst)
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return "no tokenizer in the checkpoint: wrote the image processor only"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (ImportError, OSError, ValueError) as e:  # a Llama sentencepiece tokenizer needs `sentencepiece`
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"tokenizer not converted ({first}); `pip install sentencepiece` and convert again"
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"  # batched generation continues a pruned cache: left padding only
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    grid = config.fast_grid()
    if config.image_size % grid:
        return f"no processor: {config.image_size} px is not a multiple of the grid side {grid}"
    LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.image_size // grid,  # the processor counts (size / patch)^2 tokens per image
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token="<image>",
    ).save_pretrained(dst)
    return f"processor: LlavaProcessor, <image> is token {config.image_token_id}, {grid * grid} per image"
