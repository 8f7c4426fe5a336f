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

The parts, each readable alone: `fit_statistics` (embedding and one-layer runs with the
scores), `fit_walk` (the walk for one alpha), `fit_search` (the alpha search); this module holds
the session that caches the unpruned pass, and turns a walk into a recipe.

Speed (vs. the reference that reruns the whole model per alpha): the vision tower, projector
and embeddings run once; layer outputs of the unpruned pass are cached, so a walk recomputes a
layer only for examples that already deleted something; everything per token is batched
tensor code (no Python loop over tokens); attention probabilities are computed in fp32 only for
instruction and visual query rows (which then also give those rows' attention output, so no
second attention is run for them), and only at the layers a walk visits; fewer exact walks
(guided search). ``benchmarks/fit_speed.py`` measures fit time against one plain forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from fitprune_fx.families import family_for

from . import fit_search, fit_walk
from .fit_search import SearchResult
from .fit_statistics import VISUAL, CalibrationState, LayerRunner
from .fit_walk import Selector, Walk, removable
from .recipe_merge import merge_small_deletions

__all__ = ["FitSession", "SearchResult", "Walk", "fit", "round_cumulative"]


def counts_vary_with_image(model: nn.Module) -> bool:
    """Whether the model's visual count depends on the image (LLaVA-NeXT): recipes in fractions."""
    return family_for(model).counts_vary_with_image


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
        self._progress = progress or (lambda n: None)
        self.runner = LayerRunner(model, batch_size, self._progress)
        self.info = ModelInfo.from_config(model.config)
        self.num_layers = len(self.runner.layers)
        self.min_keep = min_keep
        self.device = self.runner.device
        with torch.no_grad():
            self.start = self.runner.embed_all(calibration)
            self.num_examples = self.start.hidden.shape[0]
            self.n_visual = (self.start.kind == VISUAL).sum(dim=1)  # [B]
            if int(self.n_visual.min()) == 0:
                raise ValueError("every calibration example needs at least one image token")
            if counts_vary_with_image(model):  # no fixed count per image: normalise to the mean count
                mean = max(1, round(float(self.n_visual.double().mean())))
                self.info = dataclasses.replace(self.info, num_visual_tokens=mean)
            self._root_pass()
        self.stats_seconds = time.perf_counter() - t0

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
                self.runner.split = self.runner.split and self.runner.check_split(state)
            # The last layer's output feeds nothing: its attention (for the scores) is enough.
            out, cross, self_ = self.runner.run(layer, state, everyone, attention_only=last)
            self.root_out.append(None if last and self.runner.split else out)
            self.root_cross.append(cross)
            self.root_self.append(self_)
            # Masses computed exactly as the walk computes its current masses (bitwise equal).
            _, c_mass = removable(cross, is_vis, torch.zeros_like(no_cap).double(), 0.0, no_cap)
            _, s_mass = removable(self_, is_vis, torch.zeros_like(no_cap).double(), 0.0, no_cap)
            self.orig_cross.append(c_mass)
            self.orig_self.append(s_mass)
            state = state.with_hidden(out)
            self._progress(1)

    def _layer_scores(self, layer: int, state: CalibrationState, todo: Tensor):
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
            out[todo], cross[todo], self_[todo] = self.runner.run(layer, state, todo, attention_only=True)
        return out, cross, self_

    def walk(
        self,
        alpha: float,
        budget: float | None = None,
        select: Selector | None = None,
        trace: list | None = None,
    ) -> Walk:
        """Walk the layers for one alpha (see `fitprune_fx.fit_walk.walk`)."""
        return fit_walk.walk(self, alpha, budget, select, trace)

    def static_walk(self, alpha: float) -> list[float]:
        """Cumulative deletions of the cheap walk on unpruned statistics (`fit_walk.static_walk`)."""
        return fit_walk.static_walk(self, alpha)

    def search(self, budget: float, tolerance: float = 0.01, strategy: str = "guided") -> SearchResult:
        """Smallest alpha whose exact walk meets `budget` (see `fitprune_fx.fit_search.search`)."""
        return fit_search.search(self, budget, tolerance, strategy)

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
        fit = {
            "alpha": round(result.alpha, 6),
            "samples": self.num_examples,
            "seconds": round(seconds, 3),
            "walks": len(result.walks),
            "tolerance": tolerance,
            "search": strategy,
        }
        recipe = dataclasses.replace(recipe, flops_reduction=round(recipe.reference_reduction(), 4), fit=fit)
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
    min_saving: float = 0.0,
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
    its ``recipe(budget)`` per budget (the unpruned pass is then shared). `min_saving` > 0
    merges pruning layers whose deletions save less than that many decoder layers' FLOPs into a
    neighbouring pruning layer (:func:`fitprune_fx.recipe_merge.merge_small_deletions`): each
    pruning layer pays one scoring pass.
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
        recipe = session.recipe(budget, tolerance, name=name, strategy=strategy, units=units)
        return merge_small_deletions(recipe, min_saving) if min_saving > 0 else recipe
    finally:
        if bar is not None:
            bar.close()
