"""The eager reference continued by hand: chunks of new tokens (a later chat turn, with or without
an image), rollback and reordering, on the reference's own per-layer caches.

A later turn that brings an image is pruned by the same rule as a first prompt (DESIGN.md
section 2), applied to the chunk: at a pruning layer the chunk's visual tokens are scored with the
chunk's own query rows, from attention probabilities normalised over everything the layer attends
to (its cache and the chunk); "instruction tokens" are the chunk's text after its last visual
token, and the chunk's visual tokens are both the rows and the columns of the self score. The d
lowest-scoring are deleted: layer l's MLP and every later layer see the chunk's kept rows only,
and the layers after l cache only those. Cached tokens are never scored or deleted again.
`fitprune_fx.masking_reference.MaskingReference(later_turns=...)` states the same rule as masking.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .families import family_for
from .reference import (
    ReferenceResult,
    _attend,
    _decoder_inputs,
    _LayerKV,
    _prefill,
    _score_visual,
    _text_model,
    lowest_first,
)


class ReferenceContinuation:
    """The eager reference's own per-layer caches after a pruned prefill, continued by hand.

    Layer l holds the keys/values of the tokens present at its input (explicit removal: layers
    after a pruning layer never saw the deleted tokens). `extend` appends a chunk to every layer;
    each new token attends to its layer's cached tokens (padding excluded) and to the chunk's
    tokens up to itself. Positions continue from the original length, as a direct call with a
    cache numbers them. Written without transformers' cache classes or masks.
    """

    def __init__(self, model: nn.Module, caches: list[_LayerKV], length: int) -> None:
        self.model = model
        self.caches = caches
        self.length = length  # original positions so far (the prompt, padding included, + appended)
        self.kept: dict[int, Tensor] = {}  # after a pruned chunk: layer -> [B, k'] chunk rows kept

    @classmethod
    def after_prefill(
        cls,
        model: nn.Module,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        attention_mask: Tensor | None = None,
        prune: dict[int, int] | None = None,
        scorer: str = "fitprune",
        scorer_options: dict | None = None,
    ) -> tuple[ReferenceResult, ReferenceContinuation]:
        """Pruned prefill (position ids 0..S-1, as a direct call), then a continuation of it."""
        result, caches, _ = _prefill(
            model, input_ids, pixel_values, attention_mask, prune, scorer, scorer_options, None
        )
        return result, cls(model, caches, input_ids.shape[1])

    def extend(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        prune: dict[int, int] | None = None,
        scorer: str = "fitprune",
        scorer_options: dict | None = None,
    ) -> Tensor:
        """Append `input_ids` [B, k] (no padding; with `pixel_values`, its image tokens carry an
        image) to every layer, deleting `prune` (layer -> visual tokens per example) of the chunk's
        visual tokens (module doc). Returns the chunk's logits [B, k, V], NaN at deleted rows."""
        model, text = self.model, _text_model(self.model)
        B, k = input_ids.shape
        device = input_ids.device
        prune = {int(a): int(d) for a, d in (prune or {}).items()}
        if pixel_values is None:
            h = model.get_input_embeddings()(input_ids)  # [B, k, C]
        else:
            inputs = _decoder_inputs(model, input_ids, pixel_values, torch.ones_like(input_ids), None, {})
            if inputs.positions is not None:
                raise NotImplementedError("later-turn images with M-RoPE positions: use MaskingReference")
            h = inputs.embeds
        visual_ids = torch.tensor(family_for(model).visual_token_ids(model.config), device=device)
        index = torch.arange(k, device=device).expand(B, k)  # [B, L] chunk row of each row present
        visual = torch.isin(input_ids, visual_ids)  # [B, L]
        batch = torch.arange(B, device=device)[:, None]
        self.kept = {}
        with torch.no_grad():
            for li, layer in enumerate(text.layers):
                c = self.caches[li]
                cos, sin = text.rotary_emb(h, self.length + index)
                own = index[:, None, :] <= index[:, :, None]  # [B, L, L]: row i sees chunk rows j <= i
                allowed = torch.cat([c.valid[:, None, :].expand(B, index.shape[1], -1), own], dim=2)
                heads, probs, kk, vv = _attend(
                    layer.self_attn, layer.input_layernorm(h), cos, sin, allowed, c
                )
                past = c.keys.shape[2]
                present = torch.ones_like(index, dtype=torch.bool)
                self.caches[li] = _LayerKV(
                    torch.cat([c.keys, kk], 2), torch.cat([c.values, vv], 2), torch.cat([c.valid, present], 1)
                )
                if li in prune:
                    rows = [
                        self._kept_rows(
                            probs[b, :, :, past:], visual[b], prune[li], scorer, scorer_options, li
                        )
                        for b in range(B)
                    ]
                    rows = torch.stack(rows)  # [B, L'] (the same count per example)
                    heads, h, index, visual = (
                        heads[batch, rows],
                        h[batch, rows],
                        index[batch, rows],
                        visual[batch, rows],
                    )
                    self.kept[li] = index.clone()
                h = h + layer.self_attn.o_proj(heads)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            kept_logits = model.lm_head(text.norm(h))  # [B, L, V]
        logits = kept_logits.new_full((B, k, kept_logits.shape[-1]), float("nan"))
        logits[batch, index] = kept_logits
        self.length += k
        return logits

    @staticmethod
    def _kept_rows(
        probs: Tensor, visual: Tensor, d: int, scorer: str, options: dict | None, layer: int
    ) -> Tensor:
        """Rows of one example's chunk kept after deleting its d lowest-scoring visual rows.
        probs: [H, L, L] the chunk rows' probabilities on the chunk's columns (normalised over the
        whole context); visual: [L] bool."""
        vis = visual.nonzero().squeeze(1)
        if vis.numel() < d:
            raise ValueError(f"layer {layer}: cannot delete {d} of {vis.numel()} visual tokens in the chunk")
        keep = torch.ones_like(visual)
        if d and vis.numel():
            valid = torch.ones_like(visual)
            score = _score_visual(scorer, probs, visual, valid, layer, dict(options or {}))
            keep[vis[lowest_first(score)[:d]]] = False
        return keep.nonzero().squeeze(1)

    def crop(self, k: int) -> None:
        """Forget the last k appended tokens in every layer (a rollback)."""
        self.caches = [_LayerKV(c.keys[:, :, :-k], c.values[:, :, :-k], c.valid[:, :-k]) for c in self.caches]
        self.length -= k

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows `rows` in that order (beam reordering, selecting, repeating)."""
        self.caches = [_LayerKV(c.keys[rows], c.values[rows], c.valid[rows]) for c in self.caches]
