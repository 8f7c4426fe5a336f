"""Token selection and compaction as plain tensor functions, called from the rewritten graph.

Shapes stay static: the number of kept tokens is S - d with d a constant of the recipe, so
selection is a sort, never boolean-mask indexing (which would make the length data-dependent).
"""

from __future__ import annotations

import torch


def select_kept_tokens(scores: torch.Tensor, visual: torch.Tensor, num_delete: int) -> torch.Tensor:
    """Original-order indices [B, S - num_delete] of the tokens that survive.

    The `num_delete` visual tokens with the lowest scores are deleted; ties go to the lower
    position first (stable sort). Non-visual tokens rank after every visual token, so text is
    never deleted: the pass checks each example's visual count at the merge and plans at most
    that many deletions in all, and compaction keeps the count of every example exact.
    """
    key = torch.where(visual, torch.nan_to_num(scores.float(), nan=0.0), float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices  # [B, S], lowest score first
    return torch.sort(order[:, num_delete:], dim=1).values  # [B, S - d], original order


def gather_tokens(x: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep positions `kept` [B, K] of `x` along `dim`; a batch dim of 1 is broadcast to B."""
    b, k = kept.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    index_shape = [b] + [1] * (x.dim() - 1)
    index_shape[dim] = k
    return torch.gather(x, dim, kept.reshape(index_shape).expand(gathered_shape(x, kept, dim)))


def gathered_shape(x: torch.Tensor, kept: torch.Tensor, dim: int) -> list:
    """The shape of `gather_tokens(x, kept, dim)` (what shape propagation needs, without running it)."""
    shape = [kept.shape[0], *x.shape[1:]]
    shape[dim] = kept.shape[1]
    return shape


@torch.library.custom_op("fitprune::gather_residual", mutates_args=())
def gather_residual(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`gather_tokens(x, kept, 1)` for the residual stream [B, S, D], as an op Inductor does not fuse.

    Fused, the gather reads the previous layers' unstored residual adds, and how many of them
    differs from layer to layer: each pruning layer would compile kernels of its own. Rows are
    copied whole (`index_select` on the flattened batch): on 1 CPU thread 14x faster than
    `torch.gather`'s per-element index (0.02 against 0.30 ms for 356 of 642 rows of 512).
    """
    b, k = kept.shape
    rows = x.shape[2:]
    if x.shape[0] == 1:  # one residual stream for every example (broadcast batch)
        return x[0].index_select(0, kept.reshape(-1)).reshape(b, k, *rows)
    offsets = torch.arange(b, device=kept.device)[:, None] * x.shape[1]  # example e's rows start at e * S
    flat = x.reshape(b * x.shape[1], *rows).index_select(0, (kept + offsets).reshape(-1))
    return flat.reshape(b, k, *rows)


@gather_residual.register_fake
def _gather_residual_fake(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return x.new_empty(gathered_shape(x, kept, 1))


@torch.library.custom_op("fitprune::gather_token_pairs", mutates_args=())
def gather_token_pairs(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`x` [B|1, H, S, S] (the 4-D attention mask) at kept rows and kept columns: [B, H, K, K].

    Two row copies (`index_select`) per example. Inductor lowers the two gathers of the mask into
    one kernel that indexes every element: 1.53 ms for 356 of 642 tokens on 1 CPU thread against
    0.15 ms here. Used only where the mask is an input of the compiled code (a layer partition,
    `fitprune_fx.layer_compile`): compiled whole, Inductor fuses the mask's construction into its
    gathers and computes only the kept entries, and this op would make it store the full mask.
    """
    if x.shape[0] == 1:
        if kept.shape[0] == 1:
            return x.index_select(2, kept[0]).index_select(3, kept[0])
        x = x.expand(kept.shape[0], *x.shape[1:])
    return torch.stack([x[e].index_select(1, k).index_select(2, k) for e, k in enumerate(kept)])


@gather_token_pairs.register_fake
def _gather_token_pairs_fake(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    b, k = kept.shape
    return x.new_empty((b, x.shape[1], k, k))


@torch.library.custom_op("fitprune::kept_positions", mutates_args=())
def kept_positions(positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Original positions [B, K] of the kept tokens: `positions` [B, S_l] read at `kept` [B, K].

    An op of its own so that Inductor stores the result: as a plain gather it would be fused
    into its readers, and every later pruning layer's kernels would carry one more indirection.
    """
    return gather_tokens(positions, kept, 1)


@kept_positions.register_fake
def _kept_positions_fake(positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return kept.new_empty(kept.shape)


@torch.library.custom_op("fitprune::entry_positions", mutates_args=())
def entry_positions(count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Positions 0..K-1 [B, K] for every example, K = `count`'s length and B = `like`'s batch: the
    identity compaction before the first decoder layer (`entry_compaction`), whose length then
    comes from a token-count input and is no constant of the graph."""
    k = count.shape[0]
    return torch.arange(k, device=like.device).expand(like.shape[0], k).contiguous()


@entry_positions.register_fake
def _entry_positions_fake(count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((like.shape[0], count.shape[0]), dtype=torch.long)


@torch.library.custom_op("fitprune::enter_tokens", mutates_args=())
def enter_tokens(x: torch.Tensor, count: torch.Tensor, dims: list[int], batch: int) -> torch.Tensor:
    """`x` gathered at the identity positions of `entry_positions` (its batch dim broadcast to
    `batch`), as a plain copy: its token dims `dims` take their length from `count` when compiling.

    An op of its own: as gathers, Inductor fused the identity index into the kernel that builds
    the 4-D mask, which then loaded an index per element (8.9 against 2.0 ms for that kernel at
    642 tokens, 70 recipe at hidden 512).
    """
    for d in dims:
        if x.shape[d] != count.shape[0]:
            raise RuntimeError(
                f"fitprune: {x.shape[d]} tokens enter the decoder, its entry count says {count.shape[0]} "
                "(a token-count input of the wrong length)"
            )
    return x.expand(batch, *x.shape[1:]).clone(memory_format=torch.contiguous_format)


@enter_tokens.register_fake
def _enter_tokens_fake(x: torch.Tensor, count: torch.Tensor, dims: list[int], batch: int) -> torch.Tensor:
    shape = [batch, *x.shape[1:]]
    for d in dims:
        shape[d] = count.shape[0]
    return x.new_empty(shape)


VISUAL_COUNT_ERROR = (
    "fitprune: the examples of this batch carry different numbers of visual tokens (different image "
    "counts, or images whose sizes give different counts); this pruned graph needs the same count in "
    "every example (its scorer reads the count, or the host cannot read each example's count here): "
    "use a built-in scorer that reads no count (fitprune, fastv), call the model with batch 1, or "
    "batch only prompts whose images give the same visual count"
)


def visual_token_mask(*image_masks: torch.Tensor) -> torch.Tensor:
    """[B, S] bool visual-token mask from the merges' masks ([B, S], [B, S, 1] or [B, S, D]; images
    and videos): a row is visual when any merge writes it."""
    visual = None
    for mask in image_masks:
        mask = (mask[..., 0] if mask.dim() == 3 else mask).bool()
        visual = mask if visual is None else visual | mask
    return visual


def has_visual_count(visual: torch.Tensor, per_example: int) -> torch.Tensor:
    """0-d bool: every example has exactly `per_example` visual tokens (the recipe's static counts)."""
    return (visual.sum(dim=1) == per_example).all()


def has_even_visual_count(visual: torch.Tensor, total: int) -> torch.Tensor:
    """0-d bool: every example of `visual` [B, S] holds total / B visual tokens (`total` a size of
    the graph, possibly a symbol: the counts of a graph compiled for any visual count)."""
    return (visual.sum(dim=1) * visual.shape[0] == total).all()


def has_even_merged_count(visual: torch.Tensor, hidden: int, *features: torch.Tensor) -> torch.Tensor:
    """`has_even_visual_count` with the total read off the merged features ([N, hidden] each)."""
    return has_even_visual_count(visual, sum(f.numel() // hidden for f in features))
