"""The alpha search: the smallest alpha whose exact walk meets a FLOPs budget, to a tolerance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fitprune_fx.flops import projected_reduction

from .fit_walk import Walk, static_walk

if TYPE_CHECKING:
    from .fitting import FitSession


class BudgetOutOfReach(ValueError):
    """The budget needs more FLOPs cut than the fit can reach on this model (`reachable`)."""

    def __init__(self, budget: float, reachable: float) -> None:
        super().__init__(
            f"budget {budget:.3f} is out of reach: the most the fit can cut on this model is "
            f"{reachable:.3f} of the reference FLOPs (alpha = 1); ask for at most {reachable:.3f}"
        )
        self.budget = budget
        self.reachable = reachable


@dataclass
class SearchResult:
    alpha: float
    walk: Walk
    walks: list[Walk] = field(default_factory=list)


def _meets(session: FitSession, cumulative: list[float], budget: float) -> bool:
    """Whether some prefix of a walk's cumulative deletions meets the budget."""
    return any(_reduction(session, cumulative[: k + 1]) >= budget for k in range(len(cumulative)))


def bisect(test: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
    """Bisection for the smallest passing alpha: `lo` fails, `hi` passes (or is 1)."""
    while hi - lo > tol * (1 + 1e-9):
        mid = (lo + hi) / 2
        if test(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _reduction(session: FitSession, cumulative: list[float]) -> float:
    info = session.info
    return projected_reduction(
        cumulative,
        session.num_layers,
        info.num_visual_tokens,
        info.hidden_size,
        info.intermediate_size,
    )


def _static_equivalent(session: FitSession, walk: Walk, tol: float) -> float:
    """Alpha at which the static walk, cut at the same layer, saves as much as `walk`."""
    k = len(walk.means)
    saves_as_much = lambda a: _reduction(session, static_walk(session, a)[:k]) >= walk.reduction  # noqa: E731
    return bisect(saves_as_much, 0.0, 1.0, tol)


def search(
    session: FitSession, budget: float, tolerance: float = 0.01, strategy: str = "guided"
) -> SearchResult:
    """Smallest alpha (to `tolerance`) whose exact walk meets `budget`.

    Both strategies return an alpha whose walk meets the budget while a walk at most
    `tolerance` lower does not (or is alpha 0, which deletes nothing).
    ``"bisect"`` is the reference's bisection on [0, 1] (7 exact walks for 0.01).
    ``"guided"`` (default) needs fewer exact walks: the cheap `static_walk` predicts
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
            walks[alpha] = session.walk(alpha, budget)
            session._progress(1)
        return walks[alpha].met

    lo, hi = 0.0, 1.0  # alpha = 0 deletes nothing, so it fails any budget > 0
    width = tolerance * (1 + 1e-9)
    if strategy == "guided":
        fine = tolerance / 8
        predicted = bisect(lambda a: _meets(session, static_walk(session, a), budget), 0.0, 1.0, fine)
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
            shift = probe - _static_equivalent(session, walks[probe], fine)
    alpha = bisect(exact, lo, hi, tolerance)
    if not exact(alpha):  # only when nothing below 1 passed: alpha is 1
        raise BudgetOutOfReach(budget, walks[alpha].reduction)
    return SearchResult(alpha, walks[alpha], list(walks.values()))
