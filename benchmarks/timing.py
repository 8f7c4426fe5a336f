"""Timing helpers of `benchmarks/speed.py`: timed calls, alternating rounds, compiles without
Inductor's caches (nor kernels built before), time spent inside a backend, and a clock for
generation steps."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from transformers import LogitsProcessor

from fitprune_fx import FitpruneBackend


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call of fn, device work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def round_robin(names: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(round, name) pairs; each round runs every name once, the start rotated per round."""
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            yield r, name


@contextlib.contextmanager
def inductor_caches_disabled() -> Iterator[None]:
    """No FX-graph/AOT/kernel caches while compiling, so compile time is the full cost."""
    import torch._inductor.config as ic

    saved = (ic.fx_graph_cache, ic.force_disable_caches, os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES"))
    ic.fx_graph_cache, ic.force_disable_caches = False, True
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    try:
        yield
    finally:
        ic.fx_graph_cache, ic.force_disable_caches = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
        else:
            os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = saved[2]


@contextlib.contextmanager
def kernels_built_afresh(root: str) -> Iterator[None]:
    """Compile in a new Inductor cache directory under `root`, with its in-memory caches emptied.

    `inductor_caches_disabled` stops the FX-graph cache, but a C++ kernel whose built library is
    already on disk (an earlier variant's or an earlier run's: the vision tower's kernels are the
    same for every variant) is loaded, not built: whichever variant compiled later would be
    charged less. The directory outlives the context (the caller removes `root` once the compiled
    code is no longer called).
    """
    from torch._inductor.utils import clear_inductor_caches

    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=root)
    clear_inductor_caches()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


class TimedBackend:
    """Wraps a backend: adds up the seconds spent inside it (pass + Inductor), and times every
    call of the decoder graphs it compiled (`decoder_s`, in call order): the decoder alone, without
    the vision tower, projector and `lm_head` that run in graphs of their own."""

    def __init__(self, backend: FitpruneBackend, device: str = "cpu") -> None:
        self.backend = backend
        self.device = device
        self.seconds = 0.0
        self.decoder_s: list[float] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        t0 = time.perf_counter()
        try:
            compiled = self.backend(gm, example_inputs)
        finally:
            self.seconds += time.perf_counter() - t0
        if not self.backend.reports[-1].layers:
            return compiled

        def run(*args):
            synchronize(self.device)
            start = time.perf_counter()
            out = compiled(*args)
            synchronize(self.device)
            self.decoder_s.append(time.perf_counter() - start)
            return out

        return run


class StepClock(LogitsProcessor):
    """Records the time at every generation step (called once per forward, after the logits)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores
