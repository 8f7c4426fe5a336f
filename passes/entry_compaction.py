"""Enter the decoder through an identity compaction, so the first pruning layer is one program
with every later one.

A pruning layer after the first reads tensors whose token count is a symbol (its predecessor's
kept count) and gathers the next layer's per-token tensors from their uncompacted originals at
composed positions. The first pruning layer read the decoder's own tensors at the prompt length,
a constant, and had no positions to compose: a program of its own, which Inductor lowered and
built C++ kernels for separately (70 and 50 recipes, 8 layers at hidden 512, compiles after a
first one in the process with kernels built afresh: 4 compiles of 10 partitions, the decoder
graph in 8.6-9.4 s against 7.0-8.2 s unpruned; with this entry 3 compiles and 4.7-5.4 s against
6.7-6.8 s).

Here, before the first decoder layer, the residual stream, every per-token tensor and the visual
mask are copied with their token dims sized by a token-count input of their own (`[S]`,
`token_count_inputs`; `fitprune::enter_tokens`, what a gather at positions 0..S-1 would give),
and the first pruning layer composes its kept indices with those positions like any later one.
The values are the same; the layers all read symbolic token counts. The five copies (1.8 MB at
hidden 512 and 642 tokens) took 0.3 ms together, timed alone on 1 thread.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from . import token_ops  # noqa: F401  (registers fitprune::entry_positions, fitprune::enter_tokens)
from .layout import DecoderLayout
from .locate import DecoderGraph, PerTokenTensor, example_value
from .token_count_inputs import TokenCountInputs

ENTRY = -1  # the layer index the entry's token count is named after (before layer 0)


@dataclasses.dataclass
class Entry:
    """What the decoder's layers read after `insert_entry_compaction`."""

    positions: fx.Node  # [B, S] long: 0..S-1, S the entry token count (a symbol)
    visual: fx.Node  # [B, S] the visual-token mask at those positions
    inserted: list[fx.Node]  # every node added (their fake values are left to shape propagation)


def insert_entry_compaction(
    graph: fx.Graph,
    dec: DecoderGraph,
    layout: DecoderLayout,
    visual: fx.Node,
    shared: dict[PerTokenTensor, fx.Node],
    token_counts: TokenCountInputs,
) -> Entry | None:
    """Copy what the decoder layers read, its token dims sized by a new entry count (what a gather
    at positions 0..S-1 gives); updates `shared` (tensor -> node the layers read) and `dec.sites`
    (their residual streams).

    None, with the graph untouched, when the prompt length or the batch is a symbol (there the
    layers are not compiled apart, `fitprune_fx.layer_compile`), a token-count input cannot be
    made, or a tensor the layers read is made after the first layer's first node.
    """
    if not isinstance(dec.seq_len, int) or not isinstance(dec.batch_size, int):
        return None
    # where layer 0's partition starts (`split_layers.layer_partitions`): the entry goes before it
    computing = (n for n in graph.nodes if n.op not in ("placeholder", "output"))
    first_layer = next((n for n in computing if layout.layer_index(n) is not None), None)
    if first_layer is None:
        return None
    hidden = dec.sites[min(dec.sites)].residual
    order = {n: i for i, n in enumerate(graph.nodes)}
    read = [hidden, visual, *shared.values()]
    if any(order[n] > order[first_layer] for n in read):
        return None
    count = token_counts.length_after(ENTRY, dec.seq_len, example_value(hidden).device)
    if count is None:
        return None

    inserted: list[fx.Node] = []

    def add(target, *args) -> fx.Node:
        with graph.inserting_before(first_layer):
            node = graph.call_function(target, args)
        inserted.append(node)
        return node

    positions = add(torch.ops.fitprune.entry_positions.default, count, hidden)  # [B, S]: 0..S-1

    def after_entry(user: fx.Node) -> bool:  # a reader in the layers or after them
        return user not in inserted and order.get(user, -1) >= order[first_layer]

    def enter(node: fx.Node, dims: tuple[int, ...]) -> fx.Node:
        entered = add(torch.ops.fitprune.enter_tokens.default, node, count, list(dims), dec.batch_size)
        node.replace_all_uses_with(entered, delete_user_cb=after_entry)
        return entered

    entered = enter(hidden, (1,))
    for tensor, current in list(shared.items()):
        shared[tensor] = enter(current, tensor.token_dims)
    entered_visual = enter(visual, (1,))  # read by the pass's nodes, which come later
    for layer, site in dec.sites.items():
        if site.residual is hidden:
            dec.sites[layer] = dataclasses.replace(site, residual=entered)
    return Entry(positions, entered_visual, inserted)
