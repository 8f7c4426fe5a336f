"""Give each pruning layer's token count a symbol of its own, so Inductor compiles shared kernels.

With static shapes, the sequence length after each pruning layer (S - d_l) is a constant that
Inductor bakes into every kernel of the layers after it: a recipe that prunes after 8 layers
compiles up to 8 variants of each layer kernel (81 C++ kernels against 19 unpruned, 8 layers at
hidden 512), and compile time grows with them. Here the number of tokens kept after pruning
layer l becomes the length of an extra graph input, a size-only tensor [S - d_l] that the backend
passes on every call; the kept indices take their length from it (`select_kept_tokens_like`),
so the kernels after layer l read that length as an argument and layers of one structure share
one kernel.

A symbolic prompt length S (Dynamo recompiles with one after a second prompt length) needs the
same: left as expressions, every layer's kernels inline their own `S - d_l` and share nothing
(8 layers at hidden 512: 65 kernels, and a first call of 2.6x unpruned's at any length). There
each input's length is computed per call from the S of the call's arguments (read from a graph
SymInt input that carries S: Dynamo passes its size symbols as inputs).

Each symbol's range is [2, count], or [visual tokens left, upper bound of S - d_l] (S holds the
visual tokens still present): the compiler has nothing to guard on (a guard on a symbol that no
Dynamo input carries would be unresolvable), and sizes 0 and 1, which are always specialised,
are excluded.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
from torch import fx

from .token_ops import select_kept_tokens


@torch.library.custom_op("fitprune::select_kept_tokens_like", mutates_args=())
def select_kept_tokens_like(scores: torch.Tensor, visual: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """`select_kept_tokens` keeping `length` [K] tokens of S: its result [B, K] takes its length from
    `length` when compiling, and the S - K deleted tokens are no constant of the graph."""
    num_delete = scores.shape[1] - length.shape[0]
    if num_delete < 0:
        raise RuntimeError(
            f"fitprune: {length.shape[0]} tokens to keep of {scores.shape[1]} "
            "(a token-count input of the wrong length)"
        )
    return select_kept_tokens(scores, visual, num_delete)


@select_kept_tokens_like.register_fake
def _select_kept_tokens_like_fake(scores, visual, length):
    return scores.new_empty((scores.shape[0], length.shape[0]), dtype=torch.long)


class TokenCountInputs:
    """The extra placeholders of one graph: one per pruning layer that deletes tokens."""

    def __init__(self, graph: fx.Graph, fake_mode) -> None:
        self.graph = graph
        self.fake_mode = fake_mode
        # The extra inputs: (length or data as a function of the call's sizes and per-example visual
        # counts, device, whether it is data [B, n] rather than a size-only [length]).
        self.counts: list[tuple[Callable[[dict, list | None], int | list], torch.device, bool]] = []
        self._example_counts: int | None = None  # index of the input holding per-example visual counts
        self._counts_from_mask = False  # that input is a bool mask to sum per example
        self.fakes: list[torch.Tensor] = []  # their fake values (example inputs for Inductor)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._last = placeholders[-1]
        self._where = _symbol_inputs(placeholders)  # size symbol -> index of the argument carrying it
        self._symbols: list[sympy.Symbol] = []  # the size symbols the counts depend on
        self._last_call: tuple[tuple, list[torch.Tensor]] | None = None  # (their sizes, the tensors)

    def length_after(
        self, layer: int, count: int | torch.SymInt, device: torch.device, at_least: int = 2
    ) -> fx.Node | None:
        """A new placeholder [count] on `device` whose length is a fresh symbol with range [2, count]
        (`layer` -1: the count entering the first decoder layer, `entry_compaction`).

        `count` may be an expression in the prompt length S: then the range is [at_least, upper
        bound of the expression], `at_least` being a lower bound the caller knows (the visual
        tokens left, which S holds). None when there is no shape environment, the count can be
        below 2 (sizes 0 and 1 are always specialised), or S is not a graph input the backend
        could read it from: the caller then keeps the length it had.
        """
        shape_env = getattr(self.fake_mode, "shape_env", None)
        if shape_env is None:
            return None
        if isinstance(count, int):
            return self._new_input(layer, count, 2, count, device, lambda sizes, counts: count, set())
        expr = count.node.expr
        if not expr.free_symbols <= set(self._where) or count.node.hint is None:
            return None
        bounds = shape_env.bound_sympy(expr)
        lower, upper = max(bounds.lower, at_least), bounds.upper
        return self._new_input(
            layer,
            int(count.node.hint),
            lower,
            upper,
            device,
            lambda sizes, counts: int(expr.xreplace(sizes)),
            expr.free_symbols,
        )

    def length_per_call(
        self,
        layer: int,
        kept: Callable[[dict[sympy.Symbol, int], list[int] | None], int],
        sizes: list[int | torch.SymInt],
        upper: int | torch.SymInt,
        device: torch.device,
    ) -> fx.Node | None:
        """A new placeholder whose length, a fresh symbol with range [2, upper bound of `upper`], is
        `kept(values)` on each call: `values` maps the size symbols of `sizes` (graph sizes: the
        prompt length, the batch, the visual tokens) to their values at that call.

        What a count that is no sympy expression of the sizes needs (a recipe's rounding rule of
        the visual count). None when a symbol of `sizes` is not a graph input, or the count at this
        trace's hints is below 2.
        """
        shape_env = getattr(self.fake_mode, "shape_env", None)
        if shape_env is None:
            return None
        if not self.can_read(sizes):
            return None
        symbols = _free_symbols(sizes)
        # the hint assumes every example holds total / B (no per-example counts at trace time)
        hint = kept({s: int(shape_env.backed_var_to_val[s]) for s in symbols}, None)
        bound = upper if isinstance(upper, int) else shape_env.bound_sympy(upper.node.expr).upper
        return self._new_input(layer, hint, 2, bound, device, kept, symbols)

    def _new_input(
        self,
        layer: int,
        hint: int,
        lower: int,
        upper: int | sympy.Expr,
        device: torch.device,
        length: Callable[[dict[sympy.Symbol, int], list[int] | None], int],
        symbols: set[sympy.Symbol],
    ) -> fx.Node | None:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        if lower < 2 or hint < lower:
            return None
        shape_env = self.fake_mode.shape_env
        name = f"fitprune_tokens_after_layer_{layer}" if layer >= 0 else "fitprune_tokens_entering_decoder"
        symbol = shape_env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        shape_env.constrain_symbol_range(symbol, lower, upper)
        size = shape_env.create_symintnode(symbol, hint=hint)
        with self.fake_mode:
            fake = torch.empty((size,), dtype=torch.uint8, device=device)
        self._symbols += sorted(symbols - set(self._symbols), key=str)
        return self._placeholder(name, fake, length, device, data=False)

    def can_read(self, sizes: list) -> bool:
        """Whether every size symbol of `sizes` arrives with each call (a SymInt graph input with a hint)."""
        shape_env = getattr(self.fake_mode, "shape_env", None)
        return shape_env is not None and _free_symbols(sizes) <= set(self._where) & set(
            shape_env.backed_var_to_val
        )

    def values(self, args: tuple | list) -> list[torch.Tensor]:
        """The tensors to pass for the extra placeholders on a call with the graph's own `args`.

        Counts in S are evaluated at this call's sizes: every size symbol the graph takes as an input
        (a guard may have made two of them one after a count was set up, so all are read). Allocated
        again only when a size changes (static counts: once).
        """
        sizes = tuple(int(args[index]) for index in self._where.values()) if self._symbols else ()
        counts = None if self._example_counts is None else self._read_counts(args[self._example_counts])
        key = (sizes, counts and tuple(counts))
        if self._last_call is None or self._last_call[0] != key:
            values = dict(zip(self._where, sizes, strict=True)) if sizes else {}
            tensors = [
                torch.tensor(fn(values, counts), dtype=torch.long, device=d)
                if data
                else torch.empty((fn(values, counts),), dtype=torch.uint8, device=d)
                for fn, d, data in self.counts
            ]
            self._last_call = (key, tensors)
        return self._last_call[1]

    def read_example_counts(self, node: fx.Node, from_mask: bool = False) -> None:
        """Read each call's per-example visual counts from graph input `node` and hand them to every
        count function: a [B] long CPU tensor (a family's mark: no device sync), or with `from_mask`
        a [B, S] or [B, S, 1] bool mask whose rows are summed (on a GPU one sync per call, at the
        point where transformers' own image-placeholder check already syncs)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self._example_counts = placeholders.index(node)
        self._counts_from_mask = from_mask

    def _read_counts(self, value: torch.Tensor) -> list[int]:
        if self._counts_from_mask:
            value = value.reshape(value.shape[0], -1).sum(dim=1)
        return value.tolist()

    def per_example_input(
        self, name: str, rows: Callable[[dict, list | None], list], batch, width: int, device: torch.device
    ) -> fx.Node:
        """A new data placeholder [batch, width] long on `device`: `rows(sizes, counts)` at each call."""
        with self.fake_mode:
            fake = torch.empty((batch, width), dtype=torch.long, device=device)
        return self._placeholder(name, fake, rows, device, data=True)

    def _placeholder(self, name: str, fake: torch.Tensor, fn: Callable, device: torch.device, data: bool):
        """Append an extra input `name` (example value `fake`) made by `fn(sizes, counts)` at each call."""
        with self.graph.inserting_after(self._last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = node.meta["val"] = fake
        self._last = node
        self.counts.append((fn, device, data))
        self.fakes.append(fake)
        return node


def _free_symbols(sizes: list) -> set[sympy.Symbol]:
    """The size symbols the SymInts among `sizes` are expressions in."""
    return set().union(*(s.node.expr.free_symbols for s in sizes if isinstance(s, torch.SymInt)))


def _symbol_inputs(placeholders: list[fx.Node]) -> dict[sympy.Symbol, int]:
    """Size symbol -> the argument index of the SymInt input that carries it (Dynamo lifts every
    size symbol a graph uses into such an input; a symbol without one keeps its count an expression)."""
    where: dict[sympy.Symbol, int] = {}
    for index, node in enumerate(placeholders):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            where.setdefault(value.node.expr, index)
    return where
