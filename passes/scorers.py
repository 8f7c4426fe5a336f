"""Importance scorers: functions of one layer's attention inputs that rate every token.

A scorer returns a float tensor [B, S]; lower means "delete first". Only the entries of visual
tokens are used. The functions run inside the compiled graph: the pass inserts a call to
`score_tokens`, and Inductor traces through it, so everything here must be plain tensor code
with static control flow. Register your own with `register_scorer` and name it in the recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fitprune_fx.kernels  # noqa: F401  (registers torch.ops.fitprune.visual_attention_mass)
from fitprune_fx.kernels.attention_mass import allowed_mask

from .sharded_heads import HeadShards, reduce_heads
from .token_ops import gather_tokens


@dataclass
class ScoringInputs:
    """What a scorer sees at one pruning layer (tensors are already compacted by earlier layers)."""

    query: torch.Tensor  # [B, H, S, D] post-RoPE
    key: torch.Tensor  # [B, Hkv, K, D] post-RoPE (Hkv divides H); K = S, or P + S (below)
    attn_mask: torch.Tensor | None  # [B|1, 1|H, S, K] bool (True = attend) or additive float
    is_causal: bool
    scale: float
    visual: torch.Tensor  # [B, S] bool, visual tokens present
    layer: int  # -1 (and num_delete -1) for the built-ins that read neither (`COUNT_FREE_SCORERS`)
    num_delete: int
    options: dict
    # A chunk continuing a KV cache (a later turn's image): the keys are the P cached keys, then
    # the chunk's S; probabilities are normalised over all K, and only the chunk's tokens are
    # scored (`chunk_columns`). Never without a mask.
    continues: bool = False
    # Tensor parallelism: the query / key hold this rank's heads only (`sharded_heads`); a scorer
    # that combines heads must combine them across ranks too (`reduce_heads`).
    shards: HeadShards | None = None
    # More of the layer, for methods that read more than attention (None where a caller has none):
    hidden: torch.Tensor | None = None  # [B, S, C] the residual stream entering the layer
    value: torch.Tensor | None = None  # [B, Hkv, K, Dv] the layer's values (K as for `key`)
    positions: torch.Tensor | None = None  # [B, S] long: each token's position in the prompt as given

    def token_kinds(self) -> torch.Tensor:
        """[B, S] int8: each token's `TokenKind` (padding, system, visual, instruction, between)."""
        return token_kinds(token_validity(self), self.visual)

    def chunk_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The last S entries of x's last dim (the chunk's keys): x itself when not continuing."""
        if not self.continues:
            return x
        s = self.query.shape[-2]
        index = torch.arange(s, device=x.device) + (x.shape[-1] - s)  # a gather: no slice at a symbol
        return x.index_select(-1, index)


class TokenKind:
    """The kinds of `ScoringInputs.token_kinds`. System text comes before the first visual token of
    an example, instruction text after its last one, "between" text separates two images."""

    PADDING = 0
    SYSTEM = 1
    VISUAL = 2
    INSTRUCTION = 3
    BETWEEN = 4


def token_kinds(valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """[B, S] int8 `TokenKind`s from the non-padding tokens `valid` and the visual ones `visual`
    [B, S]. An example without visual tokens is all instruction (and padding)."""
    b, s = visual.shape
    pos = torch.arange(s, device=visual.device).expand(b, s)
    first = torch.where(visual, pos, s).amin(dim=1, keepdim=True)  # [B, 1]
    last = torch.where(visual, pos, -1).amax(dim=1, keepdim=True)
    kind = torch.where(pos < first, TokenKind.SYSTEM, TokenKind.BETWEEN)
    kind = torch.where(pos > last, TokenKind.INSTRUCTION, kind)
    kind = torch.where(visual, TokenKind.VISUAL, kind)
    return torch.where(valid, kind, TokenKind.PADDING).to(torch.int8)


Scorer = Callable[[ScoringInputs], torch.Tensor]
SCORERS: dict[str, Scorer] = {}
# Scorers that read neither `num_delete` nor the visual count (nor the layer): a graph scored by one of
# them may serve every visual count (its deletions are sized per call), and its layers of one shape
# share a compile. Others get a graph per count.
COUNT_FREE_SCORERS = frozenset(
    {"fitprune", "fastv", "last_token", "text_raters", "duplication", "random_per_example"}
)
# Scorers that read a chunk continuing a cache right (`ScoringInputs.continues`: keys are the cached
# ones, then the chunk's); a chunk scored by another runs unpruned.
CONTINUING_SCORERS = frozenset({"fitprune", "fastv", "random"})


def register_scorer(name: str, fn: Scorer | None = None):
    """Register `fn(inputs: ScoringInputs) -> scores [B, S]` under `name` (usable as a decorator)."""

    def wrap(f: Scorer) -> Scorer:
        SCORERS[name] = f
        return f

    return wrap(fn) if fn is not None else wrap


def allowed_keys(inputs: ScoringInputs) -> torch.Tensor:
    """[B|1, 1|H, S, S] bool: which keys each query may attend to (mask and causality combined)."""
    return allowed_mask(inputs.attn_mask, inputs.is_causal, inputs.query.shape[2], inputs.query.device)


def attention_probs(inputs: ScoringInputs, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """Softmax attention probabilities [B, H, R, S] in fp32 for the query rows `rows`.

    `rows` is a slice of rows shared by the batch, or a [B, R] index tensor (rows per example).
    """
    allowed = allowed_keys(inputs)  # [B|1, 1|H, S, S]
    mask = inputs.attn_mask
    q = inputs.query
    if isinstance(rows, torch.Tensor):
        q, allowed = _take_rows(q, rows), _take_rows(allowed, rows)  # [B, H, R, D], [B, 1|H, R, S]
        mask = _take_rows(mask, rows) if mask is not None and mask.dtype != torch.bool else mask
    else:
        q = q[:, :, rows]
        allowed = allowed[:, :, rows]
        mask = mask[:, :, rows] if mask is not None else None
    q = q.float()
    k = inputs.key.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves H/Hkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * inputs.scale  # [B, H, R, S]
    if mask is not None and mask.dtype != torch.bool:
        logits = logits + mask.float()
    logits = logits.masked_fill(~allowed, float("-inf"))
    # Fully masked rows (padding queries) give NaN; they carry no weight in any score.
    return torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B|1, H, S, ...] -> [B, H, R, ...]: the rows `rows` [B, R] of dim 2, per example."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    index = rows.reshape(rows.shape[0], 1, rows.shape[1], *([1] * (x.dim() - 3)))
    return x.gather(2, index.expand(*x.shape[:2], rows.shape[1], *x.shape[3:]))


def token_validity(inputs: ScoringInputs) -> torch.Tensor:
    """[B, S] bool: non-padding tokens (`mask_validity` of the scorer's mask, at the chunk's own
    columns when continuing a cache)."""
    b, s = inputs.visual.shape
    mask = inputs.attn_mask
    if inputs.continues:
        mask = inputs.chunk_columns(mask)
    return mask_validity(mask, b, s, inputs.visual.device)


def mask_validity(
    attn_mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """[B, S] bool: non-padding tokens, read off the mask diagonal (a token always sees itself,
    so causality never hides it; the same dtype rule as `allowed_mask`)."""
    if attn_mask is None:
        return torch.ones((batch, seq_len), dtype=torch.bool, device=device)
    pos = torch.arange(seq_len, device=device)
    # indexing, not .diagonal(): Inductor's diagonal lowering warns (a deprecated torch helper)
    diag = attn_mask[:, 0, pos, pos]  # [B|1, S]
    if diag.dtype != torch.bool:
        diag = diag > torch.finfo(diag.dtype).min / 2
    return diag.expand(batch, -1)


@register_scorer("fitprune")
def fitprune_score(inputs: ScoringInputs) -> torch.Tensor:
    """FitPrune: (attention from instruction tokens) x (mean attention from visual tokens).

    M = max over heads of the attention probabilities; for visual token j,
    c_j = sum over instruction rows i of M[i, j], s_j = (1/n) sum over visual rows i of M[i, j].
    Instruction tokens are the non-visual, non-padding tokens after the last visual token.
    """
    instruction = instruction_rows(inputs)
    if inputs.continues or inputs.shards is not None:
        return _fitprune_over_context(inputs, instruction)
    # One graph node that never holds the [B, H, S, S] probabilities (chunked PyTorch on CPU,
    # Triton on CUDA): per key j, the head-max probabilities summed over instruction / visual rows.
    cross, self_sum = torch.ops.fitprune.visual_attention_mass(
        inputs.query, inputs.key, inputs.attn_mask, instruction, inputs.visual, inputs.scale, inputs.is_causal
    )  # [B, S] each, fp32
    return fitprune_from_mass(cross, self_sum, inputs.visual)


def _fitprune_over_context(inputs: ScoringInputs, instruction: torch.Tensor) -> torch.Tensor:
    """FitPrune's score in plain torch from the head-max map of the probabilities: for a chunk that
    continues a cache, over the whole context [B, S, P + S] read at the chunk's columns; with heads
    sharded across ranks, the local map's max over all ranks (one all-reduce of [B, S, S]). (Holds
    the [B, H, S, K] probabilities of this rank's heads.)"""
    probs = inputs.chunk_columns(attention_probs(inputs))  # [B, H, S, S] normalised over P + S
    head_max = reduce_heads(probs.amax(dim=1), inputs.shards, "max")  # [B, S, S], all heads
    cross = (head_max * instruction[:, :, None]).sum(dim=1)  # [B, S]
    self_sum = (head_max * inputs.visual[:, :, None]).sum(dim=1)
    return fitprune_from_mass(cross, self_sum, inputs.visual)


def instruction_rows(inputs: ScoringInputs) -> torch.Tensor:
    """[B, S] bool: FitPrune's instruction tokens (non-visual, non-padding, after the last visual)."""
    return instruction_rows_from(token_validity(inputs), inputs.visual)


def instruction_rows_from(valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """`instruction_rows` from the non-padding tokens `valid` and the visual tokens `visual` [B, S]."""
    b, s = visual.shape
    pos = torch.arange(s, device=visual.device).expand(b, s)
    last_visual = torch.where(visual, pos, -1).amax(dim=1, keepdim=True)  # [B, 1]
    return valid & ~visual & (pos > last_visual)


def instruction_rows_at(
    attn_mask: torch.Tensor | None, visual: torch.Tensor, positions: torch.Tensor | None
) -> torch.Tensor:
    """Graph entry point of the fused scoring: [B, S_l] bool instruction rows at a pruning layer.

    `attn_mask` is the uncompacted mask and `positions` [B, S_l] the layer's tokens' positions in
    it (None: the uncompacted sequence); `visual` [B, S_l] marks the layer's visual tokens. Padding
    is read off the uncompacted mask's diagonal at `positions`: the same rows as the compacted
    mask's diagonal, without gathering a mask for it. No mask: no padding.
    """
    if attn_mask is None:
        return instruction_rows_from(torch.ones_like(visual), visual)
    valid = mask_validity(attn_mask, visual.shape[0], attn_mask.shape[-1], visual.device)
    if positions is not None:
        valid = gather_tokens(valid, positions, 1)
    return instruction_rows_from(valid, visual)


def fitprune_from_mass(cross: torch.Tensor, self_sum: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """FitPrune's score [B, S] from the attention mass: cross x (self mass / number of visual tokens)."""
    n = visual.sum(dim=1, keepdim=True).clamp(min=1)
    return cross * (self_sum / n)


@register_scorer("fastv")
def fastv_score(inputs: ScoringInputs) -> torch.Tensor:
    """FastV: attention the last real token gives to each token, averaged over heads.

    "Last real" is each example's last non-padding row, so a right-padded direct call scores from
    its last prompt token, not from a padding row.
    """
    last_row = inputs.chunk_columns(attention_probs(inputs, rows=last_rows(inputs)))  # [B, H, 1, S]
    return last_row.mean(dim=1)[:, 0]


def last_rows(inputs: ScoringInputs) -> torch.Tensor:
    """[B, 1] each example's last non-padding row (its last prompt token)."""
    b, s = inputs.visual.shape
    pos = torch.arange(s, device=inputs.visual.device).expand(b, s)
    return torch.where(token_validity(inputs), pos, -1).amax(dim=1, keepdim=True).clamp(min=0)


@register_scorer("random")
def random_score(inputs: ScoringInputs) -> torch.Tensor:
    """Seeded uniform choice: the visual tokens whose ordinals `random_constants` drew score 0.

    Ties go to the lower position, so exactly those `num_delete` tokens are deleted.
    """
    doomed = torch.zeros(int(inputs.options["visual_count"]), device=inputs.visual.device)
    doomed[list(inputs.options["doomed"])] = 1.0
    ordinal = (inputs.visual.cumsum(dim=1) - 1).clamp(min=0)  # [B, S] ordinal of each visual token
    # clamped: an example with more visual tokens than the graph's count fails the run-time count
    # check after the graph (which names the problem), not an index error here
    return 1.0 - doomed[ordinal.clamp(max=doomed.shape[0] - 1)]


def random_constants(layer: int, visual_count: int, num_delete: int, seed: int) -> tuple[int, ...]:
    """Ordinals (among the visual tokens present) that `random` deletes at `layer`.

    `torch.randperm(n, generator=manual_seed(seed + layer))[:d]`, the same for every example.
    Drawn when the pass runs, outside tracing, so the compiled graph holds them as constants.
    """
    g = torch.Generator().manual_seed(seed + layer)
    return tuple(sorted(torch.randperm(visual_count, generator=g)[:num_delete].tolist()))


def plain_options(options) -> tuple:
    """A recipe's scorer options as sorted (name, value) pairs a graph can hold (numbers, strings,
    booleans); other values are left out (a scorer reads them through its own closure)."""
    return tuple(sorted((k, v) for k, v in dict(options).items() if isinstance(v, (bool, int, float, str))))


@functools.cache
def bind_scorer(fn: Scorer) -> Callable[..., torch.Tensor]:
    """`score_tokens` with `fn` bound: a graph target that carries its own scorer function.

    The function object travels inside the graph (FX keeps a call target as a global of the
    generated code), so a graph always runs the scorer its backend was built with, whatever is
    registered later under any name. One target per function (cached): the scoring calls of two
    layers are then alike, and layers of one shape share a compile (`layer_compile`).
    """

    def score_tokens_with_bound_scorer(query, key, attn_mask, visual, **kwargs) -> torch.Tensor:
        return score_tokens(query, key, attn_mask, visual, scorer=fn, **kwargs)

    return score_tokens_with_bound_scorer


def score_tokens(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    visual: torch.Tensor,
    *,
    scorer: str | Scorer,
    is_causal: bool,
    scale: float,
    layer: int = -1,
    num_delete: int = -1,
    visual_count: int = 0,
    doomed: tuple[int, ...] = (),
    continues: bool = False,
    shards: tuple[str, int, int] | None = None,
    hidden: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    scorer_options: tuple = (),
) -> torch.Tensor:
    """Graph entry point: run `scorer` (a function, or a registered name); returns fp32 scores [B, S].
    `shards`: `HeadShards` as a tuple (the graph's code spells its arguments out); `scorer_options`:
    the recipe's scorer options as (name, value) pairs of plain values."""
    if not callable(scorer):
        if scorer not in SCORERS:
            raise KeyError(f"unknown scorer {scorer!r}; registered: {sorted(SCORERS)}")
        scorer = SCORERS[scorer]
    options = {**dict(scorer_options), "visual_count": visual_count, "doomed": doomed}
    inputs = ScoringInputs(
        query, key, attn_mask, is_causal, scale, visual, layer, num_delete, options, continues,
        None if shards is None else HeadShards(*shards), hidden, value, positions,
    )  # fmt: skip
    return scorer(inputs).float()
