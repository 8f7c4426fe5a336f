"""`LlavaHrConfig`: LLaVA-HR's configuration in transformers' conventions.

LLaVA-HR sees an image through two pathways. The slow one is a ConvNeXt run on the whole image
(`image_size` pixels, 1024 in the released checkpoints); the fast one is a CLIP ViT run on the
image resized to `fast_image_size()` pixels, `max(int(image_size / 32 * 14), 336)`, so that its
patch grid matches the ConvNeXt's stride-32 grid. Only the fast pathway's tokens reach the language
model: (fast_image_size / clip_patch)^2 per image, 1024 at 1024 px, 2304 at 1536 px.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, CLIPVisionConfig, ConvNextConfig, PretrainedConfig


def _sub_config(value: Any, default_type: str, **defaults: Any) -> PretrainedConfig:
    """A sub-config from None, a dict (as read from config.json) or a config object."""
    if isinstance(value, PretrainedConfig):
        return value
    kwargs = dict(defaults)
    kwargs.update(value or {})
    model_type = kwargs.pop("model_type", default_type)
    return AutoConfig.for_model(model_type, **kwargs)


# `openai/clip-vit-large-patch14-336`: LLaVA-HR's fast pathway
CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)


class LlavaHrConfig(PretrainedConfig):
    """Text model (Llama), fast pathway (CLIP ViT), slow pathway (ConvNeXt), fusion and projector.

    Defaults are LLaVA-HR-7B at 1024 px: CLIP ViT-L/14-336, ConvNeXt-L, Vicuna-7B.
    """

    model_type = "llava_hr"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "slow_vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: Any = None,
        slow_vision_config: Any = None,
        text_config: Any = None,
        image_token_id: int = 32000,
        image_size: int = 1024,
        fast_image_size_min: int = 336,
        stage_fusion: bool = True,
        projector_hidden_act: str = "gelu",
        multimodal_projector_bias: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _sub_config(vision_config, "clip_vision_model", **CLIP_L14_336)
        self.slow_vision_config = _sub_config(
            slow_vision_config, "convnext", hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3]
        )
        self.text_config = _sub_config(text_config, "llama")
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.fast_image_size_min = fast_image_size_min
        self.stage_fusion = stage_fusion
        self.projector_hidden_act = projector_hidden_act
        self.multimodal_projector_bias = multimodal_projector_bias
        # what transformers' LLaVA projector reads: one CLIP layer's features
        self.vision_feature_layer = -1
        self.vision_feature_select_strategy = "full"
        kwargs.pop("vision_feature_layer", None)
        kwargs.pop("vision_feature_select_strategy", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def fast_image_size(self) -> int:
        """Side of the image the CLIP pathway sees: the slow side scaled by 14/32, at least the minimum."""
        return max(int(self.image_size / 32 * 14), self.fast_image_size_min)

    def fast_grid(self) -> int:
        """Side of the fast pathway's patch grid (visual tokens per image = fast_grid()^2)."""
        return self.fast_image_size() // self.vision_config.patch_size

    def slow_grid(self) -> int:
        """Side of the ConvNeXt's final feature map: the stem's patch, then 2x per later stage."""
        slow: ConvNextConfig = self.slow_vision_config
        return self.image_size // (slow.patch_size * 2 ** (len(slow.hidden_sizes) - 1))


def default_clip_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14 at 336 px (`openai/clip-vit-large-patch14-336`), LLaVA-HR's fast pathway."""
    return CLIPVisionConfig(**CLIP_L14_336)
