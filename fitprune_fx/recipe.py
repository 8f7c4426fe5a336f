"""Pruning recipes: how many visual tokens to delete after each decoder layer.

A recipe is fitted once per model and FLOPs budget and stored as versioned JSON (DESIGN.md
section 3). Two ways to state the deletions:

- ``"prune"`` (formats 1 and 2): counts for an example with ``model.num_visual_tokens`` visual
  tokens; an example with a different count (several images, another resolution) gets the
  counts scaled proportionally by :meth:`Recipe.deletions_for`.
- ``"prune_fraction"`` (format ``fitprune-recipe/2`` only): per layer, the fraction of the
  visual tokens the example *entered the decoder with* that is deleted after that layer. Made for
  LLaVA-NeXT, whose visual count depends on the image size. The pass turns fractions into static
  counts for the count it finds in the graph: ``D_l = floor(F_l * n + 1/2)`` with ``F_l`` the
  running sum of the fractions (exact decimal arithmetic on the JSON numbers), ``d_l = D_l -
  D_(l-1)``; so the total never exceeds ``n`` and a layer may get 0 for a small ``n``.

A recipe is written with the lowest format that can express it (counts: version 1, fractions:
version 2), so version-1 files round-trip unchanged. Every problem with a recipe raises
:class:`RecipeError`, whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

from fitprune_fx.flops import (
    FlopsReport,
    reference_flops_reduction,
    reference_layer_flops,
    visual_tokens_per_layer,
)

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


@dataclass
class ModelInfo:
    """The model dimensions a recipe was fitted for (and that the FLOPs models need)."""

    name: str
    num_layers: int
    num_visual_tokens: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError unless every dimension is a positive int (heads optional)."""
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f'model "name" must be a non-empty string, got {self.name!r}')
        for key in _MODEL_REQUIRED[1:]:
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise RecipeError(
                    f'model "{key}" must be a positive integer, got {value!r}: '
                    "copy it from the model's config"
                )
        for key in _MODEL_OPTIONAL:
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise RecipeError(f'model "{key}" must be a positive integer or absent, got {value!r}')
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads is not None and kv is not None and heads % kv:
            raise RecipeError(
                f"model num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: "
                "copy both from the model's text config"
            )

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelInfo:
        """Read dimensions from a transformers config of a known family (pass ``model.config``).

        Visual tokens per image come from the family (LLaVA: ``(image_size // patch_size) ** 2``,
        plus the CLS token when the projector keeps it).
        """
        from .families import UnknownModel, family_for  # lazy: reading recipes needs no torch

        text = getattr(config, "text_config", None)
        try:
            family = family_for(config)
        except UnknownModel as e:
            raise RecipeError(f"cannot read model dimensions: {e} (pass model.config)") from e
        if text is None:
            raise RecipeError(f"cannot read model dimensions from {type(config).__name__}: no .text_config")
        tokens = family.visual_tokens_per_image(config)
        heads = getattr(text, "num_attention_heads", None)
        kv = getattr(text, "num_key_value_heads", None) or heads
        return cls(
            name=name or getattr(config, "_name_or_path", "") or "unnamed",
            num_layers=text.num_hidden_layers,
            num_visual_tokens=tokens,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=kv,
        )

    @classmethod
    def from_dict(cls, d: Any) -> ModelInfo:
        """Build from the recipe JSON ``"model"`` object, rejecting missing or unknown keys."""
        if not isinstance(d, dict):
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
        return cls(**{k: d[k] for k in _MODEL_REQUIRED + _MODEL_OPTIONAL if k in d})

    def to_dict(self) -> dict:
        """The JSON ``"model"`` object; optional head counts only when known."""
        out = {k: getattr(self, k) for k in _MODEL_REQUIRED}
        out.update({k: getattr(self, k) for k in _MODEL_OPTIONAL if getattr(self, k) is not None})
        return out


def _scale_cumulative(items: list[tuple[int, int]], old: int, new: int) -> dict[int, int]:
    """Scale per-layer counts from ``old`` to ``new`` visual tokens by cumulative rounding.

    ``D_l = round(cum_l * new / old)`` (half up, exact integer arithmetic), ``d_l = D_l - D_prev``:
    the total never exceeds ``new`` when the original total is at most ``old``, nothing is lost
    or invented by per-layer rounding, and ``new == old`` is the identity. Zeros are dropped.
    """
    out: dict[int, int] = {}
    cum = prev = 0
    for layer, count in sorted(items):
        cum += count
        scaled = (2 * cum * new + old) // (2 * old)
        if scaled != prev:
            out[layer] = scaled - prev
        prev = scaled
    return out


def _fraction_counts(fractions: dict[int, float], num_visual: int) -> dict[int, int]:
    """Per-layer counts for ``num_visual`` tokens from per-layer fractions (every layer kept).

    ``D_l = floor(F_l * n + 1/2)`` on the exact decimal values of the running sums ``F_l``.
    """
    out: dict[int, int] = {}
    running, prev = Fraction(0), 0
    for layer in sorted(fractions):
        running += Fraction(str(fractions[layer]))
        total = int(running * num_visual + Fraction(1, 2))  # floor: non-negative operand
        out[layer] = total - prev
        prev = total
    return out


def _parse_layer_map(mapping: Any, field: str, what: str, example: str) -> dict[int, Any]:
    """A JSON object {"layer": value} as {int layer: value}; errors name the field and the fix."""
    if not isinstance(mapping, dict):
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


def _read_recipe_text(source: str | os.PathLike) -> tuple[str, str]:
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


@dataclass
class Recipe:
    """Visual tokens to delete after each decoder layer, for one model, plus provenance."""

    model: ModelInfo
    prune: dict[int, int]
    scorer: str = "fitprune"
    budget: float | None = None
    flops_reduction: float | None = None
    fit: dict | None = None
    scorer_options: dict = field(default_factory=dict)
    prune_fraction: dict[int, float] | None = None  # format 2: fractions; `prune` is then derived

    def __post_init__(self) -> None:
        if self.prune_fraction is not None:
            self._validate_fractions()
            derived = _fraction_counts(self.prune_fraction, self.model.num_visual_tokens)
            if self.prune and self.prune != derived:
                raise RecipeError(
                    "a recipe states deletions either as counts (prune) or as fractions "
                    "(prune_fraction), not both: drop prune, it is derived from prune_fraction"
                )
            self.prune = derived  # counts at model.num_visual_tokens (describe, FLOPs)
        self.validate()

    @classmethod
    def from_fractions(cls, model: ModelInfo, fractions: dict[int, float], **fields: Any) -> Recipe:
        """A format-2 recipe deleting ``fractions[l]`` of the visual tokens present after layer l."""
        return cls(model=model, prune={}, prune_fraction=dict(fractions), **fields)

    @property
    def units(self) -> str:
        """``"fraction"`` for a prune_fraction recipe, else ``"count"``."""
        return "count" if self.prune_fraction is None else "fraction"

    def _validate_fractions(self) -> None:
        fractions = self.prune_fraction
        if not isinstance(fractions, dict):
            raise RecipeError(
                f'recipe "prune_fraction" must map layer -> fraction, got {type(fractions).__name__}: '
                'write it as {"2": 0.15, "3": 0.1}'
            )
        num_layers = self.model.num_layers
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

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise RecipeError on any structural problem; unknown scorer names are allowed."""
        if not isinstance(self.model, ModelInfo):
            raise RecipeError(
                f"Recipe.model must be a ModelInfo, got {type(self.model).__name__}: "
                "use Recipe.from_dict for JSON-like input"
            )
        self.model.validate()
        if not isinstance(self.prune, dict):
            raise RecipeError(
                f'recipe "prune" must map layer -> count, got {type(self.prune).__name__}: '
                'write it as {"2": 89, "3": 36}'
            )
        num_layers, num_visual = self.model.num_layers, self.model.num_visual_tokens
        for layer, count in self.prune.items():
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
        total = sum(self.prune.values())
        if total > num_visual:
            raise RecipeError(
                f"prune deletes {total} visual tokens in total but the model has only "
                f"{num_visual} (num_visual_tokens): lower the counts so they sum to at most "
                f"{num_visual}"
            )
        if not isinstance(self.scorer, str) or not self.scorer:
            raise RecipeError(
                f'recipe "scorer" must be a non-empty name such as "fitprune", got {self.scorer!r}'
            )
        for key in ("budget", "flops_reduction"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not 0.0 <= value <= 1.0):
                raise RecipeError(
                    f'recipe "{key}" must be a fraction in [0, 1] (0.6 means 60%), got {value!r}'
                )
        if self.fit is not None and not isinstance(self.fit, dict):
            raise RecipeError(
                f'recipe "fit" must be an object (e.g. {{"alpha": 0.4}}) or absent, got {self.fit!r}'
            )
        if not isinstance(self.scorer_options, dict):
            raise RecipeError(
                f'recipe "scorer_options" must be an object (e.g. {{"seed": 0}}), got {self.scorer_options!r}'
            )

    def check_model(self, config: Any) -> None:
        """Raise RecipeError when this recipe was fitted for a differently shaped model.

        ``config`` is a transformers ``LlavaConfig`` or a :class:`ModelInfo`. A different visual
        token count is fine (counts are scaled per example); depth and widths are not.
        """
        info = config if isinstance(config, ModelInfo) else ModelInfo.from_config(config)
        mismatches = [
            f"{key} {getattr(self.model, key)} vs {getattr(info, key)}"
            for key in ("num_layers", "hidden_size", "intermediate_size")
            if getattr(self.model, key) != getattr(info, key)
        ]
        if mismatches:
            raise RecipeError(
                f"recipe for {self.model.name!r} does not fit the model being compiled "
                f"({info.name!r}): {', '.join(mismatches)} (recipe vs model); fit a recipe for "
                "this model with fitprune_fx.fit, or rescale this one with "
                "recipe.rescaled_to(ModelInfo.from_config(model.config))"
            )

    # --------------------------------------------------------------------------- constructors
    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        """Parse and validate the JSON layout of DESIGN.md section 3."""
        if not isinstance(d, dict):
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
            return cls._from_fraction_dict(d)
        for key in ("model", "prune"):
            if key not in d:
                example = '{"2": 89, "3": 36}' if key == "prune" else "{...}"
                raise RecipeError(f'recipe has no "{key}" field: add "{key}": {example}')
        return cls(
            model=ModelInfo.from_dict(d["model"]),
            prune=_parse_layer_map(d["prune"], "prune", "count", '{"2": 89, "3": 36}'),
            scorer=d.get("scorer", "fitprune"),
            budget=d.get("budget"),
            flops_reduction=d.get("flops_reduction"),
            fit=d.get("fit"),
            scorer_options=d.get("scorer_options", {}),
        )

    @classmethod
    def _from_fraction_dict(cls, d: dict) -> Recipe:
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
        return cls.from_fractions(
            ModelInfo.from_dict(d["model"]),
            parsed,
            scorer=d.get("scorer", "fitprune"),
            budget=d.get("budget"),
            flops_reduction=d.get("flops_reduction"),
            fit=d.get("fit"),
            scorer_options=d.get("scorer_options", {}),
        )

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Recipe:
        """Load from a path, a shipped recipe name ("llava-1.5-7b/60.json") or JSON text."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text, where = source, "JSON text"
        else:
            text, where = _read_recipe_text(source)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(
                f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                "fix the file or re-export it with Recipe.to_json"
            ) from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, recipe: Recipe | dict | str | os.PathLike) -> Recipe:
        """Normalise a Recipe, a recipe dict, a path/shipped name or JSON text to a Recipe."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, os.PathLike)):
            return cls.from_json(recipe)
        raise RecipeError(
            f"cannot make a recipe from {type(recipe).__name__}: pass a Recipe, a dict, "
            "or the path of a recipe JSON file"
        )

    # ----------------------------------------------------------------------------- export
    def to_dict(self) -> dict:
        """The JSON layout; layer keys as strings in numeric order, absent fields omitted."""
        out: dict[str, Any] = {
            "format": FORMAT if self.prune_fraction is None else FORMAT_V2,
            "model": self.model.to_dict(),
            "scorer": self.scorer,
        }
        if self.scorer_options:
            out["scorer_options"] = dict(self.scorer_options)
        if self.prune_fraction is None:
            out["prune"] = {str(layer): self.prune[layer] for layer in sorted(self.prune)}
        else:
            out["prune_fraction"] = {str(k): self.prune_fraction[k] for k in sorted(self.prune_fraction)}
        for key in ("budget", "flops_reduction", "fit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text, one top-level field per line (stable, diff-friendly); written if ``path``."""
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items())
        text = "{\n" + body + "\n}\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # ----------------------------------------------------------------------------- counts
    def deletions_for(self, num_visual: int) -> dict[int, int]:
        """Per-layer deletions for an example with ``num_visual`` visual tokens.

        Proportional scaling with cumulative rounding: the total never exceeds ``num_visual``,
        and at the native count the recipe comes back unchanged (zero entries dropped). A
        fraction recipe rounds its running fractions of ``num_visual`` (module docstring).
        """
        if not _is_int(num_visual) or num_visual < 0:
            raise RecipeError(f"num_visual must be an integer >= 0, got {num_visual!r}")
        if self.prune_fraction is not None:
            counts = _fraction_counts(self.prune_fraction, num_visual)
            return {layer: d for layer, d in counts.items() if d}
        return _scale_cumulative(list(self.prune.items()), self.model.num_visual_tokens, num_visual)

    def pruning_plan(self, num_visual: int) -> dict[int, int]:
        """What the pass applies: `deletions_for(num_visual)` plus every listed layer whose count is 0.

        A layer the recipe lists with 0 still scores (and compacts nothing): that is how the scoring
        overhead is measured and how tests check that the machinery itself is exact.
        """
        listed = self.prune_fraction if self.prune_fraction is not None else self.prune
        return dict(sorted({**dict.fromkeys(listed, 0), **self.deletions_for(num_visual)}.items()))

    def tokens_per_layer(self, num_visual: int | None = None) -> list[int]:
        """Visual tokens at the input of layers 0..L-1, then after the last layer (len L+1)."""
        n = self.model.num_visual_tokens if num_visual is None else num_visual
        return visual_tokens_per_layer(self.deletions_for(n), self.model.num_layers, n)

    def rescaled_to(self, info: ModelInfo) -> Recipe:
        """Map this recipe onto a model of another depth and/or visual token count.

        Layer ``l`` goes to ``floor(l * L' / L)`` (same relative depth; collisions are summed),
        then counts are scaled to ``info.num_visual_tokens`` by cumulative rounding. The
        reference FLOPs reduction is recomputed for the new model; the budget is kept as intent.
        """
        fit: dict[str, Any] = {"rescaled_from": self.model.name}
        if self.fit:
            fit["original_fit"] = self.fit
        options = dict(self.scorer_options)
        common = dict(scorer=self.scorer, budget=self.budget, fit=fit, scorer_options=options)
        if self.prune_fraction is not None:  # fractions need no count scaling: only layers move
            fractions: dict[int, Fraction] = {}
            for layer, value in self.prune_fraction.items():
                target = layer * info.num_layers // self.model.num_layers
                fractions[target] = fractions.get(target, Fraction(0)) + Fraction(str(value))
            out = Recipe.from_fractions(info, {k: float(v) for k, v in fractions.items()}, **common)
            out.flops_reduction = round(out.reference_reduction(), 4)
            return out
        merged: dict[int, int] = {}
        for layer, count in self.prune.items():
            target = layer * info.num_layers // self.model.num_layers
            merged[target] = merged.get(target, 0) + count
        prune = _scale_cumulative(list(merged.items()), self.model.num_visual_tokens, info.num_visual_tokens)
        out = Recipe(model=info, prune=prune, **common)
        out.flops_reduction = round(out.reference_reduction(), 4)
        return out

    # ----------------------------------------------------------------------------- FLOPs
    def reference_reduction(self) -> float:
        """FLOPs reduction under the reference model (the one published labels use), unrounded."""
        m = self.model
        return reference_flops_reduction(
            self.prune, m.num_layers, m.num_visual_tokens, m.hidden_size, m.intermediate_size
        )

    def flops_report(self, num_text_tokens: int = 0, num_visual: int | None = None) -> FlopsReport:
        """Per-layer FLOPs under the reference and the full model for one prefill example."""
        m = self.model
        n = m.num_visual_tokens if num_visual is None else num_visual
        return FlopsReport.build(
            self.deletions_for(n),
            m.num_layers,
            n,
            m.hidden_size,
            m.intermediate_size,
            num_text=num_text_tokens,
            num_heads=m.num_attention_heads,
            num_kv_heads=m.num_key_value_heads,
        )

    def describe(self) -> str:
        """A per-layer table (deleted, visual tokens left, FLOPs share) for ``inspect``."""
        m = self.model
        tokens = self.tokens_per_layer()
        h, inter = m.hidden_size, m.intermediate_size
        unpruned = m.num_layers * reference_layer_flops(m.num_visual_tokens, m.num_visual_tokens, h, inter)
        budget = "-" if self.budget is None else f"{100 * self.budget:g}%"
        recorded = "" if self.flops_reduction is None else f", recorded {100 * self.flops_reduction:.2f}%"
        lines = [
            f"recipe for {m.name}: {m.num_layers} layers, {m.num_visual_tokens} visual tokens, "
            f"hidden {h}, MLP {inter}",
            f"scorer {self.scorer}, budget {budget}, FLOPs reduction "
            f"{100 * self.reference_reduction():.2f}% (reference model, visual tokens){recorded}",
        ]
        if self.prune_fraction is not None:
            lines.append(
                "deletions are fractions of the visual tokens present at the decoder input "
                f"(format 2); counts below are for {m.num_visual_tokens} visual tokens"
            )
        lines.append(f"{'layer':>5} {'deleted':>7} {'visual left':>11} {'FLOPs % of unpruned':>19}")
        total_share = 0.0
        for layer in range(m.num_layers):
            share = 100 * reference_layer_flops(tokens[layer], tokens[layer + 1], h, inter) / unpruned
            total_share += share
            lines.append(f"{layer:>5} {self.prune.get(layer, 0):>7} {tokens[layer + 1]:>11} {share:>19.2f}")
        lines.append(f"{'total':>5} {sum(self.prune.values()):>7} {tokens[-1]:>11} {total_share:>19.2f}")
        return "\n".join(lines)
