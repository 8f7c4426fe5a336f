"""Pruned generation: the one-liner that prunes on `generate`, and decoding against shorter caches.

Which forms prune for `generate`:

- `fitprune_fx.compile(model, recipe)` (recommended): compiles the model in place with the
  FitPrune backend, switches its text attention to a mask-slicing wrapper so that left-padded
  batches decode, rejects caches that cannot hold pruned layers, and keeps the backend at
  `model.fitprune_backend`. Returns the same model object.
- `model.compile(backend=fitprune_backend(recipe))` (in place): prunes for `generate` and for
  direct calls, but a left-padded batch fails at its first decode step (see below); call
  `enable_pruned_decode(model)` first, which is what `fitprune_fx.compile` does.
- `torch.compile(model, backend=...)` returns an `OptimizedModule` whose *direct calls* prune,
  but whose `.generate` runs the original, uncompiled module: the backend is never called.
  `check_generate_path` warns about that case.

Why a wrapper around the attention function: after a pruned prefill, layers past a pruning
layer hold shorter caches, but transformers builds one decode mask per step, sized from layer 0's
cache, and its SDPA attention does not cut the mask to the key length. Dynamo's fake-tensor
trace of the decode step fails on that broadcast before any backend sees a graph, so a graph
pass cannot fix it; the mask must be cut in Python, per layer, where the key length is known.
The attention function is the narrowest such place. Cutting is exact for left padding: the
columns a pruned layer lacks are pruned prompt tokens, all of which allow attention, and all
padding columns (which forbid it) come first, so dropping the pruned columns from a decode-mask
row gives the same row as keeping its first `kv_len` entries. With right padding it would not,
so pruned `generate` refuses right-padded batches.

Caches: only `DynamicCache` (the default) can hold a different length per layer. The generate
wrapper refuses `cache_implementation="static"` and any other cache with `UnsupportedCacheError`;
a direct forward call with a StaticCache is compiled unpruned by the backend, with a warning.
Decode positions come from layer 0's cache, which always holds the whole prompt, so they
continue from the original prompt length.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from fitprune_fx.passes.locate import layer_index

from .recipe import Recipe

if TYPE_CHECKING:  # backend.py may import this module; import it lazily here
    from .backend import FitpruneBackend

ATTENTION_NAME = "fitprune_sdpa"
"""Name under which the mask-slicing SDPA wrapper is registered in transformers' interfaces."""

SUPPORTED_CACHE = "DynamicCache"


class UnsupportedCacheError(ValueError):
    """A cache that cannot hold per-layer lengths (StaticCache, ...) was asked for."""


def kv_sliced_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with the mask cut to this layer's key length.

    The cut happens only when the lengths differ (a decode step of a layer after a pruning
    layer), so a prefill graph is unchanged: the attention is still one
    `scaled_dot_product_attention` call in the layer's scope, which the FX pass locates.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Register the wrapper (and SDPA's mask builder) under ATTENTION_NAME; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kv_sliced_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_pruned_decode(model: nn.Module) -> None:
    """Switch the text model's attention to the mask-slicing SDPA wrapper (the vision tower keeps its own).

    Needed for left-padded batches after a pruned prefill; harmless otherwise (same kernel, the
    mask is cut only when it is longer than the keys). The text model must use "sdpa".
    """
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    if text_config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"expected a transformers LLaVA model (config.text_config), got {type(model).__name__}"
        )
    current = text_config._attn_implementation
    if current == ATTENTION_NAME:
        return
    if current != "sdpa":
        raise ValueError(
            f"FitPrune needs the text model's attention to be 'sdpa', but it is {current!r}; load the "
            "model with attn_implementation='sdpa' or call model.set_attn_implementation('sdpa')"
        )
    register_attention()
    model.set_attn_implementation({"text_config": ATTENTION_NAME})


def generate_is_compiled(model: nn.Module) -> bool:
    """True when `model.generate` runs compiled forward calls (the module is compiled in place)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return getattr(model, "_compiled_call_impl", None) is not None


def check_generate_path(model: nn.Module) -> bool:
    """Warn, and return False, when `model.generate` would never reach a compile backend.

    That is the case for `torch.compile(model, ...)`'s result (an OptimizedModule forwards
    `.generate` to the uncompiled original) and for a module that was not compiled at all.
    """
    if generate_is_compiled(model):
        return True
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        hint = (
            "torch.compile(model, backend=...) compiles direct calls only; its .generate runs the "
            "original module uncompiled, so the backend is never called and nothing is pruned"
        )
    else:
        hint = "the model is not compiled, so nothing is pruned"
    warnings.warn(
        f"fitprune: {hint}. Use fitprune_fx.compile(model, recipe) or "
        "model.compile(backend=fitprune_backend(recipe)) (in place) for generate.",
        stacklevel=2,
    )
    return False


_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)


def padded_decode_hint(gm: fx.GraphModule) -> str | None:
    """A warning for a decoder graph whose decode steps will fail after pruning, else None.

    That is a graph with a padding mask (a left-padded batch) whose attention is not the
    mask-slicing wrapper: Dynamo's trace of the next decode step will fail on the mask. Found
    from the stack traces Dynamo records on the attention nodes.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA or layer_index(node) is None:
            continue
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        trace = node.meta.get("stack_trace")
        if mask is not None and trace and kv_sliced_sdpa_attention.__name__ not in trace:
            return (
                "fitprune: pruned a graph with an attention mask (a padded batch), but the model's "
                "attention does not cut decode masks to each layer's (shorter) cache, so a decode step "
                "(generate) will fail in Dynamo's trace; use "
                "fitprune_fx.compile(model, recipe), or call "
                "fitprune_fx.generation.enable_pruned_decode(model) before model.compile"
            )
    return None


def compile(  # shadows the builtin on purpose: exported as fitprune_fx.compile
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    **backend_options: Any,
) -> nn.Module:
    """Compile `model` in place so that `generate` and direct calls prune per `recipe`; return it.

    `backend_options` go to `fitprune_backend` (e.g. `compiler="eager"`, `scorer=...`). The
    backend is kept at `model.fitprune_backend` (read `.summary()` / `.reports` after a call).
    Besides `model.compile(backend=...)`, this switches the text attention to the mask-slicing
    wrapper (left-padded batches decode) and wraps `model.generate` to reject a StaticCache or a
    right-padded batch with a clear error, and to warn if a generate call never reached the backend.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "fitprune_fx.compile needs the model itself, not torch.compile's wrapper (whose .generate "
            "is never compiled): pass wrapper._orig_mod, or the model before torch.compile"
        )
    from .backend import fitprune_backend

    backend = fitprune_backend(recipe, **backend_options)
    enable_pruned_decode(model)
    model.compile(backend=backend)
    model.fitprune_backend = backend
    model.__dict__.pop("generate", None)  # compiled again: drop our previous wrapper
    model.generate = _checked_generate(model, model.generate, backend)
    return model


def _checked_generate(model: nn.Module, generate: Callable, backend: FitpruneBackend) -> Callable:
    """`generate` with the checks a pruned prefill needs before, and the backend check after."""
    fractions = getattr(backend.recipe, "prune_fraction", None) or {}
    deletes = any(d > 0 for d in backend.recipe.prune.values()) or any(f > 0 for f in fractions.values())

    @functools.wraps(generate)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_cache(model, kwargs)
        mask = kwargs.get("attention_mask")
        if deletes and mask is not None:
            _check_left_padded(mask)
        out = generate(*args, **kwargs)
        if not backend.reports:
            warnings.warn(
                "fitprune: generate ran but no graph reached the backend (is torch._dynamo disabled?); "
                "nothing was pruned",
                stacklevel=2,
            )
        return out

    return checked


def _check_cache(model: nn.Module, kwargs: dict) -> None:
    """Refuse caches with a fixed length per layer: pruned layers need shorter caches."""
    from transformers import DynamicCache

    past = kwargs.get("past_key_values")
    if past is not None and not isinstance(past, DynamicCache):
        raise UnsupportedCacheError(
            f"fitprune: past_key_values of type {type(past).__name__} is not supported; a pruned prefill "
            f"leaves later layers with fewer cached tokens, which only {SUPPORTED_CACHE} can hold. "
            f"Pass past_key_values={SUPPORTED_CACHE}() or none"
        )
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in (None, "dynamic"):
        raise UnsupportedCacheError(
            f"fitprune: cache_implementation={implementation!r} is not supported; a pruned prefill "
            f"leaves later layers with fewer cached tokens, which only {SUPPORTED_CACHE} "
            "(cache_implementation='dynamic', the default) can hold"
        )


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """Refuse padding anywhere but on the left: the decode-mask cut is exact only for left padding."""
    mask = attention_mask.bool()
    if mask.dim() == 2 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "fitprune: pruned generate needs left padding (a padding column after a prompt token was "
            "found); set tokenizer.padding_side = 'left'"
        )
