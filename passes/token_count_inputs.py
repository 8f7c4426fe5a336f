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
        # Length of each extra input (an int, or an expression in the graph's own size symbols) and device.
        self.counts: list[tuple[int | sympy.Expr, torch.device]] = []
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
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        shape_env = getattr(self.fake_mode, "shape_env", None)
        if shape_env is None:
            return None
        if isinstance(count, int):
            length, hint, lower, upper = count, count, 2, count
        else:
            length = count.node.expr
            if not length.free_symbols <= set(self._where) or count.node.hint is None:
                return None
            bounds = shape_env.bound_sympy(length)
            hint, lower, upper = int(count.node.hint), max(bounds.lower, at_least), bounds.upper
        if lower < 2 or hint < lower:
            return None
        name = f"fitprune_tokens_after_layer_{layer}" if layer >= 0 else "fitprune_tokens_entering_decoder"
        symbol = shape_env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        shape_env.constrain_symbol_range(symbol, lower, upper)
        size = shape_env.create_symintnode(symbol, hint=hint)
        with self.fake_mode:
            fake = torch.empty((size,), dtype=torch.uint8, device=device)
        with self.graph.inserting_after(self._last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = node.meta["val"] = fake
        self._last = node
        self.counts.append((length, device))
        self.fakes.append(fake)
        if not isinstance(length, int):
            self._symbols += sorted(length.free_symbols - set(self._symbols), key=str)
        return node

    def values(self, args: tuple | list) -> list[torch.Tensor]:
        """The tensors to pass for the extra placeholders on a call with the graph's own `args`.

        Counts in S are evaluated at this call's S. Allocated again only when S changes (static
        counts: once).
        """
        key = tuple(int(args[self._where[symbol]]) for symbol in self._symbols)
        if self._last_call is None or self._last_call[0] != key:
            sizes = dict(zip(self._symbols, key, strict=True))
            lengths = [n if isinstance(n, int) else int(n.xreplace(sizes)) for n, _ in self.counts]
            tensors = [
                torch.empty((n,), dtype=torch.uint8, device=d)
                for n, (_, d) in zip(lengths, self.counts, strict=True)
            ]
            self._last_call = (key, tensors)
        return self._last_call[1]


def _symbol_inputs(placeholders: list[fx.Node]) -> dict[sympy.Symbol, int]:
    """Size symbol -> the argument index of the SymInt input that carries it (Dynamo lifts every
    size symbol a graph uses into such an input; a symbol without one keeps its count an expression)."""
    where: dict[sympy.Symbol, int] = {}
    for index, node in enumerate(placeholders):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            where.setdefault(value.node.expr, index)
    return where
