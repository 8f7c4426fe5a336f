"""transformers' static caches (`StaticCache`, `cache_implementation="static"`) behind a pruned prefill.

A static layer preallocates [B, Hkv, L, D] keys and values and writes each call's keys at the slots
that follow the ones it holds: slot = original position (L = max_cache_len), or, in a sliding-window
layer (L = min(window, max_cache_len)), the last L positions, rolled left as decoding goes on. The
masks transformers builds for it have one column per slot. A pruned layer keeps exactly that
layout, with holes: each kept key sits at its original position's slot and the slots of deleted
(or void) tokens are marked invalid in `fitprune_valid` ([B, L] bool, next to the keys). Every
later call then runs transformers' own update unchanged, its mask is transformers' own, and the
attention forbids the invalid columns (`pruned_cache_sdpa`, via the keyword `fitprune_key_valid`).
Decoding attends over all L slots, as it does unpruned: a static cache saves no decode work, it
makes decode steps one fixed-shape program (CUDA graphs).

The call that starts a layer's sequence (its prefill, `fitprune_started` unset) is written here
instead of by the stock update, so that the graph looks like a dynamic cache's prefill to the
pass: the attention receives the call's own keys (and transformers sizes the mask for them,
`static_mask_sizes`), and the keys are scattered into the buffer at the slots of their positions,
which come from `fitprune::cache_positions` (the kept tokens' positions once the pass has set the
op, `passes/cache_positions.py`). Nothing here depends on a token count Dynamo baked into the
graph: the slots are computed from the positions, the counts from layer 0 (never pruned).

For the layers' later updates the validity follows transformers' update rule by running it on
the validity itself (`_ValidityLayer`): the same index copy, roll or cut as the keys, with the
call's new slots valid.
"""

from __future__ import annotations

from typing import Any

import torch

from .passes.cache_positions import OP_TARGETS  # noqa: F401  (registers fitprune::cache_positions)

VALID = "fitprune_valid"  # layer attribute: [B, L] bool, False at a slot whose token was deleted
KEY_VALID = "fitprune_key_valid"  # attention keyword: [B, K] bool over the keys it receives
STARTED = "fitprune_started"  # layer attribute: the layer's sequence has started (reset clears it)
CALL_LENGTH = "fitprune_call_length"  # cache attribute: the call's token count, read at layer 0

_static_layer: type | None = None  # transformers' StaticLayer, set by `install`


def is_static(layer: Any) -> bool:
    return _static_layer is not None and isinstance(layer, _static_layer)


def static_mask_sizes(layer: Any, query_length: int) -> tuple[int, int] | None:
    """A static layer whose sequence has not started is sized like a dynamic one's prefill (the
    call's own keys, from position 0); None: transformers' own sizes."""
    if is_static(layer) and not getattr(layer, STARTED, False):
        return query_length, 0
    return None


def update(
    cache: Any,
    layer_idx: int,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_kwargs: dict,
    stock_update,
    *args,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Cache.update` for a static layer (see the module doc)."""
    layer = cache.layers[layer_idx]
    if not getattr(layer, STARTED, False):
        return _start(cache, layer_idx, layer, key_states, value_states)
    valid = getattr(layer, VALID, None)
    if valid is None:  # started by no code of ours (another attention): transformers' own update
        return stock_update(cache, key_states, value_states, layer_idx, *args, **kwargs)
    proxy = _ValidityLayer(layer, valid)  # the counts before the update
    keys, values = stock_update(cache, key_states, value_states, layer_idx, *args, **kwargs)
    new = torch.ones_like(key_states[:, :1, :, :1], dtype=torch.bool)  # [B, 1, q, 1]
    returned, _ = type(layer).update(proxy, new, new)
    attention_kwargs[KEY_VALID] = returned[:, 0, :, 0]
    return keys, values


def _start(
    cache: Any, layer_idx: int, layer: Any, key_states: torch.Tensor, value_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a layer's first call into its buffers at the slots of its tokens' original positions;
    return the call's own keys and values (all the attention needs: the layer held nothing)."""
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    if layer_idx == 0:
        setattr(cache, CALL_LENGTH, key_states.shape[-2])
    seen = getattr(cache, CALL_LENGTH)  # the call's tokens in original positions (layer 0 keeps all)
    batch = key_states.shape[0]
    none_before = key_states.new_empty((batch, 0), dtype=torch.long)
    _, positions = torch.ops.fitprune.cache_positions(none_before, key_states, seen, key_states, key_states)
    slots = layer.max_cache_len
    first = torch.sym_max(seen - slots, 0)  # the original position of slot 0 (a window slid past)
    inside = positions >= first  # also False at void slots (-1)
    slot = torch.where(inside, positions - first, slots)  # [B, K]; `slots` is a dump slot
    index = slot[:, None, :, None]
    keys = key_states.new_zeros((*layer.keys.shape[:2], slots + 1, layer.keys.shape[-1]))
    values = value_states.new_zeros((*layer.values.shape[:2], slots + 1, layer.values.shape[-1]))
    layer.keys.copy_(keys.scatter(2, index.expand_as(key_states), key_states)[:, :, :slots])
    layer.values.copy_(values.scatter(2, index.expand_as(value_states), value_states)[:, :, :slots])
    written = torch.zeros((batch, slots + 1), dtype=torch.bool, device=positions.device)
    written = written.scatter(1, slot, True)[:, :slots]
    future = torch.arange(slots, device=positions.device) + first >= seen  # not yet written: causal
    valid = written | future
    held = getattr(layer, VALID, None)
    if held is not None and held.shape == valid.shape:
        held.copy_(valid)  # keep the buffer's address (a reset cache used again)
    else:
        setattr(layer, VALID, valid)
    layer.cumulative_length.add_(seen)
    if hasattr(layer, "cumulative_length_int"):  # sliding layers count in Python as well
        layer.cumulative_length_int = layer.cumulative_length_int + seen
    setattr(layer, STARTED, True)
    return key_states, value_states


class _ValidityLayer:
    """A static layer's validity [B, L] dressed as the layer itself (keys = values = [B, 1, L, 1]),
    with the counts it had before an update: transformers' update run on it moves the validity
    exactly as it moved the keys."""

    def __init__(self, layer: Any, valid: torch.Tensor) -> None:
        self.keys = self.values = valid[:, None, :, None]
        self.cumulative_length = layer.cumulative_length.clone()
        if hasattr(layer, "cumulative_length_int"):
            self.cumulative_length_int = layer.cumulative_length_int
        self.max_cache_len = layer.max_cache_len
        self.device = layer.device
        self.is_initialized = True


def initialize_early(model: Any, cache: Any, batch_size: int) -> bool:
    """Allocate a static cache's buffers and validities before a compiled prefill, outside any graph.

    transformers gives a static layer's buffers fixed addresses (`mark_static_address`, what CUDA
    graphs of the decode step need to replay without copying them) only when they are allocated
    outside compiled code, and a pruned prefill is compiled; so `fitprune_fx.compile`'s model
    calls this before each call that starts a static cache. Returns whether it allocated."""
    layers = getattr(cache, "layers", None)
    # (every forward call comes here: a dynamic cache, or a started static one, leaves at once)
    if not layers or not is_static(layers[0]) or layers[0].is_initialized or torch.compiler.is_compiling():
        return False
    if not hasattr(cache, "early_initialization") or not all(is_static(layer) for layer in layers):
        return False
    shape = getattr(model, "_get_static_cache_init_shape", lambda: None)()
    if shape is None:  # (layers on several devices; transformers allocates lazily then)
        return False
    heads, head_dim = shape
    cache.early_initialization(
        batch_size=batch_size, num_heads=heads, head_dim=head_dim, dtype=model.dtype, device=model.device
    )
    for layer in layers:
        valid = torch.ones((batch_size, layer.max_cache_len), dtype=torch.bool, device=layer.keys.device)
        torch._dynamo.mark_static_address(valid)
        setattr(layer, VALID, valid)
    return True


def _reset(stock):
    def reset(self) -> None:
        setattr(self, STARTED, False)
        return stock(self)

    reset.__wrapped__ = stock
    return reset


def install() -> None:
    """Patch the static layer classes' `reset` (process-wide, idempotent) and remember the class."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    global _static_layer
    if _static_layer is not None:
        return
    _static_layer = StaticLayer
    for cls in (StaticLayer, StaticSlidingWindowLayer):
        cls.reset = _reset(cls.reset)
