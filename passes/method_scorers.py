"""Published token-pruning criteria as scorers: the workbench's built-ins beside FitPrune and FastV.

Each reads one pruning layer (`ScoringInputs`) and returns [B, S] scores, lower deleted first; the
pass's selection and compaction are the same for all of them, so methods differ here only. The
recipe says where and how many tokens go (`fitprune_fx.recipe_shapes` builds the papers' schedules
at a FLOPs budget); the scorer says which. Their eager references, written apart from these, are
in `fitprune_fx/reference_methods.py`.
"""

from __future__ import annotations

import torch

from .scorers import (
    ScoringInputs,
    allowed_keys,
    attention_probs,
    instruction_rows,
    last_rows,
    register_scorer,
)


@register_scorer("last_token")
def last_token_score(inputs: ScoringInputs) -> torch.Tensor:
    """The last prompt token's attention over the visual tokens alone, averaged over heads.

    After PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language
    Models via Pyramid Visual Redundancy Reduction"), which ranks image tokens by the last
    instruction token's attention, a softmax over the image keys only. Used with the staged recipe
    (`recipe_shapes.staged_recipe`) it is PyramidDrop's schedule. Differences from the paper: the
    query and keys are the pruning layer's own (the paper projects the next stage's first layer),
    and keys the token may not attend to (a sliding window, padding) are left out of the softmax.
    """
    last = last_rows(inputs)  # [B, 1]
    q = _row(inputs.query, last).float()  # [B, H, D]
    k = inputs.key.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (k @ q[:, :, :, None])[..., 0] * inputs.scale  # [B, H, K]
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        logits = logits + _row(inputs.attn_mask, last).float()
    allowed = _row(allowed_keys(inputs), last).any(dim=1)  # [B, K]
    logits = inputs.chunk_columns(logits)  # [B, H, S]
    allowed = inputs.chunk_columns(allowed) & inputs.visual  # [B, S]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.nan_to_num(logits.softmax(dim=-1), nan=0.0).mean(dim=1)  # [B, S]


def _row(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B|1, H', S, K] -> [B, H', K]: row rows[b] of dim 2 for each example b (rows: [B, 1])."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    index = rows[:, None, :, None].expand(-1, x.shape[1], 1, x.shape[3])
    return x.gather(2, index)[:, :, 0]


@register_scorer("text_raters")
def text_raters_score(inputs: ScoringInputs) -> torch.Tensor:
    """Attention to each visual token from the instruction tokens that look at the image most.

    After SparseVLM (Zhang et al., 2024, "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference"): A = head-mean attention probabilities; an instruction token
    t (text after the last visual token) rates the image if its mean attention to the visual
    tokens is at least the mean of that over all instruction tokens; a visual token's score is the
    mean of A over the raters' rows. Differences from the paper: the number deleted comes from the
    recipe (the paper sizes it per layer from the rank of the attention matrix), and deleted tokens
    are dropped, not recycled into a few merged tokens.
    """
    probs = inputs.chunk_columns(attention_probs(inputs))  # [B, H, S, S]
    mean = probs.mean(dim=1)  # [B, S, S] head mean
    instruction = instruction_rows(inputs)  # [B, S]
    vis = inputs.visual.float()
    n_visual = vis.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    relevance = (mean * vis[:, None, :]).sum(dim=-1) / n_visual  # [B, S] per row
    n_text = instruction.sum(dim=1, keepdim=True).clamp(min=1)
    threshold = (relevance * instruction).sum(dim=1, keepdim=True) / n_text  # [B, 1]
    raters = instruction & (relevance >= threshold)  # [B, S]
    n_raters = raters.sum(dim=1, keepdim=True).clamp(min=1)
    return (mean * raters[:, :, None]).sum(dim=1) / n_raters  # [B, S]


@register_scorer("duplication")
def duplication_score(inputs: ScoringInputs) -> torch.Tensor:
    """Keep the visual tokens least like a few pivots: duplication, not importance.

    After DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More"): the `pivots` visual tokens (scorer option, default 8) whose keys
    have the largest L2 norm (all heads together; equal norms: the lower position) are kept
    (score 2); every other visual token scores minus its largest cosine similarity, over the
    pivots, of the hidden states entering the layer, so the most duplicated go first. Reads no
    attention probabilities: the layer's attention stays the model's own kernel. Differences
    from the paper: pivots are chosen over all images of an example together (the paper's
    LLaVA-NeXT setting picks them per crop), and its other pivot criteria are left out.
    """
    if inputs.hidden is None:
        raise ValueError(
            "the duplication scorer reads the hidden states entering the layer (ScoringInputs.hidden)"
        )
    pivots = int(inputs.options.get("pivots", 8))
    visual = inputs.visual
    key = inputs.chunk_columns(inputs.key.float().transpose(-1, -2))  # [B, Hkv, D, S]
    norm = key.pow(2).sum(dim=(1, 2))  # [B, S] squared L2 norm over heads and dims
    norm = norm.masked_fill(~visual, -1.0)  # never a pivot unless visual (norms are >= 0)
    order = torch.sort(norm, dim=1, descending=True, stable=True).indices  # [B, S]
    b, s = visual.shape
    rank = torch.empty_like(order).scatter(1, order, torch.arange(s, device=order.device).expand(b, s))
    is_pivot = (rank < pivots) & visual  # [B, S]
    # the pivots' hidden states in p slots (slot p collects the rest): no slice of S, whose length
    # may be a symbol of the graph (a slice would need a guard on it)
    slot = torch.where(is_pivot, rank, pivots)  # [B, S]
    h = torch.nn.functional.normalize(inputs.hidden.float(), dim=-1).expand(b, -1, -1)  # [B, S, C]
    hp = h.new_zeros(b, pivots + 1, h.shape[-1]).scatter_add(1, slot[:, :, None].expand_as(h), h)
    real = torch.zeros(b, pivots + 1, dtype=torch.bool, device=h.device).scatter(1, slot, is_pivot)
    similarity = (h @ hp.transpose(1, 2)).masked_fill(~real[:, None, :], float("-inf"))  # [B, S, p + 1]
    return torch.where(is_pivot, 2.0, -similarity.amax(dim=-1))


@register_scorer("random_per_example")
def random_per_example_score(inputs: ScoringInputs) -> torch.Tensor:
    """A fresh uniform draw for every example, layer and call: the baseline a method must beat.

    `random` deletes the same ordinals in every example (seeded constants, exact against its
    reference); this one draws from torch's generator inside the graph, so over a benchmark its
    choices are independent across examples and its mean accuracy is pinned down by the number of
    examples rather than by a handful of seeds. Reproducible with `torch.manual_seed` before the
    calls on one machine and compiler (Inductor draws from its own Philox stream, not eager's).
    """
    return torch.rand(inputs.visual.shape, device=inputs.visual.device)
