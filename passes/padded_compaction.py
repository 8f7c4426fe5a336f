"""Compaction for a batch whose examples hold different visual counts: void slots pad each example.

Example e deletes d_l(n_e) visual tokens after pruning layer l (the recipe applied to its own count
n_e), so examples keep different numbers of tokens. The compacted sequence takes the longest
example's length K_l (a token-count input, `token_count_inputs`); every shorter example fills its
first K_l - kept_e slots with *void* slots:

    example 0 (keeps K):      [t t v v v t t t]
    example 1 (keeps K - 2):  [_ _ t v v t t t]      _ = void slot, always at the left

A void slot copies some deleted token's row (its index points there) and is made inert:

* every attention after the compaction masks its column (`void_mask_columns` on the gathered
  4-D mask), so no query attends to it, in this prefill and in later decode steps;
* it is no visual token (the visual mask is cleared there), so no scorer counts it, and the next
  pruning layer deletes it before any real token (it keys lowest: `select_kept_padded`);
* the keys and values the layers after the compaction cache for it hold `VOID_FILL` in every
  element (`fill_void_rows`). A decode step finds a row's void slots as the run of such entries
  at the start of its cache (`pruned_cache.cut_mask_to_pruned_keys`) and masks them. Not zero:
  padding tokens whose hidden states stay zero cache zero keys and values (measured on Gemma 3),
  and those are no void slots. A computed key or value whose head-dim elements all equal one
  arbitrary constant, at kv head 0, does not happen.

Void slots lie left of every real token, tokenizer padding included, so each cache row reads
[void][padding][tokens]: the left-padded shape the decode rules of a pruned cache assume.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .locate import example_value


@torch.library.custom_op("fitprune::select_kept_padded", mutates_args=())
def select_kept_padded(
    scores: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, length: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices [B, K] into the current sequence and their validity [B, K] bool, K = `length`'s length.

    scores, visual, valid: [B, S] (valid False at void slots); keep: [B] long, the real tokens example
    e keeps. Example e deletes its void slots, then its S - void_e - keep_e lowest-scoring visual
    tokens (ties to the lower position, as `select_kept_tokens`), and keeps the rest in original
    order, right-aligned: its first K - keep_e slots are void.
    """
    b, s = scores.shape
    k = length.shape[0]
    key = torch.where(visual, torch.nan_to_num(scores.float(), nan=0.0), float("inf"))
    key = torch.where(valid, key, float("-inf"))
    order = torch.sort(key, dim=1, stable=True).indices[:, s - k :]  # [B, K] the K highest-keyed
    rank = torch.arange(k, device=scores.device).expand(b, k)
    real = rank >= (k - keep.to(scores.device))[:, None]  # the last keep_e of them are kept
    # void slots first (any order), then the kept tokens in original order
    place = torch.where(real, order + s, order)
    arranged = torch.sort(place, dim=1).indices
    return torch.gather(order, 1, arranged), torch.gather(real, 1, arranged)


@select_kept_padded.register_fake
def _select_kept_padded_fake(scores, visual, valid, length, keep):
    b, k = scores.shape[0], length.shape[0]
    return scores.new_empty((b, k), dtype=torch.long), scores.new_empty((b, k), dtype=torch.bool)


def void_mask_columns(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The 4-D attention mask [B|1, 1|H, K, K] with the columns of void slots (`valid` [B, K] False)
    forbidden: bool masks become False there, additive ones dtype-min."""
    columns = valid[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & columns
    return mask.masked_fill(~columns, torch.finfo(mask.dtype).min)


VOID_FILL = -0.0078125  # -2**-7: exact in fp32, bf16 and fp16; finite in any attention logit


def fill_void_rows(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Keys or values [B, Hkv, K, D] with the rows of void slots set to VOID_FILL (what a decode
    step finds)."""
    return torch.where(valid[:, None, :, None], states, torch.full((), VOID_FILL, dtype=states.dtype))


def leading_void_slots(key: torch.Tensor, value: torch.Tensor, old: int) -> torch.Tensor:
    """[B] long: the void slots at the start of each cache row (of its first `old` entries): the run
    of entries whose key and value at kv head 0 are VOID_FILL throughout (`fill_void_rows`)."""
    void = (key[:, 0, :old] == VOID_FILL).all(dim=-1) & (value[:, 0, :old] == VOID_FILL).all(dim=-1)
    return void.long().cumprod(dim=1).sum(dim=1)  # [B]


def has_example_counts(visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """0-d bool: example e of `visual` [B, S] holds `counts[e]` visual tokens (the host's counts, [B])."""
    return (visual.sum(dim=1) == counts.to(visual.device)).all()


def _cache_concat(states: fx.Node, layer: int, layout) -> fx.Node | None | bool:
    """The `cat` that appends a layer's keys or values to its cache, walking up from the attention's
    operand `states` through single-input ops in the layer (GQA repeats, copies). None: the walk
    found no cache (nothing of it is a graph output); False: not understood."""
    output = next(n for n in states.graph.nodes if n.op == "output")
    node = states
    for _ in range(16):
        if node.op == "call_function" and node.target in (torch.cat, torch.ops.aten.cat.default):
            return node
        if output in node.users:
            return False  # written back without a cat we know
        inputs = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
        if len(inputs) != 1 or layout.layer_index(node) != layer:
            return None
        node = inputs[0]
    return False


def writes_caches(sites: dict, layout) -> bool:
    """Whether any decoder layer writes a KV cache (or writes its keys back some way not understood)."""
    return any(_cache_concat(site.key, layer, layout) is not None for layer, site in sites.items())


class PaddedCompaction:
    """The graph side of a batch whose examples hold different visual counts (see the module doc)."""

    def __init__(self, graph: fx.Graph, keep: fx.Node, visual: fx.Node) -> None:
        self.graph = graph
        self.keep = keep  # [B, P] long: real tokens example e keeps after the P pruning layers
        with graph.inserting_after(visual):
            self.valid = graph.call_function(torch.ones_like, (visual,), {"dtype": torch.bool})
        self.valid_after: dict[int, fx.Node] = {}  # pruning layer -> validity of the tokens after it
        self.inserted: list[fx.Node] = [self.valid]

    def select(self, kept: fx.Node, step: int) -> fx.Node:
        """Replace the selection `kept` (scores, visual, length) of the `step`-th pruning layer by the
        padded one; returns the new kept-indices node."""
        graph = self.graph
        scores, visual, length = kept.args[0], kept.args[1], kept.args[2]
        # outside the layers, a column of its own (no view at an offset): the layers after pruning
        # layers of one shape then take inputs of one kind and share a compiled program
        with graph.inserting_after(self.keep):
            column = graph.call_function(torch.select, (self.keep, 1, step))
        with graph.inserting_after(column):
            keep = graph.call_method("contiguous", (column,))
        with graph.inserting_before(kept):
            pair = graph.call_function(
                torch.ops.fitprune.select_kept_padded.default, (scores, visual, self.valid, length, keep)
            )
            self.valid = graph.call_function(operator.getitem, (pair, 1))
            indices = graph.call_function(operator.getitem, (pair, 0))  # gathers go after it
        kept.replace_all_uses_with(indices)
        graph.erase_node(kept)
        self.inserted += [column, keep, pair, indices, self.valid]
        return indices

    def void(self, layer: int, visual: fx.Node, shared: dict) -> fx.Node:
        """After layer `layer`'s compaction: forbid the columns of void slots in the compacted
        attention masks of `shared` (per-token tensor -> node the later layers read; updated) and
        clear their visual mark; returns the visual mask."""
        graph = self.graph
        self.valid_after[layer] = self.valid
        for tensor, mask in list(shared.items()):
            if tensor.role != "attention_mask":
                continue
            with graph.inserting_after(mask):
                voided = graph.call_function(void_mask_columns, (mask, self.valid))
            mask.replace_all_uses_with(voided, delete_user_cb=lambda user, v=voided: user is not v)
            shared[tensor] = voided
            self.inserted.append(voided)
        with graph.inserting_after(visual):
            cleared = graph.call_function(torch.logical_and, (visual, self.valid))
        self.inserted.append(cleared)
        return cleared

    @staticmethod
    def understands_caches(sites: dict, first: int, layout) -> bool:
        """Whether every layer after pruning layer `first` writes its cache through a known `cat`, or
        writes none (`_cache_concat`)."""
        return all(
            _cache_concat(states, layer, layout) is not False
            for layer, site in sites.items()
            if layer > first
            for states in (site.key, site.value)
        )

    def fill_cached_void_rows(self, sites: dict, layout) -> bool:
        """Fill the cached keys and values of void slots in every layer after a pruning layer; False
        (graph untouched) when a layer's cache write is not understood."""
        concats = {}
        for layer, site in sites.items():
            earlier = [p for p in self.valid_after if p < layer]
            if not earlier:
                continue
            for states in (site.key, site.value):
                cat = _cache_concat(states, layer, layout)
                if cat is False:
                    return False
                if cat is not None:
                    concats[cat] = self.valid_after[max(earlier)]
        for cat, valid in concats.items():
            with self.graph.inserting_after(cat):
                filled = self.graph.call_function(fill_void_rows, (cat, valid))
            cat.replace_all_uses_with(filled, delete_user_cb=lambda user, z=filled: user is not z)
            self.inserted.append(filled)
        return True
