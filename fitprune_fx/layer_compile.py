"""Compile a pruned decoder graph layer by layer, each distinct layer once.

After the pass, the layers behind a pruning layer differ only in the parameters they read and in
the symbol of their token count (`passes/token_count_inputs.py`), yet Inductor lowers each of them
again, on symbolic sizes: at hidden 512, 8 layers and the 70 recipe it took 11-15 s on the decoder
graph against 5-6 s unpruned. Here the graph is split at layer boundaries
(`passes/split_layers.py`); partitions that run the same program on inputs of the same kind are
compiled once, on inputs whose sizes are fresh symbols of a shape environment of their own, and
the compiled code is called for each of them (7.7-10.2 s there: 4 compiles for 10 partitions;
3 once the first pruning layer was entered like the later ones, `passes/entry_compaction.py`).

A shared compile must not rest on any fact about its sizes beyond their kind: if Inductor records
a guard on those symbols, the split is abandoned and the caller compiles the whole graph. Graphs
with size symbols of Dynamo's own (any prompt length, dynamic batch) are not split: those symbols
carry relations (and guards) a fresh symbol would lose.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import sympy
import torch
from torch import fx

from fitprune_fx.passes.insert_compaction import mask_gathers_as_row_copies
from fitprune_fx.passes.layout import DecoderLayout
from fitprune_fx.passes.split_layers import LayerSplit, partition_calls, split_by_layer

log = logging.getLogger("fitprune_fx")


class SharedCompileRefused(Exception):
    """A partition's compile needed a fact about its sizes, so it cannot serve other layers."""


def compile_by_layer(
    gm: fx.GraphModule, layout: DecoderLayout, config_patches: dict, count_symbols: set
) -> LayerSplit | None:
    """Compile `gm` as its layer partitions: the split, called like `gm`, whose partitions now run
    compiled code (`inputs` and `groups` say how many were compiled for how many), or None
    when no two partitions are the same (nothing to share), a shared compile was refused, or a
    size symbol other than the token counts' (`count_symbols`) is about: Dynamo's own symbols
    (a prompt length compiled for any length, a dynamic batch) come with facts that a partition's
    fresh symbols would not know."""
    from torch._inductor.compile_fx import compile_fx

    if _size_symbols(gm) - count_symbols:
        return None
    compiled: dict[str, Callable] = {}
    try:  # whatever fails here, compiling the whole graph is the same program, only slower
        split = split_by_layer(gm, layout)
        if split is None or len(split.groups) == len(split.inputs):
            return None
        with _kernels_compiled_together():
            for members in split.groups:
                first = getattr(split.module, members[0])
                if mask_gathers_as_row_copies(first.graph):  # the mask is a stored input here
                    first.recompile()
                fn = _compile_alone(first, split.inputs[members[0]], config_patches, compile_fx)
                compiled.update(dict.fromkeys(members, fn))
    except Exception as e:
        log.info("fitprune: decoder graph compiled whole: %s: %s", type(e).__name__, e)
        return None
    for call in partition_calls(split.module):  # call the compiled code instead of the module
        name = call.target
        call.op, call.target = "call_function", _Partition(name, compiled[name])
        split.module.delete_submodule(name)
    split.module.recompile()
    return split


@contextlib.contextmanager
def _kernels_compiled_together():
    """Wait for the partitions' kernels once, after the last partition is lowered.

    Inductor returns a graph only after its kernels are built (`AsyncCompile.wait` at the end of
    the generated module): compiled one after another, each partition's C++ builds would leave
    the main thread idle and the next partition's lowering would wait for them. Deferred, the
    builds of all partitions run beside the lowering. Nothing calls a partition before the end.
    If the refused compile raises, its kernels are left to finish unread.
    """
    from torch._inductor.async_compile import AsyncCompile

    wait = getattr(AsyncCompile, "wait", None)
    if wait is None:  # another Inductor: no deferral, same result
        yield
        return
    pending: list[tuple] = []
    AsyncCompile.wait = lambda self, scope: pending.append((self, scope))
    try:
        yield
    finally:
        AsyncCompile.wait = wait
    for compiler, scope in pending:
        wait(compiler, scope)


def _size_symbols(gm: fx.GraphModule) -> set:
    """Every size symbol in the fake values of `gm`'s nodes."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    symbols: set = set()
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, (torch.Tensor, torch.SymInt)):
            symbols |= free_symbols(value)
    return symbols


class _Partition:
    """A partition's compiled code, named after the partition in the split graph's code."""

    def __init__(self, name: str, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = name

    def __call__(self, *args):
        return self.fn(*args)


def _compile_alone(sub: fx.GraphModule, values: list, config_patches: dict, compile_fx) -> Callable:
    """Compile `sub` in a shape environment of its own, its sizes fresh symbols (no range beyond
    the size-like [2, inf)): the code then serves any partition with the same signature."""
    from torch._dynamo.source import ConstantSource
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    fresh: dict[sympy.Symbol, sympy.Symbol] = {}
    hints: dict[sympy.Symbol, int] = {}

    def size(s):
        if isinstance(s, int):
            return s
        expr = s.node.expr
        if expr.is_Integer:
            return int(expr)
        outer = s.node.shape_env
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in fresh:
                hint = int(outer.backed_var_to_val[symbol])
                source = ConstantSource(f"fitprune_partition_size_{len(fresh)}")
                fresh[symbol] = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
                if not isinstance(fresh[symbol], sympy.Symbol):  # 0 and 1 are specialised
                    raise SharedCompileRefused(f"a size of {hint} would be compiled as a constant")
                hints[fresh[symbol]] = hint
        new = expr.xreplace(fresh)
        return shape_env.create_symintnode(new, hint=int(new.xreplace(hints)))

    fakes = []
    for value in values:
        if is_traceable_wrapper_subclass(value):  # a quantized weight: a plain fake would lose its kind
            raise SharedCompileRefused(f"an input is a {type(value).__name__} (a tensor subclass)")
        if isinstance(value, torch.Tensor):
            offset = value.storage_offset()
            if not isinstance(offset, int) or offset != 0:
                raise SharedCompileRefused("an input is a view with an offset")
            with mode:
                fake = torch.empty_strided(
                    [size(s) for s in value.shape],
                    [size(s) for s in value.stride()],
                    dtype=value.dtype,
                    device=value.device,
                )
            fakes.append(fake.requires_grad_(value.requires_grad))
        elif isinstance(value, torch.SymInt):
            fakes.append(size(value))
        else:
            fakes.append(value)
    with tracing(TracingContext(mode)):
        compiled = compile_fx(sub, fakes, config_patches=config_patches)
    if shape_env.guards:
        raise SharedCompileRefused(
            f"compiling a layer assumed {[str(g.expr) for g in shape_env.guards]} of its sizes"
        )
    return compiled
