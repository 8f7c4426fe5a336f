"""Run-time checks as one graph output read on the host after each call, never a device assert.

The pass and the pruned-cache attention state their run-time conditions as
`torch._assert_async(cond, "fitprune: ...")` nodes. Lowered as they are, such asserts differ per
device: on CPU a check raises; on CUDA Inductor emits `tl.device_assert`, which Triton compiles
out unless TRITON_DEBUG=1 (the check vanishes), and where compiled in, a failure kills the CUDA
context (every later CUDA call of the process fails); ROCm builds drop device asserts.

So the backend removes these nodes and appends one output to the graph: a [n] bool tensor of the
n conditions. `raise_failed_checks` reads it on the host after the call (one small device-to-host
copy once the call's work is queued, outside any captured CUDA graph) and raises the message of
the first false condition, so a wrong result is never returned.
"""

from __future__ import annotations

import torch
from torch import fx

PREFIX = "fitprune:"


class RunTimeCheckFailed(RuntimeError):
    """A condition the pruned graph needs did not hold for this call's inputs."""


def collect_run_time_checks(gm: fx.GraphModule) -> list[str]:
    """Turn fitprune's `_assert_async` nodes into one extra graph output; return their messages.

    The output is `torch.stack([cond, ...])` [n] bool, appended after the graph's own outputs.
    Returns [] (graph unchanged) when the graph holds no fitprune check.
    """
    graph = gm.graph
    checks = [n for n in graph.nodes if _is_fitprune_assert(n)]
    if not checks:
        return []
    output = graph.output_node()
    (outputs,) = output.args
    with graph.inserting_before(output):
        conds = [graph.call_method("reshape", (n.args[0], ())) for n in checks]
        flags = graph.call_function(torch.stack, (conds,))
    messages = [str(n.args[1]) for n in checks]
    for n in checks:
        graph.erase_node(n)
    output.args = ((*outputs, flags),)
    graph.lint()
    gm.recompile()
    return messages


def raise_failed_checks(flags: torch.Tensor, messages: list[str]) -> None:
    """Raise RunTimeCheckFailed with the first message whose flag is False (reads `flags` on the host).

    This read is the one deliberate synchronisation of a pruned call; it is exempt from
    `torch.cuda.set_sync_debug_mode`, so that mode can prove the compiled graphs make no other.
    """
    if flags.is_cuda:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            values = flags.tolist()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    else:
        values = flags.tolist()
    if not all(values):
        raise RunTimeCheckFailed(next(m for m, ok in zip(messages, values, strict=True) if not ok))


def _is_fitprune_assert(node: fx.Node) -> bool:
    asserts = (torch._assert_async, torch.ops.aten._assert_async.msg)
    if node.op != "call_function" or node.target not in asserts:
        return False
    return len(node.args) > 1 and str(node.args[1]).startswith(PREFIX)
