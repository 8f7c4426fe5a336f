"""Merge deleted visual tokens into kept ones instead of dropping them (recipe option "merge").

At a pruning layer, after its attention, each deleted visual token is assigned to the kept visual
token whose hidden state *entering the layer* is most similar to its own (cosine similarity; equal
similarities: the lower position). Every kept token then carries the plain mean of itself and the
tokens assigned to it, in both parts of the residual stream the compaction gathers: the attention
output before o_proj and the residual entering the layer. o_proj is linear (an affine map at
most), and the weights of a mean sum to 1, so the layer's output at a kept token is the mean of
the unpruned outputs of its group: the merge costs two scatter-adds, not a second o_proj. A token
deleted while no visual token of its example is kept is dropped. Text is never merged (it is never
deleted). The layer's own KV cache keeps every token, as with deletion.

Differences from ToMe-style merging (Bolya et al., 2023): similarity of the hidden states rather
than of the keys, one-way (deleted into kept, chosen by the scorer), and an unweighted mean: a
token's size (how many tokens it already holds) is not carried to later layers.
"""

from __future__ import annotations

import torch


def merge_targets(
    hidden: torch.Tensor, kept: torch.Tensor, visual: torch.Tensor, real: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, S] long: the kept slot (0..K-1) each token's row goes to, or K (dropped).

    hidden: [B|1, S, C] the residual stream entering the layer; kept: [B, K] original-order indices
    of the kept tokens; visual: [B, S] bool; real: [B, K] bool, False at the void slots of a padded
    compaction (`padded_compaction`: they point at a deleted token's row, which is no kept token and
    receives nothing). Kept tokens go to their own slot; a deleted visual token to the slot of its
    most similar kept visual token.
    """
    b, k = kept.shape
    h = torch.nn.functional.normalize(hidden.float(), dim=-1).expand(b, -1, -1)  # [B, S, C]
    hk = h.gather(1, kept[:, :, None].expand(-1, -1, h.shape[-1]))  # [B, K, C]
    kept_visual = visual.gather(1, kept)  # [B, K]
    if real is not None:
        kept_visual = kept_visual & real
    similarity = (h @ hk.transpose(1, 2)).masked_fill(~kept_visual[:, None, :], float("-inf"))  # [B, S, K]
    best = similarity.argmax(dim=-1)  # [B, S] first maximum: the lowest kept position
    has_target = kept_visual.any(dim=1, keepdim=True) & visual  # [B, S]
    target = torch.where(has_target, best, k)
    slot = torch.arange(k, device=kept.device).expand(b, k)
    if real is not None:  # a void slot's row keeps the target it has as a deleted token
        slot = torch.where(real, slot, target.gather(1, kept))
    return target.scatter(1, kept, slot)  # kept tokens: their own slot


def merge_rows(x: torch.Tensor, target: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """x with its token dim `dim` (of length S) reduced to the K kept slots: each slot the mean of
    the rows `target` [B, S] sends there (slot K, the dropped tokens, is left out)."""
    b, k = kept.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, x.shape[dim]
    index = target.reshape(shape).expand(x.shape)
    out_shape = list(x.shape)
    out_shape[dim] = k + 1
    sums = torch.zeros(out_shape, dtype=torch.float32, device=x.device).scatter_add(dim, index, x.float())
    counts = torch.zeros((b, k + 1), dtype=torch.float32, device=x.device).scatter_add(
        1, target, torch.ones_like(target, dtype=torch.float32)
    )
    counts = counts.clamp(min=1).reshape([b if i == 0 else k + 1 if i == dim else 1 for i in range(x.dim())])
    return (sums / counts).narrow(dim, 0, k).to(x.dtype)
