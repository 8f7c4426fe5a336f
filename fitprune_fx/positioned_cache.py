"""A KV cache that knows the original position of every key it holds, on transformers' own classes.

After a pruned prefill, layer l of a `DynamicCache` holds only the tokens that survived the pruning
layers before l. Each such layer here also holds `fitprune_positions`: [B, L] long, the original
position of each cached key (-1 for a void slot, `passes/padded_compaction.py`); a pruned prefill
records them on every layer (the ones up to the first pruning layer hold 0..S-1). Caches no pruned
graph wrote carry an empty marker (a 1-D empty tensor) and cost nothing.

How the positions reach the attention, and stay right:

* `Cache.update` (patched) calls `fitprune::cache_positions` after the stock update: the layer's
  new positions are the old ones plus the call's tokens (`seen - q .. seen - 1`, `seen` read off
  layer 0, which is never pruned), cut to what the layer stores (a sliding-window layer keeps its
  last W - 1 keys by count; keys outside the window by position are masked, below). In a pruned
  prefill the pass sets the op of every layer after a pruning layer to the kept tokens' positions
  (`passes/cache_positions.py`). The positions of the keys the attention receives go into the
  keyword arguments transformers hands the attention function (`fitprune_key_positions`, with
  `fitprune_seen`): transformers passes that very dict to the layer's update (`kwargs=kwargs`).
* `crop`, `reorder_cache`, `batch_repeat_interleave`, `batch_select_indices` and `reset`
  (patched on the dynamic layer classes) apply the stock method to the positions as well, by
  running it on a copy of the layer whose keys are the positions, so any slicing rule of
  transformers' (the sliding window's crop included) is followed as written there.
  `copy.deepcopy` copies the attribute with the layer.
* `Cache.get_seq_length` and `Cache.get_mask_sizes` (patched) count a positioned layer's
  sequence in original positions (a pruned layer would otherwise report its kept count, and the
  masks transformers builds for the first full-attention layer would start its queries there).
* `positioned_mask` takes the call's mask at each key's position: the mask transformers built
  for layer 0's geometry ([.., q, M], columns `seen - M .. seen - 1`) read at `positions - (seen -
  M)`; a key left of those columns (out of the window) or void is forbidden. That is exact for any
  padding and any window, with no condition on where padding sits.

Without the keyword channel (transformers releases whose attention calls `update(k, v, layer)`
with no `kwargs`) nothing is recorded and `fitprune_fx.pruned_cache` falls back to its cut rule.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch

from fitprune_fx import static_cache
from fitprune_fx.passes.cache_positions import identity_positions, is_identity

ATTRIBUTE = "fitprune_positions"
KEY_POSITIONS = "fitprune_key_positions"
SEEN = "fitprune_seen"
_FOLLOWED = ("crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices")
_stock: dict[str, Callable] = {}  # Cache's own update, get_seq_length and get_mask_sizes


def positions_of(layer: Any) -> torch.Tensor | None:
    """A layer's cached keys' original positions [B, L], or None when it holds every position."""
    positions = getattr(layer, ATTRIBUTE, None)
    return None if is_identity(positions) else positions


def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
    attention_kwargs = kwargs.get("kwargs")
    static = layer_idx < len(self.layers) and static_cache.is_static(self.layers[layer_idx])
    if attention_kwargs is not None and static:
        return static_cache.update(
            self, layer_idx, key_states, value_states, attention_kwargs, _stock["update"], *args, **kwargs
        )
    keys, values = _stock["update"](self, key_states, value_states, layer_idx, *args, **kwargs)
    layer = self.layers[layer_idx]
    if attention_kwargs is None or not _is_dynamic(layer) or layer.keys is None:
        return keys, values
    old = getattr(layer, ATTRIBUTE, None)
    if old is None:
        old = identity_positions(key_states)
    seen = self.layers[0].get_seq_length()
    stored, returned = torch.ops.fitprune.cache_positions(old, key_states, seen, layer.keys, keys)
    setattr(layer, ATTRIBUTE, stored)
    if not is_identity(returned):
        attention_kwargs[KEY_POSITIONS] = returned
        attention_kwargs[SEEN] = seen
    return keys, values


def _get_seq_length(self, layer_idx: int = 0) -> int:
    if layer_idx > 0 and layer_idx < len(self.layers) and positions_of(self.layers[layer_idx]) is not None:
        layer_idx = 0  # a pruned layer holds fewer keys than the sequence has positions: layer 0 holds all
    return _stock["get_seq_length"](self, layer_idx)


def _get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
    if layer_idx < len(self.layers):
        sizes = static_cache.static_mask_sizes(self.layers[layer_idx], query_length)
        if sizes is not None:
            return sizes
    if layer_idx == 0 or layer_idx >= len(self.layers) or positions_of(self.layers[layer_idx]) is None:
        return _stock["get_mask_sizes"](self, query_length, layer_idx)
    # a pruned layer holds fewer keys than the sequence has positions: size the mask by the latter,
    # with the rule of transformers' dynamic layers (full: everything; sliding: the window's last
    # W - 1 positions and the call's; `test_pruned_cache.py::test_mask_sizes_count_original_positions`)
    seen = self.layers[0].get_seq_length()
    layer = self.layers[layer_idx]
    window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
    if window is None:
        return seen + query_length, 0
    if seen >= window:
        return window - 1 + query_length, seen - window + 1
    return seen + query_length, 0


def _followed(cls: type, name: str, attribute: str = ATTRIBUTE) -> Callable:
    """`cls.name` applied to the layer's `attribute` ([B, L], one entry per cached key) as well."""
    stock = getattr(cls, name)

    def method(self, *args, **kwargs):
        followed = getattr(self, attribute, None)
        if followed is None or followed.dim() != 2:  # nothing recorded (or the identity)
            return stock(self, *args, **kwargs)
        # the stock method on a copy whose keys and values are the followed tensor [B, 1, L, 1]
        proxy = copy.copy(self)
        setattr(proxy, attribute, None)
        proxy.keys = proxy.values = followed[:, None, :, None]
        stock(proxy, *args, **kwargs)
        setattr(self, attribute, None)  # the stock method's own calls of followed methods skip it
        result = stock(self, *args, **kwargs)
        setattr(self, attribute, proxy.keys[:, 0, :, 0])
        return result

    method.__wrapped__ = stock
    return method


def _reset(stock: Callable) -> Callable:
    def reset(self) -> None:
        setattr(self, ATTRIBUTE, None)
        return stock(self)

    reset.__wrapped__ = stock
    return reset


_dynamic_layer: type | None = None  # transformers' DynamicLayer, set by `install`


def _is_dynamic(layer: Any) -> bool:
    return _dynamic_layer is not None and isinstance(layer, _dynamic_layer)


def install() -> None:
    """Patch transformers' `Cache` and dynamic layer classes (process-wide, idempotent); a no-op on
    any cache that never went through a pruned prefill (their layers carry the identity)."""
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

    global _dynamic_layer
    if _stock:
        return
    _dynamic_layer = DynamicLayer
    patches = (("update", _update), ("get_mask_sizes", _get_mask_sizes), ("get_seq_length", _get_seq_length))
    for name, patched in patches:
        _stock[name] = getattr(Cache, name)
        setattr(Cache, name, patched)
    for cls in (DynamicLayer, DynamicSlidingWindowLayer):
        for name in _FOLLOWED:
            if name in cls.__dict__ or cls is DynamicLayer:  # DynamicLayer inherits reorder_cache
                setattr(cls, name, _followed(cls, name))
        if "reset" in cls.__dict__:
            cls.reset = _reset(cls.__dict__["reset"])
    StaticLayer.reorder_cache = _followed(StaticLayer, "reorder_cache", static_cache.VALID)  # beams
    static_cache.install()


@functools.cache
def cache_update_gets_attention_keywords() -> bool:
    """Whether this transformers' attention hands its keyword dict to `cache.update` (`kwargs=`),
    the channel positions and validity travel by (5.25 does, 5.17 does not): probed on a tiny
    Llama decoder with a cache that records what its update receives."""
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    seen = []

    class Probe(DynamicCache):
        def update(self, *args, **kwargs):
            seen.append(isinstance(kwargs.get("kwargs"), dict))
            return super().update(*args, **kwargs)

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)  # fmt: skip
    with torch.no_grad():
        LlamaModel(config)(input_ids=torch.ones(1, 2, dtype=torch.long), past_key_values=Probe())
    return bool(seen) and all(seen)


def positioned_mask(
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    seen: int,
    query_length: int,
    window: int | None,
) -> torch.Tensor:
    """The attention mask [B, 1|H, q, K] of keys at original `positions` [B, K] (-1: void).

    mask: the call's mask [B|1, 1|H, q, M] (bool, or additive float), whose columns are the
    original positions seen - M .. seen - 1; None means causal with no padding, within `window`
    if the layer has one, and is then built from the positions. Returns a bool mask, or an
    additive one of `mask`'s dtype.
    """
    if mask is None:
        query = torch.arange(seen - query_length, seen, device=positions.device)[None, :, None]
        key = positions[:, None, :]
        allowed = (key >= 0) & (key <= query)
        if window is not None:
            allowed &= query - key < window
        return allowed[:, None]  # [B, 1, q, K]
    offset = seen - mask.shape[-1]
    column = positions - offset  # [B, K]
    inside = column >= 0
    # index and source broadcast to [B, 1|H, q, K] / [B, 1|H, q, M] by arithmetic, not by sizes
    # copied from the mask into the graph (a compacted chunk's rows change after tracing)
    rows = torch.zeros_like(mask[..., :1], dtype=torch.long)  # [B|1, 1|H, q, 1]
    index = column.clamp(min=0)[:, None, None, :] + rows
    batch = torch.zeros((positions.shape[0], 1, 1, 1), dtype=mask.dtype, device=mask.device)
    taken = torch.gather((mask | batch) if mask.dtype == torch.bool else mask + batch, -1, index)
    if mask.dtype == torch.bool:
        return taken & inside[:, None, None, :]
    return taken.masked_fill(~inside[:, None, None, :], torch.finfo(mask.dtype).min)
