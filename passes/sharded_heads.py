"""Tensor parallelism: tell a decoder graph whose attention heads are sharded across ranks.

Under transformers' tensor parallelism (`tp_plan="auto"`) each rank's q / k / v projections keep
a slice of the heads, so every SDPA in the graph sees this rank's heads only, and the attention
output projection ends in an all-reduce over the tensor-parallel group before the residual add.
That all-reduce is the fact read here (data flow, not module names): its group is the group the
heads are sharded over, and the query's heads times the group's size must be the model's heads.

A scorer that combines heads must then combine them across ranks, or each rank would keep other
tokens (and the all-reduced outputs would mix them): FitPrune's max over heads becomes a local max
and one all-reduce (max) of the [B, S, S] head-max map. Scorers that read no heads (random) run as
they are; others (FastV, custom ones) are refused, and so is a chunk continuing a cache (a later
turn's image): neither is tested across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .locate import AttentionSite, UnsupportedGraph, example_value

# Scorers checked with heads split across ranks (tests/test_tensor_parallel.py: fitprune; random reads
# no heads). FastV would need its head mean all-reduced too; untested, so refused like the others.
SHARDED_SCORERS = frozenset({"fitprune", "random"})


@dataclass(frozen=True)
class HeadShards:
    """The process group (by name, as functional collectives take it) the heads are split over."""

    group: str
    size: int  # ranks in the group
    heads: int  # query heads of the model (all ranks)


def all_reduce_group(site: AttentionSite, max_nodes: int = 64) -> str | None:
    """The group of the all-reduce on the way from the layer's attention to its residual add."""
    seen, frontier = set(), [site.sdpa]
    while frontier and len(seen) < max_nodes:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user is site.residual_add:
                continue
            seen.add(user)
            if user.op == "call_function" and str(user.target).startswith("_c10d_functional.all_reduce"):
                return str(user.args[2])
            frontier.append(user)
    return None


def head_sharding(sites: dict[int, AttentionSite], model_heads: int | None) -> HeadShards | None:
    """`HeadShards` when the layers' heads are split across ranks, None when every rank holds all.

    Raises UnsupportedGraph when layers disagree, or the heads do not add up to the model's.
    """
    groups = {layer: all_reduce_group(site) for layer, site in sites.items()}
    if set(groups.values()) == {None}:
        return None
    if len(set(groups.values())) != 1:
        raise UnsupportedGraph(
            f"decoder layers reduce their attention outputs over different groups: {groups}"
        )
    group = next(iter(groups.values()))
    size = torch.distributed.distributed_c10d._resolve_process_group(group).size()
    local = example_value(next(iter(sites.values())).query).shape[1]
    if model_heads is not None and local * size != model_heads:
        raise UnsupportedGraph(
            f"attention holds {local} heads on each of {size} ranks, but the model has {model_heads}: "
            "not the head sharding of transformers' tensor parallelism"
        )
    return HeadShards(group, size, local * size)


def reduce_heads(x: torch.Tensor, shards: HeadShards | None, op: str) -> torch.Tensor:
    """`x` reduced over the ranks holding the other heads (`op`: "max" or "sum"); x without shards."""
    if shards is None:
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, op, shards.group))
