"""The FitPrune pass: score and delete visual tokens after the recipe's decoder layers.

Driver only: locating (`locate`), scoring (`insert_scoring`), compaction (`insert_compaction`)
and size rewriting (`sequence_length`) live in their own modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from .entry_compaction import insert_entry_compaction
from .insert_compaction import insert_token_compaction
from .insert_fused_scoring import can_fuse_scoring, insert_fused_fitprune_scoring
from .insert_scoring import insert_importance_scoring
from .layout import DecoderLayout
from .locate import UnsupportedGraph, example_value, locate_decoder
from .sequence_length import propagate_compaction
from .token_count_inputs import TokenCountInputs
from .token_ops import VISUAL_COUNT_ERROR, has_visual_count, visual_token_mask


@dataclass
class PruneResult:
    """What the pass did to one graph."""

    deletions: dict[int, int]  # layer -> visual tokens deleted per example
    visual_tokens: int  # visual tokens per example entering the decoder
    seq_len: str  # sequence length entering the decoder ("S" when symbolic: any prompt length)
    tokens_per_layer: list[str] = field(default_factory=list)  # at each layer's input, then output
    size_rewrites: int = 0
    scorer: str = "fitprune"
    fused_scoring: list[int] = field(default_factory=list)  # layers scored from their own attention


def prune_visual_tokens(
    gm: fx.GraphModule,
    layout: DecoderLayout,
    deletions_for,
    fake_mode,
    *,
    scorer: str = "fitprune",
    scorer_fn: Callable | None = None,
    seed: int = 0,
    token_counts: TokenCountInputs | None = None,
) -> PruneResult:
    """Rewrite `gm` in place. `layout` names the decoder's modules (from its model family);
    `deletions_for(n_visual) -> {layer: count}` gives the static plan.

    A layer listed with count 0 still gets scoring and (identity) compaction: that is how the
    scoring overhead is measured and how tests check that the machinery itself is exact.

    With `token_counts`, every layer that deletes tokens gets an extra placeholder whose length is
    its kept token count (`token_count_inputs`): the caller must pass `token_counts.values(args)`
    after the graph's own inputs `args`.

    FitPrune's scoring at a deleting layer comes from the layer's own attention where it can
    (`insert_fused_scoring`: one attention instead of two on CPU).

    Raises UnsupportedGraph (graph untouched) when the graph is not understood or the plan does
    not fit it.
    """
    dec = locate_decoder(gm, layout)
    n = dec.visual_per_example
    plan = dict(sorted(deletions_for(n).items()))
    missing = [layer for layer in plan if layer not in dec.sites]
    if missing:
        raise UnsupportedGraph(
            f"recipe prunes after layers {missing}, but this graph holds decoder layers "
            f"{min(dec.sites)}..{max(dec.sites)}"
        )
    if sum(plan.values()) > n:
        raise UnsupportedGraph(f"recipe deletes {sum(plan.values())} visual tokens of {n}")

    graph = gm.graph
    with graph.inserting_after(dec.merge):
        visual = graph.call_function(visual_token_mask, tuple(dec.image_masks))
    with graph.inserting_after(visual):
        count_ok = graph.call_function(has_visual_count, (visual, n))
    with graph.inserting_after(count_ok):  # the backend turns it into a checked graph output
        check = graph.call_function(torch._assert_async, (count_ok, VISUAL_COUNT_ERROR))
    inserted = [visual, count_ok, check]
    shared = {t: t.node for t in dec.per_token}
    present = n
    all_visual, positions = visual, None  # visual mask before compaction; original token positions
    entry = None
    if token_counts is not None and plan:  # every layer then reads symbolic token counts
        entry = insert_entry_compaction(graph, dec, layout, visual, shared, token_counts)
    if entry is not None:
        visual, positions = entry.visual, entry.positions
        inserted += entry.inserted
    fused: list[int] = []
    length = dec.seq_len
    device = example_value(dec.image_masks[0]).device  # of the token-count inputs
    for layer, d in plan.items():
        site = dec.sites[layer]
        mask_tensor = next((t for t in shared if t.node is site.attn_mask), None)  # a shared mask?
        padding_mask, mask_positions = site.attn_mask, None  # where the fused scorer reads padding
        if mask_tensor is not None:
            site = dataclasses.replace(site, attn_mask=shared[mask_tensor])
            mask_positions = positions
        kept_length = None
        if d and token_counts is not None:
            # S holds `present` visual tokens, so at least present - d tokens remain.
            kept_length = token_counts.length_after(layer, length - d, device, at_least=present - d)
        length = length - d
        if can_fuse_scoring(site, scorer, scorer_fn, d):
            site, kept, nodes = insert_fused_fitprune_scoring(
                graph,
                site,
                visual,
                num_delete=d,
                causal_decoder=layout.causal,
                kept_length=kept_length,
                padding_mask=padding_mask,
                positions=mask_positions,
            )
            fused.append(layer)
        else:
            kept, nodes = insert_importance_scoring(
                graph,
                site,
                visual,
                scorer=scorer,
                scorer_fn=scorer_fn,
                num_delete=d,
                visual_count=present,
                seed=seed,
                causal_decoder=layout.causal,
                kept_length=kept_length,
            )
        visual, positions, more = insert_token_compaction(
            graph, site, kept, shared, all_visual, layout, positions
        )
        inserted += nodes + more
        present -= d

    rewrites = propagate_compaction(gm, set(inserted), fake_mode)
    graph.lint()
    gm.recompile()

    # Lengths as numbers, or as "S-52" when Dynamo made the prompt length symbolic (S).
    symbolic = not isinstance(dec.seq_len, int)
    tokens, deleted = [], 0
    for layer in sorted(dec.sites):
        tokens.append(_length(dec.seq_len, deleted, symbolic))
        deleted += plan.get(layer, 0)
    tokens.append(_length(dec.seq_len, deleted, symbolic))
    return PruneResult(plan, n, _length(dec.seq_len, 0, symbolic), tokens, rewrites, scorer, fused)


def _length(seq_len, deleted: int, symbolic: bool) -> str:
    if not symbolic:
        return str(seq_len - deleted)
    return f"S-{deleted}" if deleted else "S"
