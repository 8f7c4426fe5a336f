"""Route a decoder graph's fp32 CPU linears to oneDNN, whose rate does not fall on fewer rows.

Inductor lowers an fp32 `linear` on CPU to `aten.mm` / `addmm`, which call MKL's sgemm. On one
thread MKL's rate drops as the rows shrink: the 4096 x 11008 projection of LLaVA-1.5-7B ran at
47.5 GMAC/s on 642 rows and 39.7 on 155, the rows a pruned layer keeps. oneDNN's inner product
(`torch.ops.mkldnn._linear_pointwise`), on the same plain weight, ran at 54.5 and 53.2 (at
hidden 512: 5-11 % faster than MKL from 642 rows down to 130, 1-7 % at 64). Inductor's own oneDNN
lowering needs weights frozen into constants (a packed copy of every weight); the op here reads
the model's weights as they are, so nothing is copied and weight updates are seen.

Only prefill graphs move (a linear of at least `MIN_ROWS` rows; then all of the graph's linears,
so that layers sharing a compile stay one program). A decode step's rows are one per example:
there oneDNN ran faster on some weights and slower on others timed alone (1.40x at 512 x 32064,
0.80x at 11008 x 4096), and with every weight of at least 2^22 elements routed, the unpruned
decode step at 7B width took 202.8 against 197.1 ms (`benchmarks/speed.py`, 2026-11-30).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

MIN_ROWS = 32  # rows (tokens x batch) from which a graph is a prefill: all its linears go


# Defined with `torch.library.Library`, not `custom_op`: its Python wrapper cost 15 us a call
# (3 us here), on a decoder's 7 linears per layer.
_LIB = torch.library.Library("fitprune", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LINEAR_POINTWISE = (
    torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None
)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through oneDNN's inner product (fp32 CPU)."""
    x = x if x.is_contiguous() else x.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")


_LIB.impl("onednn_linear", onednn_linear, "CPU")


@torch.library.register_fake("fitprune::onednn_linear")
def _onednn_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def may_route_linears(example_inputs: list) -> bool:
    """This torch build has oneDNN and its linear op, and the graph is compiled for inference
    (the op has no backward)."""
    if not (torch.backends.mkldnn.is_available() and _LINEAR_POINTWISE is not None):
        return False
    needs_grad = any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)
    return not (torch.is_grad_enabled() and needs_grad)


def _value(node) -> torch.Tensor | None:
    """The plain tensor a node stands for (None: not a tensor, unknown, or a tensor subclass such
    as a quantized weight, whose own dispatch may not know the op)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor) or is_traceable_wrapper_subclass(value):
        return None
    return value


def _rows_hint(x: torch.Tensor) -> int:
    """Rows of a linear's input (all but the last dim), at this call's sizes."""
    rows = 1
    for s in x.shape[:-1]:
        rows *= s if isinstance(s, int) else s.node.hint if s.node.has_hint() else 0
    return rows


def _fp32_cpu_linears(graph: fx.Graph) -> list[tuple[fx.Node, tuple, torch.Tensor]]:
    """Every `linear` of `graph` whose input, weight (2-D) and bias are plain fp32 CPU tensors of
    known sizes: (node, its (x, weight, bias) arguments, x's value)."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch._C._nn.linear:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        operands = (args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2]))
        values = [_value(a) for a in operands if a is not None]
        if len(values) < 2 or any(
            v is None or v.dtype != torch.float32 or v.device.type != "cpu" for v in values
        ):
            continue
        if values[0].dim() >= 2 and values[1].dim() == 2:
            found.append((node, operands, values[0]))
    return found


def route_linears_to_onednn(graph: fx.Graph) -> int:
    """Replace the fp32 CPU `linear`s of a prefill graph (one of them reaches `MIN_ROWS` rows) by
    `fitprune::onednn_linear`; returns how many were replaced (0 for other graphs). All move, so
    that layers sharing a compile (`fitprune_fx.layer_compile`) stay the same program whatever
    their kept counts. A linear whose sizes or dtypes are unknown is left alone.
    """
    linears = _fp32_cpu_linears(graph)
    if not any(_rows_hint(x) >= MIN_ROWS for _, _, x in linears):
        return 0
    for node, operands, _ in linears:
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.fitprune.onednn_linear.default, operands)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return len(linears)
