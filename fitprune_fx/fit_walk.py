"""The layer walk for one alpha (FitPrune's per-layer selection), exact and static.

At layer l each example deletes the intersection of (a) the largest set of lowest-cross tokens
whose removal keeps at least (1 - alpha) of the layer's original cross mass and (b) the same
for self mass; the walk stops once the projected reference FLOPs reduction meets the budget.
`walk` recomputes the layers of examples that already deleted something (the pruned model's
scores); `static_walk` only rescales the cached unpruned scores (a cheap predictor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fitprune_fx.flops import projected_reduction

from .fit_statistics import VISUAL, compact

if TYPE_CHECKING:
    from .fitting import FitSession

# select(layer, cross [B, w], self [B, w], is_visual [B, w]) -> drop mask [B, w]
Selector = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def removable(scores: Tensor, is_vis: Tensor, original: Tensor, alpha: float, cap: Tensor):
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


@torch.no_grad()
def walk(
    session: FitSession,
    alpha: float,
    budget: float | None = None,
    select: Selector | None = None,
    trace: list | None = None,
) -> Walk:
    """Walk the layers for one alpha (stop once `budget` is met; all layers if None).

    `select(layer, cross, self, is_visual) -> drop mask` replaces the FitPrune rule (tests
    use it to replay a fixed recipe); `trace` collects (layer, kind, pos, cross, self).
    """
    B, L = session.num_examples, session.num_layers
    info = session.info
    state = session.start
    root = torch.ones(B, dtype=torch.bool, device=session.device)  # nothing deleted yet
    deleted = torch.zeros(B, L, dtype=torch.long, device=session.device)
    kept_c = torch.ones(B, L, dtype=torch.float64, device=session.device)
    kept_s = torch.ones_like(kept_c)
    weight = info.num_visual_tokens / session.n_visual.double()  # normalise multi-image
    cumulative: list[float] = []
    reduction, met, runs = 0.0, False, 0
    for layer in range(L):
        todo = (~root).nonzero().flatten()  # examples that deleted something already
        out, cross, self_ = session._layer_scores(layer, state, todo)
        runs += len(todo)
        is_vis = state.kind == VISUAL
        if trace is not None:
            trace.append((layer, state.kind, state.pos, cross, self_))
        cap = (is_vis.sum(dim=1) - session.min_keep).clamp(min=0)
        del_c, mass_c = removable(cross, is_vis, session.orig_cross[layer], alpha, cap)
        del_s, mass_s = removable(self_, is_vis, session.orig_self[layer], alpha, cap)
        drop = del_c & del_s if select is None else select(layer, cross, self_, is_vis)
        count = drop.sum(dim=1)
        deleted[:, layer] = count
        kept_c[:, layer] = (mass_c - (cross * drop).double().sum(1)) / session.orig_cross[layer]
        kept_s[:, layer] = (mass_s - (self_ * drop).double().sum(1)) / session.orig_self[layer]
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
        state = state.with_hidden(out)
        if bool(count.any()):
            state = compact(state, state.valid & ~drop)
            root &= count == 0
        if session.runner.split and len(todo):
            session.runner.mlp(layer, state, todo)  # kept rows only
    means = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
    return Walk(alpha, deleted, means, reduction, met, kept_c, kept_s, runs)


@torch.no_grad()
def static_walk(session: FitSession, alpha: float) -> list[float]:
    """Cheap approximate walk on the unpruned statistics (no layer is recomputed).

    Returns the cumulative mean deletions after every layer. Scores of surviving tokens
    are the unpruned ones, rescaled for the softmax renormalisation (attention that
    deleted tokens received goes to the others); other effects of earlier deletions are
    ignored. Only used to steer the exact search.
    """
    present = session.start.kind == VISUAL  # [B, S0] in the original layout
    gone = torch.zeros_like(present)
    weight = session.info.num_visual_tokens / session.n_visual.double()
    cumulative: list[float] = []
    for layer in range(session.num_layers):
        cap = (present.sum(dim=1) - session.min_keep).clamp(min=0)
        c, s = session.root_cross[layer], session.root_self[layer]
        c = c * _renormalise(c, gone)
        s = s * _renormalise(s, gone)
        del_c, _ = removable(c, present, session.orig_cross[layer], alpha, cap)
        del_s, _ = removable(s, present, session.orig_self[layer], alpha, cap)
        drop = del_c & del_s
        present, gone = present & ~drop, gone | drop
        done = cumulative[-1] if cumulative else 0.0
        cumulative.append(done + float((drop.sum(dim=1) * weight).mean()))
    return cumulative


def _renormalise(scores: Tensor, gone: Tensor) -> Tensor:
    """[B, 1] factor total / (total - mass of deleted columns) of unpruned scores."""
    total = scores.double().sum(dim=1)
    lost = torch.where(gone, scores, 0).double().sum(dim=1)
    return (total / (total - lost).clamp(min=1e-30)).float()[:, None]
