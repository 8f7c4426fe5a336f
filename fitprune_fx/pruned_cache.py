"""Attention over a pruned KV cache: why transformers' `DynamicCache` stays exact.

After a pruned prefill of P tokens, layer l of the `DynamicCache` holds P - D_l entries, where D_l
is the number of visual tokens deleted after layers before l (layers up to and including the first
pruning layer hold all P; layer 0 always does). Each such layer also records the original
position of every key it holds (`fitprune_fx.positioned_cache`), and that module's patches keep
those positions with their keys through every cache operation transformers performs (append,
`crop(-k)`, reorder, batch repeat/select, deepcopy, a sliding window's own trimming). The
attention then takes the call's mask at those positions: exact for any padding and any window.

This module is the attention function. Where positions are recorded it hands the mask to
`positioned_cache.positioned_mask`. Where they are not (a transformers release whose attention
does not give the cache update its keyword arguments, 5.17), it falls back to a cut: transformers
builds one mask per call, sized for layer 0: [B, 1|H, q, M] with M = (entries before the call) + q;
layer l's keys number K = M - D_l, and the deleted columns lie in the old part (the first M - q
columns). When the old part allows a prefix-closed set of columns (forbidden columns, i.e. left
padding, only at its left), removing D_l allowed columns equals keeping its first K - q columns:

    layer mask = cat(mask[..., : K - q], mask[..., M - q :])

after shifting each row right past its void slots (found in the cache by their fill value) and
forbidding those. Padding inside the old part would make the cut wrong, so there it is checked at
run time and refused with an error (`PADDING_ERROR`); sliding windows are not pruned there at all.

`pruned_cache_sdpa` replaces transformers' "sdpa" attention function process-wide once a
FitPrune backend exists (`install`): without recorded positions and with a mask as wide as the
keys (every layer of every model that was never pruned) it is the stock function. It also marks
layers that use a sliding window (see `passes/attention_marks.py`), so the backend knows them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fitprune_fx import positioned_cache
from fitprune_fx.passes.attention_marks import mark_sliding_window
from fitprune_fx.passes.padded_compaction import leading_void_slots, void_mask_columns
from fitprune_fx.passes.run_time_checks import RunTimeCheckFailed
from fitprune_fx.static_cache import KEY_VALID

PADDING_ERROR = (
    "fitprune: a pruned KV cache was continued with an attention mask that forbids a cached column "
    "after an allowed one (right padding, or padding inside the sequence from a batched later turn). "
    "Continuing a pruned cache is exact only with left padding: use tokenizer.padding_side = 'left' "
    "and give every row of a later turn the same length, or continue one conversation per call"
)

_stock_sdpa = None  # transformers' own SDPA attention function, saved by `install`


def cut_mask_to_pruned_keys(
    mask: torch.Tensor,
    key_length: int,
    query_length: int,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer mask for a pruned layer: the old part's first columns plus the new block (see module doc).

    mask: [B|1, 1|H, q, M] bool (True = attend) or additive float; returns [..., q, key_length].
    Checks that the old part forbids only a prefix of columns in every row (see run_time_checks).
    With the layer's `key` and `value` [B, Hkv, key_length, D], a row whose cache starts with void
    slots (a batch of different visual counts, `passes/padded_compaction.py`) gets those columns
    forbidden and its old part shifted right by as many.
    """
    old = mask.shape[-1] - query_length  # columns before this call, in original positions
    kept_old = key_length - query_length  # of them, the ones this layer still holds
    allowed = mask[..., :old]
    if allowed.dtype != torch.bool:  # additive mask: transformers uses dtype-min (or -inf) for "masked"
        allowed = allowed > torch.finfo(allowed.dtype).min / 2
    # left padding only: once a column is allowed, every later old column is allowed too
    left_padded = (allowed[..., 1:] >= allowed[..., :-1]).all()
    if torch.compiler.is_compiling():  # the backend makes it a graph output checked after the call
        torch._assert_async(left_padded, PADDING_ERROR)
    elif not bool(left_padded):  # eager (a Dynamo fallback): on the host, never a device assert
        raise RunTimeCheckFailed(PADDING_ERROR)
    new = mask[..., old:]
    if key is None:
        return torch.cat([mask[..., :kept_old], new], dim=-1)
    void = leading_void_slots(key, value, kept_old)  # [B]
    batch = key.shape[0]
    column = torch.arange(kept_old, device=mask.device)[None, :] - void[:, None]  # [B, kept_old]
    index = column.clamp(min=0)[:, None, None, :].expand(batch, *mask.shape[1:-1], kept_old)
    shifted = torch.gather(mask[..., :old].expand(batch, *mask.shape[1:-1], old), -1, index)
    forbidden = torch.zeros((), dtype=mask.dtype, device=mask.device)
    if mask.dtype != torch.bool:
        forbidden = torch.full((), torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
    shifted = torch.where((column >= 0)[:, None, None, :], shifted, forbidden)
    return torch.cat([shifted, new.expand(batch, *new.shape[1:])], dim=-1)


def pruned_cache_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, exact over pruned caches, windows marked.

    query: [B, H, q, D]; key/value: [B, Hkv, K, D] (cache + new); attention_mask: [B|1, 1|H, q, M]
    or None. A layer whose cache knows its keys' positions (`fitprune_fx.positioned_cache`) takes
    the mask at those positions; without them a mask wider than the keys is cut (module doc). With
    neither (no pruned cache, or any prefill) this is the stock function unchanged, so a prefill
    graph still holds one `scaled_dot_product_attention` per layer for the pass.
    """
    positions = kwargs.pop(positioned_cache.KEY_POSITIONS, None)
    seen = kwargs.pop(positioned_cache.SEEN, None)
    valid = kwargs.pop(KEY_VALID, None)
    window = kwargs.get("sliding_window")
    if window is not None:
        query = mark_sliding_window(query, int(window))
    if valid is not None:  # a static layer written by a pruned prefill: forbid its holes
        if attention_mask is None:  # (transformers always masks a static layer's future slots)
            attention_mask = valid.new_ones((1, 1, query.shape[-2], 1))
        attention_mask = void_mask_columns(attention_mask, valid)
    elif positions is not None:
        attention_mask = positioned_cache.positioned_mask(
            attention_mask, positions, seen, query.shape[-2], window
        )
    elif attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = cut_mask_to_pruned_keys(attention_mask, key.shape[-2], query.shape[-2], key, value)
    return _stock_sdpa(module, query, key, value, attention_mask, **kwargs)


def install() -> None:
    """Make `pruned_cache_sdpa` transformers' "sdpa" attention, process-wide; idempotent.

    Called when a FitPrune backend is created, i.e. before Dynamo traces any graph with it, so no
    compiled graph was traced with the stock function (no recompile, no missed decode step).
    """
    global _stock_sdpa
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positioned_cache.install()
    if AttentionInterface._global_mapping.get("sdpa") is pruned_cache_sdpa:
        return
    _stock_sdpa = sdpa_attention_forward
    AttentionInterface.register("sdpa", pruned_cache_sdpa)
