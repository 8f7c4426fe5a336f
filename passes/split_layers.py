"""Split a decoder graph into one subgraph per decoder layer, and tell which subgraphs are the same.

Inductor lowers every node of the graph it is given: eight decoder layers cost eight lowerings
even when, after the pass, seven of them differ only in which parameters they read and in the
symbol of their token count. Split at layer boundaries, the layers that are the same program
can be compiled once and called per layer (`fitprune_fx.layer_compile`).

Partitions follow graph order: everything before the first decoder layer (embedding, image merge,
rotary tables, mask), one per layer (the pass's scoring and compaction nodes belong to the layer
they follow), and everything from the decoder's final norm on. Partition numbers only grow along
the graph, so the split graph has no cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from .layout import DecoderLayout
from .locate import copy_graph_module, example_value


def layer_partitions(gm: fx.GraphModule, layout: DecoderLayout) -> dict[fx.Node, int]:
    """Partition of every computing node: 0 before the layers, l + 1 for layer l, then the rest."""
    parts: dict[fx.Node, int] = {}
    current, last = 0, 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        layer = layout.layer_index(node)
        if layer is not None:
            current = max(current, layer + 1)
            last = max(last, current)
        elif current and layout.is_final_norm(node):
            current = last + 1
        parts[node] = current
    return parts


@dataclass
class LayerSplit:
    """A graph split at layer boundaries (`split_by_layer`)."""

    module: fx.GraphModule  # calls `submod_<p>` in order; each returns a tuple
    size_reads: list[tuple[int, int]]  # extra SymInt inputs after the graph's own: (argument, dim)
    inputs: dict[str, list]  # partition name -> the fake values of its inputs
    groups: list[list[str]]  # partitions that run the same program on inputs of the same kind

    def __call__(self, *args):
        """Run like the graph that was split (`args`: that graph's inputs)."""
        return self.module(*args, *(args[i].shape[d] for i, d in self.size_reads))


def split_by_layer(gm: fx.GraphModule, layout: DecoderLayout) -> LayerSplit | None:
    """`gm` split into partitions (`layer_partitions`), grouped by what they compute. None when a
    partition's input has no fake value to compile it from. `gm` is left as it is.

    Partitions that hold the same nodes but return different values (the last layer: nothing
    after it reads the next layer's inputs) are made to return the same ones (`align_outputs`).
    """
    gm = copy_graph_module(gm)
    reads = _bind_size_symbols(gm.graph)
    parts = layer_partitions(gm, layout)
    split = split_module(gm, None, lambda node: parts[node], keep_original_order=True, tuple_return=True)
    values = {node.name: example_value(node) for node in gm.graph.nodes}
    inputs: dict[str, list] = {}
    for call in partition_calls(split):
        names = [n.name for n in getattr(split, call.target).graph.nodes if n.op == "placeholder"]
        if any(values.get(name) is None for name in names):
            return None
        inputs[call.target] = [values[name] for name in names]

    def kind(name: str, outputs: bool = True) -> tuple:
        program = graph_signature(getattr(split, name))
        return (program if outputs else program[:-1], input_signature(inputs[name]))

    alike: dict[tuple, list[str]] = {}
    for name in inputs:
        alike.setdefault(kind(name, outputs=False), []).append(name)
    groups: dict[tuple, list[str]] = {}
    for members in alike.values():
        if len(members) > 1:
            align_outputs(split, members)
        for name in members:
            groups.setdefault(kind(name), []).append(name)
    return LayerSplit(split, reads, inputs, list(groups.values()))


def _bind_size_symbols(graph: fx.Graph) -> list[tuple[int, int]]:
    """Give every size symbol of a tensor input a SymInt input of its own, after the graph's inputs;
    returns where each new input's value is read: (argument index, dimension).

    `split_module` passes a symbol between partitions from the first node whose value is that
    symbol. A token count's symbol is the length of a size-only input, so no input carries it and
    the first node holding it may come after a partition that uses it (a cycle). Dynamo lifts its
    own size symbols into inputs the same way.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bound = set()
    for node in placeholders:
        value = example_value(node)
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            bound.add(value.node.expr)
    reads, last = [], placeholders[-1]
    for index, node in enumerate(placeholders):
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            continue
        for dim, s in enumerate(value.shape):
            if (
                isinstance(s, torch.SymInt)
                and isinstance(s.node.expr, sympy.Symbol)
                and s.node.expr not in bound
            ):
                with graph.inserting_after(last):
                    last = graph.placeholder(f"fitprune_size_{len(reads)}")
                last.meta["example_value"] = s
                bound.add(s.node.expr)
                reads.append((index, dim))
    return reads


def partition_calls(split: fx.GraphModule) -> list[fx.Node]:
    """The top-level `call_module` nodes of a split graph, in order."""
    return [n for n in split.graph.nodes if n.op == "call_module"]


def graph_signature(sub: fx.GraphModule) -> tuple:
    """What a subgraph computes, up to the names of its nodes: two subgraphs with the same signature
    run the same program on their inputs."""
    index = {node: i for i, node in enumerate(sub.graph.nodes)}

    def norm(value):
        if isinstance(value, fx.Node):
            return ("node", index[value])
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(norm(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((k, norm(v)) for k, v in value.items()))
        if isinstance(value, slice):  # its bounds may be nodes
            return ("slice", norm(value.start), norm(value.stop), norm(value.step))
        if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return repr(value)
        if isinstance(value, (int, float, bool, str, type(None), type(Ellipsis))):
            return (type(value).__name__, repr(value))
        return ("object", id(value))  # anything else is the same only if it is the same object

    return tuple(
        (node.op, node.target if node.op != "placeholder" else None, norm(node.args), norm(node.kwargs))
        for node in sub.graph.nodes
    )


def input_signature(values: list) -> tuple:
    """Metadata of a partition's inputs (dtype, device, sizes, strides), size symbols renamed in
    order of appearance: equal for inputs of the same kind whatever their token counts."""
    names: dict[sympy.Symbol, int] = {}

    def size(s) -> tuple:
        if isinstance(s, int):
            return ("int", s)
        expr = s.node.expr
        if expr.is_Integer:
            return ("int", int(expr))
        for symbol in sorted(expr.free_symbols, key=str):
            names.setdefault(symbol, len(names))
        renamed = expr.xreplace({sym: sympy.Symbol(f"c{names[sym]}") for sym in expr.free_symbols})
        return ("sym", str(renamed))

    key = []
    for value in values:
        if isinstance(value, torch.Tensor):
            key.append(
                (
                    "tensor",
                    value.dtype,
                    value.device.type,
                    value.requires_grad,
                    tuple(size(s) for s in value.shape),
                    tuple(size(s) for s in value.stride()),
                    size(value.storage_offset()),
                )
            )
        elif isinstance(value, torch.SymInt):
            key.append(("symint", size(value)))
        else:
            key.append(("value", repr(value)))
    return tuple(key)


def align_outputs(split: fx.GraphModule, names: list[str]) -> None:
    """Make the partitions `names` (the same nodes, outputs aside) return the same values.

    `split_module` returns from a partition what later partitions read: the last decoder layer
    returns less than the others, as nothing after it reads the next layer's inputs. Returning
    the union of the others' outputs (in node order) makes it the same program as them.
    """
    subs = [getattr(split, name) for name in names]
    position = [{node: i for i, node in enumerate(sub.graph.nodes)} for sub in subs]
    outputs = [[position[k][n] for n in _output(sub).args[0]] for k, sub in enumerate(subs)]
    union = sorted(set().union(*outputs))
    calls = {n.target: n for n in partition_calls(split)}
    for k, (name, sub) in enumerate(zip(names, subs, strict=True)):
        nodes = list(sub.graph.nodes)
        for user in list(calls[name].users):  # getitem(call, i): the i-th output moves
            user.args = (user.args[0], union.index(outputs[k][user.args[1]]))
        _output(sub).args = (tuple(nodes[i] for i in union),)
        sub.recompile()
    split.recompile()


def _output(sub: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(sub.graph.nodes) if n.op == "output")
