"""Insert token compaction: gather the kept rows wherever later computation reads tokens.

At a pruning layer l (kept = [B, S'] indices):
  * the attention output [B, H, S, D] is gathered on dim 2 before it reaches o_proj,
  * the residual stream entering layer l is gathered on dim 1 where it is added back,
  * every per-token tensor shared by the layers (RoPE cos/sin, the 4-D attention mask) is
    gathered for the layers after l only, and so is a visual residual addend (DeepStack) for
    the adds that come after layer l's attention,
  * the visual-token mask is gathered for the next pruning layer.
Layer l's keys and values (its KV cache) are untouched: they hold every token.

Shared tensors and the visual mask are gathered from their uncompacted originals at the kept
tokens' original positions ([B, S'], composed across pruning layers), not from the previous
layer's compacted copy: Inductor fuses a chain of gathers into its consumer, so gathering copy
from copy would give the RoPE kernel of every later layer one more indirection, and every layer
a kernel of its own to compile.
"""

from __future__ import annotations

import torch
from torch import fx

from .layout import DecoderLayout
from .locate import AttentionSite, PerTokenTensor
from .token_merging import merge_rows, merge_targets
from .token_ops import gather_tokens  # also registers fitprune::kept_positions, gather_token_pairs
from .visual_token_marks import is_visual_residual_add


def _gather(graph: fx.Graph, after: fx.Node, x: fx.Node, kept: fx.Node, dims: tuple[int, ...]):
    node = after
    for d in dims:
        with graph.inserting_after(node):
            node = graph.call_function(gather_tokens, (x if node is after else node, kept, d))
    return node


def insert_token_compaction(
    graph: fx.Graph,
    site: AttentionSite,
    kept: fx.Node,
    shared: dict[PerTokenTensor, fx.Node],
    visual: fx.Node,
    layout: DecoderLayout,
    positions: fx.Node | None = None,
    merge_visual: fx.Node | None = None,
    merge_real: fx.Node | None = None,
) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """Compact after `site`'s attention. Updates `shared` (tensor -> node later layers read).

    `visual` is the uncompacted visual-token mask [B, S] and `positions` [B, S_l] the original
    positions of the tokens entering this layer (None: no earlier pruning layer).
    `merge_visual`, the layer's own visual mask [B, S_l], merges the deleted visual tokens into
    kept ones (`token_merging`) in the attention output and the residual instead of dropping them;
    `merge_real` [B, K] marks the kept slots that are no void slot of a padded compaction.
    Returns the compacted visual mask, the kept tokens' original positions and all nodes inserted.
    """
    inserted: list[fx.Node] = []
    last = kept

    def gather(x: fx.Node, dims: tuple[int, ...], index: fx.Node = kept) -> fx.Node:
        nonlocal last
        before = set(graph.nodes)
        node = _gather(graph, last, x, index, dims)
        inserted.extend(n for n in graph.nodes if n not in before)
        last = node
        return node

    if merge_visual is None:
        attn = gather(site.sdpa, (2,))
        with graph.inserting_after(last):
            residual = graph.call_function(torch.ops.fitprune.gather_residual.default, (site.residual, kept))
        inserted.append(residual)
    else:
        with graph.inserting_after(last):
            target = graph.call_function(merge_targets, (site.residual, kept, merge_visual, merge_real))
        with graph.inserting_after(target):
            attn = graph.call_function(merge_rows, (site.sdpa, target, kept, 2))
        with graph.inserting_after(attn):
            residual = graph.call_function(merge_rows, (site.residual, target, kept, 1))
        inserted += [target, attn, residual]
    site.sdpa.replace_all_uses_with(attn, delete_user_cb=lambda u: u not in inserted)
    last = residual
    site.residual_add.replace_input_with(site.residual, residual)

    if positions is None:
        kept_positions = kept
    else:
        with graph.inserting_after(last):
            kept_positions = graph.call_function(torch.ops.fitprune.kept_positions.default, (positions, kept))
        inserted.append(kept_positions)
        last = kept_positions
    order = {n: i for i, n in enumerate(graph.nodes)}

    def after_this_layer(user: fx.Node) -> bool:
        if user in inserted:
            return False
        if is_visual_residual_add(user):  # between layers: after this layer's attention?
            return order[user] > order[site.residual_add]
        layer = layout.layer_index(user)
        return layer is not None and layer > site.layer

    for tensor, current in list(shared.items()):
        compacted = gather(tensor.node, tensor.token_dims, kept_positions)
        current.replace_all_uses_with(compacted, delete_user_cb=after_this_layer)
        shared[tensor] = compacted

    return gather(visual, (1,), kept_positions), kept_positions, inserted


def mask_gathers_as_row_copies(graph: fx.Graph) -> int:
    """Where a layer partition gathers the 4-D mask it takes as input (rows on dim 2, then columns
    on dim 3, at one index), gather with `fitprune::gather_token_pairs` instead; returns how many.

    For compiled code whose mask arrives stored (`fitprune_fx.layer_compile`) only: see the op.
    """
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not gather_tokens or node.args[2] != 3:
            continue
        rows, kept = node.args[0], node.args[1]
        if not (isinstance(rows, fx.Node) and rows.target is gather_tokens and rows.args[1:] == (kept, 2)):
            continue
        if rows.args[0].op != "placeholder" or len(rows.users) != 1:
            continue
        with graph.inserting_before(node):
            pairs = graph.call_function(torch.ops.fitprune.gather_token_pairs.default, (rows.args[0], kept))
        node.replace_all_uses_with(pairs)
        graph.erase_node(node)
        graph.erase_node(rows)
        replaced += 1
    return replaced
