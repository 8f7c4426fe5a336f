"""Fit a FitPrune recipe: per-layer visual-token deletions that meet a FLOPs budget.

Algorithm (DESIGN.md section 2), as implemented here:

1. *Statistics.* The calibration set runs once without pruning. For every example and layer we
   keep the cross score ``c_j = (1/|T|) sum_{i in T} M[i, j]`` and the self score
   ``s_j = (1/n) sum_{i in V} M[i, j]`` of each visual token ``j`` (``M`` = max over heads of the
   fp32 softmax attention), their sums (the layer's *original* cross and self masses) and the
   layer's output hidden states (the "root" cache, shared by every alpha).
2. *Walk* for one ``alpha``: layers in order; at layer ``l`` each example deletes the
   intersection of (a) the largest set of lowest-cross tokens whose removal keeps at least
   ``(1 - alpha)`` of the layer's original cross mass and (b) the same for self mass. The
   scores are those of the *pruned* model (earlier deletions change later attention). The
   walk stops after the first layer at which the projected reference FLOPs reduction meets
   the budget.
3. *Search.* The smallest alpha whose walk meets the budget, to ``tolerance`` (0.01): the
   result passes and an alpha at most ``tolerance`` lower fails. ``strategy="bisect"`` is the
   reference's bisection on [0, 1] (7 exact walks); the default ``"guided"`` predicts the
   answer with a cheap walk on the cached unpruned statistics, corrects that prediction with
   each exact walk and places exact walks to close the bracket (typically 2-3 exact walks).

Interpretations of the spec (documented choices):

- *Removable mass.* Tokens are removed lowest-first while the removed mass is <= ``r =
  current_mass - (1 - alpha) * original_mass``; if ``r <= 0`` (alpha = 0, or earlier
  deletions already cost that much mass) nothing is removed. Hence alpha = 0 deletes nothing.
- *Ties.* A stable ascending sort over tokens in position order: among equal scores the lower
  position is removed first (the rule of ``fitprune_fx.reference``).
- *Keep one.* At least ``min_keep`` (default 1) visual tokens survive in every example.
- *Positions.* Each example is scored as if it were alone and unpadded: RoPE positions are
  ``cumsum(attention_mask) - 1`` (what ``generate`` uses), so the recipe does not depend on
  how the calibration set was batched or padded.
- *Several images / other token counts.* An example with ``n_e`` visual tokens contributes
  ``d * N / n_e`` to a layer's mean, ``N`` = the model's visual tokens per image.
- *Visual counts that vary with the image* (families with ``counts_vary_with_image``, e.g.
  LLaVA-NeXT: base tile + unpadded grid + one newline token per row, all visual tokens here as in
  the pass). ``N`` is then the mean visual count of the calibration set (recorded as
  the recipe's ``num_visual_tokens``) and the recipe states fractions (format 2,
  ``prune_fraction``): ``d_l / N`` of the rounded counts, i.e. per layer the mean share of each
  example's visual tokens; ``units=`` overrides the choice.
- *Projected FLOPs.* After layer ``l`` the per-layer means (real numbers) so far form a
  partial recipe; its reference FLOPs (layers <= l as pruned, every later layer at the current
  token count, DESIGN.md's visual-only model) give the projected reduction checked against
  the budget.
- *Rounding.* Cumulative deletions are rounded up (``ceil`` of the running sum of means), so
  every layer sees at most as many tokens as the real-valued means imply: the rounded recipe's
  reduction is >= the walk's projected reduction >= budget. The total overshoots by < 1 token.

Speed (vs. the reference that reruns the whole model per alpha): the vision tower, projector
and embeddings run once; layer outputs of the unpruned pass are cached, so a walk recomputes a
layer only for examples that already deleted something; everything per token is batched
tensor code (no Python loop over tokens); attention probabilities are computed in fp32 only for
instruction and visual query rows (which then also give those rows' attention output, so no
second attention is run for them), and only at the layers a walk visits; fewer exact walks
(guided search). ``benchmarks/fit_speed.py`` measures fit time against one plain forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fitprune_fx.calibration import as_batches
from fitprune_fx.families import family_for
from fitprune_fx.flops import projected_reduction

# Token kinds in the walk state.
PAD, VISUAL, INSTRUCTION, OTHER = 0, 1, 2, 3

_STATS_ATTENTION = "fitprune_fit_stats"

# Decoder layers known to be `h += attn(norm1(h)); h += mlp(norm2(h))`.
_SPLIT_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}

# select(layer, cross [B, w], self [B, w], is_visual [B, w]) -> drop mask [B, w]
Selector = Callable[[int, Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- model access
def _text_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``-like), as the model's family states it."""
    return family_for(model).text_model(model)


def counts_vary_with_image(model: nn.Module) -> bool:
    """Whether the model's visual count depends on the image (LLaVA-NeXT): recipes in fractions."""
    return family_for(model).counts_vary_with_image


class _Embedded(Exception):
    """Raised by a hook to stop the LLaVA forward once the decoder inputs exist."""

    def __init__(self, embeds: Tensor) -> None:
        super().__init__()
        self.embeds = embeds


@torch.no_grad()
def _embed(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Decoder input embeddings (text + projected image features): vision tower runs once."""
    lm = _text_model(model)

    def hook(_module, args, kwargs):
        raise _Embedded(kwargs["inputs_embeds"])

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inner = getattr(model, "model", model)
        inner(
            input_ids=batch["input_ids"],
            pixel_values=batch.get("pixel_values"),
            attention_mask=batch.get("attention_mask"),
            **{k: v for k, v in batch.items() if k == "image_sizes"},
        )
    except _Embedded as e:
        return e.embeds
    finally:
        handle.remove()
    raise RuntimeError("the language model was never called; cannot capture its inputs")


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
class _State:
    """Left-padded batch of all examples at one layer's input (width w = longest example)."""

    hidden: Tensor  # [B, w, h] model dtype
    kind: Tensor  # [B, w] int8: PAD / VISUAL / INSTRUCTION / OTHER
    pos: Tensor  # [B, w] long RoPE position ids (original, never renumbered)

    @property
    def valid(self) -> Tensor:
        return self.kind != PAD


def _kinds(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """[b, S] token kinds; instruction = non-visual, non-pad tokens after the last visual one."""
    valid = attention_mask.bool()
    visual = (input_ids == image_token_id) & valid
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_visual = torch.where(visual, idx, -1).amax(dim=1, keepdim=True)  # [b, 1]
    kind = torch.full_like(input_ids, OTHER, dtype=torch.int8)
    kind[idx > last_visual] = INSTRUCTION
    kind[visual] = VISUAL
    kind[~valid] = PAD
    return kind


def _left_pack(keep: Tensor) -> tuple[Tensor, int]:
    """Gather index [B, w'] that moves the kept entries of each row to the right, in order."""
    order = torch.sort(keep.to(torch.int32), dim=1, stable=True).indices  # dropped first
    width = int(keep.sum(dim=1).max().item()) if keep.numel() else 0
    return order[:, order.shape[1] - width :], width


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, w, ...] gathered along dim 1 by index [B, w']."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _compact(state: _State, keep: Tensor) -> _State:
    """Drop the tokens where keep is False (and surplus padding), preserving order."""
    index, _ = _left_pack(keep)
    kind = _gather_rows(state.kind, index)
    kind = torch.where(_gather_rows(keep, index), kind, torch.zeros_like(kind))
    return _State(_gather_rows(state.hidden, index), kind, _gather_rows(state.pos, index))


# ------------------------------------------------------------------------------ FLOPs model
def round_cumulative(
    means: list[float], num_visual: int, min_keep: int = 1, slack: float = 1e-6
) -> dict[int, int]:
    """Integer per-layer deletions whose running sums are ceil of the real running sums.

    Every layer then sees no more tokens than the real-valued means imply (so FLOPs can only
    drop); `slack` absorbs float noise such as 2.0000000001 (pass 0 for a strict ceiling).
    """
    prune: dict[int, int] = {}
    done, running = 0, 0.0
    cap = max(num_visual - min_keep, 0)
    for layer, mean in enumerate(means):
        running += mean
        target = min(math.ceil(running - slack), cap)
        if target > done:
            prune[layer] = target - done
            done = target
    return prune


# -------------------------------------------------------------------------------- selection
def _removable(scores: Tensor, is_vis: Tensor, original: Tensor, alpha: float, cap: Tensor):
    """Per example, a [B, w] mask of the lowest-score tokens whose removal keeps mass.

    scores [B, w] fp32 (only visual entries matter), original [B] float64 original mass,
    cap [B] max removable count. Returns (mask, current mass [B] float64).
    """
    masked = torch.where(is_vis, scores, torch.full_like(scores, float("inf")))
    values, order = torch.sort(masked, dim=1, stable=True)  # visual lowest-first, pads last
    finite = torch.isfinite(values)
    cum = torch.where(finite, values, 0).double().cumsum(dim=1)
    current = cum[:, -1]
    allowance = current - (1.0 - alpha) * original  # removable mass
    ok = finite & (cum <= allowance[:, None]) & (allowance > 0)[:, None]
    count = torch.minimum(ok.sum(dim=1), cap)  # cum is monotone: ok is a prefix
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < count[:, None]) & is_vis, current


# ------------------------------------------------------------------------------ the session
@dataclass
class Walk:
    """One alpha's layer walk."""

    alpha: float
    deleted: Tensor  # [B, L] long raw deletions per example and layer (0 after the stop)
    means: list[float]  # per layer walked: mean deletions normalised to num_visual tokens
    reduction: float  # projected reference FLOPs reduction at the end of the walk
    met: bool  # reduction >= budget (False when no budget was given)
    kept_cross: Tensor  # [B, L] fraction of the layer's original cross mass kept
    kept_self: Tensor  # [B, L] fraction of the layer's original self mass kept
    layers_run: int = 0  # example-layers recomputed (not served from the unpruned cache)


@dataclass
class SearchResult:
    alpha: float
    walk: Walk
    walks: list[Walk] = field(default_factory=list)


class FitSession:
    """Calibration statistics of one model, ready to walk any alpha or search any budget.

    Building it runs the unpruned pass (vision tower, projector and all decoder layers once).
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Iterable[Mapping[str, Tensor]],
        *,
        batch_size: int = 8,
        min_keep: int = 1,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        from fitprune_fx.recipe import ModelInfo

        t0 = time.perf_counter()
        self.model = model
        self.lm = _text_model(model)
        self.layers = self.lm.layers
        self.config = self.lm.config
        self.info = ModelInfo.from_config(model.config)
        self.num_layers = len(self.layers)
        self.batch_size = batch_size
        self.min_keep = min_keep
        self._progress = progress or (lambda n: None)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.image_token_id = family_for(model).image_token_id(model.config)
        # Llama-style layers run as attention half + MLP half: deleted rows skip the MLP and a
        # walk's last layer skips it entirely (checked numerically on layer 0 before use).
        self._split = all(
            type(layer).__name__ in _SPLIT_LAYERS
            and all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "mlp"))
            and hasattr(layer, "post_attention_layernorm")
            for layer in self.layers
        )
        with torch.no_grad():
            self.start = self._embed_all(calibration)
            self.num_examples = self.start.hidden.shape[0]
            self.n_visual = (self.start.kind == VISUAL).sum(dim=1)  # [B]
            if int(self.n_visual.min()) == 0:
                raise ValueError("every calibration example needs at least one image token")
            if counts_vary_with_image(model):  # no fixed count per image: normalise to the mean count
                mean = max(1, round(float(self.n_visual.double().mean())))
                self.info = dataclasses.replace(self.info, num_visual_tokens=mean)
            self._root_pass()
        self.stats_seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------------- unpruned pass
    def _embed_all(self, calibration: Iterable[Mapping[str, Tensor]]) -> _State:
        """Embed every batch, then re-pad all examples into one left-padded state."""
        hidden, kinds = [], []
        for batch in as_batches(calibration):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            emb = _embed(self.model, batch)
            kind = _kinds(ids, mask, self.image_token_id)
            for b in range(ids.shape[0]):
                keep = mask[b].bool()
                hidden.append(emb[b][keep])
                kinds.append(kind[b][keep])
            self._progress(ids.shape[0])
        if not hidden:
            raise ValueError("the calibration set is empty")
        width = max(x.shape[0] for x in hidden)
        count = len(hidden)
        h = hidden[0].shape[-1]
        state_h = torch.zeros(count, width, h, dtype=self.dtype, device=self.device)
        state_k = torch.zeros(count, width, dtype=torch.int8, device=self.device)
        for b, (x, k) in enumerate(zip(hidden, kinds, strict=True)):
            state_h[b, width - x.shape[0] :] = x
            state_k[b, width - x.shape[0] :] = k
        # Positions as if unpadded: 0..len-1 right-aligned (pads get 0).
        pos = (state_k != PAD).long().cumsum(dim=1) - 1
        return _State(state_h, state_k, pos.clamp(min=0))

    def _root_pass(self) -> None:
        """All layers without pruning; cache outputs, scores and original masses."""
        self.root_out: list[Tensor] = []
        self.root_cross: list[Tensor] = []
        self.root_self: list[Tensor] = []
        self.orig_cross: list[Tensor] = []
        self.orig_self: list[Tensor] = []
        state = self.start
        is_vis = state.kind == VISUAL
        no_cap = torch.zeros(self.num_examples, dtype=torch.long, device=self.device)
        everyone = torch.arange(self.num_examples, device=self.device)
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            if layer == 0:
                self._split = self._split and self._check_split(state)
            # The last layer's output feeds nothing: its attention (for the scores) is enough.
            out, cross, self_ = self._run(layer, state, everyone, attention_only=last)
            self.root_out.append(None if last and self._split else out)
            self.root_cross.append(cross)
            self.root_self.append(self_)
            # Masses computed exactly as the walk computes its current masses (bitwise equal).
            _, c_mass = _removable(cross, is_vis, torch.zeros_like(no_cap).double(), 0.0, no_cap)
            _, s_mass = _removable(self_, is_vis, torch.zeros_like(no_cap).double(), 0.0, no_cap)
            self.orig_cross.append(c_mass)
            self.orig_self.append(s_mass)
            state = _State(out, state.kind, state.pos)
            self._progress(1)

    # ---------------------------------------------------------------------- one layer
    def _run(
        self, layer: int, state: _State, which: Tensor, attention_only: bool = False
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
                attention_only and self._split,
            )
            k = slice(start, start + len(sel))
            out[k, : width - w] = 0
            out[k, width - w :] = o
            cross[k, width - w :] = c
            self_[k, width - w :] = s
        return out, cross, self_

    def _mlp(self, layer: int, state: _State, which: Tensor) -> None:
        """Finish split layer `layer` in place: MLP half on the rows of examples `which`."""
        module = self.layers[layer]
        width = state.hidden.shape[1]
        for start in range(0, len(which), self.batch_size):
            sel = which[start : start + self.batch_size]
            w = int((state.kind[sel] != PAD).sum(dim=1).max())
            h = state.hidden[sel, width - w :]
            state.hidden[sel, width - w :] = h + module.mlp(module.post_attention_layernorm(h))

    def _check_split(self, state: _State) -> bool:
        """Whether attention half + MLP half reproduces layer 0 on the first examples."""
        first = torch.arange(min(2, self.num_examples), device=self.device)
        full, _, _ = self._run(0, state, first)
        half, _, _ = self._run(0, state, first, attention_only=True)
        part = _State(half, state.kind[first], state.pos[first])
        self._mlp(0, part, torch.arange(len(first), device=self.device))
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
        if window and (types is None or types[layer] == "sliding_attention"):
            allowed &= (pos[:, :, None] - pos[:, None, :]) < window
        allowed |= torch.eye(w, dtype=torch.bool, device=kind.device)[None]
        return allowed[:, None]

    def _run_chunk(self, layer: int, hidden: Tensor, kind: Tensor, pos: Tensor, attention_only: bool = False):
        """One decoder layer (or its attention half) on a trimmed chunk, with statistics."""
        is_vis, is_txt = kind == VISUAL, kind == INSTRUCTION
        scored = is_vis | is_txt
        rows, _ = _left_pack(scored)  # [b, R] indices of T and V rows (right-aligned)
        row_scored = scored.gather(1, rows)
        n = is_vis.sum(dim=1, keepdim=True).clamp(min=1).float()
        t = is_txt.sum(dim=1, keepdim=True).clamp(min=1).float()
        row_t = torch.where(is_txt.gather(1, rows) & row_scored, 1.0 / t, 0.0)
        row_v = torch.where(is_vis.gather(1, rows) & row_scored, 1.0 / n, 0.0)
        rest = None
        if not bool(scored.all()):
            rest, _ = _left_pack(~scored)  # [b, R2] rows outside T and V
        req = _StatsRequest(rows=rows, rest=rest, row_t=row_t, row_v=row_v)
        mask = self._mask(layer, kind, pos)
        cos_sin = self.lm.rotary_emb(hidden, pos)
        _local.request = req
        try:
            with _stats_attention_on(self.layers[layer : layer + 1]):
                module = self.layers[layer]
                kwargs = dict(attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
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
    def _layer_scores(self, layer: int, state: _State, todo: Tensor):
        """Layer output and scores for the walk state: cached rows for unpruned examples.

        Examples `todo` are recomputed; with a split layer their output rows are the
        attention half only (the caller applies the MLP to the rows it keeps).
        """
        width = state.hidden.shape[1]
        cached = self.root_out[layer]
        out = cached[:, -width:] if cached is not None else state.hidden
        cross = self.root_cross[layer][:, -width:]
        self_ = self.root_self[layer][:, -width:]
        if len(todo):
            out, cross, self_ = out.clone(), cross.clone(), self_.clone()
            out[todo], cross[todo], self_[todo] = self._run(layer, state, todo, attention_only=True)
        return out, cross, self_

    @torch.no_grad()
    def walk(
        self,
        alpha: float,
        budget: float | None = None,
        select: Selector | None = None,
        trace: list | None = None,
    ) -> Walk:
        """Walk the layers for one alpha (stop once `budget` is met; all layers if None).

        `select(layer, cross, self, is_visual) -> drop mask` replaces the FitPrune rule (tests
        use it to replay a fixed recipe); `trace` collects (layer, kind, pos, cross, self).
        """
        B, L = self.num_examples, self.num_layers
        info = self.info
        state = self.start
        root = torch.ones(B, dtype=torch.bool, device=self.device)  # nothing deleted yet
        deleted = torch.zeros(B, L, dtype=torch.long, device=self.device)
        kept_c = torch.ones(B, L, dtype=torch.float64, device=self.device)
        kept_s = torch.ones_like(kept_c)
        weight = info.num_visual_tokens / self.n_visual.double()  # normalise multi-image
        cumulative: list[float] = []
        reduction, met, runs = 0.0, False, 0
        for layer in range(L):
            todo = (~root).nonzero().flatten()  # examples that deleted something already
            out, cross, self_ = self._layer_scores(layer, state, todo)
            runs += len(todo)
            is_vis = state.kind == VISUAL
            if trace is not None:
                trace.append((layer, state.kind, state.pos, cross, self_))
            cap = (is_vis.sum(dim=1) - self.min_keep).clamp(min=0)
            del_c, mass_c = _removable(cross, is_vis, self.orig_cross[layer], alpha, cap)
            del_s, mass_s = _removable(self_, is_vis, self.orig_self[layer], alpha, cap)
            drop = del_c & del_s if select is None else select(layer, cross, self_, is_vis)
            count = drop.sum(dim=1)
            deleted[:, layer] = count
            kept_c[:, layer] = (mass_c - (cross * drop).double().sum(1)) / self.orig_cross[layer]
            kept_s[:, layer] = (mass_s - (self_ * drop).double().sum(1)) / self.orig_self[layer]
            done = cumulative[-1] if cumulative else 0.0
            cumulative.append(done + float((count * weight).mean()))
            reduction = projected_reduction(
                cumulative, L, info.num_visual_tokens, info.hidden_size, info.intermediate_size
            )
            if budget is not None and reduction >= budget:
                met = True
                break
            if layer == L - 1:
                break
            state = _State(out, state.kind, state.pos)
            if bool(count.any()):
                state = _compact(state, state.valid & ~drop)
                root &= count == 0
            if self._split and len(todo):
                self._mlp(layer, state, todo)  # kept rows only
        means = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
        return Walk(alpha, deleted, means, reduction, met, kept_c, kept_s, runs)

    # ---------------------------------------------------------------------- the search
    @torch.no_grad()
    def static_walk(self, alpha: float) -> list[float]:
        """Cheap approximate walk on the unpruned statistics (no layer is recomputed).

        Returns the cumulative mean deletions after every layer. Scores of surviving tokens
        are the unpruned ones, rescaled for the softmax renormalisation (attention that
        deleted tokens received goes to the others); other effects of earlier deletions are
        ignored. Only used to steer the exact search.
        """
        present = self.start.kind == VISUAL  # [B, S0] in the original layout
        gone = torch.zeros_like(present)
        weight = self.info.num_visual_tokens / self.n_visual.double()
        cumulative: list[float] = []
        for layer in range(self.num_layers):
            cap = (present.sum(dim=1) - self.min_keep).clamp(min=0)
            c, s = self.root_cross[layer], self.root_self[layer]
            c = c * self._renormalise(c, gone)
            s = s * self._renormalise(s, gone)
            del_c, _ = _removable(c, present, self.orig_cross[layer], alpha, cap)
            del_s, _ = _removable(s, present, self.orig_self[layer], alpha, cap)
            drop = del_c & del_s
            present, gone = present & ~drop, gone | drop
            done = cumulative[-1] if cumulative else 0.0
            cumulative.append(done + float((drop.sum(dim=1) * weight).mean()))
        return cumulative

    @staticmethod
    def _renormalise(scores: Tensor, gone: Tensor) -> Tensor:
        """[B, 1] factor total / (total - mass of deleted columns) of unpruned scores."""
        total = scores.double().sum(dim=1)
        lost = torch.where(gone, scores, 0).double().sum(dim=1)
        return (total / (total - lost).clamp(min=1e-30)).float()[:, None]

    def _meets(self, cumulative: list[float], budget: float) -> bool:
        """Whether some prefix of a walk's cumulative deletions meets the budget."""
        info = self.info
        return any(
            projected_reduction(
                cumulative[: k + 1],
                self.num_layers,
                info.num_visual_tokens,
                info.hidden_size,
                info.intermediate_size,
            )
            >= budget
            for k in range(len(cumulative))
        )

    @staticmethod
    def _bisect(test: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
        """Bisection for the smallest passing alpha: `lo` fails, `hi` passes (or is 1)."""
        while hi - lo > tol * (1 + 1e-9):
            mid = (lo + hi) / 2
            if test(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def _reduction(self, cumulative: list[float]) -> float:
        info = self.info
        return projected_reduction(
            cumulative,
            self.num_layers,
            info.num_visual_tokens,
            info.hidden_size,
            info.intermediate_size,
        )

    def _static_equivalent(self, walk: Walk, tol: float) -> float:
        """Alpha at which the static walk, cut at the same layer, saves as much as `walk`."""
        k = len(walk.means)
        return self._bisect(
            lambda a: self._reduction(self.static_walk(a)[:k]) >= walk.reduction, 0.0, 1.0, tol
        )

    def search(self, budget: float, tolerance: float = 0.01, strategy: str = "guided") -> SearchResult:
        """Smallest alpha (to `tolerance`) whose exact walk meets `budget`.

        Both strategies return an alpha whose walk meets the budget while a walk at most
        `tolerance` lower does not (or is alpha 0, which deletes nothing).
        ``"bisect"`` is the reference's bisection on [0, 1] (7 exact walks for 0.01).
        ``"guided"`` (default) needs fewer exact walks: the cheap :meth:`static_walk` predicts
        the answer; each exact walk then measures how far the static model is off (the alpha
        at which the static walk deletes as much) and corrects the next prediction; probes
        are placed to close a bracket of width `tolerance` (a prediction plus/minus half the
        tolerance), with plain bisection after four probes as a safeguard.
        """
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budget must be a fraction in (0, 1) such as 0.6, got {budget!r}")
        if strategy not in ("guided", "bisect"):
            raise ValueError(f"strategy must be 'guided' or 'bisect', not {strategy!r}")
        walks: dict[float, Walk] = {}

        def exact(alpha: float) -> bool:
            if alpha not in walks:
                walks[alpha] = self.walk(alpha, budget)
                self._progress(1)
            return walks[alpha].met

        lo, hi = 0.0, 1.0  # alpha = 0 deletes nothing, so it fails any budget > 0
        width = tolerance * (1 + 1e-9)
        if strategy == "guided":
            fine = tolerance / 8
            predicted = self._bisect(lambda a: self._meets(self.static_walk(a), budget), 0.0, 1.0, fine)
            shift = 0.0
            for _ in range(4):
                if hi - lo <= width:
                    break
                target = predicted + shift
                if hi == 1.0 and 1.0 not in walks:  # no passing walk yet: aim just above
                    probe = target + tolerance / 2
                else:
                    probe = target
                if probe - lo < tolerance:
                    probe = lo + tolerance
                if hi - probe < tolerance:
                    probe = hi - tolerance
                if not lo < probe < hi:
                    probe = (lo + hi) / 2
                if exact(probe):
                    hi = probe
                else:
                    lo = probe
                # The exact walk deleted what the static one deletes at a lower alpha.
                shift = probe - self._static_equivalent(walks[probe], fine)
        alpha = self._bisect(exact, lo, hi, tolerance)
        if not exact(alpha):  # only when nothing below 1 passed: alpha is 1
            raise ValueError(
                f"budget {budget:.3f} is out of reach: even alpha = {alpha:g} only gives a "
                f"{walks[alpha].reduction:.3f} reference FLOPs reduction on this model"
            )
        return SearchResult(alpha, walks[alpha], list(walks.values()))

    def recipe(
        self,
        budget: float,
        tolerance: float = 0.01,
        name: str | None = None,
        strategy: str = "guided",
        units: str = "auto",
    ):
        """Search `budget` and turn the winning walk into a `Recipe`.

        `units`: ``"count"`` (format 1, ``prune``), ``"fraction"`` (format 2,
        ``prune_fraction``) or ``"auto"`` (fractions for LLaVA-NeXT, counts otherwise).
        """
        from fitprune_fx.recipe import Recipe

        if units not in ("auto", "count", "fraction"):
            raise ValueError(f"units must be 'auto', 'count' or 'fraction', not {units!r}")
        t0 = time.perf_counter()
        result = self.search(budget, tolerance, strategy)
        info = self.info if name is None else dataclasses.replace(self.info, name=name)
        prune = round_cumulative(result.walk.means, info.num_visual_tokens, self.min_keep)
        if Recipe(model=info, prune=prune).reference_reduction() < budget:  # float noise in the slack
            prune = round_cumulative(result.walk.means, info.num_visual_tokens, self.min_keep, slack=0.0)
        fractions = units == "fraction" or (units == "auto" and counts_vary_with_image(self.model))
        if fractions:
            recipe = Recipe.from_fractions(
                info, _as_fractions(prune, info.num_visual_tokens), scorer="fitprune", budget=budget
            )
        else:
            recipe = Recipe(model=info, prune=prune, scorer="fitprune", budget=budget)
        seconds = self.stats_seconds + time.perf_counter() - t0
        recipe.flops_reduction = round(recipe.reference_reduction(), 4)
        recipe.fit = {
            "alpha": round(result.alpha, 6),
            "samples": self.num_examples,
            "seconds": round(seconds, 3),
            "walks": len(result.walks),
            "tolerance": tolerance,
            "search": strategy,
        }
        return recipe


def _as_fractions(prune: dict[int, int], num_visual: int) -> dict[int, float]:
    """Fractions ``d / N`` (6 decimals when that still gives the same counts at ``N``)."""
    from fitprune_fx.recipe import _fraction_counts

    for digits in (6, None):
        out = {
            k: (d / num_visual if digits is None else round(d / num_visual, digits)) for k, d in prune.items()
        }
        if _fraction_counts(out, num_visual) == prune:
            return out
    raise AssertionError("fractions d / N do not reproduce the counts")  # pragma: no cover


def fit(
    model: nn.Module,
    calibration: Iterable[Mapping[str, Tensor]],
    budget: float,
    *,
    tolerance: float = 0.01,
    batch_size: int = 8,
    min_keep: int = 1,
    name: str | None = None,
    strategy: str = "guided",
    progress: bool = False,
    units: str = "auto",
):
    """Fit a FitPrune recipe for `model` meeting a reference FLOPs `budget` (0.6 = 60 %).

    `calibration` is an iterable of processor outputs (dicts with ``input_ids``,
    ``attention_mask``, ``pixel_values``; any batch size), e.g. from
    :func:`fitprune_fx.calibration.load_question_file`. The model's device and dtype are used.
    `strategy` is the alpha search (``"guided"`` or the reference's ``"bisect"``, see
    :meth:`FitSession.search`); `progress` shows a tqdm bar. `units` picks counts (format 1) or
    fractions of the visual tokens present (format 2; the default for LLaVA-NeXT, whose visual
    count depends on the image size; calibration items then carry ``image_sizes``). Returns a validated
    :class:`fitprune_fx.recipe.Recipe` with ``fit`` = {alpha, samples, seconds, walks, ...}.
    To fit several budgets on one calibration set, build a :class:`FitSession` once and call
    its ``recipe(budget)`` per budget (the unpruned pass is then shared).
    """
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1) such as 0.6, got {budget!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="fit", unit="step")
    try:
        session = FitSession(
            model,
            calibration,
            batch_size=batch_size,
            min_keep=min_keep,
            progress=bar.update if bar is not None else None,
        )
        return session.recipe(budget, tolerance, name=name, strategy=strategy, units=units)
    finally:
        if bar is not None:
            bar.close()
