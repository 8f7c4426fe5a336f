"""Pruning as masking: a second, independent oracle that runs inside transformers' own code.

A visual token deleted after layer l can stay in the sequence if no query of a layer after l may
attend to it, in the prefill and in every later forward call (layers up to l keep seeing it, as
their caches do). For every kept token that gives the same outputs as removing it, positions
untouched (DESIGN.md section 2). This module implements exactly that as an attention function
for an unpruned, uncompiled model, so transformers' own `generate` — every cache operation and
generation mode — runs the pruned semantics without any code of ours around the cache.

How the deletions travel with the cache: at a layer after l, the cached keys of tokens deleted
after l are overwritten with NaN (in the cache tensor itself, which `DynamicCache.update` hands
to the attention function), and every key column holding NaN is masked. Crop, beam reorder,
batch repeat/select and deepcopy therefore carry the deletions along with the keys.

It shares nothing with the FX pass or with `fitprune_fx.pruned_cache`; the per-example scorer
arithmetic (`_score_visual`, `lowest_first`) is the eager reference's.

Semantics: a forward call that starts a sequence (no cached tokens) and holds visual tokens is
pruned by `prune`; a later chunk that holds visual tokens (a chat turn with a new image) is pruned
by `later_turns` if given, else it runs unpruned against the cache as it is, as do decode steps
and text-only turns. A later chunk is scored with its own query rows from probabilities over the
whole context (cache and chunk), its own visual tokens as rows and columns
(`fitprune_fx.reference_continuation`, which states the same rule by explicit removal). Padding
rows are never visual and never deleted, wherever they sit. A sliding-window layer counts its
window in original positions: nothing moves here, so the mask transformers builds for it is the
window, and a deleted token inside it is masked like any other.

    with MaskingReference(model, prune={1: 10, 2: 8}) as oracle:
        out = model.generate(**inputs, max_new_tokens=8)   # pruned semantics, unpruned shapes
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .families import family_for
from .reference import SCORERS, _score_visual, lowest_first
from .reference_methods import NEEDS_LAYER_STATE

ATTENTION_NAME = "fitprune_masking_reference"
_ACTIVE: list[MaskingReference] = []


class MaskingReference:
    """Context manager: the model's text attention applies `prune` by masking (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        prune: dict[int, int],
        scorer: str = "fitprune",
        scorer_options: dict | None = None,
        later_turns: dict[int, int] | None = None,
    ) -> None:
        if (scorer_options or {}).get("merge"):
            raise ValueError(
                "pruning as masking deletes tokens; token merging (option merge) has no mask form"
            )
        if scorer not in SCORERS or scorer in NEEDS_LAYER_STATE:
            raise ValueError(
                f"unknown scorer {scorer!r} for pruning as masking (it sees attention only); expected one "
                f"of {[s for s in SCORERS if s not in NEEDS_LAYER_STATE]}"
            )
        self.model = model
        self.prune = {int(k): int(v) for k, v in prune.items()}
        self.later_turns = None if later_turns is None else {int(k): int(v) for k, v in later_turns.items()}
        self.scorer = scorer
        self.options = dict(scorer_options or {})
        family = family_for(model)
        self.image_token_id = family.image_token_id(model.config)
        self.visual_ids = torch.tensor(family.visual_token_ids(model.config))  # images (and videos)
        self.deleted: dict[
            int, Tensor
        ] = {}  # layer -> [B, q] bool, chunk tokens deleted after it (last pruned call)
        self._chunk: dict[str, Tensor | None] = {}
        self._gone: Tensor | None = None  # [B, q] bool: chunk rows deleted so far in this forward
        self._plan: dict[int, int] | None = None  # this forward's deletions (None: unpruned)

    # -- switching the model over and back ---------------------------------------------------

    def __enter__(self) -> MaskingReference:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, _attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        self._previous = self.model.config.get_text_config()._attn_implementation
        self.model.set_attn_implementation({"text_config": ATTENTION_NAME})
        self._hook = self.model.register_forward_pre_hook(self._capture, with_kwargs=True)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        self._hook.remove()
        self.model.set_attn_implementation({"text_config": self._previous})

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Remember the call's token ids and 2-D padding mask: the attention function needs them."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("MaskingReference needs input_ids (visual tokens are found by their token ids)")
        self._chunk = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}

    # -- the attention function --------------------------------------------------------------

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, **kw):
        """Eager attention with deleted columns masked; deletes after the recipe's layers.

        query [B, H, q, D]; key/value [B, Hkv, K, D] (cache + chunk, the cache tensors themselves);
        mask [B|1, 1|H, q, K] bool/additive or None (causal). Returns ([B, q, H, D], None).
        """
        layer = module.layer_idx
        B, H, q, D = query.shape
        K = key.shape[-2]
        if layer == 0:  # a new forward call
            self._gone = torch.zeros(B, q, dtype=torch.bool, device=query.device)
            images = bool(self._visual(self._chunk["input_ids"]).any())
            self._plan = (self.prune if K == q else self.later_turns) if images else None
            if self._plan is not None:
                self.deleted = {}
        # deletions after earlier layers: hide those keys from this layer on, in its cache too
        key[:, :, K - q :].masked_fill_(self._gone[:, None, :, None], float("nan"))
        hidden = key.isnan().any(dim=-1).any(dim=1)  # [B, K]

        allowed = _allowed(mask, B, q, K, query.device) & ~hidden[:, None, None, :]  # [B, 1|H, q, K]
        groups = H // key.shape[1]
        k = key.nan_to_num().repeat_interleave(groups, dim=1).float()
        v = value.repeat_interleave(groups, dim=1)
        scaling = kw.get("scaling") or D**-0.5
        logits = (query.float() @ k.transpose(-1, -2)) * scaling  # [B, H, q, K]
        if mask is not None and mask.dtype != torch.bool:
            logits = logits + mask.float()
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # fp32
        out = (probs.to(v.dtype) @ v).transpose(1, 2).contiguous()  # [B, q, H, D]

        if self._plan is not None and layer in self._plan:
            self._delete(layer, probs)
        return out, None

    def _visual(self, ids: Tensor) -> Tensor:
        return torch.isin(ids, self.visual_ids.to(ids.device))

    def _delete(self, layer: int, probs: Tensor) -> None:
        """Score the chunk's visual rows still present (columns: the chunk's, the last q) and hide
        the d lowest."""
        ids, mask2d = self._chunk["input_ids"], self._chunk["attention_mask"]
        valid = (
            torch.ones_like(ids, dtype=torch.bool) if mask2d is None else mask2d[:, -ids.shape[1] :].bool()
        )
        visual = self._visual(ids) & valid  # [B, q]
        d = self._plan[layer]
        past = probs.shape[-1] - probs.shape[-2]  # cached columns before the chunk's
        for b in range(ids.shape[0]):
            rows = (~self._gone[b]).nonzero().squeeze(1)  # present rows, in position order
            vis = visual[b, rows].nonzero().squeeze(1)
            if vis.numel() < d:
                raise ValueError(
                    f"layer {layer}: cannot delete {d} of {vis.numel()} visual tokens (example {b})"
                )
            if d == 0 or vis.numel() == 0:
                continue
            present = probs[b][:, rows][:, :, past + rows]  # [H, n, n] over present chunk tokens only
            score = _score_visual(self.scorer, present, visual[b, rows], valid[b, rows], layer, self.options)
            self._gone[b, rows[vis[lowest_first(score)[:d]]]] = True
        self.deleted[layer] = self._gone.clone()


def _allowed(mask: Tensor | None, B: int, q: int, K: int, device: torch.device) -> Tensor:
    """[B|1, 1|H, q, K] bool from transformers' mask; None means causal, the chunk at the end."""
    if mask is None:
        rows = torch.arange(K - q, K, device=device)[:, None]
        return (torch.arange(K, device=device)[None, :] <= rows)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: dispatch to the innermost active MaskingReference."""
    if not _ACTIVE:
        raise RuntimeError("the masking reference attention was called outside `with MaskingReference(...)`")
    return _ACTIVE[-1].attend(module, query, key, value, attention_mask, **kwargs)
