"""Re-derive shapes after compaction and rewrite sizes that Dynamo baked into the graph.

Dynamo records the sequence length S as a literal (or a SymInt placeholder) in the arguments of
`view` / `reshape` / `expand` calls: `view(x, (1, 23, -1, 16))`. Once tokens are deleted those
calls must use the shorter length. Which argument is the sequence length is decided from shapes,
not by value: we re-run every affected node on fake tensors, find the input dimension that
changed, and map it to the output position with the same prefix of elements (view/reshape) or
the same right-aligned position (expand). If that mapping is ambiguous or an op fails on the new
shapes, we refuse (`UnsupportedGraph`) instead of guessing.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.node import map_arg

from .locate import UnsupportedGraph, example_value, same_size
from .token_merging import merge_rows
from .token_ops import gather_tokens, gathered_shape  # also registers torch.ops.fitprune.gather_residual

_VIEW_METHODS = {"view", "reshape", "expand"}
_VIEW_FUNCTIONS = {torch.reshape: "reshape"}
_COMPACTIONS = (
    gather_tokens,
    merge_rows,
    torch.ops.fitprune.gather_residual.default,
    torch.ops.fitprune.enter_tokens.default,
)


def _view_kind(node: fx.Node) -> str | None:
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return node.target
    if node.op == "call_function":
        return _VIEW_FUNCTIONS.get(node.target)
    return None


def _output_position(kind: str, dim: int, old_in: tuple, old_out: tuple) -> int:
    """Where input dimension `dim` of a view/reshape/expand lands in the output."""
    if kind == "expand":
        return dim + len(old_out) - len(old_in)
    prefix = math.prod(old_in[:dim])
    hits = [
        p
        for p in range(len(old_out))
        if same_size(math.prod(old_out[:p]), prefix) and same_size(old_out[p], old_in[dim])
    ]
    if len(hits) != 1:
        raise UnsupportedGraph(
            f"cannot tell which output dim of a {kind} from {old_in} to {old_out} is dim {dim}"
        )
    return hits[0]


def _rewrite_view(node: fx.Node, old_in: tuple, new_in: tuple, old_out: tuple) -> None:
    kind = _view_kind(node)
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
    if len(sizes) != len(old_out):
        raise UnsupportedGraph(f"{node.name}: {len(sizes)} sizes for a {len(old_out)}-d result")
    for dim in range(len(old_in)):
        if same_size(old_in[dim], new_in[dim]):
            continue
        p = _output_position(kind, dim, old_in, old_out)
        if isinstance(sizes[p], int) and sizes[p] == -1:
            continue  # inferred from the element count
        old = example_value(sizes[p]) if isinstance(sizes[p], fx.Node) else sizes[p]
        if not same_size(old, old_in[dim]):
            raise UnsupportedGraph(f"{node.name}: size argument {p} is {old}, expected {old_in[dim]}")
        new = new_in[dim]
        if isinstance(new, torch.SymInt):
            with node.graph.inserting_before(node):
                size = node.graph.call_function(torch.ops.aten.sym_size.int, (node.args[0], dim))
            size.meta["example_value"] = new
            new = size
        sizes[p] = int(new) if not isinstance(new, fx.Node) else new
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


_OWN_NAMESPACES = ("aten", "prims", "fitprune")

KERNEL_FIX = (
    "a kernel that takes sizes as arguments cannot follow a shorter sequence: a hub kernel? Load the "
    "model with use_kernels=False (or call model.reset_kernels()), or leave this layer unkernelized"
)


def check_resizable(node: fx.Node, original: dict) -> None:
    """Refuse an opaque kernel downstream of a compaction that bakes a token-dependent size.

    Views carry sizes the pass rewrites (above); a user Triton kernel carries a launch grid, and a
    custom op from another library (a hub kernel from `use_kernels=True` / `kernelize()`) may take a
    row count as an integer. Fake tensors would re-run either with the old size and never notice, so
    the compiled kernel would read or write the wrong rows: refused instead (contract item
    `resizable-ops`, `passes/graph_contract.py`)."""
    if node.op != "call_function":
        return
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise UnsupportedGraph(f"{node.name} launches {target.name()} on compacted tokens: {KERNEL_FIX}")
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return
    if str(target).split(".")[0] in _OWN_NAMESPACES:  # "fitprune.op" (packet), "fitprune.op.default"
        return
    # sizes the compaction changed, as a kernel could receive them: a dim, rows, numel (SymInts do not
    # hash: a list)
    stale = []
    for inp in node.all_input_nodes:
        old, new = _original_value(inp, original), example_value(inp)
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.dim() == new.dim():
            for d in range(old.dim()):
                if not same_size(old.shape[d], new.shape[d]):
                    stale += [old.shape[d], math.prod(old.shape[: d + 1]), old.numel()]
    sizes = [
        a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if not isinstance(a, fx.Node)
    ]
    sizes += [
        example_value(a) for a in node.all_input_nodes if not isinstance(example_value(a), torch.Tensor)
    ]
    baked = [
        a
        for a in sizes
        if isinstance(a, (int, torch.SymInt))
        and not isinstance(a, bool)
        and any(same_size(a, s) for s in stale)
    ]
    if baked:
        raise UnsupportedGraph(
            f"{node.name} calls {target} with size {baked[0]}, a token count that deleting tokens "
            f"changes: {KERNEL_FIX}"
        )


def _original_value(node: fx.Node, original: dict):
    """The value `node` had before the pass; a compaction stands in for the tensor it compacts."""
    while original.get(node) is None and node.target in _COMPACTIONS:
        node = node.args[0]
    return original.get(node)


def _run_fake(gm: fx.GraphModule, node: fx.Node, fake_mode):
    args = map_arg(node.args, example_value)
    kwargs = map_arg(node.kwargs, example_value)
    with fake_mode:
        if node.target is gather_tokens:  # a gather's shape is known: skip tracing it (most of its cost)
            return args[0].new_empty(gathered_shape(*args))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
    raise UnsupportedGraph(f"cannot re-run {node.op} node {node.name}")


def propagate_compaction(gm: fx.GraphModule, inserted: set[fx.Node], fake_mode) -> int:
    """Re-run fake shapes for every node downstream of `inserted`, fixing baked sizes.

    Returns the number of size arguments rewritten. Raises UnsupportedGraph when a node cannot
    be made consistent with the shorter sequence.
    """
    cache = getattr(fake_mode, "cache_enabled", None)
    if cache is not None:  # symbolic sizes make every op a miss: building entries cost a third
        fake_mode.cache_enabled = False  # of the propagation (1.2-1.3 against 0.7-0.9 s, 8 layers)
    try:
        return _propagate(gm, inserted, fake_mode)
    finally:
        if cache is not None:
            fake_mode.cache_enabled = cache


def _propagate(gm: fx.GraphModule, inserted: set[fx.Node], fake_mode) -> int:
    original = {n: example_value(n) for n in gm.graph.nodes}
    dirty = set(inserted)
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node not in dirty and not any(i in dirty for i in node.all_input_nodes):
            continue
        kind = _view_kind(node)
        if kind is not None and node.args[0] in dirty:
            old_in = tuple(_original_value(node.args[0], original).shape)
            new_in = tuple(example_value(node.args[0]).shape)
            before = node.args
            _rewrite_view(node, old_in, new_in, tuple(original[node].shape))
            rewrites += before != node.args
        check_resizable(node, original)
        try:
            node.meta["example_value"] = _run_fake(gm, node, fake_mode)
        except UnsupportedGraph:
            raise
        except Exception as e:  # shape errors: a size we could not account for
            raise UnsupportedGraph(
                f"{node.name} ({node.format_node()}) fails on the compacted shapes: {e}"
            ) from e
        dirty.add(node)
    return rewrites
