"""Hub-kernel look-alikes for tests: what `use_kernel_forward_from_hub` / `kernelize()` do to a model.

`FunctionAsModule` is what the hub-kernels decorator makes of a function since transformers 5.25: a
module object at module level, so Dynamo records its calls under a `G['...']` entry that is not part
of the model's module tree. `rows_rms_norm` is a kernel as hub kernels often are: an op from another
library that takes the row count as an integer (a launch grid) and reads exactly that many rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class FunctionAsModule(nn.Module):
    """A function turned into a module instance (as the hub-kernel decorator does to functions)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def gated_mlp(
    x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: Callable
) -> torch.Tensor:
    return down(act(gate(x)) * up(x))


RMS_NORM_KERNEL = FunctionAsModule(rms_norm)
MLP_KERNEL = FunctionAsModule(gated_mlp)


@torch.library.custom_op("fitprune_test::rows_rms_norm", mutates_args=())
def rows_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, rows: int) -> torch.Tensor:
    """RMSNorm over the first `rows` rows of x viewed as [rows, C]; like a kernel launched on a
    grid of `rows` programs, it cannot tell that x has another number of rows."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] != rows:
        raise RuntimeError(f"rows_rms_norm launched for {rows} rows on a tensor of {flat.shape[0]}")
    return rms_norm(x, weight, eps)


@rows_rms_norm.register_fake
def _(x, weight, eps, rows):
    return torch.empty_like(x)


def wrap_rotary(monkeypatch, modeling) -> None:
    """`modeling.apply_rotary_pos_emb` called through a module object (another wrapper on 5.25)."""
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", FunctionAsModule(modeling.apply_rotary_pos_emb))


def wrap_rms_norm(monkeypatch, norm_class) -> None:
    """`norm_class.forward` routed through the module-level `RMS_NORM_KERNEL`."""
    monkeypatch.setattr(
        norm_class, "forward", lambda self, x: RMS_NORM_KERNEL(x, self.weight, self.variance_epsilon)
    )


def wrap_mlp(monkeypatch, mlp_class) -> None:
    """`mlp_class.forward` routed through the module-level `MLP_KERNEL`."""
    monkeypatch.setattr(
        mlp_class,
        "forward",
        lambda self, x: MLP_KERNEL(x, self.gate_proj, self.up_proj, self.down_proj, self.act_fn),
    )


def use_row_count_kernel(monkeypatch, norm_class) -> None:
    """`norm_class.forward` through `fitprune_test::rows_rms_norm` with the row count baked in."""

    def forward(self, x):
        rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        return torch.ops.fitprune_test.rows_rms_norm(x, self.weight, self.variance_epsilon, rows)

    monkeypatch.setattr(norm_class, "forward", forward)
