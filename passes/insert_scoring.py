"""Insert importance scoring and token selection after one decoder layer's attention."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import fx

from . import token_count_inputs  # noqa: F401  (registers torch.ops.fitprune.select_kept_tokens_like)
from .locate import AttentionSite, UnsupportedGraph, example_value
from .scorers import bind_scorer, random_constants, score_tokens
from .token_ops import select_kept_tokens


def insert_importance_scoring(
    graph: fx.Graph,
    site: AttentionSite,
    visual: fx.Node,
    *,
    scorer: str,
    scorer_fn: Callable | None = None,
    num_delete: int,
    visual_count: int,
    seed: int = 0,
    causal_decoder: bool = False,
    kept_length: fx.Node | None = None,
    continues: bool = False,
    shards=None,
    positions: fx.Node | None = None,
    scorer_options: tuple = (),
    count_free: bool = False,
) -> tuple[fx.Node, list[fx.Node]]:
    """Add `kept = select_kept_tokens(score_tokens(q, k, mask, visual), visual, d)` after the sdpa.

    `scorer` names the scorer (the random scorer's constants are drawn here); `scorer_fn`, when
    given, is the function the graph calls. `causal_decoder` adds causality to the scorer's
    mask (exact when the layer's own mask is causal already). `kept_length`, a [K] placeholder of
    `token_count_inputs`, gives `kept` its length symbol. Returns the `kept` node
    ([B, S - d] original-order indices) and all nodes inserted. `continues`: the chunk continues
    a KV cache (its keys are the cached ones, then its own; `ScoringInputs.continues`). `shards`:
    the heads are split across tensor-parallel ranks (`sharded_heads.HeadShards`). The scorer also
    gets the layer's entering residual stream and values, `positions` ([B, S] original positions of
    the layer's tokens) and the recipe's `scorer_options` ((name, value) pairs of plain values).
    `count_free`: a built-in that reads neither the layer nor the counts (`COUNT_FREE_SCORERS`) is
    not handed them, so the scoring calls of all layers are alike and layers of one shape share a
    compile (`layer_compile`).
    """
    head_dim = example_value(site.query).shape[-1]
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(head_dim)
    if isinstance(scale, fx.Node):
        raise UnsupportedGraph(
            f"layer {site.layer}'s attention scale is a dynamic graph input (Dynamo turns a float "
            "attribute into one after compiling models with other values); keep floats static with "
            "torch._dynamo.config.specialize_float = True (a FitPrune backend sets it when created)"
        )
    doomed = random_constants(site.layer, visual_count, num_delete, seed) if scorer == "random" else ()
    with graph.inserting_after(site.sdpa):
        scores = graph.call_function(
            bind_scorer(scorer_fn) if scorer_fn is not None else score_tokens,
            (site.query, site.key, site.attn_mask, visual),
            {
                **({} if scorer_fn is not None else {"scorer": scorer}),
                "is_causal": site.is_causal or causal_decoder,
                "scale": float(scale),
                **({} if count_free else {"layer": site.layer, "num_delete": num_delete}),
                **({} if count_free else {"visual_count": visual_count, "doomed": doomed}),
                **({"continues": True} if continues else {}),
                **({"shards": dataclasses.astuple(shards)} if shards is not None else {}),
                "hidden": site.residual,
                "value": site.value,
                "positions": positions,
                **({"scorer_options": scorer_options} if scorer_options else {}),
            },
        )
    kept = insert_kept_selection(graph, scores, visual, num_delete, kept_length)
    return kept, [scores, kept]


def insert_kept_selection(
    graph: fx.Graph, scores: fx.Node, visual: fx.Node, num_delete: int, kept_length: fx.Node | None
) -> fx.Node:
    """After `scores`: the kept indices [B, S - d], their length a symbol when `kept_length` is given
    (then d is read off the sizes: every layer that deletes runs the same call)."""
    with graph.inserting_after(scores):
        if kept_length is None:
            return graph.call_function(select_kept_tokens, (scores, visual, num_delete))
        return graph.call_function(
            torch.ops.fitprune.select_kept_tokens_like.default, (scores, visual, kept_length)
        )
