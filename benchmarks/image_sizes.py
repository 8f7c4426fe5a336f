"""Compiles over a run of prompts whose images all differ in size: plain Inductor against FitPrune.

    python benchmarks/image_sizes.py                 # 12 image sizes at batch 1, then a mixed batch
    python benchmarks/image_sizes.py --sizes 4 --arm fitprune

A tiny Qwen2.5-VL (4 layers, hidden 64, native-resolution images) answers one prompt per image
size at batch 1, then batches of 3 and 2 prompts (the last holding two image sizes). Each arm runs
in a process of its own with an empty Inductor cache, so neither reuses the other's kernels:

* ``inductor`` -- ``model.compile()`` (Dynamo's automatic dynamic shapes after the first change), with
  the recompile limit a FitPrune backend sets (64: at the default 8 this run's frames reach it and
  Dynamo runs them uncompiled from then on);
* ``fitprune`` -- ``fitprune_fx.compile(model, {1: 0.25, 2: 0.25})`` (a fraction recipe).

Printed per arm: wall time of all calls (compiles included), the number of decoder graphs Inductor
compiled, how many calls ran a pruned graph, and what the mixed batch gave. The ratio line
compares the two arms' wall times measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRACTIONS = {1: 0.25, 2: 0.25}


def run_arm(arm: str, sizes: int) -> dict:
    """One arm in this process: every call of the run, timed as a whole."""
    import torch

    import fitprune_fx
    from fitprune_fx import ModelInfo, Recipe
    from fitprune_fx.testbed.batching import batch_prompts
    from fitprune_fx.testbed.tiny_qwen import IMAGE_GRIDS as GRIDS
    from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl

    torch.set_num_threads(1)
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=0)
    graphs = {"decoder": 0}
    if arm == "inductor":
        from torch._inductor.compile_fx import compile_fx

        from fitprune_fx.backend import RECOMPILE_LIMIT

        # the limit a FitPrune backend sets: at Dynamo's default of 8 the frames of this run reach it
        # and plain Inductor silently runs them uncompiled, which would flatter its compile time
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT

        def counting(gm, example_inputs):
            if any("self_attn" in str(n.meta.get("nn_module_stack", "")) for n in gm.graph.nodes):
                graphs["decoder"] += 1
            return compile_fx(gm, example_inputs)

        model.compile(backend=counting)
    else:
        recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), FRACTIONS)
        fitprune_fx.compile(model, recipe, progress=False)
    calls = [make_qwen_inputs(model, [3], [4], grid=g, seed=i) for i, g in enumerate(GRIDS[:sizes])]
    # then a batch of 3 of one size, and a batch of 2 mixing two sizes
    mixed = batch_prompts(
        [make_qwen_inputs(model, [3], [4], grid=g, seed=98 + i) for i, g in enumerate(GRIDS[:2])]
    )
    calls.append(
        batch_prompts([make_qwen_inputs(model, [2], [3], grid=GRIDS[2], seed=50 + i) for i in range(3)])
    )
    outcome = {"call_s": []}
    start = time.perf_counter()
    with torch.no_grad():
        for inputs in calls:
            began = time.perf_counter()
            model(**inputs)
            outcome["call_s"].append(time.perf_counter() - began)
        began = time.perf_counter()
        try:
            model(**mixed)
            outcome["mixed"] = "answered"
        except Exception as e:  # noqa: BLE001 (reported, not hidden)
            outcome["mixed"] = type(e).__name__
        outcome["call_s"].append(time.perf_counter() - began)
    outcome["wall_s"] = time.perf_counter() - start
    if arm == "fitprune":
        backend = model.fitprune_backend
        graphs["decoder"] = sum(1 for r in backend.reports if r.layers and "no image merge" not in r.reason)
        outcome["pruned_graphs"] = len(backend.pruned_graphs)
        outcome["pruned_calls"] = backend.pruned_runs
    outcome["decoder_graphs"] = graphs["decoder"]
    outcome["calls"] = len(calls) + 1
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=12, help="distinct image sizes at batch 1 (at most 12)")
    parser.add_argument("--arm", choices=["inductor", "fitprune"], help="run one arm here (internal)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.sizes)))
        return
    results = {}
    for arm in ("inductor", "fitprune"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            print(f"running {arm} ({args.sizes} image sizes, then batches of 3 and 2) ...", file=sys.stderr)
            done = subprocess.run(
                [sys.executable, __file__, "--arm", arm, "--sizes", str(args.sizes)],
                env=env, check=True, capture_output=True, text=True,
            )  # fmt: skip
            results[arm] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [
        "| arm | wall time, compiles included | first call | second size | other sizes | batch of 3 "
        "| mixed batch of 2 | decoder graphs compiled | pruned calls | mixed batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        pruned = f"{r['pruned_calls']} of {r['calls']}" if "pruned_calls" in r else "-"
        c = r["call_s"]
        lines.append(
            f"| {arm} | {r['wall_s']:.1f} s | {c[0]:.1f} s | {c[1]:.1f} s | {sum(c[2:-2]):.1f} s "
            f"| {c[-2]:.1f} s | {c[-1]:.1f} s | {r['decoder_graphs']} | {pruned} | {r['mixed']} |"
        )
    sizes = {arm: sum(r["call_s"][: args.sizes]) for arm, r in results.items()}
    ratio = results["fitprune"]["wall_s"] / results["inductor"]["wall_s"]
    lines += [
        "",
        f"{args.sizes} image sizes at batch 1: fitprune {sizes['fitprune']:.1f} s, inductor "
        f"{sizes['inductor']:.1f} s: {sizes['fitprune'] / sizes['inductor']:.2f}x; every call (with the "
        f"batches): {ratio:.2f}x.",
    ]
    print("\n".join(lines))
    if args.markdown:
        from speed_report import write_record

        write_record(args.markdown, "image_sizes.py", "\n".join(lines))


if __name__ == "__main__":
    main()
