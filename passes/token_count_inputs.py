"""Give each pruning layer's token count a symbol of its own, so Inductor compiles shared kernels.

With static shapes, the sequence length after each pruning layer (S - d_l) is a constant that
Inductor bakes into every kernel of the layers after it: a recipe that prunes after 8 layers
compiles up to 8 variants of each layer kernel (81 C++ kernels against 19 unpruned, 8 layers at
hidden 512), and compile time grows with them. Here the number of tokens kept after pruning
layer l becomes the length of an extra graph input, a size-only tensor [S - d_l] that the backend
passes on every call; the kept indices take their length from it (`select_kept_tokens_like`),
so the kernels after layer l read that length as an argument and layers of one structure share
one kernel.

Only for graphs with a static prompt length: the count is then known, and each symbol's range is
[2, count], so no guard on it can arise (a guard on a symbol that no Dynamo input carries would
be unresolvable). A graph with a symbolic length S keeps the expressions S - d.
"""

from __future__ import annotations

import torch
from torch import fx

from .token_ops import select_kept_tokens


@torch.library.custom_op("fitprune::select_kept_tokens_like", mutates_args=())
def select_kept_tokens_like(
    scores: torch.Tensor, visual: torch.Tensor, num_delete: int, length: torch.Tensor
) -> torch.Tensor:
    """`select_kept_tokens`, whose result length [B, K] is read from `length` [K] when compiling."""
    kept = select_kept_tokens(scores, visual, num_delete)
    if kept.shape[1] != length.shape[0]:
        raise RuntimeError(
            f"fitprune: {kept.shape[1]} tokens kept but the graph was compiled for {length.shape[0]} "
            "(a token-count input of the wrong length)"
        )
    return kept


@select_kept_tokens_like.register_fake
def _select_kept_tokens_like_fake(scores, visual, num_delete, length):
    return scores.new_empty((scores.shape[0], length.shape[0]), dtype=torch.long)


class TokenCountInputs:
    """The extra placeholders of one graph: one per pruning layer that deletes tokens."""

    def __init__(self, graph: fx.Graph, fake_mode) -> None:
        self.graph = graph
        self.fake_mode = fake_mode
        self.counts: list[tuple[int, torch.device]] = []  # length and device of each extra input
        self.fakes: list[torch.Tensor] = []  # their fake values (example inputs for Inductor)
        self._last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def length_after(self, layer: int, count: int, device: torch.device) -> fx.Node | None:
        """A new placeholder [count] on `device` whose length is a fresh symbol with range [2, count].

        None when there is no shape environment or the count is below 2 (sizes 0 and 1 are
        always specialised): the caller then keeps the static length.
        """
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        shape_env = getattr(self.fake_mode, "shape_env", None)
        if shape_env is None or count < 2:
            return None
        name = f"fitprune_tokens_after_layer_{layer}"
        symbol = shape_env.create_symbol(count, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        shape_env.constrain_symbol_range(symbol, 2, count)
        size = shape_env.create_symintnode(symbol, hint=count)
        with self.fake_mode:
            fake = torch.empty((size,), dtype=torch.uint8, device=device)
        with self.graph.inserting_after(self._last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = node.meta["val"] = fake
        self._last = node
        self.counts.append((count, device))
        self.fakes.append(fake)
        return node

    def values(self) -> list[torch.Tensor]:
        """The tensors to pass for the extra placeholders on every call (allocate once)."""
        return [torch.empty((n,), dtype=torch.uint8, device=device) for n, device in self.counts]
