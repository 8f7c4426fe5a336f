"""`torch.compile(model, backend="fitprune", options={"recipe": ...})`: the backend by name.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so the name works
without importing fitprune_fx first. Every graph of every call with the same options goes to one
shared `FitpruneBackend`, so its reports stay reachable: `fitprune_fx.named_backend(recipe)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from torch import fx

from .backend import FitpruneBackend, fitprune_backend
from .recipe import Recipe, RecipeError

_SHARED: dict[str, FitpruneBackend] = {}


def named_backend(recipe: Recipe | dict | str | os.PathLike, **options) -> FitpruneBackend:
    """The backend that `backend="fitprune"` with these options uses (created on first use).

    `recipe` and `options` as given in `torch.compile(..., options={"recipe": recipe, **options})`.
    """
    key = _key(recipe, options)
    if key not in _SHARED:
        _SHARED[key] = fitprune_backend(recipe, **options)
    return _SHARED[key]


def fitprune(
    gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None
) -> Callable:
    """The Dynamo backend registered as "fitprune"."""
    options = dict(options or {})
    if "recipe" not in options:
        raise RecipeError(
            'backend="fitprune" needs options={"recipe": <shipped name, path, dict or Recipe>}, e.g. '
            'torch.compile(model, backend="fitprune", options={"recipe": "llava-1.5-7b/60.json"})'
        )
    recipe = options.pop("recipe")
    return named_backend(recipe, **options)(gm, example_inputs, mode=mode)


def _key(recipe, options: dict) -> str:
    """A stable key for (recipe, options): paths and names by text, dicts by content."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe_key = f"path:{os.fspath(recipe)}"
    elif isinstance(recipe, dict):
        recipe_key = "dict:" + json.dumps(recipe, sort_keys=True, default=str)
    else:
        recipe_key = f"object:{id(recipe)}"
    return recipe_key + "|" + json.dumps(options, sort_keys=True, default=repr)


def register() -> None:
    """Register "fitprune" with Dynamo now (for an install without entry points); idempotent."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends.registry import _COMPILER_FNS

    if "fitprune" not in _COMPILER_FNS:
        register_backend(fitprune, name="fitprune")
