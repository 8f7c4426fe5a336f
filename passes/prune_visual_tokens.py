"""The FitPrune pass: score and delete visual tokens after the recipe's decoder layers.

Driver only: locating (`locate`), scoring (`insert_scoring`), compaction (`insert_compaction`)
and size rewriting (`sequence_length`) live in their own modules.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from . import method_scorers  # noqa: F401  (registers the published methods' scorers)
from .cache_positions import cache_position_ops, insert_cache_positions, token_positions
from .causal_mask import insert_causal_mask, needs_causal_mask
from .entry_compaction import insert_entry_compaction
from .insert_compaction import insert_token_compaction
from .insert_fused_scoring import can_fuse_scoring, insert_fused_fitprune_scoring
from .insert_scoring import insert_importance_scoring
from .layout import DecoderLayout
from .locate import CacheContinuation, UnsupportedGraph, example_value, locate_decoder
from .padded_compaction import PaddedCompaction, has_example_counts, writes_caches
from .scorers import CONTINUING_SCORERS, COUNT_FREE_SCORERS, SCORERS
from .sequence_length import propagate_compaction
from .sharded_heads import SHARDED_SCORERS, head_sharding
from .token_count_inputs import TokenCountInputs
from .token_ops import (
    VISUAL_COUNT_ERROR,
    has_even_merged_count,
    has_even_visual_count,
    has_visual_count,
    visual_token_mask,
)


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
    any_visual_count: bool = False  # one graph for every visual count and batch size (sized per call)
    padded: bool = False  # examples may hold different visual counts (`padded_compaction`)


def prune_visual_tokens(
    gm: fx.GraphModule,
    layout: DecoderLayout,
    deletions_for,
    fake_mode,
    *,
    scorer: str = "fitprune",
    scorer_fn: Callable | None = None,
    seed: int = 0,
    scorer_options: tuple = (),
    merge: bool = False,
    token_counts: TokenCountInputs | None = None,
    windows: Sequence[int] = (),
    num_heads: int | None = None,
) -> PruneResult:
    """Rewrite `gm` in place. `layout` names the decoder's modules (from its model family);
    `deletions_for(n_visual) -> {layer: count}` gives the static plan.

    A layer listed with count 0 still gets scoring and (identity) compaction: that is how the
    scoring overhead is measured and how tests check that the machinery itself is exact.

    With `token_counts`, every layer that deletes tokens gets an extra placeholder whose length is
    its kept token count (`token_count_inputs`): the caller must pass `token_counts.values(args)`
    after the graph's own inputs `args`.

    `windows`: the decoder layers that attend within a sliding window (`attention_marks`); their
    caches must record their keys' positions (`cache_positions`). `num_heads`: the model's query
    heads, to check a tensor-parallel graph's shards against (`sharded_heads`). `scorer_options`:
    the recipe's options for the scorer, as (name, value) pairs of plain values. `merge`: deleted
    visual tokens are merged into kept ones (`token_merging`) instead of dropped.

    FitPrune's scoring at a deleting layer comes from the layer's own attention where it can
    (`insert_fused_scoring`: one attention instead of two on CPU).

    Raises UnsupportedGraph (graph untouched) when the graph is not understood or the plan does
    not fit it.
    """
    # Built-in scorers that read no count: the graph may serve any visual count (sized per call).
    count_free = scorer in COUNT_FREE_SCORERS and scorer_fn in (None, SCORERS.get(scorer))
    dec = locate_decoder(gm, layout, specialize=not (token_counts is not None and count_free))
    per_call = _per_call_sizes(dec, token_counts, count_free)
    n = dec.visual_per_example  # this trace's (a hint when per_call)
    plan = dict(sorted(deletions_for(n).items()))
    missing = [layer for layer in plan if layer not in dec.sites]
    if missing:
        raise UnsupportedGraph(
            f"recipe prunes after layers {missing}, but this graph holds decoder layers "
            f"{min(dec.sites)}..{max(dec.sites)}"
        )
    if sum(plan.values()) > n:
        raise UnsupportedGraph(f"recipe deletes {sum(plan.values())} visual tokens of {n}")
    builtin = scorer in CONTINUING_SCORERS and scorer_fn in (None, SCORERS.get(scorer))
    if dec.continues and not builtin:
        raise CacheContinuation(
            f"this prompt chunk brings an image but continues an existing KV cache, and the scorer "
            f"{scorer!r} is not one of the built-ins that score a chunk against its cache "
            f"({', '.join(sorted(CONTINUING_SCORERS))}: `ScoringInputs.continues`); this chunk runs "
            "unpruned (exact) against the cache as it is"
        )
    if dec.continues and {layout.layer_index(op) for op in cache_position_ops(gm.graph)} < set(dec.sites):
        raise CacheContinuation(
            "this prompt chunk brings an image but continues an existing KV cache whose layers' updates "
            "record no key positions (a transformers release without the keyword channel, or a static "
            "cache); this chunk runs unpruned (exact) against the cache as it is"
        )
    if windows and not cache_position_ops(gm.graph) and writes_caches(dec.sites, layout):
        raise UnsupportedGraph(
            f"decoder layers {windows} use sliding-window attention, and their cache updates record no "
            "key positions: this transformers release does not hand the attention's keyword arguments "
            "to the cache update, so a pruned cache cannot count a window in original positions; "
            "upgrade transformers (5.25 does) to prune this model"
        )

    shards = head_sharding(dec.sites, num_heads)  # tensor parallelism: each rank holds some heads
    if shards is not None and (scorer not in SHARDED_SCORERS or scorer_fn not in (None, SCORERS.get(scorer))):
        raise UnsupportedGraph(
            f"the attention heads are split over {shards.size} tensor-parallel ranks, and the scorer "
            f"{getattr(scorer_fn, '__name__', scorer)!r} sees one rank's heads; the built-in scorers "
            f"{', '.join(sorted(SHARDED_SCORERS))} combine heads across ranks"
        )
    if shards is not None and dec.continues:
        raise CacheContinuation(
            f"this prompt chunk brings an image but continues an existing KV cache, and the heads are "
            f"split over {shards.size} tensor-parallel ranks: later-turn images are not checked across "
            "ranks; this chunk runs unpruned (exact) against the cache as it is"
        )

    if merge:
        _check_merge(dec, shards)

    graph = gm.graph
    device = example_value(dec.image_masks[0]).device  # of the token-count inputs
    with graph.inserting_after(dec.merge):
        visual = graph.call_function(visual_token_mask, tuple(dec.image_masks))
    keep = None  # examples may hold different visual counts (void slots pad the shorter ones)
    if per_call is not None and plan and dec.example_counts is not None and needs_causal_mask(dec):
        insert_causal_mask(graph, dec, fake_mode)  # void slots need a mask to hide them
    if per_call is not None and _can_pad(dec, plan, layout):
        token_counts.read_example_counts(dec.example_counts, dec.counts_from_mask)
        rows = per_call.keep_rows(list(plan), deletions_for)
        keep = token_counts.per_example_input(
            "fitprune_kept_per_example", rows, dec.batch_size, len(plan), device
        )
    with graph.inserting_after(visual):
        if not plan or (keep is not None and dec.counts_from_mask):
            # nothing to check: an empty recipe deletes nothing whatever the counts, and counts read
            # off the merge's own mask are the visual mask's row sums by construction
            count_ok = graph.call_function(torch.ones, ((),), {"dtype": torch.bool, "device": device})
        elif keep is not None:
            count_ok = graph.call_function(has_example_counts, (visual, dec.example_counts))
        elif per_call is None:
            count_ok = graph.call_function(has_visual_count, (visual, n))
        elif len(dec.visual_total_from) == 1:  # the mark's count
            count_ok = graph.call_function(has_even_visual_count, (visual, *dec.visual_total_from))
        else:  # hidden size, merged features
            count_ok = graph.call_function(has_even_merged_count, (visual, *dec.visual_total_from))
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
    padded = None if keep is None else PaddedCompaction(graph, keep, visual)
    fused: list[int] = []
    scoring: dict[int, fx.Node] = {}  # pruning layer -> its scorer's node (unfused)
    after_pruning: dict[int, tuple[fx.Node, fx.Node | None]] = {}  # kept positions, validity
    length = dec.seq_len
    for step, (layer, d) in enumerate(plan.items()):
        site = dec.sites[layer]
        mask_tensor = next((t for t in shared if t.node is site.attn_mask), None)  # a shared mask?
        padding_mask, mask_positions = site.attn_mask, None  # where the fused scorer reads padding
        if mask_tensor is not None:
            site = dataclasses.replace(site, attn_mask=shared[mask_tensor])
            mask_positions = positions
        kept_length = None
        if per_call is not None:
            kept_length = token_counts.length_per_call(
                layer, per_call.kept_after(layer, deletions_for), per_call.sizes, dec.seq_len, device
            )
            if kept_length is None:
                raise UnsupportedGraph(f"fewer than 2 tokens would remain after layer {layer}")
        elif d and token_counts is not None:
            # S holds `present` visual tokens, so at least present - d tokens remain.
            kept_length = token_counts.length_after(layer, length - d, device, at_least=present - d)
        length = length - d
        if not dec.continues and shards is None and can_fuse_scoring(site, scorer, scorer_fn, d):
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
            scorer_positions = positions
            if positions is None:  # the scorer reads original positions: the identity up to here
                with graph.inserting_after(all_visual):
                    scorer_positions = graph.call_function(token_positions, (all_visual,))
                inserted.append(scorer_positions)
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
                continues=dec.continues,
                shards=shards,
                positions=scorer_positions,
                scorer_options=scorer_options,
                count_free=count_free,
            )
            scoring[layer] = nodes[0]
        if padded is not None:
            kept = padded.select(kept, step)
        visual, positions, more = insert_token_compaction(
            graph,
            site,
            kept,
            shared,
            all_visual,
            layout,
            positions,
            merge_visual=visual if merge else None,
            merge_real=None if padded is None else padded.valid,
        )
        if padded is not None:
            visual = padded.void(layer, visual, shared)
        after_pruning[layer] = (positions, None if padded is None else padded.valid)
        inserted += nodes + more
        present -= d
    if padded is not None:
        padded.fill_cached_void_rows(dec.sites, layout)
        inserted += padded.inserted
    if dec.continues:
        inserted += _continue_cache_positions(graph, dec, layout, after_pruning, entry, all_visual, scoring)
    else:
        inserted += _record_cache_positions(graph, dec, layout, after_pruning, entry, all_visual)

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
    result = PruneResult(plan, n, _length(dec.seq_len, 0, symbolic), tokens, rewrites, scorer, fused)
    result.any_visual_count = per_call is not None and not (
        isinstance(dec.visual_total, int) and isinstance(dec.batch_size, int)
    )
    result.padded = padded is not None
    return result


def _check_merge(dec, shards) -> None:
    """Token merging runs where a test checked it against the eager reference: a call that starts
    its sequence, on one process."""
    if dec.continues:
        raise CacheContinuation(
            "this prompt chunk brings an image but continues an existing KV cache, and token merging "
            "is not defined for a later turn; this chunk runs unpruned (exact) against the cache as it is"
        )
    if shards is not None:
        raise UnsupportedGraph(
            f"token merging (recipe option merge) is not checked across {shards.size} tensor-parallel "
            "ranks; drop the option to prune this model"
        )


def _entering_positions(graph, dec, after_pruning: dict, entry, all_visual) -> tuple[dict, list[fx.Node]]:
    """layer -> (original positions [B, K] of the tokens entering it, their validity or None): the
    last earlier pruning layer's kept tokens, or the identity (the entry compaction's positions
    where there is one) up to the first pruning layer; and the nodes inserted for the identity."""
    inserted, entering = [], {}
    identity = entry.positions if entry is not None else None
    for layer in dec.sites:
        earlier = [p for p in after_pruning if p < layer]
        if earlier:
            entering[layer] = after_pruning[max(earlier)]
            continue
        if identity is None:
            with graph.inserting_after(all_visual):
                identity = graph.call_function(token_positions, (all_visual,))
            inserted.append(identity)
        entering[layer] = (identity, None)
    return entering, inserted


def _record_cache_positions(graph, dec, layout, after_pruning: dict, entry, all_visual) -> list[fx.Node]:
    """A call that starts its sequence: every layer's cache records its keys' positions (the ones up
    to the first pruning layer the identity): one representation in every pruned graph, so decode
    graphs are shared across them."""
    entering, inserted = _entering_positions(graph, dec, after_pruning, entry, all_visual)
    return inserted + list(insert_cache_positions(graph, layout, entering).values())


def _continue_cache_positions(
    graph, dec, layout, after_pruning: dict, entry, all_visual, scoring: dict
) -> list[fx.Node]:
    """A chunk that continues a cache: each layer caches its old keys' positions and those of the
    chunk's tokens entering it (`continued_positions`; the whole chunk up to the first pruning
    layer), and attends at them: where the layer's attention read its cache's positions already
    (they were recorded), it now reads these; where it read the mask as it is (a cache that held
    every position), the mask is taken at them here (`positioned_mask`), so its columns follow
    the compacted chunk; a pruning layer's scorer (`scoring`) then reads that mask too."""
    from fitprune_fx.positioned_cache import positioned_mask

    entering, inserted = _entering_positions(graph, dec, after_pruning, entry, all_visual)
    ops = {layout.layer_index(op): op for op in cache_position_ops(graph)}
    unrecorded = {layer for layer, op in ops.items() if example_value(op.args[0]).dim() == 1}
    seen = {layer: op.args[2] for layer, op in ops.items()}
    replaced = insert_cache_positions(graph, layout, entering, chunk=all_visual)
    inserted += list(replaced.values())
    for layer in sorted(set(replaced) & unrecorded):
        sdpa = dec.sites[layer].sdpa
        mask = sdpa.kwargs["attn_mask"] if "attn_mask" in sdpa.kwargs else sdpa.args[3]
        with graph.inserting_before(sdpa):
            keys = graph.call_function(operator.getitem, (replaced[layer], 1))
            taken = graph.call_function(positioned_mask, (mask, keys, seen[layer], 0, None))
        if "attn_mask" in sdpa.kwargs:
            sdpa.update_kwarg("attn_mask", taken)
        else:
            sdpa.update_arg(3, taken)
        if layer in scoring:
            scoring[layer].update_arg(2, taken)
        inserted += [keys, taken]
    return inserted


@dataclass
class _PerCallSizes:
    """Sizes that change from call to call in one graph: the kept counts are computed per call."""

    seq_len: int | torch.SymInt
    batch: int | torch.SymInt
    visual_total: int | torch.SymInt

    @property
    def sizes(self) -> list:
        return [self.seq_len, self.batch, self.visual_total]

    def counts(self, values: dict, counts: list[int] | None) -> list[int]:
        """Each example's visual count: read on the host, or total / B (every example alike)."""
        if counts is not None:
            return counts
        batch = _value(self.batch, values)
        return [_value(self.visual_total, values) // batch] * batch

    def kept_after(self, layer: int, deletions_for) -> Callable[[dict, list | None], int]:
        """(values of the size symbols, per-example counts) -> tokens kept after `layer`: S minus the
        deletions up to it, the recipe applied to each example's own count; the longest example's."""

        def kept(values: dict, counts: list[int] | None) -> int:
            deleted = [_deleted(deletions_for(n), layer) for n in self.counts(values, counts)]
            return _value(self.seq_len, values) - min(deleted)

        return kept

    def keep_rows(self, layers: list[int], deletions_for) -> Callable[[dict, list | None], list]:
        """(values, counts) -> [B, P]: the real tokens example e keeps after each pruning layer."""

        def rows(values: dict, counts: list[int] | None) -> list[list[int]]:
            s = _value(self.seq_len, values)
            plans = [deletions_for(n) for n in self.counts(values, counts)]
            return [[s - _deleted(plan, layer) for layer in layers] for plan in plans]

        return rows


def _deleted(plan: dict[int, int], layer: int) -> int:
    return sum(d for at, d in plan.items() if at <= layer)


def _can_pad(dec, plan: dict, layout) -> bool:
    """Whether a batch of different visual counts can be compacted with void slots here: the host
    reads the counts (`example_counts`), a 4-D mask carries the void columns, and the caches
    after the first pruning layer are written where void rows can be filled."""
    return (
        bool(plan)
        and dec.example_counts is not None
        and any(t.role == "attention_mask" for t in dec.per_token)
        and PaddedCompaction.understands_caches(dec.sites, min(plan), layout)
    )


def _value(size: int | torch.SymInt, values: dict) -> int:
    return size if isinstance(size, int) else int(size.node.expr.xreplace(values))


def _per_call_sizes(dec, token_counts: TokenCountInputs | None, count_free: bool) -> _PerCallSizes | None:
    """The sizes a graph compiled for any visual count reads per call; None when the visual count
    and the batch are static and one count per example is all the batch can hold (batch 1, or no
    per-example counts to read: the plan is then constant), or a size cannot be read off the call's
    arguments (they are then made static with a guard: a graph per value). A static batch of
    several examples whose counts the host reads is sized per call: its examples may split the
    total differently on every call (a first call that mixes image sizes)."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    total, batch = dec.visual_total, dec.batch_size
    if isinstance(total, int) and isinstance(batch, int):
        several = batch > 1 and dec.example_counts is not None and count_free and token_counts is not None
        return _PerCallSizes(dec.seq_len, batch, total) if several else None
    sizes = _PerCallSizes(dec.seq_len, batch, total)
    if token_counts is not None and token_counts.can_read(sizes.sizes):
        return sizes
    dec.visual_total, dec.batch_size = guard_int(total), guard_int(batch)
    return None


def _length(seq_len, deleted: int, symbolic: bool) -> str:
    if not symbolic:
        return str(seq_len - deleted)
    return f"S-{deleted}" if deleted else "S"
