"""Kernel launches per prefill, and what each pruning layer adds to them.

    python benchmarks/launches.py                    # CPU: the small width (8 layers, hidden 512)
    python benchmarks/launches.py --device cuda      # LLaVA-1.5-7B's 32 layers in bfloat16

Scoring and compaction are small work; on a GPU their cost is mostly launches. One profiled call
of a compiled variant counts them:

* CUDA: the GPU kernels the call ran (profiler events on the device);
* CPU, a proxy anyone can check: the calls the compiled graphs make, each Inductor C++ kernel
  (profiled when compiled under `cpp.enable_kernel_profile`, see `kernel_profile`) and each extern
  op (GEMMs, SDPA, the pass's ops) counted once, whatever it runs inside.

A variant's launches beyond unpruned's, divided by its pruning layers, is the count per pruning
layer: the figure `LAUNCH_BUDGET` bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Launches a pruning layer may add (scoring, selection, compaction), per device. CUDA: the mass
# kernel and the sum of its partials beside the attention kernel (which replaces SDPA's and
# returns its log-sum-exp), the score and selection, the compaction's gathers. CPU: the same
# through Inductor's C++ kernels, the fused attention op counted once.
LAUNCH_BUDGET = {"cuda": 12, "cpu": 10}
COMPILED_GRAPH = "## Call CompiledFxGraph"


@contextlib.contextmanager
def kernel_profile() -> Iterator[None]:
    """Compile inside this for C++ kernels that show in the profiler (one record per call; free
    while no profiler runs), so that `count_launches` sees them on CPU."""
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        yield


def count_launches(fn: Callable[[], object], device: str) -> int:
    """Kernel launches of one call of `fn` (see the module docstring)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.events()
    if device.startswith("cuda"):
        return sum(
            e.device_type == DeviceType.CUDA and e.cpu_parent is None and _is_kernel(e) for e in events
        )
    return sum(e.cpu_parent is not None and e.cpu_parent.name.startswith(COMPILED_GRAPH) for e in events)


def _is_kernel(event) -> bool:
    """A GPU kernel, not a memcpy / memset record."""
    name = event.name.lower()
    return not (name.startswith("memcpy") or name.startswith("memset"))


def per_pruning_layer(launches: dict[str, int], layers: dict[str, int], base: str) -> dict[str, float]:
    """Launches each variant adds per pruning layer over `base` (variants with pruning layers)."""
    return {
        n: (launches[n] - launches[base]) / layers[n] for n in launches if layers.get(n) and base in launches
    }


def launches_table(launches: dict[str, int], layers: dict[str, int], base: str, device: str) -> str:
    """Markdown: launches per prefill, the difference to `base`, per pruning layer vs the budget."""
    budget = LAUNCH_BUDGET["cuda" if device.startswith("cuda") else "cpu"]
    per_layer = per_pruning_layer(launches, layers, base)
    what = "GPU kernels" if device.startswith("cuda") else "compiled-code calls (C++ kernels + extern ops)"
    lines = [
        f"Kernel launches per prefill ({what}; `benchmarks/launches.py`), budget {budget} per pruning layer:",
        "",
        "| variant | launches | vs unpruned | pruning layers | per pruning layer |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, n in launches.items():
        per = f"{per_layer[name]:.1f}" if name in per_layer else "-"
        lines.append(f"| {name} | {n} | {n - launches.get(base, n):+d} | {layers.get(name, 0)} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Compile unpruned, score-only and the shipped recipes on `speed.py`'s model, print the table."""
    from speed import UNPRUNED, build_model, make_prompt, make_recipes
    from speed_args import parse_args, width_args
    from speed_report import write_record
    from tqdm import tqdm

    from fitprune_fx import ModelInfo, fitprune_backend

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipes", nargs="+", default=["50", "70"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--markdown", type=Path, help="also write the table here (docs/results/launches-cpu.md)")
    own, rest = p.parse_known_args(argv)
    args = parse_args(["--device", own.device, "--batch", str(own.batch), *rest])
    args = width_args(args, args.widths[0])  # CPU: small; CUDA: gpu (32 layers)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args)
    inputs = make_prompt(model, args)
    info = ModelInfo.from_config(model.config, name=f"launches-{args.layers}x{args.hidden}")
    recipes = make_recipes(info, own.recipes)
    launches, layers = {}, {}
    for name, recipe in tqdm(recipes.items(), desc="compile and count", file=sys.stdout):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fitprune_backend(recipe, progress=False))
        forward = functools.partial(compiled, **inputs, logits_to_keep=1)
        with torch.no_grad(), kernel_profile():
            forward()
            forward()  # a warm call: the counted one must not compile
            launches[name] = count_launches(forward, args.device)
        layers[name] = sum(1 for n in recipe.prune.values() if n > 0)
    where = f"{args.layers} layers x hidden {args.hidden}, {args.dtype}, batch {args.batch}, {args.device}"
    table = f"{where}, prompt {inputs['input_ids'].shape[1]} tokens\n\n" + launches_table(
        launches, layers, UNPRUNED, args.device
    )
    print("\n" + table)
    if own.markdown:
        write_record(own.markdown, "launches.py", table, args.device)
    return launches


if __name__ == "__main__":
    main()
