"""Model families: everything the library knows about one kind of multimodal model, in one module.

A family states where the decoder's layers are (as a `DecoderLayout` the FX pass reads), how image
features enter the embeddings, which token id marks visual tokens, how many visual tokens an image
gives, and how to run the prompt embedding (for the eager reference). The backend, the pass, fit,
the reference and the CLI consult the family; none of them names a model.

Adding a family = one module here that subclasses `ModelFamily` and calls `register_family`, plus
its tests. A model no family claims compiles unchanged, with one warning.
"""

from __future__ import annotations

from fitprune_fx.passes.layout import DecoderLayout

from .base import ModelFamily, UnknownModel
from .gemma3 import Gemma3Family
from .llava import LlavaFamily
from .llava_hr import LlavaHrFamily
from .llava_next import LlavaNextFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_vl import QwenVLFamily
from .qwen3_vl import Qwen3VLFamily

FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; later registrations are asked first (a specialisation before its base)."""
    FAMILIES.insert(0, family)
    return family


register_family(LlavaFamily())
register_family(LlavaHrFamily())
register_family(LlavaNextFamily())
register_family(LlavaOnevisionFamily())
register_family(QwenVLFamily())
register_family(Qwen3VLFamily())
register_family(Gemma3Family())


def install_families() -> None:
    """Let every family patch what it needs (see `ModelFamily.install`)."""
    for family in FAMILIES:
        family.install()


def family_for(model_or_config) -> ModelFamily:
    """The family that claims a model (or its config); UnknownModel names the known ones otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES:
        if family.claims(config):
            return family
    raise UnknownModel(
        f"no model family claims {type(config).__name__}; supported: {', '.join(f.name for f in FAMILIES)}"
    )


def graph_layouts() -> list[DecoderLayout]:
    """The distinct decoder layouts of the registered families (the graph side of the seam)."""
    layouts: list[DecoderLayout] = []
    for family in FAMILIES:
        if family.layout not in layouts:
            layouts.append(family.layout)
    return layouts


__all__ = [
    "FAMILIES",
    "Gemma3Family",
    "LlavaFamily",
    "LlavaHrFamily",
    "LlavaNextFamily",
    "LlavaOnevisionFamily",
    "ModelFamily",
    "Qwen3VLFamily",
    "QwenVLFamily",
    "UnknownModel",
    "family_for",
    "graph_layouts",
    "install_families",
    "register_family",
]
