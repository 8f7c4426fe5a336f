"""Fit time vs one plain forward pass over the same calibration set.

    python benchmarks/fit_speed.py [--layers 8] [--hidden 256] [--image 96] [--samples 16]

Builds a small random LLaVA (fitprune_fx.testbed.tiny), times ``model(**batch)`` over every batch
(best of a few repeats) and ``fitprune_fx.fit`` for a few budgets, and prints the ratio. The
target is fit <= 3 x forward. Runs single-threaded by default so numbers are comparable on a
shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitprune_fx.fitting import FitSession
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava


def forward_seconds(model, data, repeats: int) -> float:
    """Best-of-`repeats` time of one plain forward over all calibration batches."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for batch in data:
                model(**batch)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--image", type=int, default=96, help="image size; patch 8")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budgets", default="0.3,0.45,0.6")
    p.add_argument("--strategies", default="guided,bisect", help="alpha search strategies")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = tiny_llava(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        num_kv_heads=max(args.heads // 2, 1),
        intermediate_size=int(2.6875 * args.hidden),  # LLaVA-7B's MLP ratio (11008 / 4096)
        image_size=args.image,
        dtype=getattr(torch, args.dtype),
    ).to(args.device)
    g = torch.Generator().manual_seed(0)
    specs = [
        PromptSpec(int(torch.randint(8, 24, (1,), generator=g)), int(torch.randint(6, 20, (1,), generator=g)))
        for _ in range(args.samples)
    ]
    data = [
        {k: v.to(args.device) for k, v in make_inputs(model, specs[i : i + args.batch_size], seed=i).items()}
        for i in range(0, args.samples, args.batch_size)
    ]
    n_vis = (args.image // 8) ** 2
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {n_vis} visual "
        f"tokens, {args.dtype} on {args.device}; {args.samples} samples in batches of "
        f"{args.batch_size}; {args.threads} thread(s)"
    )
    forward_seconds(model, data, 1)  # warm-up
    fwd = forward_seconds(model, data, args.repeats)
    print(f"plain forward over the calibration set: {fwd * 1e3:.1f} ms")

    t0 = time.perf_counter()
    session = FitSession(model, data, batch_size=args.batch_size)
    stats = time.perf_counter() - t0
    print(f"statistics pass (embed + all layers, cached): {stats * 1e3:.1f} ms = {stats / fwd:.2f} x forward")
    for budget in (float(b) for b in args.budgets.split(",")):
        for strategy in args.strategies.split(","):
            t1 = time.perf_counter()
            recipe = session.recipe(budget, strategy=strategy)
            search = time.perf_counter() - t1
            total = stats + search
            print(
                f"budget {budget:.2f} [{strategy}]: alpha {recipe.fit['alpha']:.4f}, reduction "
                f"{recipe.flops_reduction:.4f}, {recipe.fit['walks']} exact walks; search "
                f"{search * 1e3:.0f} ms; fit total {total * 1e3:.0f} ms = "
                f"{total / fwd:.2f} x forward (target <= 3)"
            )


if __name__ == "__main__":
    main()
