"""fitprune-fx: FitPrune visual-token pruning for LLaVA models as a torch.compile backend.

from fitprune_fx import fitprune_backend
model.compile(backend=fitprune_backend("llava-1.5-7b/60.json"))   # in place: generate prunes too
fitprune_fx.compile(model, "llava-1.5-7b/60.json")                 # same, plus generate checks
"""

from fitprune_fx.passes.scorers import ScoringInputs, register_scorer

from .backend import FitpruneBackend, GraphReport, fitprune_backend
from .fit import fit
from .generation import UnsupportedCacheError, check_generate_path, compile
from .recipe import ModelInfo, Recipe, RecipeError

__all__ = [
    "FitpruneBackend",
    "GraphReport",
    "ModelInfo",
    "Recipe",
    "RecipeError",
    "ScoringInputs",
    "UnsupportedCacheError",
    "check_generate_path",
    "compile",
    "fit",
    "fitprune_backend",
    "register_scorer",
]
