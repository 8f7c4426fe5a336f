"""`fitprune::visual_token_mark`: where the visual tokens are, for families whose image merge runs
in another Dynamo graph than the decoder.

Qwen2-VL's M-RoPE position code breaks the graph between the image merge and the decoder, so the
decoder graph never sees the merge. Such a family computes the [B, S] visual mask and its count
before the graph break and marks the decoder's input embeddings with them inside the decoder's own
graph: `inputs_embeds = visual_token_mark(inputs_embeds, visual, count)`. The pass treats the mark
as the image merge (mask = `visual`, visual tokens = `count`, static: a Python int, or a SymInt the
pass specialises); the backend then replaces the mark by its input, so Inductor never sees it.

`fitprune::visual_residual_add` is the second mark: features added to the residual stream between
decoder layers at visual rows (Qwen3-VL's DeepStack), as a dense [B, S, C] addend. The pass compacts
the addend like the other per-token tensors; the backend then makes the op a plain add.
"""

from __future__ import annotations

import torch
from torch import fx


@torch.library.custom_op("fitprune::visual_token_mark", mutates_args=())
def visual_token_mark(
    embeds: torch.Tensor, visual: torch.Tensor, count: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """`embeds` [B, S, C] unchanged (a copy: a custom op may not alias); `visual` [B, S] bool marks
    the visual tokens, `count` is their number over the whole batch and `counts` [B] (a CPU tensor,
    read on the host before each call) their number per example."""
    return embeds.clone()


@visual_token_mark.register_fake
def _visual_token_mark_fake(embeds, visual, count, counts=None):
    return torch.empty_like(embeds)


# Dynamo records the op packet, AOT traces the overload: both mean the mark
VISUAL_TOKEN_MARKS = (torch.ops.fitprune.visual_token_mark, torch.ops.fitprune.visual_token_mark.default)


def is_visual_token_mark(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in VISUAL_TOKEN_MARKS


def strip_visual_token_marks(gm: fx.GraphModule) -> int:
    """Replace every mark by its `embeds` input and every visual residual add by a plain `torch.add`
    (Inductor sees neither op); returns how many nodes were changed."""
    marks = [n for n in gm.graph.nodes if is_visual_token_mark(n)]
    for node in marks:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    adds = [n for n in gm.graph.nodes if is_visual_residual_add(n)]
    for node in adds:
        node.target = torch.add
    if marks or adds:
        gm.graph.lint()
        gm.recompile()
    return len(marks) + len(adds)


@torch.library.custom_op("fitprune::visual_residual_add", mutates_args=())
def visual_residual_add(hidden: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """`hidden + addend`, both [B, S, C]: features added to the residual stream between decoder layers
    (Qwen3-VL's DeepStack). `addend` is made before the decoder, zero at non-visual rows; the pass
    compacts it with the tokens, so kept tokens keep their own features after a deletion."""
    return hidden + addend


@visual_residual_add.register_fake
def _visual_residual_add_fake(hidden, addend):
    return hidden + addend  # a shape mismatch (an addend left uncompacted) fails here, at pass time


VISUAL_RESIDUAL_ADDS = (
    torch.ops.fitprune.visual_residual_add,
    torch.ops.fitprune.visual_residual_add.default,
)


def is_visual_residual_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in VISUAL_RESIDUAL_ADDS
