"""Marks that attention code leaves in a traced graph, and the pass that reads and removes them.

The FX graph does not say whether a layer's attention uses a sliding window: the window lives in
the model config and, for SDPA, inside the mask (or nowhere, when the prompt is shorter than the
window and transformers skips the mask). The attention wrapper (`fitprune_fx.pruned_cache`) knows
it from the `sliding_window` argument transformers passes, so it routes the query through
`fitprune::sliding_window_mark`, an identity op that carries the window into the graph. The
backend strips every mark before anything else sees the graph (no run-time cost once compiled)
and learns which layers use a window.
"""

from __future__ import annotations

import torch
from torch import fx


@torch.library.custom_op("fitprune::sliding_window_mark", mutates_args=())
def sliding_window_mark(query: torch.Tensor, window: int) -> torch.Tensor:
    """Identity on `query` (a copy: custom ops may not alias); records `window` in the graph."""
    return query.clone()


@sliding_window_mark.register_fake
def _(query: torch.Tensor, window: int) -> torch.Tensor:
    return torch.empty_like(query)


def mark_sliding_window(query: torch.Tensor, window: int) -> torch.Tensor:
    return torch.ops.fitprune.sliding_window_mark(query, window)


_MARK_TARGETS = (torch.ops.fitprune.sliding_window_mark.default, torch.ops.fitprune.sliding_window_mark)


def strip_sliding_window_marks(gm: fx.GraphModule) -> list[tuple[fx.Node, int]]:
    """Remove every sliding-window mark from `gm` (in place); return (consumer, window) pairs.

    Each pair names the first node that read the marked query (inside the layer that uses the
    window) and the window size, so callers can map marks to layers.
    """
    found: list[tuple[fx.Node, int]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MARK_TARGETS:
            continue
        query, window = node.args[0], int(node.args[1])
        users = list(node.users)
        node.replace_all_uses_with(query)
        gm.graph.erase_node(node)
        found.append((users[0] if users else query, window))
    if found:
        gm.recompile()
    return found
