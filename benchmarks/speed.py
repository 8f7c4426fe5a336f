"""Prefill speed of FitPrune vs the FLOPs bound, with the pass's overheads measured alongside.

    python benchmarks/speed.py                      # CPU: 8 layers, hidden 512, 576 visual tokens
    python benchmarks/speed.py --recipes 50 70 --repeats 15
    python benchmarks/speed.py --device cuda        # LLaVA-1.5-7B dimensions in bfloat16
    python benchmarks/speed.py --quick --compiler eager   # CI smoke run (seconds, no timing claims)

The model is a randomly initialised LLaVA with LLaVA-1.5's token geometry: a system prompt,
576 visual tokens (a 1-layer CLIP tower on a 24 x 24 patch grid, image 96 / patch 4, cheap on
purpose) and a question. What is timed is the whole compiled forward of one prompt (batch 1,
``logits_to_keep=1`` as in generate's prefill): the vision tower's share is reported so that the
decoder dominates. Every variant goes through the same backend, ``fitprune_backend``:

* ``unpruned``    -- ``Recipe(prune={})``: the pass finds nothing to do (plain Inductor graph);
* ``score-only``  -- the 60 % recipe's layers with count 0: scoring + identity compaction;
* ``50``/``60``/... -- the shipped LLaVA-1.5-7B recipes rescaled to this model's depth.

Variants run alternately (round robin, start rotated each round), warm-up excluded; medians are
reported. Speed-ups are ratios of medians measured side by side in one run. Also measured:
compile time of every variant (its first call minus a warm call, Inductor caches off, after a
throw-away compile that absorbs one-time costs) and greedy decode throughput over
``--new-tokens`` tokens after a pruned prefill (in-place ``model.compile(backend=...)`` +
``generate``). The results are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)

from fitprune_fx import FitpruneBackend, ModelInfo, Recipe, fitprune_backend

IMAGE_TOKEN_ID = 32000  # LLaVA-1.5's <image> id; text ids are drawn below it
VOCAB_SIZE = 32064
UNPRUNED, SCORE_ONLY = "unpruned", "score-only"
CPU_SIZES = dict(layers=8, hidden=512, heads=8, intermediate=1376)  # ~1 s prefill, 1 thread
GPU_SIZES = dict(layers=32, hidden=4096, heads=32, intermediate=11008)  # LLaVA-1.5-7B
QUICK_SIZES = dict(layers=2, hidden=64, heads=2, intermediate=172)


# ----------------------------------------------------------------------------------- setup
def build_model(args: argparse.Namespace) -> LlavaForConditionalGeneration:
    """Random LLaVA: 1-layer CLIP on a (image/patch)^2 grid, Llama decoder of the requested size."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=args.image_size,
        patch_size=args.patch_size,
        projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,  # LLaVA-1.5 (Llama-2/Vicuna) is multi-head attention
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(args.torch_dtype)  # build in the target dtype (7B: no fp32 copy)
    try:
        with torch.device(args.device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def make_prompt(model: LlavaForConditionalGeneration, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """One prompt: BOS + system prompt, the image's visual tokens, the question (batch 1)."""
    g = torch.Generator().manual_seed(args.seed)
    vc = model.config.vision_config
    n_visual = (vc.image_size // vc.patch_size) ** 2

    def text(n: int) -> list[int]:
        return torch.randint(4, IMAGE_TOKEN_ID, (n,), generator=g).tolist()

    ids = [1] + text(args.system_tokens) + [IMAGE_TOKEN_ID] * n_visual + text(args.question_tokens)
    pixels = torch.randn((1, 3, vc.image_size, vc.image_size), generator=g)
    return {
        "input_ids": torch.tensor([ids], device=args.device),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long, device=args.device),
        "pixel_values": pixels.to(device=args.device, dtype=args.torch_dtype),
    }


def make_recipes(info: ModelInfo, names: list[str], compaction_only: bool = False) -> dict[str, Recipe]:
    """unpruned, score-only (the 60 recipe's layers, count 0) and the shipped recipes rescaled.

    With `compaction_only`, also "<name>-random": the same counts with the `random` scorer, i.e.
    the compaction without attention scoring (separates scoring cost from compaction cost).
    """
    shipped = {n: Recipe.load(f"llava-1.5-7b/{n}.json").rescaled_to(info) for n in names}
    if compaction_only:
        shipped.update({f"{n}-random": dataclasses.replace(shipped[n], scorer="random") for n in names})
    score_layers = Recipe.load("llava-1.5-7b/60.json").rescaled_to(info).prune
    recipes = {
        UNPRUNED: Recipe(model=info, prune={}),
        SCORE_ONLY: Recipe(model=info, prune=dict.fromkeys(score_layers, 0)),
    }
    recipes.update(shipped)
    return recipes


# ----------------------------------------------------------------------------------- timing
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


class TimedBackend:
    """Wraps a backend and adds up the seconds spent inside it (pass + Inductor)."""

    def __init__(self, backend: FitpruneBackend) -> None:
        self.backend = backend
        self.seconds = 0.0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        t0 = time.perf_counter()
        try:
            return self.backend(gm, example_inputs)
        finally:
            self.seconds += time.perf_counter() - t0


class StepClock(LogitsProcessor):
    """Records the time at every generation step (called once per forward, after the logits)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class Results:
    """Everything measured, JSON-serialisable (``--json``)."""

    machine: dict
    sizes: dict
    prefill_ms: dict[str, float] = field(default_factory=dict)
    prefill_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    flops: dict[str, dict] = field(default_factory=dict)
    kept_tokens: dict[str, list[int]] = field(default_factory=dict)
    reports: dict[str, list[str]] = field(default_factory=dict)
    pruned_graphs: dict[str, int] = field(default_factory=dict)
    vision_ms: float | None = None
    compile_s: dict[str, dict] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)  # CUDA: peak allocated during one prefill
    decode: dict[str, dict] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- phases
def measure_prefill(
    model: LlavaForConditionalGeneration,
    inputs: dict,
    recipes: dict[str, Recipe],
    results: Results,
    args: argparse.Namespace,
) -> dict[str, TimedBackend]:
    """Compile every variant (timed, Inductor caches off), then alternating prefill timings.

    Compile time of a variant = its first call (Dynamo trace + pass + Inductor + one run) minus
    its median warm call; `backend_s` is the part spent inside the backend (pass + Inductor).
    """
    backends = {n: fitprune_backend(r, compiler=args.compiler) for n, r in recipes.items()}
    timers = {n: TimedBackend(b) for n, b in backends.items()}
    compiled = {n: torch.compile(model, backend=t) for n, t in timers.items()}
    names = list(recipes)
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}

    def call(name: str) -> float:
        return timed(lambda: compiled[name](**inputs, logits_to_keep=1), args.device)

    with torch.no_grad():
        with inductor_caches_disabled():
            # A throw-away compile absorbs one-time costs (imports, C++ toolchain probe, headers).
            torch.compile(lambda x: (x * 2).sin(), backend=args.compiler)(torch.randn(8, device=args.device))
            for name in tqdm(names, desc="compile (first calls)", file=sys.stdout):
                first[name] = call(name)
        for _, name in tqdm(list(round_robin(names, args.warmup)), desc="warm-up", file=sys.stdout):
            call(name)
        for _, name in tqdm(list(round_robin(names, args.repeats)), desc="prefill", file=sys.stdout):
            times[name].append(call(name))
        if args.device.startswith("cuda"):
            for name in names:
                torch.cuda.reset_peak_memory_stats()
                call(name)
                results.peak_mib[name] = torch.cuda.max_memory_allocated() / 2**20
        if args.vision_repeats:
            pv = inputs["pixel_values"]
            vision = [
                timed(lambda: model.model.get_image_features(pixel_values=pv), args.device)
                for _ in range(args.vision_repeats + 1)
            ]
            results.vision_ms = 1e3 * statistics.median(vision[1:])
    for name in names:
        warm = statistics.median(times[name])
        results.prefill_samples_ms[name] = [1e3 * t for t in times[name]]
        results.prefill_ms[name] = 1e3 * warm
        results.compile_s[name] = {"compile_s": first[name] - warm, "backend_s": timers[name].seconds}
        b = backends[name]
        results.reports[name] = [str(r) for r in b.reports]
        results.pruned_graphs[name] = len(b.pruned_graphs)
        pruned = [r.result for r in b.pruned_graphs if r.result is not None]
        results.kept_tokens[name] = [int(t) for t in pruned[0].tokens_per_layer] if pruned else []
    return timers


def measure_decode(
    model: LlavaForConditionalGeneration,
    inputs: dict,
    backends: dict[str, TimedBackend],
    names: list[str],
    args: argparse.Namespace,
) -> dict[str, dict]:
    """Greedy generate of --new-tokens tokens per variant (in-place compile), alternating.

    The prefill's backends are reused, so Dynamo's entries for the prefill graph stay valid.
    """
    steps: dict[str, list[float]] = {n: [] for n in names}
    prefill: dict[str, list[float]] = {n: [] for n in names}
    gen = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
    )
    rounds = list(round_robin(names, args.decode_warmup + args.decode_repeats))
    with torch.no_grad():
        for r, name in tqdm(rounds, desc="decode", file=sys.stdout):
            model.compile(backend=backends[name])  # in place: generate's forward calls reach the backend
            clock = StepClock(args.device)
            synchronize(args.device)
            t0 = time.perf_counter()
            out = model.generate(**inputs, logits_processor=LogitsProcessorList([clock]), **gen)
            if out.shape[1] - inputs["input_ids"].shape[1] != args.new_tokens:
                raise RuntimeError(f"generate made {out.shape[1] - inputs['input_ids'].shape[1]} tokens")
            if r >= args.decode_warmup:
                prefill[name].append(clock.stamps[0] - t0)
                steps[name].append((clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1))
    result = {}
    for name in names:
        step = statistics.median(steps[name])
        result[name] = {
            "step_ms": 1e3 * step,
            "tokens_per_s": 1.0 / step,
            "generate_prefill_ms": 1e3 * statistics.median(prefill[name]),
            "pruned_graphs": len(backends[name].backend.pruned_graphs),
            "graphs_seen": len(backends[name].backend.reports),
        }
    return result


# ----------------------------------------------------------------------------------- report
def machine_info(device: str) -> dict:
    """CPU model, cores, torch/transformers versions (and GPU name on CUDA)."""
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prefill_table(results: Results, recipes: dict[str, Recipe], names: list[str], num_text: int) -> str:
    """Markdown: per recipe, the FLOPs reductions, ideal and measured speed-ups and their ratio."""
    base = results.prefill_ms[UNPRUNED]
    lines = [
        "| variant | pruned graphs | tokens per layer (first -> last) | r (reference) | r (full, text incl.) "
        "| ideal 1/(1-r) | ideal (full) | prefill ms (median) | measured speed-up "
        "| measured / ideal | measured / ideal (full) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [UNPRUNED, SCORE_ONLY, *(n for n in recipes if n not in (UNPRUNED, SCORE_ONLY))]:
        recipe = recipes[name]
        report = recipe.flops_report(num_text_tokens=num_text)
        r_ref, r_full = recipe.reference_reduction(), report.full_reduction
        ideal, ideal_full = 1 / (1 - r_ref), 1 / (1 - r_full)
        speedup = base / results.prefill_ms[name]
        results.flops[name] = {
            "reference_reduction": r_ref,
            "full_reduction": r_full,
            "ideal": ideal,
            "ideal_full": ideal_full,
            "speedup": speedup,
        }
        kept = results.kept_tokens[name]
        tokens = f"{kept[0]} -> {kept[-1]}" if kept else "-"
        lines.append(
            f"| {name} | {results.pruned_graphs[name]} | {tokens} | {r_ref:.3f} | {r_full:.3f} "
            f"| {ideal:.2f}x | {ideal_full:.2f}x | {results.prefill_ms[name]:.1f} | {speedup:.2f}x "
            f"| {speedup / ideal:.2f} | {speedup / ideal_full:.2f} |"
        )
    return "\n".join(lines)


def overhead_table(results: Results, names: list[str]) -> str:
    """Markdown: scoring, compile time and decode throughput, each next to its goal."""
    base = results.prefill_ms[UNPRUNED]
    scoring = results.prefill_ms[SCORE_ONLY] / base - 1
    lines = ["| overhead | measured | goal |", "|---|---|---|"]
    lines.append(
        f"| scoring (score-only vs unpruned prefill) | {100 * scoring:+.1f} % "
        f"({results.prefill_ms[SCORE_ONLY]:.1f} vs {base:.1f} ms) | <= 5 % |"
    )
    if results.vision_ms is not None:
        lines.append(
            f"| vision tower + projector (eager) share of unpruned prefill | "
            f"{100 * results.vision_ms / base:.1f} % ({results.vision_ms:.1f} ms) | small |"
        )
    for name, mib in results.peak_mib.items():
        lines.append(f"| peak GPU memory of one prefill, {name} | {mib:.0f} MiB | below unpruned |")
    c = results.compile_s
    if UNPRUNED in c:
        for name in (n for n in c if n != UNPRUNED):
            lines.append(
                f"| compile time, {name} vs unpruned (first call - warm call; caches off) "
                f"| {c[name]['compile_s'] / c[UNPRUNED]['compile_s']:.2f}x "
                f"({c[name]['compile_s']:.1f} vs {c[UNPRUNED]['compile_s']:.1f} s; in backend "
                f"{c[name]['backend_s']:.1f} vs {c[UNPRUNED]['backend_s']:.1f} s) | <= 1.3x |"
            )
    d = results.decode
    if UNPRUNED in d:
        for name in (n for n in d if n != UNPRUNED):
            lines.append(
                f"| decode throughput, {name} vs unpruned ({results.sizes['new_tokens']} new tokens) "
                f"| {d[name]['tokens_per_s'] / d[UNPRUNED]['tokens_per_s']:.2f}x "
                f"({d[name]['tokens_per_s']:.1f} vs {d[UNPRUNED]['tokens_per_s']:.1f} tok/s) | >= 1x |"
            )
    return "\n".join(lines)


def machine_line(results: Results) -> str:
    m, s = results.machine, results.sizes
    where = f"{m['gpu']} (GPU), " if "gpu" in m else ""
    return (
        f"Machine: {where}{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}; load average at start {m['load_avg']}.\n"
        f"Model: random LLaVA, decoder {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, MLP "
        f"{s['intermediate']}, {s['dtype']}; prompt {s['prompt_tokens']} tokens = {s['text_tokens']} text "
        f"(system {s['system_tokens']} + BOS, question {s['question_tokens']}) + {s['visual_tokens']} visual "
        f"(1-layer CLIP, image {s['image_size']} / patch {s['patch_size']}); batch 1; "
        f"compiler {s['compiler']}; "
        f"{s['repeats']} alternating repeats after {s['warmup']} warm-up rounds, medians."
    )


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--recipes", nargs="+", default=["50", "60", "70"], help="shipped LLaVA-1.5-7B recipes (budget %%)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 9, quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant (the first compiles)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--layers", type=int, default=None, help="decoder layers (CPU 8, CUDA 32)")
    p.add_argument("--hidden", type=int, default=None, help="decoder hidden size (CPU 512, CUDA 4096)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (CPU 8, CUDA 32)")
    p.add_argument(
        "--intermediate", type=int, default=None, help="MLP width (default 2.6875 x hidden, LLaVA-7B's ratio)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=96,
        help="image side; with --patch-size 4: 24 x 24 = 576 visual tokens",
    )
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=35, help="system prompt tokens before the image")
    p.add_argument("--question-tokens", type=int, default=30, help="question tokens after the image")
    p.add_argument(
        "--compiler",
        default="inductor",
        choices=["inductor", "eager"],
        help="what the backend hands graphs to",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument(
        "--decode-recipes", nargs="*", default=None, help="recipes timed on generate (default: --recipes)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="decode tokens per generate (default 64, quick 4)"
    )
    p.add_argument(
        "--decode-repeats",
        type=int,
        default=None,
        help="timed generate calls per variant (0 skips; default 3)",
    )
    p.add_argument("--decode-warmup", type=int, default=1)
    p.add_argument(
        "--vision-repeats", type=int, default=5, help="eager vision-tower timings for its share (0 skips)"
    )
    p.add_argument(
        "--compaction-only",
        action="store_true",
        help="also time each recipe with the random scorer (compaction cost without scoring)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run: 2 tiny layers, few repeats")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    args = p.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES if args.device.startswith("cuda") else CPU_SIZES
    for key in ("layers", "hidden", "heads"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.intermediate is None:
        args.intermediate = (
            sizes["intermediate"] if args.hidden == sizes["hidden"] else round(2.6875 * args.hidden)
        )
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.torch_dtype = getattr(torch, args.dtype)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 9
    if args.new_tokens is None:
        args.new_tokens = 4 if args.quick else 64
    if args.decode_repeats is None:
        args.decode_repeats = 1 if args.quick else 3
    if args.quick:
        args.warmup = min(args.warmup, 1)
        args.vision_repeats = min(args.vision_repeats, 1)
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    for key in ("recompile_limit", "cache_size_limit"):  # one frame, one entry per backend (variant)
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)

    model = build_model(args)
    inputs = make_prompt(model, args)
    info = ModelInfo.from_config(model.config, name=f"speed-bench-{args.layers}x{args.hidden}")
    recipes = make_recipes(info, args.recipes, args.compaction_only)
    num_text = inputs["input_ids"].shape[1] - info.num_visual_tokens
    results = Results(
        machine=machine_info(args.device),
        sizes=dict(
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            intermediate=args.intermediate,
            dtype=args.dtype,
            visual_tokens=info.num_visual_tokens,
            text_tokens=num_text,
            prompt_tokens=inputs["input_ids"].shape[1],
            system_tokens=args.system_tokens,
            question_tokens=args.question_tokens,
            image_size=args.image_size,
            patch_size=args.patch_size,
            compiler=args.compiler,
            repeats=args.repeats,
            warmup=args.warmup,
            new_tokens=args.new_tokens,
        ),
    )
    print(machine_line(results))
    for name in args.recipes:
        print(f"recipe {name} rescaled to {args.layers} layers: {recipes[name].prune}")

    backends = measure_prefill(model, inputs, recipes, results, args)
    prefill = prefill_table(results, recipes, args.recipes, num_text)
    print("\n" + prefill + "\n", flush=True)  # decode (more compiles) comes next
    if args.decode_repeats:
        decode_names = [UNPRUNED, *(n for n in args.decode_recipes or args.recipes if n in recipes)]
        results.decode = measure_decode(model, inputs, backends, decode_names, args)

    print("\n" + machine_line(results) + "\n")
    print(prefill + "\n")
    print(overhead_table(results, args.recipes) + "\n")
    print("Backend reports (decoder graphs):")
    for name, lines in results.reports.items():
        for line in lines:
            if "pruned" in line:
                print(f"  {name}: {line}")
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
