"""The recipe file format: parse, validate and serialise (versions 1 and 2), apart from the value.

JSON layout (DESIGN.md section 3), one top-level field per line when written::

    {"format": "fitprune-recipe/1",
     "model": {"name": ..., "num_layers": 32, "num_visual_tokens": 576, "hidden_size": 4096,
               "intermediate_size": 11008},
     "scorer": "fitprune", "prune": {"2": 89, "3": 36}, "budget": 0.6, "flops_reduction": 0.597,
     "fit": {"alpha": 0.43, "samples": 64, "seconds": 12.3}}

Version 2 (``fitprune-recipe/2``) may state ``"prune_fraction"`` instead of ``"prune"``. A recipe is
written with the lowest version that can express it. Every problem raises `RecipeError`, whose
message says what is wrong and how to fix it. Nothing here builds a `Recipe`: parsing returns the
constructor's keyword arguments, validation reads the value's fields.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "fitprune-recipe/1"
FORMAT_V2 = "fitprune-recipe/2"  # adds "prune_fraction"
SUPPORTED_FORMATS = (FORMAT, FORMAT_V2)
SHIPPED_PACKAGE = "fitprune_fx.recipes"

_MODEL_REQUIRED = ("name", "num_layers", "num_visual_tokens", "hidden_size", "intermediate_size")
_MODEL_OPTIONAL = ("num_attention_heads", "num_key_value_heads")
_RECIPE_KEYS = (
    "format",
    "model",
    "scorer",
    "scorer_options",
    "prune",
    "prune_fraction",
    "budget",
    "flops_reduction",
    "fit",
)


class RecipeError(ValueError):
    """A recipe is malformed or does not fit the model; the message says the problem and fix."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_model_fields(info: Any) -> None:
    """Raise RecipeError unless every dimension is a positive int (heads optional)."""
    if not isinstance(info.name, str) or not info.name:
        raise RecipeError(f'model "name" must be a non-empty string, got {info.name!r}')
    for key in _MODEL_REQUIRED[1:]:
        value = getattr(info, key)
        if not _is_int(value) or value < 1:
            raise RecipeError(
                f'model "{key}" must be a positive integer, got {value!r}: copy it from the model\'s config'
            )
    for key in _MODEL_OPTIONAL:
        value = getattr(info, key)
        if value is not None and (not _is_int(value) or value < 1):
            raise RecipeError(f'model "{key}" must be a positive integer or absent, got {value!r}')
    heads, kv = info.num_attention_heads, info.num_key_value_heads
    if heads is not None and kv is not None and heads % kv:
        raise RecipeError(
            f"model num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: "
            "copy both from the model's text config"
        )


def parse_model(d: Any) -> dict[str, Any]:
    """Build from the recipe JSON ``"model"`` object, rejecting missing or unknown keys."""
    if not isinstance(d, Mapping):
        raise RecipeError(
            f'recipe "model" must be an object with {", ".join(_MODEL_REQUIRED)}, got {type(d).__name__}'
        )
    missing = [k for k in _MODEL_REQUIRED if k not in d]
    if missing:
        raise RecipeError(
            f'recipe "model" is missing {", ".join(repr(k) for k in missing)}: '
            f"add them (required: {', '.join(_MODEL_REQUIRED)})"
        )
    unknown = sorted(set(d) - set(_MODEL_REQUIRED) - set(_MODEL_OPTIONAL))
    if unknown:
        raise RecipeError(
            f'recipe "model" has unknown keys {unknown}: allowed are '
            f"{', '.join(_MODEL_REQUIRED + _MODEL_OPTIONAL)}"
        )
    return dict(**{k: d[k] for k in _MODEL_REQUIRED + _MODEL_OPTIONAL if k in d})


def model_json_object(info: Any) -> dict:
    """The JSON ``"model"`` object; optional head counts only when known."""
    out = {k: getattr(info, k) for k in _MODEL_REQUIRED}
    out.update({k: getattr(info, k) for k in _MODEL_OPTIONAL if getattr(info, k) is not None})
    return out


def check_fractions(fractions: Any, num_layers: int) -> None:
    """Raise RecipeError unless `fractions` maps decoder layers to fractions summing to <= 1."""
    if not isinstance(fractions, Mapping):
        raise RecipeError(
            f'recipe "prune_fraction" must map layer -> fraction, got {type(fractions).__name__}: '
            'write it as {"2": 0.15, "3": 0.1}'
        )
    for layer, value in fractions.items():
        if not _is_int(layer) or not 0 <= layer < num_layers:
            raise RecipeError(
                f"prune_fraction layer {layer!r} is not a decoder layer: use 0-based layer "
                f"numbers 0..{num_layers - 1}"
            )
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise RecipeError(
                f"prune_fraction for layer {layer} is {value!r}: give the fraction in [0, 1] of the "
                "visual tokens present at the decoder input that is deleted after that layer"
            )
    total = sum((Fraction(str(v)) for v in fractions.values()), Fraction(0))
    if total > 1:
        raise RecipeError(
            f"prune_fraction deletes {float(total):.4g} of the visual tokens in total: the "
            "fractions must sum to at most 1"
        )


def check_recipe_fields(recipe: Any) -> None:
    """Raise RecipeError on any structural problem; unknown scorer names are allowed."""
    if not hasattr(recipe.model, "num_visual_tokens"):
        raise RecipeError(
            f"Recipe.model must be a ModelInfo, got {type(recipe.model).__name__}: "
            "use Recipe.from_dict for JSON-like input"
        )
    if not isinstance(recipe.prune, Mapping):
        raise RecipeError(
            f'recipe "prune" must map layer -> count, got {type(recipe.prune).__name__}: '
            'write it as {"2": 89, "3": 36}'
        )
    num_layers, num_visual = recipe.model.num_layers, recipe.model.num_visual_tokens
    for layer, count in recipe.prune.items():
        if not _is_int(layer):
            raise RecipeError(
                f"prune layer key {layer!r} is not an integer: use 0-based decoder layer "
                "numbers (ints in Python, numeric strings in JSON via Recipe.from_dict)"
            )
        if not 0 <= layer < num_layers:
            raise RecipeError(
                f"prune layer {layer} is outside the model: num_layers is {num_layers}, so "
                f"layers are 0..{num_layers - 1}; fix the index, or map a recipe fitted for "
                "another depth with Recipe.rescaled_to"
            )
        if not _is_int(count):
            raise RecipeError(
                f"prune count for layer {layer} is {count!r}, not an integer: give the "
                "number of visual tokens deleted after that layer"
            )
        if count < 0:
            raise RecipeError(
                f"prune count for layer {layer} is negative ({count}): counts are visual "
                "tokens deleted and must be >= 0"
            )
    total = sum(recipe.prune.values())
    if total > num_visual:
        raise RecipeError(
            f"prune deletes {total} visual tokens in total but the model has only "
            f"{num_visual} (num_visual_tokens): lower the counts so they sum to at most "
            f"{num_visual}"
        )
    if not isinstance(recipe.scorer, str) or not recipe.scorer:
        raise RecipeError(
            f'recipe "scorer" must be a non-empty name such as "fitprune", got {recipe.scorer!r}'
        )
    for key in ("budget", "flops_reduction"):
        value = getattr(recipe, key)
        if value is not None and (not _is_number(value) or not 0.0 <= value <= 1.0):
            raise RecipeError(f'recipe "{key}" must be a fraction in [0, 1] (0.6 means 60%), got {value!r}')
    if recipe.fit is not None and not isinstance(recipe.fit, Mapping):
        raise RecipeError(
            f'recipe "fit" must be an object (e.g. {{"alpha": 0.4}}) or absent, got {recipe.fit!r}'
        )
    if not isinstance(recipe.scorer_options, Mapping):
        raise RecipeError(
            f'recipe "scorer_options" must be an object (e.g. {{"seed": 0}}), got {recipe.scorer_options!r}'
        )


def _parse_layer_map(mapping: Any, field: str, what: str, example: str) -> dict[int, Any]:
    """A JSON object {"layer": value} as {int layer: value}; errors name the field and the fix."""
    if not isinstance(mapping, Mapping):
        raise RecipeError(
            f'recipe "{field}" must map layer -> {what}, got {type(mapping).__name__}: write it as {example}'
        )
    parsed: dict[int, Any] = {}
    for key, value in mapping.items():
        layer = _parse_layer_key(key)
        if layer in parsed:
            raise RecipeError(f"{field} layer {layer} appears twice: keep one entry per layer")
        parsed[layer] = value
    return parsed


def _parse_layer_key(key: Any) -> int:
    """A JSON layer key ("2") or an int; anything else is a RecipeError."""
    if _is_int(key):
        return key
    if isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key):
        return int(key)
    raise RecipeError(
        f'prune layer key {key!r} is not an integer: use 0-based decoder layer numbers, e.g. "2"'
    )


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package, e.g. ``"llava-1.5-7b/60.json"``."""
    root = importlib.resources.files(SHIPPED_PACKAGE)
    names = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(("_", ".")):
            names += [f"{folder.name}/{f.name}" for f in folder.iterdir() if f.name.endswith(".json")]

    def order(name: str) -> tuple:
        folder, _, stem = name.rpartition("/")
        stem = stem.removesuffix(".json")
        return (folder, int(stem) if stem.isdigit() else 10**9, stem)

    return sorted(names, key=order)


def read_recipe_text(source: str | os.PathLike) -> tuple[str, str]:
    """Find ``source`` as a file, else under the shipped recipes folder; returns (text, where)."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    parts = PurePosixPath(os.fspath(source).replace(os.sep, "/")).parts
    if parts and parts[0] == "recipes":
        parts = parts[1:]
    if parts and not path.is_absolute():
        shipped = importlib.resources.files(SHIPPED_PACKAGE).joinpath(*parts)
        if shipped.is_file():
            return shipped.read_text(encoding="utf-8"), f"shipped recipe {'/'.join(parts)}"
    available = ", ".join(shipped_recipes()) or "none"
    raise RecipeError(
        f"recipe file not found: {os.fspath(source)!r} is not a file and not a shipped recipe; "
        f"pass an existing path or one of the shipped recipes: {available}"
    )


def parse_recipe(d: Any) -> dict[str, Any]:
    """Constructor arguments of a `Recipe` from its JSON object (``model`` as `parse_model` gives it)."""
    if not isinstance(d, Mapping):
        raise RecipeError(f"a recipe must be a JSON object, got {type(d).__name__}")
    if "format" not in d:
        raise RecipeError(f'recipe has no "format" field: add "format": "{FORMAT}"')
    if d["format"] not in SUPPORTED_FORMATS:
        raise RecipeError(
            f"unknown recipe format {d['format']!r}: supported versions are "
            f"{', '.join(SUPPORTED_FORMATS)}; upgrade fitprune-fx or re-export the recipe"
        )
    unknown = sorted(set(d) - set(_RECIPE_KEYS))
    if unknown:
        raise RecipeError(
            f"recipe has unknown keys {unknown}: allowed are {', '.join(_RECIPE_KEYS)} "
            '(free-form provenance belongs in "fit")'
        )
    if "prune_fraction" in d:
        return _parse_fraction_recipe(d)
    for key in ("model", "prune"):
        if key not in d:
            example = '{"2": 89, "3": 36}' if key == "prune" else "{...}"
            raise RecipeError(f'recipe has no "{key}" field: add "{key}": {example}')
    return dict(
        model=parse_model(d["model"]),
        prune=_parse_layer_map(d["prune"], "prune", "count", '{"2": 89, "3": 36}'),
        scorer=d.get("scorer", "fitprune"),
        budget=d.get("budget"),
        flops_reduction=d.get("flops_reduction"),
        fit=d.get("fit"),
        scorer_options=d.get("scorer_options", {}),
    )


def _parse_fraction_recipe(d: Mapping) -> dict[str, Any]:
    """A ``prune_fraction`` recipe (format 2 only, no ``prune`` beside it)."""
    if d["format"] != FORMAT_V2:
        raise RecipeError(
            f'"prune_fraction" needs "format": "{FORMAT_V2}" (this recipe says {d["format"]!r}): '
            'change the format, or state counts in "prune" instead'
        )
    if "prune" in d:
        raise RecipeError('recipe has both "prune" and "prune_fraction": keep one (counts or fractions)')
    if "model" not in d:
        raise RecipeError('recipe has no "model" field: add "model": {...}')
    parsed = _parse_layer_map(d["prune_fraction"], "prune_fraction", "fraction", '{"2": 0.15, "3": 0.1}')
    return dict(
        model=parse_model(d["model"]),
        prune={},
        prune_fraction=parsed,
        scorer=d.get("scorer", "fitprune"),
        budget=d.get("budget"),
        flops_reduction=d.get("flops_reduction"),
        fit=d.get("fit"),
        scorer_options=d.get("scorer_options", {}),
    )


def read_recipe_json(source: str | os.PathLike) -> Any:
    """The JSON object of a recipe given as a path, a shipped recipe name or JSON text."""
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text, where = source, "JSON text"
    else:
        text, where = read_recipe_text(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
            "fix the file or re-export it with Recipe.to_json"
        ) from None
    return data


def recipe_json_object(recipe: Any) -> dict:
    """The JSON layout; layer keys as strings in numeric order, absent fields omitted."""
    out: dict[str, Any] = {
        "format": FORMAT if recipe.prune_fraction is None else FORMAT_V2,
        "model": model_json_object(recipe.model),
        "scorer": recipe.scorer,
    }
    if recipe.scorer_options:
        out["scorer_options"] = dict(recipe.scorer_options)
    if recipe.prune_fraction is None:
        out["prune"] = {str(layer): recipe.prune[layer] for layer in sorted(recipe.prune)}
    else:
        out["prune_fraction"] = {str(k): recipe.prune_fraction[k] for k in sorted(recipe.prune_fraction)}
    for key in ("budget", "flops_reduction", "fit"):
        if getattr(recipe, key) is not None:
            value = getattr(recipe, key)
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def recipe_json_text(recipe: Any, path: str | os.PathLike | None = None) -> str:
    """JSON text, one top-level field per line (stable, diff-friendly); written if ``path``."""
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in recipe_json_object(recipe).items())
    text = "{\n" + body + "\n}\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
