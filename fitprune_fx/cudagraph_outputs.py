"""Outputs of CUDA-graph replays that stay valid after the next call.

With `mode="reduce-overhead"` Inductor replays each graph in a CUDA graph whose outputs live in
the graph's memory pool: the next replay writes the same memory, and a tensor kept from an
earlier call (a first prompt's logits, a cache the user holds on to) then raises "accessing
tensor output of CUDAGraphs that has been overwritten by a subsequent run", or, read through a
view, holds another call's numbers. The backend copies such outputs out of the pool as they are
returned: one `torch._foreach_copy_` for all of a call's outputs (a launch or two, not one per
tensor). Outputs that share storage with an input (a cache buffer the graph updated in place and
returned) are passed through: copying them would detach the caller's object from its buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def outputs_kept(compiled: Callable, device_type: str = "cuda") -> Callable:
    """`compiled` whose `device_type` tensor outputs are fresh copies (see the module docstring)."""

    def run(*args):
        outputs = compiled(*args)
        # (parameters are never returned by an inference graph: skipped, hundreds of them per call)
        inputs = {
            a.untyped_storage().data_ptr()
            for a in args
            if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)
        }
        pool = [
            i
            for i, o in enumerate(outputs)
            if isinstance(o, torch.Tensor)
            and o.device.type == device_type
            and o.untyped_storage().data_ptr() not in inputs
        ]
        if not pool:
            return outputs
        copies = [torch.empty_like(outputs[i]) for i in pool]
        torch._foreach_copy_(copies, [outputs[i] for i in pool])
        kept = list(outputs)
        for i, copy in zip(pool, copies, strict=True):
            kept[i] = copy
        return type(outputs)(kept) if isinstance(outputs, tuple) else kept

    return run
