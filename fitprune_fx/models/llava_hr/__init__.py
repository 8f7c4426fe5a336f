"""LLaVA-HR (dual-pathway high-resolution LLaVA) ported to transformers' conventions.

Importing this package registers `LlavaHrConfig` and `LlavaHrForConditionalGeneration` with
transformers' Auto classes, so a folder written by `fitprune-fx convert-llava-hr` loads with
`AutoModelForImageTextToText.from_pretrained`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_llava_hr import LlavaHrConfig
from .modeling_llava_hr import LlavaHrForConditionalGeneration, LlavaHrModel, LlavaHrVisionTower


def _register() -> None:
    try:
        AutoConfig.register("llava_hr", LlavaHrConfig)
        AutoModel.register(LlavaHrConfig, LlavaHrModel)
        AutoModelForImageTextToText.register(LlavaHrConfig, LlavaHrForConditionalGeneration)
    except ValueError:  # registered already (a second import under another name)
        pass


_register()

__all__ = ["LlavaHrConfig", "LlavaHrForConditionalGeneration", "LlavaHrModel", "LlavaHrVisionTower"]
