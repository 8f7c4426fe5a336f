"""Tables of `benchmarks/speed.py`: per-width prefill and overhead tables, decode against cache
length, and one side-by-side summary of every width measured in the run (Markdown)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fitprune_fx import Recipe

UNPRUNED, SCORE_ONLY = "unpruned", "score-only"
ANY_LENGTH = "-any-length"  # variant suffix: compiled for any prompt length (dynamic=True)
# Unpruned with Inductor's own linears (`fitprune_backend(onednn_linears=False)`): every other
# variant runs its fp32 CPU linears through oneDNN, and speed-ups are taken against the faster
# of the two unpruned runs, so that a slower oneDNN unpruned cannot inflate them.
INDUCTOR_LINEARS = "-inductor-linears"
UNPRUNED_INDUCTOR_LINEARS = UNPRUNED + INDUCTOR_LINEARS


def baseline(times: dict[str, float]) -> float:
    """The unpruned time speed-ups are taken against: the faster of the unpruned runs in `times`."""
    return min(times[n] for n in (UNPRUNED, UNPRUNED_INDUCTOR_LINEARS) if n in times)


def compile_base(name: str) -> str:
    """The variant whose compile time `name`'s is compared with: unpruned, compiled the same way."""
    return UNPRUNED + ANY_LENGTH if name.endswith(ANY_LENGTH) else UNPRUNED


@dataclass
class Results:
    """Everything measured, JSON-serialisable (``--json``)."""

    machine: dict
    sizes: dict
    prefill_ms: dict[str, float] = field(default_factory=dict)
    prefill_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    decoder_ms: dict[str, float] = field(default_factory=dict)  # the decoder graph's calls in a prefill
    flops: dict[str, dict] = field(default_factory=dict)
    kept_tokens: dict[str, list[int]] = field(default_factory=dict)
    cache_lengths: dict[str, list[int]] = field(default_factory=dict)  # per layer, after one prefill
    reports: dict[str, list[str]] = field(default_factory=dict)
    pruned_graphs: dict[str, int] = field(default_factory=dict)
    vision_ms: float | None = None
    compile_s: dict[str, dict] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)  # CUDA: peak allocated during one prefill
    decode: dict[str, dict] = field(default_factory=dict)
    decode_batched: dict[str, dict] = field(default_factory=dict)  # the same at `sizes["decode_batch"]`
    breakdown: dict[str, dict] = field(default_factory=dict)  # CPU: ms per kind of work (speed_breakdown)
    launches: dict[str, int] = field(default_factory=dict)  # kernel launches of one prefill (launches.py)
    pruning_layers: dict[str, int] = field(default_factory=dict)  # layers that delete tokens


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


def prefill_table(results: Results, recipes: dict[str, Recipe], num_text: int) -> str:
    """Markdown: per recipe, the FLOPs reductions, ideal and measured speed-ups and their ratio
    (speed-ups against the faster unpruned run, `baseline`)."""
    base = baseline(results.prefill_ms)
    fixed = results.sizes.get("unprunable_macs", 0.0)  # vision tower, projector, lm_head: not pruned
    lines = [
        "| variant | pruned graphs | tokens per layer (first -> last) | r (reference) | r (full, text incl.) "
        "| ideal 1/(1-r) | ideal (full) | ideal (forward) | prefill ms (median) | quartiles ms "
        "| measured speed-up | measured / ideal | measured / ideal (full) | measured / ideal (forward) "
        "| decoder graph ms | decoder graph speed-up / ideal (full) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [UNPRUNED, SCORE_ONLY, *(n for n in recipes if n not in (UNPRUNED, SCORE_ONLY))]:
        recipe = recipes[name]
        report = recipe.flops_report(num_text_tokens=num_text)
        r_ref, r_full = recipe.reference_reduction(), report.full_reduction
        ideal, ideal_full = 1 / (1 - r_ref), 1 / (1 - r_full)
        # The timed forward also runs what pruning leaves alone: the same FLOPs ratio with it added.
        ideal_forward = (report.full_unpruned + fixed) / (report.full_total + fixed)
        speedup = base / results.prefill_ms[name]
        decoder = results.decoder_ms.get(name)
        decoder_speedup = baseline(results.decoder_ms) / decoder if decoder else float("nan")
        results.flops[name] = {
            "reference_reduction": r_ref,
            "full_reduction": r_full,
            "ideal": ideal,
            "ideal_full": ideal_full,
            "ideal_forward": ideal_forward,
            "speedup": speedup,
            "decoder_speedup": decoder_speedup,
        }
        kept = results.kept_tokens[name]
        tokens = f"{kept[0]} -> {kept[-1]}" if kept else "-"
        samples = results.prefill_samples_ms[name]
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
        lines.append(
            f"| {name} | {results.pruned_graphs[name]} | {tokens} | {r_ref:.3f} | {r_full:.3f} "
            f"| {ideal:.2f}x | {ideal_full:.2f}x | {ideal_forward:.2f}x | {results.prefill_ms[name]:.1f} "
            f"| {q1:.1f} - {q3:.1f} | {speedup:.2f}x | {speedup / ideal:.2f} | {speedup / ideal_full:.2f} "
            f"| {speedup / ideal_forward:.2f} | {decoder or float('nan'):.1f} "
            f"| {decoder_speedup / ideal_full:.2f} |"
        )
    return "\n".join(lines)


def decoder_ideal_ceiling(results: Results, name: str) -> float:
    """Measured / decoder ideal that `name` would reach if its decoder graph ran exactly at the
    decoder ideal and the rest of the call (vision tower, projector, `lm_head`, the model's Python:
    the call minus the decoder graph) took what it took unpruned. That rest does not shrink with the
    recipe, so this is the ceiling it sets; the unpruned run is the faster one (`baseline`)."""
    fastest = min((n for n in (UNPRUNED, UNPRUNED_INDUCTOR_LINEARS) if n in results.prefill_ms),
                  key=results.prefill_ms.__getitem__)  # fmt: skip
    call, decoder = results.prefill_ms[fastest], results.decoder_ms[fastest]
    ideal = results.flops[name]["ideal_full"]
    return call / (decoder / ideal + call - decoder) / ideal


def scoring_pass_layers(results: Results, recipes: dict[str, Recipe]) -> float:
    """What one scoring pass costs, in decoder layers: the score-only overhead per scoring layer
    over the unpruned time of one layer (compare with the -merged variants' threshold)."""
    base = results.prefill_ms[UNPRUNED]
    passes = max(len(recipes[SCORE_ONLY].prune), 1)
    return (results.prefill_ms[SCORE_ONLY] - base) / passes / (base / results.sizes["layers"])


def overhead_table(results: Results, recipes: dict[str, Recipe]) -> str:
    """Markdown: scoring, compile time and decode throughput, each next to its goal."""
    base = results.prefill_ms[UNPRUNED]
    scoring = results.prefill_ms[SCORE_ONLY] / base - 1
    goal = "<= 10 %" if results.sizes["hidden"] < 2048 else "<= 3 %"
    lines = ["| overhead | measured | goal |", "|---|---|---|"]
    lines.append(
        f"| scoring (score-only vs unpruned prefill, {len(recipes[SCORE_ONLY].prune)} scoring layers) "
        f"| {100 * scoring:+.1f} % ({results.prefill_ms[SCORE_ONLY]:.1f} vs {base:.1f} ms) | {goal} |"
    )
    lines.append(
        f"| one scoring pass, in decoder layers | {scoring_pass_layers(results, recipes):.3f} "
        f"| -merged threshold {results.sizes['merge_below']} |"
    )
    if UNPRUNED_INDUCTOR_LINEARS in results.prefill_ms:
        other = results.prefill_ms[UNPRUNED_INDUCTOR_LINEARS]
        lines.append(
            f"| unpruned prefill, oneDNN linears vs Inductor's | {other / base:.2f}x ({base:.1f} vs "
            f"{other:.1f} ms; speed-ups are against the faster) | - |"
        )
    if results.vision_ms is not None:
        lines.append(
            f"| vision tower + projector (eager) share of unpruned prefill | "
            f"{100 * results.vision_ms / base:.1f} % ({results.vision_ms:.1f} ms) | small |"
        )
    for name, mib in results.peak_mib.items():
        lines.append(f"| peak GPU memory of one prefill, {name} | {mib:.0f} MiB | below unpruned |")
    c = results.compile_s
    for name in (n for n in c if n != compile_base(n) and compile_base(n) in c):
        base = compile_base(name)
        lines.append(
            f"| compile time, {name} vs {base} (first call - warm call; caches off) "
            f"| {c[name]['compile_s'] / c[base]['compile_s']:.2f}x "
            f"({c[name]['compile_s']:.1f} vs {c[base]['compile_s']:.1f} s; in backend "
            f"{c[name]['backend_s']:.1f} vs {c[base]['backend_s']:.1f} s) | <= 1.3x |"
        )
    return "\n".join(lines)


def decode_bytes(results: Results, name: str, batch: int) -> float:
    """Bytes a decode step of `name` must read at least: the weights once (`lm_head`, the decoder
    layers and norm) and every example's cache once, keys and values of every layer at its mean
    length over the timed steps (the cache the prefill left, per layer, plus half the new tokens).
    A ratio's ingredient (`decode_ideal`): no byte rate is assumed."""
    s = results.sizes
    # The timed steps are the forwards after the prefill's: forward i (1 .. new_tokens - 1) reads
    # the prefill's cache plus i tokens, new_tokens / 2 on average.
    growth = s["new_tokens"] / 2
    cache = sum(length + growth for length in results.cache_lengths[name])
    return s["decode_weight_bytes"] + batch * s["kv_bytes_per_token"] * cache


def decode_ideal(results: Results, name: str, batch: int) -> float:
    """Decode throughput `name` could reach against unpruned if a step cost the bytes it must read
    (`decode_bytes`), as a step that streams its weights and cache from memory does. At batch 1 the
    weights dominate, so a shorter cache cannot give much; each example adds its cache. A cache
    that concatenates copies itself every step too, which pruning also shortens, so a measured
    ratio can pass this ideal by that copy's share."""
    return decode_bytes(results, UNPRUNED, batch) / decode_bytes(results, name, batch)


def decode_table(results: Results, batched: bool = False) -> str:
    """Markdown: decode-step time against the per-layer cache length the prefill left (throughput
    against the faster unpruned run, and against its bytes-read bound `decode_ideal`), at the run's
    batch or (`batched`) at its decode batch."""
    d = results.decode_batched if batched else results.decode
    batch = results.sizes["decode_batch"] if batched else results.sizes.get("batch", 1)
    base = baseline({n: row["step_ms"] for n, row in d.items()})
    lines = [
        f"| variant, batch {batch} | cache per layer after the prefill (mean; first -> last layer) | decode "
        f"step ms ({results.sizes['new_tokens']} new tokens, median) | tokens/s | throughput vs unpruned "
        "| ideal by bytes read per step (weights + cache) | throughput / ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in d.items():
        cache = results.cache_lengths[name]  # measured: the prefill output's cache, per layer
        speedup = base / row["step_ms"]
        ideal = decode_ideal(results, name, batch)
        lines.append(
            f"| {name} | {sum(cache) / len(cache):.0f} ({cache[0]} -> {cache[-1]}) | {row['step_ms']:.2f} "
            f"| {row['tokens_per_s']:.1f} | {speedup:.2f}x | {ideal:.3f}x | {speedup / ideal:.2f} |"
        )
    return "\n".join(lines)


def side_by_side(runs: dict[str, Results]) -> str:
    """Markdown: every width of one run in adjacent columns (speed-up vs ideal, overheads)."""
    widths = list(runs)
    head = " | ".join(
        f"{w} ({runs[w].sizes['layers']} x {runs[w].sizes['hidden']}): ideal, decoder / forward | measured "
        "| measured / ideal, decoder / forward | decoder graph alone / decoder ideal"
        for w in widths
    )
    lines = [f"| variant | {head} |", "|---|" + "---|---|---|---|" * len(widths)]
    names = [n for n in runs[widths[0]].flops if all(n in runs[w].flops for w in widths)]
    for name in names:
        cells = []
        for w in widths:
            f = runs[w].flops[name]
            ideal, forward, speedup = f["ideal_full"], f["ideal_forward"], f["speedup"]
            ratios = f"{speedup / ideal:.2f} / {speedup / forward:.2f}"
            alone = f.get("decoder_speedup", float("nan")) / ideal
            cells.append(f"{ideal:.2f}x / {forward:.2f}x | {speedup:.2f}x | {ratios} | {alone:.2f}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", f"| figure | {' | '.join(widths)} |", "|---|" + "---|" * len(widths)]

    def row(label: str, fn) -> None:
        values = []
        for w in widths:
            try:
                values.append(fn(runs[w]))
            except (KeyError, ZeroDivisionError):
                values.append("-")
        lines.append(f"| {label} | {' | '.join(values)} |")

    def scoring(r: Results) -> str:
        return f"{100 * (r.prefill_ms[SCORE_ONLY] / r.prefill_ms[UNPRUNED] - 1):+.1f} %"

    def compile_ratio(name: str):
        base = compile_base(name)
        return lambda r: f"{r.compile_s[name]['compile_s'] / r.compile_s[base]['compile_s']:.2f}x"

    def decode_ratio(name: str, batched: bool = False):
        def ratio(r: Results) -> str:
            d = r.decode_batched if batched else r.decode
            if name not in d:  # a width without that decode (7b: no batched decode)
                raise KeyError(name)
            batch = r.sizes["decode_batch"] if batched else r.sizes.get("batch", 1)
            speedup = baseline({n: row["step_ms"] for n, row in d.items()}) / d[name]["step_ms"]
            return f"{speedup:.2f}x (ideal {decode_ideal(r, name, batch):.2f}x)"

        return ratio

    def onednn(r: Results) -> str:
        ms = r.prefill_ms
        return f"{ms[UNPRUNED_INDUCTOR_LINEARS] / ms[UNPRUNED]:.2f}x"

    for name in (n for n in names if n.isdigit()):  # the shipped recipes as they are
        row(
            f"measured / decoder ideal, {name}: ceiling (decoder graph at its ideal, rest as unpruned)",
            lambda r, name=name: f"{decoder_ideal_ceiling(r, name):.2f}",
        )
    row("scoring overhead (score-only vs unpruned)", scoring)
    row("unpruned prefill, oneDNN linears vs Inductor's (speed-up)", onednn)
    compiled = [n for n in runs[widths[0]].compile_s if n != compile_base(n) and n != SCORE_ONLY]
    for name in compiled:
        row(f"compile time {name} / {compile_base(name)}", compile_ratio(name))
    batch = runs[widths[0]].sizes.get("batch", 1)
    for name in (n for n in runs[widths[0]].decode if not n.startswith(UNPRUNED)):
        row(f"decode throughput {name} / unpruned, batch {batch} (ideal: bytes read)", decode_ratio(name))
    batched = next((r for r in runs.values() if r.decode_batched), None)
    for name in (n for n in (batched.decode_batched if batched else {}) if not n.startswith(UNPRUNED)):
        row(
            f"decode throughput {name} / unpruned, batch {batched.sizes['decode_batch']} (ideal: bytes read)",
            decode_ratio(name, True),
        )
    return "\n".join(lines)


def _quantized(sizes: dict) -> str:
    return f", decoder linears {sizes['quantize']} (torchao)" if sizes.get("quantize") else ""


def write_record(path: Path, script: str, body: str, device: str = "cpu") -> None:
    """A benchmark's table as a file the documentation includes: the command, when and where it
    ran, then the table as printed."""
    m = machine_info(device)
    where = f"{m['gpu']} (GPU), " if "gpu" in m else ""
    command = " ".join([f"python benchmarks/{script}", *sys.argv[1:]])
    header = (
        f"`{command}` ({datetime.date.today()}; {where}{m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"transformers {m['transformers']})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{header}\n\n{body.strip()}\n")


def machine_line(results: Results) -> str:
    m, s = results.machine, results.sizes
    where = f"{m['gpu']} (GPU), " if "gpu" in m else ""
    return (
        f"Machine: {where}{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}; load average at start {m['load_avg']}.\n"
        f"Model: random LLaVA, decoder {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, MLP "
        f"{s['intermediate']}, {s['dtype']}{_quantized(s)}; "
        f"prompt {s['prompt_tokens']} tokens = {s['text_tokens']} text "
        f"(system {s['system_tokens']} + BOS, question {s['question_tokens']}) + {s['visual_tokens']} visual "
        f"(1-layer CLIP, image {s['image_size']} / patch {s['patch_size']}); batch {s.get('batch', 1)}; "
        f"compiler {s['compiler']}; "
        f"{s['repeats']} alternating repeats after {s['warmup']} warm-up rounds, medians."
    )
