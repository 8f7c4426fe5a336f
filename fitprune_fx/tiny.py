"""Tiny random models and prompts for trying fitprune-fx without downloads (re-exported from the
test bed, `fitprune_fx.testbed`): `tiny_llava`, `tiny_llava_hr`, `make_inputs`, `PromptSpec`."""

from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, num_image_tokens, tiny_llava
from fitprune_fx.testbed.tiny_llava_hr import tiny_llava_hr

__all__ = ["PromptSpec", "make_inputs", "num_image_tokens", "tiny_llava", "tiny_llava_hr"]
