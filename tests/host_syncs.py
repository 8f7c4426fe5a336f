"""Detect device-to-host synchronisations on CPU, where no CUDA sync debug mode exists.

Every host read of a tensor value goes through one of a few aten ops (`bool(t)`, `int(t)`,
`t.item()` and `t.tolist()` call `_local_scalar_dense`; data-dependent shapes call `nonzero`
and friends). A dispatch mode records them, so a code path can be proven sync-free on CPU.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::repeat_interleave",  # the op form takes a repeats tensor (a data-dependent size)
}


class HostSyncRecorder(TorchDispatchMode):
    """Records the syncing aten ops called while active (their names, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        sized = name == "aten::repeat_interleave" and "output_size" in (kwargs or {})
        if name in SYNCING_OPS and not sized:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))
