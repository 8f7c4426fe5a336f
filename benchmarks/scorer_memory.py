"""Peak memory and time of FitPrune scoring: materialising [B, H, S, S] vs `visual_attention_mass`.

    python benchmarks/scorer_memory.py [--device cpu|cuda] [--seq 700 3000] [--heads 32] [--dim 128]

One LLaVA-like prefill example per sequence length: a 35-token system prefix, then the visual
tokens (576 for S <= 1000 as in LLaVA-1.5, else S - 120 as in LLaVA-NeXT's up to 2880), then the
instruction; causal attention without padding (mask None), random q / k.

* `materialise`: the former `fitprune_score` body (fp32 probabilities [B, H, S, S] via
  `attention_probs`, max over heads, weighted row sums).
* `op`: `torch.ops.fitprune.visual_attention_mass` (chunked PyTorch on CPU, Triton on CUDA).

Memory on CUDA: `torch.cuda.max_memory_allocated` above what the inputs hold. On CPU torch's
allocator is invisible to tracemalloc, so each (variant, length) runs in a fresh subprocess and
reports the growth of the process's peak RSS (`resource.getrusage`) over its state after the
inputs were built and a small warm-up ran. Both report the best-of-`--repeats` time. The two
variants' scores are compared (max relative difference; same lowest-50% set or not).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from fitprune_fx.kernels.attention_mass import visual_attention_mass  # noqa: F401 (registers the op)
from fitprune_fx.passes.scorers import ScoringInputs, attention_probs

PREFIX = 35


def make_inputs(seq: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str):
    """q [1, H, S, D], k [1, Hkv, S, D] and the instruction / visual row masks [1, S]."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, dim, generator=g, device=device).to(dtype)
    k = torch.randn(1, kv_heads, seq, dim, generator=g, device=device).to(dtype)
    n_visual = 576 if seq <= 1000 else seq - 120
    pos = torch.arange(seq, device=device)[None]
    visual = (pos >= PREFIX) & (pos < PREFIX + n_visual)
    instruction = pos >= PREFIX + n_visual
    return q, k, instruction, visual


def materialise(q, k, instruction, visual, scale):
    """The former in-graph computation: all fp32 probabilities at once."""
    inputs = ScoringInputs(q, k, None, True, scale, visual, 0, 0, {})
    head_max = attention_probs(inputs).amax(dim=1)  # [B, S, S]
    cross = (head_max * instruction.unsqueeze(-1)).sum(dim=1)
    return cross, (head_max * visual.unsqueeze(-1)).sum(dim=1)


def fused(q, k, instruction, visual, scale):
    return torch.ops.fitprune.visual_attention_mass(q, k, None, instruction, visual, scale, True)


VARIANTS = {"materialise": materialise, "op": fused}


def measure(variant: str, seq: int, args) -> dict:
    """Run one variant at one length in this process; returns time, memory and the scores."""
    dtype = getattr(torch, args.dtype)
    q, k, instruction, visual = make_inputs(seq, args.heads, args.kv_heads, args.dim, dtype, args.device)
    fn, scale = VARIANTS[variant], args.dim**-0.5
    small = make_inputs(64, args.heads, args.kv_heads, args.dim, dtype, args.device)
    fn(*small, scale)  # warm-up: kernels compiled, libraries loaded
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        cross, selfsum = fn(q, k, instruction, visual, scale)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    n = visual.sum()
    score = (cross * selfsum / n)[visual].float().cpu()
    return {"variant": variant, "seq": seq, "seconds": best, "peak_bytes": peak, "score": score.tolist()}


def run_isolated(variant: str, seq: int, args) -> dict:
    """`measure` in a fresh interpreter, so that peak RSS belongs to this variant alone."""
    cmd = [sys.executable, __file__, "--worker", variant, "--seq", str(seq), *forwarded(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def forwarded(args) -> list[str]:
    return [
        "--device", args.device, "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
        "--dim", str(args.dim), "--dtype", args.dtype, "--repeats", str(args.repeats),
        "--threads", str(args.threads),
    ]  # fmt: skip


def compare(a: list[float], b: list[float]) -> tuple[float, bool]:
    """Max relative score difference and whether the lowest half (what would be pruned) agrees."""
    x, y = torch.tensor(a), torch.tensor(b)
    rel = ((x - y).abs() / y.abs().clamp(min=1e-30)).max().item()
    d = len(a) // 2
    lowest = [set(torch.sort(v, stable=True).indices[:d].tolist()) for v in (x, y)]
    return rel, lowest[0] == lowest[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq", type=int, nargs="+", default=[700, 3000])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no grouped-query)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.seq[0], args)))
        return
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"# {where}; H={args.heads} Hkv={args.kv_heads} D={args.dim} {args.dtype}, best of {args.repeats}")
    print(f"{'S':>6} {'variant':>12} {'time s':>9} {'peak MiB':>10}")
    for seq in args.seq:
        results = {}
        for variant in VARIANTS:
            r = run_isolated(variant, seq, args) if args.device == "cpu" else measure(variant, seq, args)
            results[variant] = r
            print(f"{seq:>6} {variant:>12} {r['seconds']:>9.3f} {r['peak_bytes'] / 2**20:>10.1f}", flush=True)
        rel, same = compare(results["op"]["score"], results["materialise"]["score"])
        print(f"{seq:>6} {'':>12} scores: max rel diff {rel:.2e}, same lowest-50% set: {same}")


if __name__ == "__main__":
    main()
