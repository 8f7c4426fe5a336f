"""Score with FitPrune from the layer's own attention: replace its SDPA by `fitprune::attention_with_mass`.

`insert_scoring` adds a scorer beside the layer's SDPA, which on CPU recomputes the attention
probabilities (about one more attention per pruning layer). Here the SDPA node itself becomes the
fused op, which returns the attention output (used where SDPA's was) and the attention mass that
FitPrune's score is made of. Only for the built-in `fitprune` scorer, at layers that delete tokens,
in graphs that do not require grad (the op has no backward) and whose keys are the layer's own
tokens (no cache prefix). A layer listed with count 0 keeps the unfused path, so a zero recipe
still reproduces the model bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import torch
from torch import fx

import fitprune_fx.kernels.fused_attention  # noqa: F401  (registers torch.ops.fitprune.attention_with_mass)

from .insert_scoring import insert_kept_selection
from .locate import AttentionSite, example_value
from .scorers import fitprune_from_mass, fitprune_score, instruction_rows_at


def can_fuse_scoring(site: AttentionSite, scorer: str, scorer_fn: Callable | None, num_delete: int) -> bool:
    """True when this layer's FitPrune scoring can come from its attention (see the module docstring)."""
    builtin = scorer_fn is fitprune_score or (scorer_fn is None and scorer == "fitprune")
    if not builtin or num_delete == 0 or isinstance(site.scale, fx.Node):
        return False
    if not isinstance(site.value, fx.Node):
        return False
    query, key, value = (example_value(n) for n in (site.query, site.key, site.value))
    if query.requires_grad or key.requires_grad or value.requires_grad:
        return False
    return query.shape[-2] == key.shape[-2] and set(site.sdpa.kwargs) <= _SDPA_KWARGS


_SDPA_KWARGS = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}


def insert_fused_fitprune_scoring(
    graph: fx.Graph,
    site: AttentionSite,
    visual: fx.Node,
    *,
    num_delete: int,
    causal_decoder: bool = False,
    kept_length: fx.Node | None = None,
    padding_mask: fx.Node | None,
    positions: fx.Node | None,
) -> tuple[AttentionSite, fx.Node, list[fx.Node]]:
    """Replace the layer's SDPA by the fused op; returns the site (its `sdpa` now the fused op's
    attention output), the `kept` node ([B, S - d] original-order indices) and the nodes inserted.

    The instruction rows read padding off `padding_mask` at `positions` (`scorers.instruction_rows_at`):
    the uncompacted mask and the layer's tokens' original positions, or the layer's own mask and None.
    """
    head_dim = example_value(site.query).shape[-1]
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(head_dim)
    causal = site.is_causal or causal_decoder
    sdpa = site.sdpa
    with graph.inserting_after(sdpa):
        instruction = graph.call_function(instruction_rows_at, (padding_mask, visual, positions))
    with graph.inserting_after(instruction):
        fused = graph.call_function(
            torch.ops.fitprune.attention_with_mass.default,
            (site.query, site.key, site.value, site.attn_mask, instruction, visual),
            {"scale": float(scale), "sdpa_is_causal": site.is_causal, "causal": causal},
        )
    with graph.inserting_after(fused):
        out = graph.call_function(operator.getitem, (fused, 0))
    with graph.inserting_after(out):
        cross = graph.call_function(operator.getitem, (fused, 1))
    with graph.inserting_after(cross):
        self_sum = graph.call_function(operator.getitem, (fused, 2))
    with graph.inserting_after(self_sum):
        scores = graph.call_function(fitprune_from_mass, (cross, self_sum, visual))
    kept = insert_kept_selection(graph, scores, visual, num_delete, kept_length)
    out.meta.update(sdpa.meta)  # same value as SDPA's (shape, dtype, module scope)
    sdpa.replace_all_uses_with(out)
    graph.erase_node(sdpa)
    nodes = [instruction, fused, out, cross, self_sum, scores, kept]
    return dataclasses.replace(site, sdpa=out), kept, nodes
