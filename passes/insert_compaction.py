"""Insert token compaction: gather the kept rows wherever later computation reads tokens.

At a pruning layer l (kept = [B, S'] indices):
  * the attention output [B, H, S, D] is gathered on dim 2 before it reaches o_proj,
  * the residual stream entering layer l is gathered on dim 1 where it is added back,
  * every per-token tensor shared by the layers (RoPE cos/sin, the 4-D attention mask) is
    gathered for the layers after l only, and so is a visual residual addend (DeepStack) for
    the adds that come after layer l's attention,
  * the visual-token mask is gathered for the next pruning layer.
Layer l's keys and values (its KV cache) are untouched: they hold every token.
"""

from __future__ import annotations

from torch import fx

from .layout import DecoderLayout
from .locate import AttentionSite, PerTokenTensor
from .token_ops import gather_tokens
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
) -> tuple[fx.Node, list[fx.Node]]:
    """Compact after `site`'s attention. Updates `shared` (tensor -> node later layers read).

    Returns the compacted visual mask and all nodes inserted.
    """
    inserted: list[fx.Node] = []
    last = kept

    def gather(x: fx.Node, dims: tuple[int, ...]) -> fx.Node:
        nonlocal last
        before = set(graph.nodes)
        node = _gather(graph, last, x, kept, dims)
        inserted.extend(n for n in graph.nodes if n not in before)
        last = node
        return node

    attn = gather(site.sdpa, (2,))
    site.sdpa.replace_all_uses_with(attn, delete_user_cb=lambda u: u not in inserted)

    residual = gather(site.residual, (1,))
    site.residual_add.replace_input_with(site.residual, residual)

    order = {n: i for i, n in enumerate(graph.nodes)}

    def after_this_layer(user: fx.Node) -> bool:
        if user in inserted:
            return False
        if is_visual_residual_add(user):  # between layers: after this layer's attention?
            return order[user] > order[site.residual_add]
        layer = layout.layer_index(user)
        return layer is not None and layer > site.layer

    for tensor, current in list(shared.items()):
        compacted = gather(current, tensor.token_dims)
        current.replace_all_uses_with(compacted, delete_user_cb=after_this_layer)
        shared[tensor] = compacted

    return gather(visual, (1,)), inserted
