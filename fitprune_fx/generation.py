"""Pruned generation: the one-liner that prunes on `generate`, and the checks around it.

Which forms prune for `generate`:

- `fitprune_fx.compile(model, recipe)` (recommended): compiles the model in place with the
  FitPrune backend, keeps the backend at `model.fitprune_backend`, and wraps `generate` to refuse,
  with an error that names them, the caches and generation modes a pruned cache cannot serve
  exactly, and to warn when a call with an image ran no pruned graph; it also gives a static
  cache's buffers fixed addresses before the compiled prefill (CUDA-graph decode steps). Returns
  the same model.
- `model.compile(backend=fitprune_backend(recipe))` (in place): prunes for `generate` and for
  direct calls, decodes exactly (padded batches included), but has none of the checks above.
- `torch.compile(model, backend=...)` returns an `OptimizedModule` whose *direct calls* prune,
  but whose `.generate` runs the original, uncompiled module: the backend is never called.
  `check_generate_path` warns about that case.

Decoding against a pruned cache needs no switch: creating a backend installs the attention
function that reads pruned caches exactly (`fitprune_fx.pruned_cache`, which explains why a plain
`DynamicCache` stays exact under every cache operation of transformers' generation).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import static_cache
from .recipe import Recipe

if TYPE_CHECKING:  # backend.py may import this module; import it lazily here
    from .backend import FitpruneBackend


class UnsupportedCacheError(ValueError):
    """A cache a pruned prefill cannot write exactly (offloaded, quantized, ...; a StaticCache on a
    transformers release without the keyword channel) was asked for."""


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


def compile(  # shadows the builtin on purpose: exported as fitprune_fx.compile
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    **backend_options: Any,
) -> nn.Module:
    """Compile `model` in place so that `generate` and direct calls prune per `recipe`; return it.

    `backend_options` go to `fitprune_backend` (`compiler="eager"`, `scorer=...`, `mode=...`). The
    backend is kept at `model.fitprune_backend` (read `.summary()` / `.reports` after a call).
    Models spread over devices by accelerate's `device_map` are refused (`check_device_map`).
    Besides `model.compile(backend=...)`, this wraps `model.generate` to refuse what a pruned cache
    cannot serve exactly (caches other than dynamic and static ones, the generation modes of
    `REFUSED_MODES`) with an error that names it, and warns when a call with an image ran no
    pruned graph (Dynamo fell back to eager, or the graph was not understood).
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "fitprune_fx.compile needs the model itself, not torch.compile's wrapper (whose .generate "
            "is never compiled): pass wrapper._orig_mod, or the model before torch.compile"
        )
    from .backend import fitprune_backend

    check_attention_implementation(model)
    check_quantizer(model)
    check_device_map(model)
    backend = fitprune_backend(recipe, **backend_options)
    model.compile(backend=backend)
    model._compiled_call_impl = _watch_pruned_calls(model, model._compiled_call_impl, backend)
    model.fitprune_backend = backend
    model.__dict__.pop("generate", None)  # compiled again: drop our previous wrapper
    model.generate = _checked_generate(model, model.generate, backend)
    return model


class UnsupportedAttention(ValueError):
    """The decoder runs an attention implementation the pass cannot prune (it reads SDPA calls)."""


def check_attention_implementation(model: nn.Module) -> None:
    """Refuse, before anything is compiled, a decoder whose attention is not transformers' "sdpa".

    The pass finds each layer's attention as a `scaled_dot_product_attention` call: "eager" spells
    the softmax out, "flash_attention_2" and hub attention kernels ("kernels-community/flash-attn")
    call opaque kernels, so none of them can be scored or cut. Models no family claims pass (the
    backend compiles them unchanged, with its warning)."""
    from .families import UnknownModel, family_for

    try:
        text_model = family_for(model).text_model(model)
    except (UnknownModel, TypeError):
        return
    implementation = getattr(text_model.config, "_attn_implementation", None)
    if implementation not in (None, "sdpa"):
        raise UnsupportedAttention(
            f'fitprune: the decoder runs attn_implementation="{implementation}"; the pass prunes '
            'transformers\' "sdpa" attention only. Load the model with attn_implementation="sdpa" (or '
            'call model.set_attn_implementation("sdpa")) before fitprune_fx.compile'
        )


class UnsupportedQuantizer(ValueError):
    """The model is quantized by a method the pass was not checked on."""


TESTED_QUANTIZERS = ("torchao",)
"""transformers quantization methods whose models the pass was checked on (`tests/test_quantized.py`)."""


def check_quantizer(model: nn.Module) -> None:
    """Refuse, before compiling, a model quantized through transformers by a method the pass was not
    checked on (bitsandbytes, GPTQ, AWQ, fp8, ...): their linears run kernels of their own, which
    may bake a row count (refused in the graph, then unpruned) or be fine; unverified either way.
    torchao (`TorchAoConfig`, or `quantize_` on the model) is checked against pruning as masking."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if method is not None and str(method) not in TESTED_QUANTIZERS:
        raise UnsupportedQuantizer(
            f"fitprune: the model is quantized with {method}, which fitprune-fx has not been checked "
            f"with (checked: {', '.join(TESTED_QUANTIZERS)}). Quantize with torchao instead "
            "(quantization_config=TorchAoConfig(...)), or, to try it yourself, compile with "
            "model.compile(backend=fitprune_backend(recipe)) and compare against "
            "fitprune_fx.masking_reference.MaskingReference"
        )


class UnsupportedPlacement(ValueError):
    """The model is spread over devices by accelerate's `device_map` (hooks between modules)."""


def check_device_map(model: nn.Module) -> None:
    """Refuse, before compiling, a model that accelerate placed on several devices or offloads
    (`device_map="auto"` across GPUs, CPU or disk). Its hooks move tensors between modules, and
    Dynamo breaks the graph at each of them, so no graph holds the decoder and nothing could be
    pruned. Tensor parallelism keeps the decoder one graph per rank, and the pass prunes it."""
    placement = getattr(model, "hf_device_map", None) or {}
    devices = {str(d) for d in placement.values()}
    if len(devices) > 1 or devices & {"cpu", "disk", "meta"} and len(placement) > 1:
        raise UnsupportedPlacement(
            f"fitprune: the model is placed by accelerate's device_map on {sorted(devices)}; its hooks "
            "break the graph at every placed module, so the decoder is never one graph and cannot be "
            "pruned. Run a model that needs several GPUs with tensor parallelism instead: "
            'from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto")) under `torchrun '
            "--nproc_per_node N` (each rank prunes its shard; docs/multi-gpu.md), or load it on "
            "one device"
        )


REFUSED_MODES = {
    "contrastive_search": "contrastive search",
    "dola_generation": "DoLa decoding",
    "group_beam_search": "group (diverse) beam search",
    "constrained_beam_search": "constrained beam search",
}
"""Generation modes refused on a pruned model: transformers 5.x runs them from Hub code
(`custom_generate`) that reads hidden states or layer outputs at every prompt position, which a
pruned prefill does not return; nothing here checks them, so they are refused rather than guessed."""


def _checked_generate(model: nn.Module, generate: Callable, backend: FitpruneBackend) -> Callable:
    """`generate` with the checks a pruned prefill needs before, and the backend check after."""
    fractions = getattr(backend.recipe, "prune_fraction", None) or {}
    deletes = any(d > 0 for d in backend.recipe.prune.values()) or any(f > 0 for f in fractions.values())

    @functools.wraps(generate)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_cache(model, kwargs)
        if deletes:
            _check_generation_mode(model, kwargs)
        out = generate(*args, **kwargs)
        if not backend.reports:
            warnings.warn(
                "fitprune: generate ran but no graph reached the backend (is torch._dynamo disabled?); "
                "nothing was pruned",
                stacklevel=2,
            )
        return out

    return checked


def _check_generation_mode(model: nn.Module, kwargs: dict) -> None:
    """Refuse generation modes that are not exact on a pruned model, naming the mode."""
    import copy

    if kwargs.get("custom_generate") is not None:
        raise ValueError(
            "fitprune: custom_generate is not supported on a pruned model: its code may read hidden "
            "states of pruned prompt positions. Use greedy, sampling, beam search or assisted decoding"
        )
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    if getattr(config, "assistant_early_exit", None) is not None or getattr(config, "use_mtp", False):
        raise ValueError(
            "fitprune: self-speculative decoding (assistant_early_exit / use_mtp) is not supported on a "
            "pruned model: the draft shares the pruned model's layers and cache. Use a separate "
            "assistant_model or prompt_lookup_num_tokens"
        )
    mode = str(getattr(config.get_generation_mode(kwargs.get("assistant_model")), "value", ""))
    if mode in REFUSED_MODES:
        raise ValueError(
            f"fitprune: {REFUSED_MODES[mode]} is not supported on a pruned model (it runs Hub code that "
            "reads every prompt position's hidden states, which a pruned prefill does not keep). "
            "Supported and exact: greedy, sampling, beam search, beam sampling, num_return_sequences, "
            "assisted decoding (assistant_model, prompt_lookup_num_tokens)"
        )


def _watch_pruned_calls(model: nn.Module, compiled_call: Callable, backend: FitpruneBackend) -> Callable:
    """Wrap the module's compiled call: warn once when a first chunk with an image ran unpruned,
    and allocate a static cache's buffers before the compiled prefill (`static_cache.initialize_early`).

    That happens when Dynamo gives up on the frame (recompile limit) and runs it eagerly, which
    it does silently; the backend never sees such a call, so only the caller can notice.
    """

    @functools.wraps(compiled_call)
    def call(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if cache is not None and ids is not None:
            static_cache.initialize_early(model, cache, ids.shape[0])  # (static caches: fixed addresses)
        before = backend.pruned_runs, len(backend.reports)
        out = compiled_call(*args, **kwargs)
        if backend.pruned_runs == before[0] and _first_chunk_with_image(kwargs) and not backend.warned:
            new = backend.reports[before[1] :]
            reasons = "; ".join(f"graph {r.index}: {r.reason}" for r in new if r.reason)
            limit = torch._dynamo.config.recompile_limit
            fallback = (
                f"Dynamo ran it eagerly (torch._dynamo.config.recompile_limit = {limit} reached?); "
                "raise the limit or call torch._dynamo.reset()"
            )
            why = reasons or fallback
            backend.warn_once("unpruned call", f"fitprune: a call with an image ran no pruned graph: {why}")
        return out

    return call


def _first_chunk_with_image(kwargs: dict) -> bool:
    """A forward call that brings pixels and starts a sequence (no cache, or an empty one)."""
    if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
        return False
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return cache is None or cache.get_seq_length() == 0


def _check_cache(model: nn.Module, kwargs: dict) -> None:
    """Refuse caches a pruned prefill cannot write exactly: any but dynamic and static ones, and
    static ones where transformers does not hand the attention's keywords to the cache update (the
    channel a static layer's holes are forbidden by, `fitprune_fx.static_cache`)."""
    from transformers import DynamicCache, StaticCache

    from .positioned_cache import cache_update_gets_attention_keywords

    supported = (DynamicCache, StaticCache) if cache_update_gets_attention_keywords() else (DynamicCache,)
    names = " or ".join(f"{c.__name__}()" for c in supported)
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is not None and not isinstance(past, supported):
        raise UnsupportedCacheError(
            f"fitprune: a cache of type {type(past).__name__} is not supported; a pruned prefill "
            f"leaves later layers with fewer tokens, which only {names} can hold (StaticCache needs "
            f"transformers 5.25 or later). Pass {names} or none"
        )
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    allowed = (None, "dynamic", "static")[: 3 if len(supported) > 1 else 2]
    if implementation not in allowed:
        raise UnsupportedCacheError(
            f"fitprune: cache_implementation={implementation!r} is not supported; a pruned prefill "
            f"leaves later layers with fewer tokens, which only {' and '.join(map(repr, allowed[1:]))} "
            "caches can hold ('static' needs transformers 5.25 or later)"
        )
