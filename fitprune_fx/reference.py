"""Eager reference implementation of pruned prefill and pruned greedy generation (the test oracle).

This module runs a Hugging Face multimodal model (any family of `fitprune_fx.families`) layer by
layer in plain PyTorch and applies the algorithm of DESIGN.md section 2. It is deliberately
independent of the FX pass (it uses no code of `fitprune_fx.passes` or `fitprune_fx.backend`, only
the family's facts about the model: its decoder stack, image token and embedding): it computes the
attention probabilities itself from each layer's q/k/v projections and uses them both for the
attention output and for the importance scores.

Conventions, stated once:

- *Original positions* are column indices 0..S-1 of the prompt as given, padding included.
  Deleted tokens keep no row; kept tokens keep their original position ids for RoPE, and
  causality among kept tokens follows original positions.
- Padding tokens (attention_mask == 0) are never visual, never deleted and never attended to.
  They stay in the sequence (like the compiled model keeps them), so `kept` lists include them.
  Padding query rows that have nothing to attend to get a zero attention output (no NaN).
- Deletion: after layer l's attention, the rows of deleted tokens are dropped from both the
  attention output (before o_proj) and the residual stream, so layer l's MLP and all later
  layers see kept tokens only. Layer l's KV cache holds every token present at its input.
- Tie rule: visual tokens are ordered by (score, original position) with a stable sort and the
  first d are deleted, i.e. among equal scores the LOWER position is deleted first.
- Scorers (per example, at a pruning layer, over the visual tokens present in position order):
  * "fitprune": M = max over heads of the probabilities; c_j = sum over instruction rows i
    (non-visual, non-padding, after the last present visual token) of M[i, j];
    s_j = (1/n) sum over visual rows i of M[i, j]; score = c * s.
  * "fastv": mean over heads of the probability that the last non-padding row gives to j.
  * "random": g = torch.Generator().manual_seed(scorer_options.get("seed", 0) + layer);
    perm = torch.randperm(n, generator=g); the visual tokens perm[:d] are deleted. A fresh
    generator is made for every example, so the choice does not depend on the batch. The
    reported score of visual token perm[k] is k, so "delete the d lowest" holds here too.
- `prune` maps a 0-based layer to the number d of visual tokens deleted after it in EVERY
  example; keys are visited in increasing order; an entry with d = 0 is still a pruning layer
  (it is scored and listed in `kept`) but deletes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .decoder_inputs import DecoderInputs, capture_decoder_inputs
from .families import family_for
from .reference_methods import METHODS, score_method

SCORERS = ("fitprune", "fastv", "random", *METHODS)


@dataclass
class ReferenceResult:
    """What one pruned prefill produced; see the module docstring for the conventions."""

    logits: Tensor  # [B, S, V] at original positions; rows of deleted tokens are NaN
    kept: list[list[Tensor]]  # kept[b][i]: original positions kept after the i-th pruning layer
    kept_final: list[Tensor]  # kept_final[b]: original positions present after the last layer
    scores: dict[int, list[Tensor]]  # layer -> per example, score of each visual token present
    visual_positions: dict[int, list[Tensor]]  # layer -> per example, positions of those tokens
    tokens_per_layer: list[list[int]]  # [b][l]: sequence length at layer l's input, + final
    past_key_values: object | None  # DynamicCache; layer l holds the tokens at layer l's input


@dataclass
class _LayerKV:
    """One layer's cache inside the reference: keys post-RoPE, as Hugging Face caches them."""

    keys: Tensor  # [B, Hkv, L, D]
    values: Tensor  # [B, Hkv, L, D]
    valid: Tensor  # [B, L] bool, False for padding columns


# ----------------------------------------------------------------------------------------------
# model plumbing


def _text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (LlamaModel / MistralModel / Qwen2Model ...), as the model's family states it."""
    return family_for(model).text_model(model)


def _check_supported(model: nn.Module) -> None:
    """Refuse configurations this reference does not model (sliding-window attention, norms around
    attention and MLP as in Gemma 3)."""
    for layer in _text_model(model).layers:
        if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
            raise NotImplementedError(
                f"reference: {type(layer).__name__} has norms around attention and MLP that this reference "
                "does not model; check it with fitprune_fx.masking_reference.MaskingReference"
            )
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        if window is not None:
            raise NotImplementedError("reference: sliding-window attention is not supported")


def _rope_function(attn: nn.Module) -> Callable:
    """`apply_rotary_pos_emb` of the model family that defines this attention module."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _decoder_inputs(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor,
    image_sizes: Tensor | None,
    model_inputs: dict,
) -> DecoderInputs:
    """Token embeddings with the visual features merged in, [B, S, C], the family's way.

    For LLaVA-NeXT (`image_sizes` given) each image contributes a size-dependent number of rows,
    newline rows included; every one of them is a visual token. Families with M-RoPE take their
    embeddings, 3-D positions and DeepStack features from the model's own call.
    """
    family = family_for(model)
    if family.positions_from_model:
        batch = dict(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **model_inputs
        )
        return capture_decoder_inputs(model, batch, family)
    embeds = family.embed_prompt(model, input_ids, pixel_values, image_sizes=image_sizes, **model_inputs)
    return DecoderInputs(embeds, None, None)


def _attend(
    attn: nn.Module,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    allowed: Tensor,
    past: _LayerKV | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain multi-head attention of the queries x against past keys + their own keys.

    x: [B, L, C] normalised hidden states; cos/sin: [B, L, D]; allowed: [B, L, K] bool with
    K = past length + L. Returns (heads [B, L, Hq*D] before o_proj, probs [B, Hq, L, K] fp32,
    k and v of the new tokens [B, Hkv, L, D], k post-RoPE).
    """
    B, L, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, L, -1, D)
    k = attn.k_proj(x).view(B, L, -1, D)
    if hasattr(attn, "q_norm"):  # per-head RMSNorm before RoPE (Qwen3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, Hq, L, D], [B, Hkv, L, D]
    v = attn.v_proj(x).view(B, L, -1, D).transpose(1, 2)  # [B, Hkv, L, D]
    q, k = _rope_function(attn)(q, k, cos, sin)
    k_all, v_all = k, v
    if past is not None:
        k_all = torch.cat([past.keys, k], dim=2)  # [B, Hkv, K, D]
        v_all = torch.cat([past.values, v], dim=2)
    # grouped-query attention: query head h reads key/value head h // groups
    groups = q.shape[1] // k_all.shape[1]
    k_all = k_all.repeat_interleave(groups, dim=1)  # [B, Hq, K, D]
    v_all = v_all.repeat_interleave(groups, dim=1)
    scaling = getattr(attn, "scaling", D**-0.5)
    logits = (q @ k_all.transpose(-1, -2)) * scaling  # [B, Hq, L, K]
    logits = logits.float().masked_fill(~allowed[:, None], float("-inf"))
    probs = logits.softmax(dim=-1)  # fp32, as the model's softmax
    # a query row with no allowed key (a left-padding row) would be NaN: make it all zeros
    probs = torch.where(allowed.any(dim=-1)[:, None, :, None], probs, 0.0)
    heads = probs.to(v_all.dtype) @ v_all  # [B, Hq, L, D]
    heads = heads.transpose(1, 2).reshape(B, L, -1)  # [B, L, Hq*D]
    return heads, probs, k, v


# ----------------------------------------------------------------------------------------------
# scoring and selection


def _score_visual(
    scorer: str,
    probs: Tensor,
    visual: Tensor,
    valid: Tensor,
    layer: int,
    options: dict,
    hidden: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Importance of each visual row of one example: [n] fp32, aligned with visual rows in order.

    probs: [H, L, L] fp32 attention probabilities of this example at this layer;
    visual, valid: [L] bool over the rows currently present (in original-position order);
    hidden [L, C] / keys [Hkv, L, D]: the residual stream entering the layer and its keys (the
    published methods of `reference_methods` that read them).
    """
    if scorer in METHODS:
        return score_method(scorer, probs, visual, valid, options, hidden, keys).to(probs.device)
    vis = visual.nonzero().squeeze(1)  # [n] row indices of visual tokens
    n = vis.numel()
    if scorer == "fitprune":
        M = probs.max(dim=0).values  # [L, L] head-max map
        rows = torch.arange(visual.numel(), device=visual.device)
        instruction = valid & ~visual & (rows > vis[-1])  # T: text after the last visual token
        c = M[instruction][:, vis].sum(dim=0)  # [n] cross score
        s = M[vis][:, vis].sum(dim=0) / n  # [n] self score
        return c * s
    if scorer == "fastv":
        last = valid.nonzero()[-1, 0]  # last non-padding row
        return probs[:, last, vis].mean(dim=0)  # [n]
    if scorer == "random":
        g = torch.Generator().manual_seed(int(options.get("seed", 0)) + layer)
        perm = torch.randperm(n, generator=g)  # perm[:d] are deleted
        score = torch.empty(n, dtype=torch.float32)
        score[perm] = torch.arange(n, dtype=torch.float32)
        return score.to(probs.device)
    raise ValueError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")


def _merge_deleted(heads: Tensor, h: Tensor, rows: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
    """Token merging (scorer option "merge"): each deleted visual row joins the kept visual row whose
    hidden state entering the layer (`h`) is most similar (cosine; the first kept row on ties), and
    each kept row becomes the plain mean of its group, in the attention heads [B, L, Hq*D] and the
    residual [B, L, C]. A deleted row with no kept visual row in its example is dropped."""
    merged_heads, merged_h = [], []
    for b in range(h.shape[0]):
        kept_rows = rows[b].tolist()
        groups = {r: [r] for r in kept_rows}
        kept_visual = [r for r in kept_rows if visual[b, r]]
        for r in range(h.shape[1]):
            if r in groups or not visual[b, r] or not kept_visual:
                continue
            sims = [float(torch.cosine_similarity(h[b, r], h[b, c], dim=0)) for c in kept_visual]
            groups[kept_visual[sims.index(max(sims))]].append(r)
        merged_heads.append(torch.stack([heads[b, groups[r]].mean(dim=0) for r in kept_rows]))
        merged_h.append(torch.stack([h[b, groups[r]].mean(dim=0) for r in kept_rows]))
    return torch.stack(merged_heads), torch.stack(merged_h)


def lowest_first(scores: Tensor) -> Tensor:
    """Order of deletion: indices sorted by (score, index), i.e. ties delete the lower index first.

    `scores` is aligned with visual tokens in increasing position, so a stable ascending sort
    keeps equal scores in position order.
    """
    return torch.sort(scores, stable=True).indices


# ----------------------------------------------------------------------------------------------
# prefill


def _prefill(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None,
    prune: dict[int, int] | None,
    scorer: str,
    scorer_options: dict | None,
    position_ids: Tensor | None,
    image_sizes: Tensor | None = None,
    model_inputs: dict | None = None,
) -> tuple[ReferenceResult, list[_LayerKV], Tensor]:
    """The pruned prefill; also returns the per-layer caches and the last row's logits [B, V]."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of {SCORERS}")
    _check_supported(model)
    text = _text_model(model)
    layers = text.layers
    prune = {int(k): int(v) for k, v in (prune or {}).items()}
    for layer, d in prune.items():
        if not 0 <= layer < len(layers) or d < 0:
            raise ValueError(f"bad prune entry {layer}: {d} for {len(layers)} layers")
    options = dict(scorer_options or {})

    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(S, device=device)  # what the model's forward uses
    position_ids = position_ids.to(device).expand(B, S)

    # State of the current (compacted) sequence, one row per token still present:
    inputs = _decoder_inputs(model, input_ids, pixel_values, attention_mask, image_sizes, model_inputs or {})
    h = inputs.embeds  # [B, L, C] residual stream
    index = torch.arange(S, device=device).expand(B, S)  # [B, L] original position of each row
    pos = position_ids if inputs.positions is None else inputs.positions  # [B, L] RoPE or [B, L, 3] M-RoPE
    deepstack = inputs.deepstack  # [B, L, levels, C] or None
    valid = attention_mask.bool()  # [B, L] not padding
    visual_ids = torch.tensor(family_for(model).visual_token_ids(model.config), device=device)
    visual = torch.isin(input_ids, visual_ids) & valid  # [B, L]
    batch = torch.arange(B, device=device)[:, None]  # [B, 1] for row gathers

    caches: list[_LayerKV] = []
    kept: list[list[Tensor]] = [[] for _ in range(B)]
    scores: dict[int, list[Tensor]] = {}
    visual_positions: dict[int, list[Tensor]] = {}
    tokens_per_layer: list[list[int]] = [[] for _ in range(B)]

    with torch.no_grad():
        for li, layer in enumerate(layers):
            for b in range(B):
                tokens_per_layer[b].append(h.shape[1])
            # key j visible to query i: j is not padding and j is not after i (original order)
            allowed = valid[:, None, :] & (index[:, None, :] <= index[:, :, None])  # [B, L, L]
            cos, sin = text.rotary_emb(h, pos if pos.dim() == 2 else pos.permute(2, 0, 1))  # [B, L, D] each
            heads, probs, k, v = _attend(layer.self_attn, layer.input_layernorm(h), cos, sin, allowed)
            caches.append(_LayerKV(k, v, valid))  # this layer holds every token at its input

            if li in prune:
                d = prune[li]
                keep_rows = []
                scores[li], visual_positions[li] = [], []
                for b in range(B):
                    vis = visual[b].nonzero().squeeze(1)  # [n] rows of visual tokens
                    if vis.numel() < d:
                        raise ValueError(
                            f"layer {li}: cannot delete {d} of {vis.numel()} visual tokens (example {b})"
                        )
                    if vis.numel() == 0:
                        score = torch.zeros(0, device=device)
                    else:
                        score = _score_visual(scorer, probs[b], visual[b], valid[b], li, options, h[b], k[b])
                    scores[li].append(score)
                    visual_positions[li].append(index[b, vis])
                    delete = vis[lowest_first(score)[:d]]  # rows to drop
                    keep = torch.ones(h.shape[1], dtype=torch.bool, device=device)
                    keep[delete] = False
                    keep_rows.append(keep.nonzero().squeeze(1))  # sorted rows kept
                rows = torch.stack(keep_rows)  # [B, L'] (same d per example)
                if options.get("merge"):
                    heads, h = _merge_deleted(heads, h, rows, visual)
                else:
                    heads, h = heads[batch, rows], h[batch, rows]
                index, pos, valid, visual = (t[batch, rows] for t in (index, pos, valid, visual))
                deepstack = None if deepstack is None else deepstack[batch, rows]
                for b in range(B):
                    kept[b].append(index[b].clone())

            h = h + layer.self_attn.o_proj(heads)  # attention residual, kept rows only
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if deepstack is not None and li < deepstack.shape[2]:  # kept visual rows get their own features
                h = h + deepstack[:, :, li]

        for b in range(B):
            tokens_per_layer[b].append(h.shape[1])
        kept_logits = model.lm_head(text.norm(h))  # [B, L, V]

    logits = kept_logits.new_full((B, S, kept_logits.shape[-1]), float("nan"))
    logits[batch, index] = kept_logits
    cache = DynamicCache()
    for li, c in enumerate(caches):
        cache.update(c.keys, c.values, li)
    result = ReferenceResult(
        logits=logits,
        kept=kept,
        kept_final=[index[b].clone() for b in range(B)],
        scores=scores,
        visual_positions=visual_positions,
        tokens_per_layer=tokens_per_layer,
        past_key_values=cache,
    )
    return result, caches, kept_logits[:, -1]


def reference_prefill(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None = None,
    prune: dict[int, int] | None = None,
    scorer: str = "fitprune",
    scorer_options: dict | None = None,
    position_ids: Tensor | None = None,
    image_sizes: Tensor | None = None,
    **model_inputs: Tensor,
) -> ReferenceResult:
    """Pruned prefill of a supported model; `prune` maps layer -> visual tokens deleted per example.

    position_ids defaults to 0..S-1 for every row, like calling the model directly; pass
    `attention_mask.cumsum(-1) - 1` to get what `generate` uses with left padding.
    `image_sizes` ([num_images, 2]) is required for LLaVA-NeXT models; `model_inputs` are the other
    processor outputs a family needs (Qwen-VL: image_grid_thw, mm_token_type_ids, videos), whose
    M-RoPE positions come from the model (position_ids is then ignored).
    """
    result, _, _ = _prefill(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        prune,
        scorer,
        scorer_options,
        position_ids,
        image_sizes,
        model_inputs,
    )
    return result


# ----------------------------------------------------------------------------------------------
# greedy generation


def generate_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids the way Hugging Face generate makes them: cumsum(mask) - 1, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def reference_generate(
    model: nn.Module,
    input_ids: Tensor,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None = None,
    prune: dict[int, int] | None = None,
    max_new_tokens: int = 8,
    scorer: str = "fitprune",
    scorer_options: dict | None = None,
    eos_token_id: int | None = None,
    output_logits: bool = False,
    image_sizes: Tensor | None = None,
) -> torch.LongTensor | tuple[torch.LongTensor, Tensor]:
    """Greedy decoding after a pruned prefill, with its own decode loop: [B, S + max_new_tokens].

    Each decode step runs every layer against that layer's own cache (layers up to and
    including a pruning layer hold all prompt tokens, later layers only the kept ones). The
    prompt uses generate's position ids; new tokens continue from the last prompt position.
    With eos_token_id, finished rows are filled with the pad token and decoding stops early
    once every row has finished (then the output is shorter), as generate does.
    With output_logits, also returns the logits each new token was chosen from: [B, new, V].
    `image_sizes` ([num_images, 2]) is required for LLaVA-NeXT models.
    """
    if family_for(model).positions_from_model:
        raise NotImplementedError(
            "reference_generate: decode positions of M-RoPE models (rope deltas) are not modelled; "
            "check their generation with fitprune_fx.masking_reference.MaskingReference"
        )
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_pos = generate_position_ids(attention_mask)
    _, caches, last_logits = _prefill(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        prune,
        scorer,
        scorer_options,
        prompt_pos,
        image_sizes,
    )
    text = _text_model(model)
    pad = model.config.text_config.pad_token_id
    pad = 0 if pad is None else pad

    tokens = [input_ids]
    step_logits: list[Tensor] = []
    pos = prompt_pos[:, -1:]  # [B, 1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    with torch.no_grad():
        for step in range(max_new_tokens):
            next_token = last_logits.argmax(dim=-1)  # [B]
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, pad)
                finished = finished | (next_token == eos_token_id)
            tokens.append(next_token[:, None])
            step_logits.append(last_logits)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            # one decode step for the new token, [B, 1, C], at the next position
            pos = pos + 1
            h = model.model.get_input_embeddings()(next_token[:, None])
            cos, sin = text.rotary_emb(h, pos)
            for li, layer in enumerate(text.layers):
                c = caches[li]
                valid = torch.cat([c.valid, c.valid.new_ones(B, 1)], dim=1)  # [B, K]
                heads, _, k, v = _attend(
                    layer.self_attn, layer.input_layernorm(h), cos, sin, valid[:, None, :], c
                )
                caches[li] = _LayerKV(torch.cat([c.keys, k], dim=2), torch.cat([c.values, v], dim=2), valid)
                h = h + layer.self_attn.o_proj(heads)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            last_logits = model.lm_head(text.norm(h))[:, -1]  # [B, V]
    output = torch.cat(tokens, dim=1)
    if not output_logits:
        return output
    chosen_from = (
        torch.stack(step_logits, dim=1) if step_logits else last_logits.new_empty(B, 0, last_logits.shape[-1])
    )
    return output, chosen_from
