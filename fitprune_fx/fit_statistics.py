"""Attention statistics for the fit: embed the calibration set once, run one decoder layer at a time.

A `LayerRunner` runs decoder layer l on any subset of the calibration examples (a left-padded
batch, `CalibrationState`) and returns the layer's output with FitPrune's statistics of every
column: the cross score c_j = (1/|T|) sum_{i in T} M[i, j] and the self score
s_j = (1/n) sum_{i in V} M[i, j], M = max over heads of the fp32 softmax attention. The scores
come from `_stats_attention`, an attention function that computes fp32 probabilities only for
instruction and visual rows and reuses them for those rows' output.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fitprune_fx.calibration import as_batches
from fitprune_fx.decoder_inputs import capture_decoder_inputs
from fitprune_fx.families import family_for

# Token kinds in the walk state.
PAD, VISUAL, INSTRUCTION, OTHER = 0, 1, 2, 3

_STATS_ATTENTION = "fitprune_fit_stats"

# Decoder layers known to be `h += attn(norm1(h)); h += mlp(norm2(h))`.
_SPLIT_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


# ----------------------------------------------------------------------------- model access
def _text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``-like), as the model's family states it."""
    return family_for(model).text_model(model)


# --------------------------------------------------------------------- attention statistics
@dataclass
class _StatsRequest:
    """What the patched attention needs to score one batch, and where it writes the result."""

    rows: Tensor  # [b, R] long: sequence index of each scored query row (T and V rows)
    rest: Tensor | None  # [b, R2] long: the other rows (system prompt, padding), or None
    row_t: Tensor  # [b, R] fp32: 1/|T| on instruction rows, else 0
    row_v: Tensor  # [b, R] fp32: 1/n on visual rows, else 0
    cross: Tensor | None = None  # [b, w] fp32 output: c_j for every column j (0 on padding)
    self_: Tensor | None = None  # [b, w] fp32 output: s_j for every column j


_local = threading.local()


def _stats_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention that also yields FitPrune statistics (an AttentionInterface function).

    query [b, H, w, D], key/value [b, Hkv, w, D] (post-RoPE), attention_mask [b, 1, w, w] bool.
    Scored rows (instruction and visual) get fp32 probabilities, which give both the head-max
    statistics and their output (``P @ V``, like eager attention); the few other rows use SDPA.
    Returns ([b, w, H, D], None) like transformers' attention functions.
    """
    req: _StatsRequest | None = getattr(_local, "request", None)
    if req is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    b, heads, w, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    out = torch.empty(b, heads, w, value.shape[-1], dtype=value.dtype, device=value.device)
    if req.rest is not None:  # rows no statistic needs: plain SDPA on just those rows
        r2 = req.rest.shape[1]
        idx = req.rest[:, None, :, None].expand(b, heads, r2, dim)
        mask = attention_mask.gather(2, req.rest[:, None, :, None].expand(b, 1, r2, w))
        o = torch.nn.functional.scaled_dot_product_attention(
            query.gather(2, idx),
            key,
            value,
            attn_mask=mask,
            scale=scale,
            enable_gqa=groups > 1,
        )
        out.scatter_(2, req.rest[:, None, :, None].expand_as(o), o)
    rows = req.rows.shape[1]
    idx = req.rows[:, None, :, None].expand(b, heads, rows, dim)
    q = query.gather(2, idx).float().mul_(scale)  # [b, H, R, D], a fresh tensor
    # Head h = k * G + g shares kv head k: fold (G, R) into one matmul dimension.
    q = q.view(b, kv_heads, groups * rows, dim)
    logits = torch.matmul(q, key.float().transpose(-1, -2))  # [b, Hkv, G*R, w]
    allowed = attention_mask[:, 0].gather(1, req.rows[:, :, None].expand(b, rows, w))
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device)
    bias.masked_fill_(~allowed, float("-inf"))  # [b, R, w]
    logits = logits.view(b, kv_heads, groups, rows, w).add_(bias[:, None, None])
    probs = torch.softmax(logits, dim=-1)  # fp32, as the model does
    m = probs.amax(dim=(1, 2))  # [b, R, w] head-max map
    req.cross = torch.bmm(req.row_t[:, None, :], m)[:, 0]  # [b, w]
    req.self_ = torch.bmm(req.row_v[:, None, :], m)[:, 0]
    o = torch.matmul(probs.view(b, kv_heads, groups * rows, w).to(value.dtype), value)
    out.scatter_(2, idx[..., : value.shape[-1]], o.view(b, heads, rows, -1))
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_STATS_ATTENTION, _stats_attention)


@contextmanager
def _stats_attention_on(layers: nn.ModuleList) -> Iterator[None]:
    """Route the layers' attention through `_stats_attention` without touching the user config.

    Each attention module gets a shallow copy of its config naming our implementation; the
    original config objects are put back on exit.
    """
    _register_attention()
    saved = []
    for layer in layers:
        attn = layer.self_attn
        cfg = copy.copy(attn.config)
        cfg._attn_implementation_internal = _STATS_ATTENTION
        saved.append((attn, attn.config))
        attn.config = cfg
    try:
        yield
    finally:
        for attn, cfg in saved:
            attn.config = cfg


# ------------------------------------------------------------------------------- the state
@dataclass
class CalibrationState:
    """Left-padded batch of all examples at one layer's input (width w = longest example)."""

    hidden: Tensor  # [B, w, h] model dtype
    kind: Tensor  # [B, w] int8: PAD / VISUAL / INSTRUCTION / OTHER
    pos: Tensor  # [B, w] long RoPE position ids, or [B, w, 3] M-RoPE ones (original, never renumbered)
    deepstack: Tensor | None = None  # [B, w, L, h] features added after layers 0..L-1, travel with rows

    def with_hidden(self, hidden: Tensor) -> CalibrationState:
        return dataclasses.replace(self, hidden=hidden)

    @property
    def valid(self) -> Tensor:
        return self.kind != PAD


def token_kinds(input_ids: Tensor, attention_mask: Tensor, visual_ids: tuple[int, ...]) -> Tensor:
    """[b, S] token kinds; instruction = non-visual, non-pad tokens after the last visual one."""
    valid = attention_mask.bool()
    visual = torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device)) & valid
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_visual = torch.where(visual, idx, -1).amax(dim=1, keepdim=True)  # [b, 1]
    kind = torch.full_like(input_ids, OTHER, dtype=torch.int8)
    kind[idx > last_visual] = INSTRUCTION
    kind[visual] = VISUAL
    kind[~valid] = PAD
    return kind


def left_pack(keep: Tensor) -> tuple[Tensor, int]:
    """Gather index [B, w'] that moves the kept entries of each row to the right, in order."""
    order = torch.sort(keep.to(torch.int32), dim=1, stable=True).indices  # dropped first
    width = int(keep.sum(dim=1).max().item()) if keep.numel() else 0
    return order[:, order.shape[1] - width :], width


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, w, ...] gathered along dim 1 by index [B, w']."""
    shaped = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, shaped.expand(-1, -1, *x.shape[2:]))


def compact(state: CalibrationState, keep: Tensor) -> CalibrationState:
    """Drop the tokens where keep is False (and surplus padding), preserving order."""
    index, _ = left_pack(keep)
    kind = gather_rows(state.kind, index)
    kind = torch.where(gather_rows(keep, index), kind, torch.zeros_like(kind))
    deepstack = None if state.deepstack is None else gather_rows(state.deepstack, index)
    return CalibrationState(gather_rows(state.hidden, index), kind, gather_rows(state.pos, index), deepstack)


class LayerRunner:
    """Runs single decoder layers of `model` on calibration states, with statistics."""

    def __init__(self, model: nn.Module, batch_size: int, progress: Callable[[int], None]) -> None:
        self.model = model
        self.lm = _text_model(model)
        self.layers = self.lm.layers
        self.config = self.lm.config
        self.batch_size = batch_size
        self._progress = progress
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.family = family = family_for(model)
        if not family.fits:
            raise NotImplementedError(f"fit does not support {family.name} models yet: {family.fits_not_why}")
        self.visual_ids = family.visual_token_ids(model.config)
        # Llama-style layers run as attention half + MLP half: deleted rows skip the MLP and a
        # walk's last layer skips it entirely (checked numerically on layer 0 before use).
        self.split = all(
            type(layer).__name__ in _SPLIT_LAYERS
            and all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "mlp"))
            and hasattr(layer, "post_attention_layernorm")
            for layer in self.layers
        )
        self.num_examples = 0  # set by embed_all

    def embed_all(self, calibration: Iterable[Mapping[str, Tensor]]) -> CalibrationState:
        """Embed every batch, then re-pad all examples into one left-padded state."""
        hidden, kinds, positions, deepstacks = [], [], [], []
        for batch in as_batches(calibration):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            inputs = capture_decoder_inputs(self.model, batch, self.family)
            kind = token_kinds(ids, mask, self.visual_ids)
            for b in range(ids.shape[0]):
                keep = mask[b].bool()
                hidden.append(inputs.embeds[b][keep])
                kinds.append(kind[b][keep])
                positions.append(None if inputs.positions is None else inputs.positions[b][keep])
                deepstacks.append(None if inputs.deepstack is None else inputs.deepstack[b][keep])
            self._progress(ids.shape[0])
        if not hidden:
            raise ValueError("the calibration set is empty")
        width = max(x.shape[0] for x in hidden)
        count = len(hidden)
        self.num_examples = count

        def left_padded(rows: list[Tensor], dtype) -> Tensor:
            out = torch.zeros(count, width, *rows[0].shape[1:], dtype=dtype, device=self.device)
            for b, x in enumerate(rows):
                out[b, width - x.shape[0] :] = x
            return out

        state_h = left_padded(hidden, self.dtype)
        state_k = left_padded(kinds, torch.int8)
        if positions[0] is not None:  # the model's own M-RoPE positions (pads get 0)
            pos = left_padded(positions, torch.long)
        else:  # positions as if unpadded: 0..len-1 right-aligned (pads get 0)
            pos = ((state_k != PAD).long().cumsum(dim=1) - 1).clamp(min=0)
        deepstack = None if deepstacks[0] is None else left_padded(deepstacks, self.dtype)
        return CalibrationState(state_h, state_k, pos, deepstack)

    def run(
        self, layer: int, state: CalibrationState, which: Tensor, attention_only: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run decoder layer on examples `which`; returns output [k, w, h], cross, self [k, w].

        Examples go in chunks of `batch_size`; each chunk is trimmed to its longest example.
        With `attention_only` (and a splittable layer) the output is the residual stream
        after attention, before the MLP (see :meth:`_mlp`).
        """
        width = state.hidden.shape[1]
        out = torch.empty(len(which), width, state.hidden.shape[2], dtype=self.dtype, device=self.device)
        cross = torch.zeros(len(which), width, dtype=torch.float32, device=self.device)
        self_ = torch.zeros_like(cross)
        for start in range(0, len(which), self.batch_size):
            sel = which[start : start + self.batch_size]
            kind = state.kind[sel]
            w = int((kind != PAD).sum(dim=1).max())
            o, c, s = self._run_chunk(
                layer,
                state.hidden[sel, width - w :],
                kind[:, width - w :],
                state.pos[sel, width - w :],
                attention_only and self.split,
            )
            if state.deepstack is not None and layer < state.deepstack.shape[2]:  # zero at other rows
                o = o + state.deepstack[sel, width - w :, layer]
            k = slice(start, start + len(sel))
            out[k, : width - w] = 0
            out[k, width - w :] = o
            cross[k, width - w :] = c
            self_[k, width - w :] = s
        return out, cross, self_

    def mlp(self, layer: int, state: CalibrationState, which: Tensor) -> None:
        """Finish split layer `layer` in place: MLP half on the rows of examples `which`."""
        module = self.layers[layer]
        width = state.hidden.shape[1]
        for start in range(0, len(which), self.batch_size):
            sel = which[start : start + self.batch_size]
            w = int((state.kind[sel] != PAD).sum(dim=1).max())
            h = state.hidden[sel, width - w :]
            state.hidden[sel, width - w :] = h + module.mlp(module.post_attention_layernorm(h))

    def check_split(self, state: CalibrationState) -> bool:
        """Whether attention half + MLP half reproduces layer 0 on the first examples."""
        first = torch.arange(min(2, self.num_examples), device=self.device)
        full, _, _ = self.run(0, state, first)
        half, _, _ = self.run(0, state, first, attention_only=True)
        part = CalibrationState(
            half, state.kind[first], state.pos[first]
        )  # (layers with DeepStack: no split)
        self.mlp(0, part, torch.arange(len(first), device=self.device))
        valid = (part.kind != PAD)[..., None]
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        return bool(torch.allclose(full * valid, part.hidden * valid, rtol=tol, atol=tol))

    def _mask(self, layer: int, kind: Tensor, pos: Tensor) -> Tensor:
        """[b, 1, w, w] bool: causal by sequence order, pads never attended (pad rows see self)."""
        w = kind.shape[1]
        ar = torch.arange(w, device=kind.device)
        causal = ar[None, :] <= ar[:, None]  # [w, w] key j <= query i
        allowed = causal[None] & (kind != PAD)[:, None, :]
        window = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        if window and (types is None or types[layer] == "sliding_attention") and pos.dim() == 2:
            allowed &= (pos[:, :, None] - pos[:, None, :]) < window
        allowed |= torch.eye(w, dtype=torch.bool, device=kind.device)[None]
        return allowed[:, None]

    def _run_chunk(self, layer: int, hidden: Tensor, kind: Tensor, pos: Tensor, attention_only: bool = False):
        """One decoder layer (or its attention half) on a trimmed chunk, with statistics."""
        is_vis, is_txt = kind == VISUAL, kind == INSTRUCTION
        scored = is_vis | is_txt
        rows, _ = left_pack(scored)  # [b, R] indices of T and V rows (right-aligned)
        row_scored = scored.gather(1, rows)
        n = is_vis.sum(dim=1, keepdim=True).clamp(min=1).float()
        t = is_txt.sum(dim=1, keepdim=True).clamp(min=1).float()
        row_t = torch.where(is_txt.gather(1, rows) & row_scored, 1.0 / t, 0.0)
        row_v = torch.where(is_vis.gather(1, rows) & row_scored, 1.0 / n, 0.0)
        rest = None
        if not bool(scored.all()):
            rest, _ = left_pack(~scored)  # [b, R2] rows outside T and V
        req = _StatsRequest(rows=rows, rest=rest, row_t=row_t, row_v=row_v)
        mask = self._mask(layer, kind, pos)
        rope_pos = pos if pos.dim() == 2 else pos.permute(2, 0, 1)  # M-RoPE: [3, b, w]
        cos_sin = self.lm.rotary_emb(hidden, rope_pos)
        _local.request = req
        try:
            with _stats_attention_on(self.layers[layer : layer + 1]):
                module = self.layers[layer]
                kwargs = dict(
                    attention_mask=mask,
                    position_ids=pos if pos.dim() == 2 else None,
                    position_embeddings=cos_sin,
                )
                if attention_only:
                    attn = module.self_attn(module.input_layernorm(hidden), **kwargs)[0]
                    out = hidden + attn
                else:
                    out = module(hidden, **kwargs)
        finally:
            _local.request = None
        if isinstance(out, tuple):  # older transformers layers return (hidden, ...)
            out = out[0]
        return out, req.cross, req.self_  # scores of every column; callers mask to visual

    # ---------------------------------------------------------------------- the walk
