"""FLOPs models for visual-token pruning in a multimodal decoder.

Two models, both counting one multiply-accumulate as one FLOP (the convention of the model the
published FitPrune recipes were labelled with; double every number for hardware FLOPs). Only
matmuls are counted: norms, RoPE, softmax, residual adds and the scoring of tokens are ignored,
and so is the vision tower, the projector and ``lm_head`` (pruning changes none of them).

Reference model (DESIGN.md section 2), visual tokens only. For a layer whose attention sees
``n`` visual tokens and which deletes ``d`` of them, ``n' = n - d``::

    attention = 3*n*h*h + 2*n*n*h      # q/k/v projections, scores and weighted sum (no mask)
    rest      = n'*h*h + 3*n'*h*m      # o_proj and the 3 MLP matmuls, after this layer's deletion

That reading (``n`` before, ``n'`` after the layer's own deletion, because tokens are dropped
between attention and ``o_proj``) gives the "60" published recipe 59.70%, the value DESIGN.md
quotes; it is also how the fitting loop of the authors' code charges a layer.

Full model (:func:`full_layer_flops`): text tokens too, grouped-query k/v projections and a
causal score matrix. With no text, as many kv heads as heads and ``causal=False`` it equals
the reference model exactly, which is how the tests tie the two together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


def reference_layer_flops(n_before: int, n_after: int, hidden: int, intermediate: int) -> float:
    """Reference FLOPs of a layer: attention on ``n_before`` visual tokens, rest on ``n_after``."""
    n, n2, h, m = n_before, n_after, hidden, intermediate
    attention = 3 * n * h * h + 2 * n * n * h
    rest = n2 * h * h + 3 * n2 * h * m
    return float(attention + rest)


def visual_tokens_per_layer(prune: Mapping[int, int], num_layers: int, num_visual: int) -> list[int]:
    """Visual tokens at the input of layers 0..L-1 plus one entry after the last layer (len L+1).

    ``prune`` maps a layer to the tokens deleted after it; counts are clamped at zero so a
    malformed recipe cannot produce negative FLOPs here (validation is the recipe's job).
    """
    counts = [num_visual]
    n = num_visual
    for layer in range(num_layers):
        n = max(n - int(prune.get(layer, 0)), 0)
        counts.append(n)
    return counts


def reference_reduction(counts: Sequence[float], hidden: int, intermediate: int) -> float:
    """``1 - pruned / unpruned`` with the reference model, from the visual counts at the input of
    each layer plus one after the last (len L+1; real-valued counts are fine)."""
    layers = len(counts) - 1
    pruned = sum(reference_layer_flops(counts[i], counts[i + 1], hidden, intermediate) for i in range(layers))
    unpruned = layers * reference_layer_flops(counts[0], counts[0], hidden, intermediate)
    return 1.0 - pruned / unpruned if unpruned else 0.0


def reference_flops_reduction(
    prune: Mapping[int, int], num_layers: int, num_visual: int, hidden: int, intermediate: int
) -> float:
    """``1 - pruned / unpruned`` over all layers with the reference model (visual tokens only)."""
    return reference_reduction(visual_tokens_per_layer(prune, num_layers, num_visual), hidden, intermediate)


def projected_reduction(
    cumulative: Sequence[float], num_layers: int, num_visual: int, hidden: int, intermediate: int
) -> float:
    """Reference reduction for real-valued cumulative deletions after layers 0..k-1 (the fit's
    projection): layers after the last entry keep the last token count."""
    last = len(cumulative) - 1
    after = [num_visual - (cumulative[min(i, last)] if cumulative else 0.0) for i in range(num_layers)]
    return reference_reduction([float(num_visual), *after], hidden, intermediate)


def full_layer_flops(
    n_before: int,
    n_after: int,
    hidden: int,
    intermediate: int,
    num_text: int = 0,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    causal: bool = True,
) -> float:
    """FLOPs of one prefill decoder layer with ``num_text`` text and ``n_before`` visual tokens.

    Counts q/k/v projections on all ``S = num_text + n_before`` tokens (k and v are
    ``hidden * num_kv_heads / num_heads`` wide: grouped-query attention, head_dim * num_heads
    assumed to equal hidden), attention scores and the weighted sum (``S*(S+1)/2`` query-key
    pairs per head when ``causal``, ``S*S`` otherwise; GQA does not shrink these), then
    ``o_proj`` and the gate/up/down MLP on the ``S' = num_text + n_after`` kept tokens.
    """
    h, m = hidden, intermediate
    s, s2 = num_text + n_before, num_text + n_after
    if num_heads and num_kv_heads:
        kv_width = h * num_kv_heads / num_heads
    else:
        kv_width = h
    projections = s * h * h + 2 * s * h * kv_width
    pairs = s * (s + 1) / 2 if causal else s * s
    attention = 2 * pairs * h
    rest = s2 * h * h + 3 * s2 * h * m
    return float(projections + attention + rest)


def full_flops_reduction(
    prune: Mapping[int, int],
    num_layers: int,
    num_visual: int,
    hidden: int,
    intermediate: int,
    num_text: int = 0,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    causal: bool = True,
) -> float:
    """``1 - pruned / unpruned`` over all layers with the full model (text tokens included).

    Text tokens add cost that pruning cannot remove, so with ``causal=False`` (MHA) the result
    never exceeds :func:`reference_flops_reduction`. The causal mask halves the quadratic term,
    which can tip it the other way for almost text-free prompts and late deletions (e.g. 1 text
    token, LLaVA-1.5-7B dims, deletions only after the last layer); the text cost outweighs
    that once ``T * (4h + 3m + T + 1) >= N * N`` (T text, N visual tokens: T >= 7 for
    LLaVA-1.5-7B). With GQA the k/v projections shrink and no such ordering is promised.
    """
    counts = visual_tokens_per_layer(prune, num_layers, num_visual)
    kw = dict(num_text=num_text, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal)
    pruned = sum(
        full_layer_flops(counts[i], counts[i + 1], hidden, intermediate, **kw) for i in range(num_layers)
    )
    unpruned = num_layers * full_layer_flops(num_visual, num_visual, hidden, intermediate, **kw)
    return 1.0 - pruned / unpruned if unpruned else 0.0


@dataclass
class FlopsRow:
    """One decoder layer: visual tokens entering/leaving it and its FLOPs under both models."""

    layer: int
    tokens_in: int
    tokens_out: int
    reference_flops: float
    full_flops: float


@dataclass
class FlopsReport:
    """Per-layer FLOPs of a pruned prefill next to the unpruned one, under both FLOPs models.

    ``reference_*`` counts visual tokens only (the model published labels use); ``full_*``
    adds ``num_text_tokens`` text tokens, GQA and the causal mask. Units: one
    multiply-accumulate = 1 FLOP.
    """

    rows: list[FlopsRow]
    num_text_tokens: int
    num_visual: int
    reference_total: float
    reference_unpruned: float
    full_total: float
    full_unpruned: float
    reference_reduction: float = field(init=False)
    full_reduction: float = field(init=False)

    def __post_init__(self) -> None:
        ref, full = self.reference_unpruned, self.full_unpruned
        self.reference_reduction = 1.0 - self.reference_total / ref if ref else 0.0
        self.full_reduction = 1.0 - self.full_total / full if full else 0.0

    @classmethod
    def build(
        cls,
        prune: Mapping[int, int],
        num_layers: int,
        num_visual: int,
        hidden: int,
        intermediate: int,
        num_text: int = 0,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        causal: bool = True,
    ) -> FlopsReport:
        """Evaluate both models layer by layer for ``prune`` (counts for ``num_visual`` tokens)."""
        counts = visual_tokens_per_layer(prune, num_layers, num_visual)
        kw = dict(num_text=num_text, num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal)
        rows = [
            FlopsRow(
                layer=i,
                tokens_in=counts[i],
                tokens_out=counts[i + 1],
                reference_flops=reference_layer_flops(counts[i], counts[i + 1], hidden, intermediate),
                full_flops=full_layer_flops(counts[i], counts[i + 1], hidden, intermediate, **kw),
            )
            for i in range(num_layers)
        ]
        return cls(
            rows=rows,
            num_text_tokens=num_text,
            num_visual=num_visual,
            reference_total=sum(r.reference_flops for r in rows),
            reference_unpruned=num_layers
            * reference_layer_flops(num_visual, num_visual, hidden, intermediate),
            full_total=sum(r.full_flops for r in rows),
            full_unpruned=num_layers * full_layer_flops(num_visual, num_visual, hidden, intermediate, **kw),
        )

    def __str__(self) -> str:
        """A fixed-width table, one line per layer, then totals and both reductions."""
        lines = [f"{'layer':>5} {'vis in':>6} {'vis out':>7} {'ref GFLOPs':>11} {'full GFLOPs':>11}"]
        for r in self.rows:
            lines.append(
                f"{r.layer:>5} {r.tokens_in:>6} {r.tokens_out:>7} "
                f"{r.reference_flops / 1e9:>11.3f} {r.full_flops / 1e9:>11.3f}"
            )
        lines.append(
            f"{'total':>5} {self.num_visual:>6} {self.rows[-1].tokens_out if self.rows else 0:>7} "
            f"{self.reference_total / 1e9:>11.3f} {self.full_total / 1e9:>11.3f}"
        )
        lines.append(
            f"reduction: reference {100 * self.reference_reduction:.2f}% (visual tokens only), "
            f"full {100 * self.full_reduction:.2f}% (with {self.num_text_tokens} text tokens); "
            "1 multiply-accumulate = 1 FLOP"
        )
        lines.append(
            "ref: the FitPrune paper's FLOPs model, visual tokens only (the budget a recipe is fitted to); "
            "full: every projection, attention and MLP of the decoder over text and visual tokens "
            "(text tokens from --text-tokens, never deleted), which is what a prefill actually runs"
        )
        return "\n".join(lines)
