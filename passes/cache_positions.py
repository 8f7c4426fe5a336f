"""Original positions of the keys a layer caches: the op a cache update calls, and the pass that
sets it for the layers after a pruning layer.

A pruned KV cache holds fewer keys in later layers, so the k-th cached key of layer l is no longer
the token at position k. `fitprune_fx.positioned_cache` keeps, next to each layer's keys, the
original position of every cached key ([B, L] long; -1 for a void slot of a batch that mixes
visual counts) and takes each call's attention mask at those positions. Every cache update calls
`fitprune::cache_positions`; by default it appends the call's positions to a layer that already
has some, and leaves a layer that holds every position unrecorded (a 1-D empty tensor) as it is:
caches no pruned graph wrote (every other model) record nothing and cost nothing.

In a pruned prefill the pass replaces the op of every layer after a pruning layer by the kept
tokens' original positions (`insert_cache_positions`): the tokens entering that layer, which it
caches. The layers up to the first pruning layer get the identity (0..S-1; the entry compaction's
positions where there is one) the same way: every pruned graph then leaves one representation in
the cache, so decode graphs compiled after one prefill serve the next, and every layer stays the
same program for the per-layer compile. Which layer an op belongs to is read off the graph (the
layer scope of the op node), and the positions come from the compaction's own composed indices,
so no name of transformers' is involved.
"""

from __future__ import annotations

import torch
from torch import fx


def identity_positions(like: torch.Tensor) -> torch.Tensor:
    """The marker of a layer that caches every position: a 1-D empty long tensor."""
    return like.new_empty((0,), dtype=torch.long)


def is_identity(positions: torch.Tensor | None) -> bool:
    return positions is None or positions.dim() == 1


def _last(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The last `like.shape[-2]` columns of `full` [B, n], as a gather: a slice at a symbolic start
    would put a guard on the pass's own token counts, which no input of Dynamo's carries."""
    count = like.shape[-2]
    index = torch.arange(count, device=full.device) + (full.shape[-1] - count)
    return full.index_select(-1, index)


def default_cache_positions(old, key_states, seen, stored_keys, returned_keys):
    """What `cache_positions` computes, in plain torch ops (Inductor fuses them,
    `lower_cache_positions`)."""
    if old.dim() == 1:  # the identity stays the identity
        return old.clone(), old.clone()
    batch, q = key_states.shape[0], key_states.shape[-2]
    new = torch.arange(seen - q, seen, device=old.device).expand(batch, q)
    full = torch.cat([old, new], dim=-1)
    return _last(full, stored_keys), _last(full, returned_keys)


@torch.library.custom_op("fitprune::cache_positions", mutates_args=())
def cache_positions(
    old: torch.Tensor,
    key_states: torch.Tensor,
    seen: int,
    stored_keys: torch.Tensor,
    returned_keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions the layer stores, positions of the keys the attention receives) after an update.

    old: [B, L] positions of the layer's cached keys before the call, or the identity (1-D empty);
    key_states: [B, Hkv, q, D] the call's new keys; seen: tokens in the sequence after the call
    (original positions, layer 0's count); stored_keys / returned_keys: the keys the layer now
    stores and those it hands to the attention, [B, Hkv, L', D] (a sliding-window layer stores
    fewer than it returns): read for their lengths only. Both are the last ones of old + new. The
    call's tokens are the last q positions, seen - q .. seen - 1.
    """
    return tuple(
        t.clone() for t in default_cache_positions(old, key_states, seen, stored_keys, returned_keys)
    )


@cache_positions.register_fake
def _cache_positions_fake(old, key_states, seen, stored_keys, returned_keys):
    if old.dim() == 1:
        return torch.empty_like(old), torch.empty_like(old)
    batch = key_states.shape[0]
    return old.new_empty((batch, stored_keys.shape[-2])), old.new_empty((batch, returned_keys.shape[-2]))


def token_positions(tokens: torch.Tensor) -> torch.Tensor:
    """[B, S] long: 0..S-1 for every example of a [B, S] per-token tensor (the identity)."""
    batch, length = tokens.shape
    return torch.arange(length, device=tokens.device).expand(batch, length)


def chunk_positions(
    kept: torch.Tensor, valid: torch.Tensor | None, stored_keys: torch.Tensor, returned_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_positions` for a layer of a pruned call that starts its sequence: the layer caches the
    tokens entering it. kept: [B, K] their original positions; valid: [B, K] bool, False at void
    slots (position -1), or None; stored_keys / returned_keys as in `cache_positions`."""
    if valid is not None:
        kept = torch.where(valid, kept, -1)
    return _last(kept, stored_keys), _last(kept, returned_keys)


def continued_positions(
    old: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor | None,
    seen,
    chunk: torch.Tensor,
    stored_keys: torch.Tensor,
    returned_keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_positions` for a layer after a pruning layer of a chunk that continues a cache: the
    layer's old positions (or, for a layer that held every position, 0..P-1), then the chunk's
    kept tokens. kept: [B, K] their positions within the chunk; chunk: any [B, S] tensor of the
    uncompacted chunk (its length S; the chunk starts at seen - S); the rest as `chunk_positions`."""
    start = seen - chunk.shape[1]
    batch = kept.shape[0]
    if old.dim() == 1:
        old = torch.arange(start, device=kept.device).expand(batch, start)
    new = kept + start
    if valid is not None:
        new = torch.where(valid, new, -1)
    full = torch.cat([old, new], dim=-1)
    return _last(full, stored_keys), _last(full, returned_keys)


OP_TARGETS = (torch.ops.fitprune.cache_positions.default, torch.ops.fitprune.cache_positions)


def cache_position_ops(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in OP_TARGETS]


def insert_cache_positions(
    graph: fx.Graph,
    layout,
    entering: dict[int, tuple[fx.Node, fx.Node | None]],
    chunk: fx.Node | None = None,
) -> dict[int, fx.Node]:
    """Replace the `cache_positions` op of each layer in `entering` (layer -> the original positions
    [B, K] of the tokens entering it, and their validity or None) by `chunk_positions`, or, for a
    chunk that continues a cache (`chunk`: a [B, S] tensor of it, uncompacted), by
    `continued_positions`. Returns layer -> the node inserted. Without `chunk` the call must start
    its sequence (UnsupportedGraph if its layers hold recorded positions)."""
    from .locate import UnsupportedGraph, example_value

    inserted = {}
    for node in cache_position_ops(graph):
        layer = layout.layer_index(node)
        if layer not in entering:
            continue
        old, _, seen, stored, returned = node.args
        before = example_value(old)
        kept, valid = entering[layer]
        with graph.inserting_before(node):
            if chunk is not None:
                new = graph.call_function(
                    continued_positions, (old, kept, valid, seen, chunk, stored, returned)
                )
            elif before.dim() != 1 and before.shape[-1] != 0:  # (a static layer's first call: [B, 0])
                raise UnsupportedGraph("the call continues a cache whose layers record key positions")
            else:
                new = graph.call_function(chunk_positions, (kept, valid, stored, returned))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        inserted[layer] = new
    return inserted


def lower_cache_positions(gm: fx.GraphModule) -> int:
    """Run every `cache_positions` op left in `gm` as plain torch ops (Inductor then fuses them
    instead of calling the op); returns how many."""
    ops = cache_position_ops(gm.graph)
    for node in ops:
        node.target = default_cache_positions
    if ops:
        gm.recompile()
    return len(ops)
