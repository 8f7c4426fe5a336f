"""fitprune-fx: FitPrune visual-token pruning for LLaVA models as a torch.compile backend.

    from fitprune_fx import fitprune_backend
    model.compile(backend=fitprune_backend("llava-1.5-7b/60.json"))
"""

from fitprune_fx.passes.scorers import ScoringInputs, register_scorer

from .backend import FitpruneBackend, GraphReport, fitprune_backend
from .fit import fit
from .recipe import ModelInfo, Recipe, RecipeError

__all__ = [
    "FitpruneBackend",
    "GraphReport",
    "ModelInfo",
    "Recipe",
    "RecipeError",
    "ScoringInputs",
    "fit",
    "fitprune_backend",
    "register_scorer",
]
