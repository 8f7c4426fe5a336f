"""Prefill speed where users run it: a GPU, LLaVA-1.5-7B's depth, batch 1 and 8, one image and
LLaVA-NeXT's five tiles, Inductor's default mode and reduce-overhead (CUDA graphs).

    python benchmarks/prefill_matrix.py --device cuda --out-dir docs/gpu   # 32 layers x 4096, bf16
    python benchmarks/prefill_matrix.py --smoke                            # CPU, tiny, seconds (CI)

The model is `speed.py`'s random LLaVA (576 visual tokens per image; 5 images stand for one
LLaVA-NeXT image: 4 tiles + the base view = 2880 visual tokens, the same decoder work). For each
mode, each variant (unpruned, score-only, the 50 and 70 recipes) is compiled once with
``dynamic=True`` (one graph for every prompt length; batch 1 gets its own, as Dynamo specialises
a size of 1), then per shape the variants are timed alternately (round robin, medians), side by
side with the FLOPs ideal of the recipe (1 / (1 - r), the paper's reduction r) and each call's
peak memory. Compile time is a variant's first call minus its warm call, at the first shape.
A greedy decode at batch 1 (default mode) checks that decode throughput after a pruned prefill
is not below unpruned's. The run keeps to a time budget (``--budget-s``): a stage that would
start after it is reported as skipped, never silently dropped.

Goals (issue: the GPU prefill) are printed beside the numbers: score-only within +3 % of unpruned,
50 / 70 at least 1.4x / 1.8x at batch 1 and 1.7x / 2.4x at batch 8, compile time at most 1.3x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from launches import count_launches, launches_table
from speed import SCORE_ONLY, UNPRUNED, build_model, make_prompt, make_recipes
from speed_report import machine_info
from timing import round_robin, synchronize, timed

from fitprune_fx import ModelInfo, fitprune_backend

MODES = ("default", "reduce-overhead")
GOALS = {  # (variant, batch): minimum speed-up; score-only: maximum slow-down
    (SCORE_ONLY, 1): 1 / 1.03,
    (SCORE_ONLY, 8): 1 / 1.03,
    ("50", 1): 1.4,
    ("50", 8): 1.7,
    ("70", 1): 1.8,
    ("70", 8): 2.4,
}
COMPILE_GOAL = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, 2 tiny layers, the eager compiler (CI)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--images", type=int, nargs="+", default=[1, 5], help="576 visual tokens each")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--recipes", nargs="+", default=["50", "70"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=32, help="decode check (0 skips)")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new stage starts after this")
    p.add_argument("--out-dir", type=Path, default=None, help="write the table (.md) and the run (.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.layers, args.hidden, args.heads, args.intermediate = 2, 64, 2, 172
        args.batches, args.images, args.repeats, args.new_tokens = [2], [1], 1, 2
        args.recipes = ["70"]
    args.compiler = "eager" if args.smoke else "inductor"
    args.torch_dtype = getattr(torch, args.dtype)
    args.image_size, args.patch_size, args.seed = 96, 4, 0  # speed.py's model: 24 x 24 = 576 tokens
    args.system_tokens, args.question_tokens = 35, 30
    return args


def make_prompts(model, batch: int, images: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """`speed.py`'s prompts (35 system tokens, the images' visual tokens, a 30-token question) at
    this batch and image count."""
    shape = argparse.Namespace(**{**vars(args), "batch": batch, "seed": batch * 100 + images})
    return make_prompt(model, shape, images)


class Clock:
    """Seconds since start, and whether a stage may still start within the budget."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.budget_s


def peak_mib(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2**20


def run(args: argparse.Namespace) -> dict:
    """Every measurement of the matrix, JSON-serialisable."""
    clock = Clock(args.budget_s)
    model = build_model(args)
    info = ModelInfo.from_config(model.config, name=f"prefill-matrix-{args.layers}x{args.hidden}")
    recipes = make_recipes(info, args.recipes)
    shapes = [(b, i) for i in args.images for b in sorted(args.batches, reverse=True)]
    result: dict = {
        "machine": machine_info(args.device),
        "date": datetime.date.today().isoformat(),
        "sizes": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate", "dtype")},
        "ideal": {n: 1 / (1 - r.reference_reduction()) for n, r in recipes.items()},
        "prefill": [],
        "compile_s": {},
        "decode": {},
        "skipped": [],
        "launches": {},
    }
    with torch.no_grad():
        for mode in args.modes:
            backends = {
                n: fitprune_backend(r, compiler=args.compiler, mode=mode, progress=False)
                for n, r in recipes.items()
            }
            compiled = {n: torch.compile(model, backend=b, dynamic=True) for n, b in backends.items()}
            result["compile_s"][mode] = {}
            for batch, images in shapes:
                if not clock.left():
                    result["skipped"].append(
                        f"{mode}, batch {batch}, {images} image(s): over the time budget"
                    )
                    continue
                inputs = make_prompts(model, batch, images, args)

                def forward(name: str, inputs=inputs, compiled=compiled):
                    return compiled[name](**inputs, logits_to_keep=1)

                def call(name: str) -> float:
                    return timed(lambda: forward(name), args.device)  # noqa: B023  (called here only)

                first = {n: call(n) for n in recipes}  # compiles (a new graph per batch of 1)
                warm = {n: call(n) for n in recipes}
                if not result["compile_s"][mode]:
                    result["compile_s"][mode] = {n: first[n] - warm[n] for n in recipes}
                times: dict[str, list[float]] = {n: [] for n in recipes}
                for _, name in round_robin(list(recipes), args.repeats):
                    times[name].append(call(name))
                row = {"mode": mode, "batch": batch, "images": images, "tokens": inputs["input_ids"].shape[1]}
                row["ms"] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
                row["peak_mib"] = {n: peak_mib(lambda n=n: forward(n), args.device) for n in recipes}
                row["pruned_runs"] = {n: backends[n].pruned_runs for n in recipes}
                if args.compiler == "inductor" and not result["launches"]:  # `launches.py`, first shape
                    result["launches"] = {
                        n: count_launches(lambda n=n: forward(n), args.device) for n in recipes
                    }
                    result["pruning_layers"] = {
                        n: sum(c > 0 for c in r.prune.values()) for n, r in recipes.items()
                    }
                    result["launches_at"] = f"{mode}, batch {batch}, {row['tokens']} tokens"
                result["prefill"].append(row)
                print(f"{mode}, batch {batch}, {row['tokens']} tokens: " + ", ".join(
                    f"{n} {ms:.2f} ms" for n, ms in row["ms"].items()), flush=True)  # fmt: skip
        if args.new_tokens and clock.left():
            result["decode"] = measure_decode(model, recipes, args)
        elif args.new_tokens:
            result["skipped"].append("decode: over the time budget")
    return result


def measure_decode(model, recipes: dict, args: argparse.Namespace) -> dict:
    """Decode tokens per second after each variant's prefill (greedy, batch 1, default mode): the
    generate time less its prefill, over the new tokens (each variant compiled in place)."""
    inputs = make_prompts(model, 1, 1, args)
    gen = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
    )
    out = {}
    for name in (UNPRUNED, *args.recipes):
        torch._dynamo.reset()
        model.compile(backend=fitprune_backend(recipes[name], compiler=args.compiler, progress=False))
        model.generate(**inputs, **gen)  # compiles prefill and decode graphs
        total = statistics.median(
            timed(lambda: model.generate(**inputs, **gen), args.device) for _ in range(3)
        )
        prefill = statistics.median(
            timed(lambda: model(**inputs, logits_to_keep=1), args.device) for _ in range(3)
        )
        out[name] = {"tokens_per_s": args.new_tokens / max(total - prefill, 1e-9)}
    return out


def report(result: dict) -> str:
    """Markdown tables: prefill per shape and mode, compile time, decode; goals beside."""
    m = result["machine"]
    head = (
        f"{m.get('gpu', m['cpu'])}, torch {m['torch']}, transformers {m['transformers']}, {result['date']}; "
        f"{result['sizes']['layers']} layers x hidden {result['sizes']['hidden']}, {result['sizes']['dtype']}"
    )
    lines = [
        head,
        "",
        "| mode | batch | tokens | variant | prefill ms | speed-up | FLOPs ideal | peak MiB | goal |",
    ]
    lines.append("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for row in result["prefill"]:
        base = row["ms"][UNPRUNED]
        for name, ms in row["ms"].items():
            speedup = base / ms
            goal = GOALS.get((name, row["batch"]))
            verdict = "-" if goal is None else ("met" if speedup >= goal else f"short (>= {goal:.2f}x)")
            peak = row["peak_mib"][name]
            lines.append(
                f"| {row['mode']} | {row['batch']} | {row['tokens']} | {name} | {ms:.2f} | {speedup:.2f}x "
                f"| {result['ideal'][name]:.2f}x | {'-' if peak is None else f'{peak:.0f}'} | {verdict} |"
            )
    lines += ["", "| mode | variant | compile s | vs unpruned | goal |", "|---|---|---:|---:|---|"]
    for mode, comp in result["compile_s"].items():
        for name, s in comp.items():
            ratio = s / comp[UNPRUNED] if comp.get(UNPRUNED) else float("nan")
            verdict = "-" if name == UNPRUNED else ("met" if ratio <= COMPILE_GOAL else "short")
            lines.append(f"| {mode} | {name} | {s:.1f} | {ratio:.2f}x | {verdict} |")
    if result["decode"]:
        base = result["decode"][UNPRUNED]["tokens_per_s"]
        lines += ["", "| decode (batch 1, default mode) | tokens/s | vs unpruned |", "|---|---:|---:|"]
        for name, d in result["decode"].items():
            lines.append(f"| {name} | {d['tokens_per_s']:.1f} | {d['tokens_per_s'] / base:.2f}x |")
    if result["launches"]:
        device = "cuda" if "gpu" in m else "cpu"
        lines += [
            "",
            f"At {result['launches_at']}:",
            launches_table(result["launches"], result["pruning_layers"], UNPRUNED, device),
        ]
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def write(result: dict, table: str, out_dir: Path) -> list[Path]:
    """`<date>-<device>-prefill.{md,json}` in `out_dir`; returns the paths."""
    device = result["machine"].get("gpu", "cpu").replace(" ", "-").lower()
    stem = out_dir / f"{result['date']}-{device}-prefill"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".json")]
    paths[0].write_text(
        f"# Prefill matrix\n\n`python benchmarks/prefill_matrix.py --device cuda`\n\n{table}\n"
    )
    paths[1].write_text(json.dumps(result, indent=1, default=str))
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke (CPU, tiny sizes) or on a GPU machine")
    for key in ("recompile_limit", "cache_size_limit"):  # one frame, an entry per variant and batch kind
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    result = run(args)
    table = report(result)
    print("\n" + table)
    if args.out_dir:
        for path in write(result, table, args.out_dir):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
