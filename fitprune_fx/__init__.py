"""fitprune-fx: FitPrune visual-token pruning for LLaVA models as a torch.compile backend.

from fitprune_fx import fitprune_backend
model.compile(backend=fitprune_backend("llava-1.5-7b/60.json"))   # in place: generate prunes too
fitprune_fx.compile(model, "llava-1.5-7b/60.json")                 # same, plus generate checks

Names load on first use (PEP 562), so `import fitprune_fx` and the command line start without
importing torch; `torch.compile(..., backend="fitprune")` finds the backend through the
`torch_dynamo_backends` entry point.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "FitpruneBackend": "fitprune_fx.backend",
    "GraphReport": "fitprune_fx.backend",
    "NotPruned": "fitprune_fx.errors",
    "fitprune_backend": "fitprune_fx.backend",
    "named_backend": "fitprune_fx.backend_by_name",
    "fit": "fitprune_fx.fitting",
    "UnsupportedAttention": "fitprune_fx.generation",
    "UnsupportedCacheError": "fitprune_fx.generation",
    "UnsupportedQuantizer": "fitprune_fx.generation",
    "UnsupportedPlacement": "fitprune_fx.generation",
    "check_generate_path": "fitprune_fx.generation",
    "compile": "fitprune_fx.generation",
    "ModelInfo": "fitprune_fx.recipe",
    "Recipe": "fitprune_fx.recipe",
    "RecipeError": "fitprune_fx.recipe",
    "merge_small_deletions": "fitprune_fx.recipe_merge",
    "RunTimeCheckFailed": "fitprune_fx.passes.run_time_checks",
    "ScoringInputs": "fitprune_fx.passes.scorers",
    "TokenKind": "fitprune_fx.passes.scorers",
    "attention_probs": "fitprune_fx.passes.scorers",
    "register_scorer": "fitprune_fx.passes.scorers",
    "one_layer_recipe": "fitprune_fx.recipe_shapes",
    "staged_recipe": "fitprune_fx.recipe_shapes",
}

__all__ = [  # = sorted(_EXPORTS), spelled out for linters
    "FitpruneBackend",
    "GraphReport",
    "ModelInfo",
    "NotPruned",
    "Recipe",
    "RecipeError",
    "RunTimeCheckFailed",
    "ScoringInputs",
    "TokenKind",
    "UnsupportedAttention",
    "UnsupportedCacheError",
    "UnsupportedQuantizer",
    "UnsupportedPlacement",
    "attention_probs",
    "check_generate_path",
    "compile",
    "fit",
    "fitprune_backend",
    "merge_small_deletions",
    "named_backend",
    "one_layer_recipe",
    "register_scorer",
    "staged_recipe",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fitprune_fx' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from fitprune_fx.passes.run_time_checks import RunTimeCheckFailed
    from fitprune_fx.passes.scorers import ScoringInputs, TokenKind, attention_probs, register_scorer

    from .backend import FitpruneBackend, GraphReport, fitprune_backend
    from .backend_by_name import named_backend
    from .errors import NotPruned
    from .fitting import fit
    from .generation import (
        UnsupportedAttention,
        UnsupportedCacheError,
        UnsupportedPlacement,
        UnsupportedQuantizer,
        check_generate_path,
        compile,
    )
    from .recipe import ModelInfo, Recipe, RecipeError
    from .recipe_merge import merge_small_deletions
    from .recipe_shapes import one_layer_recipe, staged_recipe
