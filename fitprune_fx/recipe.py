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

A `Recipe` is a frozen value (its maps are read-only): validated once when made, never changed
after; `dataclasses.replace` makes a changed copy. The file format (parsing, validation,
serialisation, versions) lives in `fitprune_fx.recipe_format`; this module holds the value and
the operations on it (scaling to other visual counts, rescaling to other depths, FLOPs, tables).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from fitprune_fx.flops import (
    FlopsReport,
    reference_flops_reduction,
    reference_layer_flops,
    visual_tokens_per_layer,
)

from .recipe_format import (
    FORMAT,
    FORMAT_V2,
    SUPPORTED_FORMATS,
    RecipeError,
    _is_int,
    check_fractions,
    check_model_fields,
    check_recipe_fields,
    model_json_object,
    parse_model,
    parse_recipe,
    read_recipe_json,
    recipe_json_object,
    recipe_json_text,
    shipped_recipes,
)

__all__ = [
    "FORMAT",
    "FORMAT_V2",
    "SUPPORTED_FORMATS",
    "ModelInfo",
    "Recipe",
    "RecipeError",
    "shipped_recipes",
]


@dataclass(frozen=True)
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
        check_model_fields(self)

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
        return cls(**parse_model(d))

    def to_dict(self) -> dict:
        """The JSON ``"model"`` object; optional head counts only when known."""
        return model_json_object(self)


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


@dataclass(frozen=True)
class Recipe:
    """Visual tokens to delete after each decoder layer, for one model, plus provenance (frozen)."""

    model: ModelInfo
    prune: Mapping[int, int]
    scorer: str = "fitprune"
    budget: float | None = None
    flops_reduction: float | None = None
    fit: Mapping | None = None
    scorer_options: Mapping = field(default_factory=dict)
    prune_fraction: Mapping[int, float] | None = None  # format 2: fractions; `prune` is then derived

    def __post_init__(self) -> None:
        if self.prune_fraction is not None:
            check_fractions(self.prune_fraction, self.model.num_layers)
            derived = _fraction_counts(self.prune_fraction, self.model.num_visual_tokens)
            if self.prune and dict(self.prune) != derived:
                raise RecipeError(
                    "a recipe states deletions either as counts (prune) or as fractions "
                    "(prune_fraction), not both: drop prune, it is derived from prune_fraction"
                )
            object.__setattr__(self, "prune", derived)  # counts at model.num_visual_tokens
        self.validate()
        for name in ("prune", "prune_fraction", "fit", "scorer_options"):  # read-only from here on
            value = getattr(self, name)
            if isinstance(value, Mapping) and not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    @classmethod
    def from_fractions(cls, model: ModelInfo, fractions: Mapping[int, float], **fields: Any) -> Recipe:
        """A format-2 recipe deleting ``fractions[l]`` of the visual tokens present after layer l."""
        return cls(model=model, prune={}, prune_fraction=dict(fractions), **fields)

    @property
    def units(self) -> str:
        """``"fraction"`` for a prune_fraction recipe, else ``"count"``."""
        return "count" if self.prune_fraction is None else "fraction"

    def validate(self) -> None:
        """Raise RecipeError on any structural problem; unknown scorer names are allowed."""
        if not isinstance(self.model, ModelInfo):
            raise RecipeError(
                f"Recipe.model must be a ModelInfo, got {type(self.model).__name__}: "
                "use Recipe.from_dict for JSON-like input"
            )
        check_recipe_fields(self)

    def check_model(self, config: Any) -> None:
        """Raise RecipeError when this recipe was fitted for a differently shaped model.

        ``config`` is a transformers config of a known family or a :class:`ModelInfo`. A different visual
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

    # --------------------------------------------------------------------------- format
    @classmethod
    def from_dict(cls, d: Any) -> Recipe:
        """Parse and validate the JSON layout of DESIGN.md section 3 (`recipe_format`)."""
        fields = parse_recipe(d)
        return cls(model=ModelInfo(**fields.pop("model")), **fields)

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Recipe:
        """Load from a path, a shipped recipe name ("llava-1.5-7b/60.json") or JSON text."""
        return cls.from_dict(read_recipe_json(source))

    @classmethod
    def load(cls, recipe: Recipe | dict | str | os.PathLike) -> Recipe:
        """Normalise a Recipe, a recipe dict, a path/shipped name or JSON text to a Recipe."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, os.PathLike)):
            return cls.from_json(recipe)
        raise RecipeError(
            f"cannot make a recipe from {type(recipe).__name__}: pass a Recipe, a dict, "
            "or the path of a recipe JSON file"
        )

    def to_dict(self) -> dict:
        """The JSON layout; layer keys as strings in numeric order, absent fields omitted."""
        return recipe_json_object(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text, one top-level field per line (stable, diff-friendly); written if ``path``."""
        return recipe_json_text(self, path)

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
            fit["original_fit"] = dict(self.fit)
        options = dict(self.scorer_options)
        common = dict(scorer=self.scorer, budget=self.budget, fit=fit, scorer_options=options)
        if self.prune_fraction is not None:  # fractions need no count scaling: only layers move
            fractions: dict[int, Fraction] = {}
            for layer, value in self.prune_fraction.items():
                target = layer * info.num_layers // self.model.num_layers
                fractions[target] = fractions.get(target, Fraction(0)) + Fraction(str(value))
            out = Recipe.from_fractions(info, {k: float(v) for k, v in fractions.items()}, **common)
            return dataclasses.replace(out, flops_reduction=round(out.reference_reduction(), 4))
        merged: dict[int, int] = {}
        for layer, count in self.prune.items():
            target = layer * info.num_layers // self.model.num_layers
            merged[target] = merged.get(target, 0) + count
        prune = _scale_cumulative(list(merged.items()), self.model.num_visual_tokens, info.num_visual_tokens)
        out = Recipe(model=info, prune=prune, **common)
        return dataclasses.replace(out, flops_reduction=round(out.reference_reduction(), 4))

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
