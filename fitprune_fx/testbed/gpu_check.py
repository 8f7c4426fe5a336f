"""One command for a GPU machine: does fitprune-fx run right, and how fast, on this stack?

    python -m fitprune_fx.gpu_check              # on a CUDA machine, a few minutes
    python -m fitprune_fx.gpu_check --smoke      # CPU, tiny sizes, the Triton interpreter (CI)

Sections (each prints as it goes, then one summary table; exit status 1 if a check fails):

* kernel   -- the Triton scorer vs the PyTorch op over fp32 / fp16 / bf16 and S up to 3000 on a
              left-padded LLaVA-like batch (GQA, head_dim 128), run under
              `torch.cuda.set_sync_debug_mode("error")`; times both.
* pass     -- the compiled pruned prefill vs the eager reference (explicit removal): fp32 logits
              at the kept positions within 1e-4; in bf16 / fp16 the agreement of kept sets with
              fp32 and of the last token's top-1 is reported.
* generate -- pruned greedy `generate` on a left-padded batch under each CUDA SDPA backend (math,
              memory-efficient, flash) vs pruning as masking (transformers' own generate).
* capture  -- `mode="reduce-overhead"`: the pruned prefill and decode graphs under CUDA graphs,
              replays checked under sync-debug "error" and against the default mode.
* speed    -- `benchmarks/prefill_matrix.py` at LLaVA-1.5-7B's depth and width (32 layers, hidden
              4096) in bf16: batch 1 and 8, 642 and 2880-visual-token prompts, default and
              reduce-overhead modes; unpruned, score-only, the 50 and 70 recipes against the FLOPs
              ideal, peak memory, compile time, kernel launches per pruning layer, decode.

On CUDA the summary table is also written to the clone's docs/gpu/ (with the speed section's
table and JSON), named by date and device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import runpy
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.reference import reference_prefill

from .tiny import PromptSpec, make_inputs, tiny_llava

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRUNE = {1: 6, 2: 4}  # of 16 visual tokens per image in the tiny model


@dataclass
class Row:
    section: str
    check: str
    result: str
    status: str  # "ok" | "FAIL" | "info" | "skipped"


def sync_free():
    """Context: any device-to-host synchronisation raises (CUDA); nothing on CPU."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def debug_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return debug_mode()


def timed_ms(fn, device: str, repeats: int = 5) -> float:
    """Median wall time of `fn()` in milliseconds (device synchronised around each call)."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# ----------------------------------------------------------------------------------- kernel
def llava_like_scoring_inputs(s: int, heads: int, kv_heads: int, dim: int, dtype, device: str, seed: int):
    """A left-padded batch of 2: system text, a visual block, a question; bool mask, causal."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, s, dim, generator=g).to(device, dtype)
    key = torch.randn(2, kv_heads, s, dim, generator=g).to(device, dtype)
    pad = torch.tensor([[0], [s // 10]])
    pos = torch.arange(s)[None, :]
    valid = pos >= pad
    first_visual, visual_len = pad + min(35, s // 8), (s * 3) // 4
    visual = (pos >= first_visual) & (pos < first_visual + visual_len) & (pos < s - 2)
    instruction = valid & (pos >= first_visual + visual_len)
    mask = (torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    to = dict(device=device)
    return query, key, mask.to(**to), instruction.to(**to), visual.to(**to), dim**-0.5, True


def check_kernels(device: str, smoke: bool) -> list[Row]:
    from fitprune_fx.kernels.attention_mass import cuda_attention_mass, torch_attention_mass

    lengths = (40, 150) if smoke else (64, 577, 1200, 3000)
    heads, kv_heads, dim = (2, 1, 128) if smoke else (32, 8, 128)
    rows = []
    for name, dtype in DTYPES.items():
        worst, fell_back, times = 0.0, [], None
        for s in lengths:
            args = llava_like_scoring_inputs(s, heads, kv_heads, dim, dtype, device, seed=s)
            with warnings.catch_warnings(record=True) as caught, sync_free():
                warnings.simplefilter("always")
                ours = cuda_attention_mass(*args)
            fell_back += [str(w.message) for w in caught if "not Triton" in str(w.message)]
            ref = torch_attention_mass(*args)
            for a, e in zip(ours, ref, strict=True):
                worst = max(worst, ((a - e).abs().max() / e.abs().max().clamp(min=1e-30)).item())
            if s == lengths[-1] and device == "cuda":
                times = (timed_ms(lambda a=args: cuda_attention_mass(*a), device),
                         timed_ms(lambda a=args: torch_attention_mass(*a), device))  # fmt: skip
        ok = worst <= 1e-4 and not fell_back
        speed = f"; S={lengths[-1]}: Triton {times[0]:.2f} ms, PyTorch {times[1]:.2f} ms" if times else ""
        detail = f"max rel diff {worst:.1e} over S in {list(lengths)}{speed}"
        if fell_back:
            detail += f"; FELL BACK: {fell_back[0][:200]}"
        rows.append(Row("kernel", f"Triton vs PyTorch op, {name}, sync-free", detail, "ok" if ok else "FAIL"))
        print(f"kernel {name}: {detail}", flush=True)
    return rows + [
        check_fused(name, dtype, lengths, heads, kv_heads, dim, device) for name, dtype in DTYPES.items()
    ]


def check_fused(name: str, dtype, lengths, heads: int, kv_heads: int, dim: int, device: str) -> Row:
    """The pruning layer's op on CUDA: torch's attention kernel with its lse (checked against the
    lse pass at a configuration's first call), then the mass from it. Its output against SDPA, its
    mass at visual columns against the PyTorch op; later calls sync-free; time against SDPA alone."""
    import torch.nn.functional as F

    from fitprune_fx.kernels.fused_attention import cuda_attention_with_mass

    worst_out, worst_mass, fell_back, times = 0.0, 0.0, [], None
    for s in lengths:
        query, key, mask, instruction, visual, scale, causal = llava_like_scoring_inputs(
            s, heads, kv_heads, dim, dtype, device, seed=s
        )
        value = torch.randn(key.shape, generator=torch.Generator().manual_seed(s)).to(device, dtype)
        args = (query, key, value, mask, instruction, visual, scale, False, causal)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cuda_attention_with_mass(*args)  # a configuration's first call checks the kernel's lse
            with sync_free():
                out, cross, selfsum = cuda_attention_with_mass(*args)
        fell_back += [
            str(w.message) for w in caught if "instead" in str(w.message) or "not Triton" in str(w.message)
        ]
        expected = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=True
        )
        worst_out = max(worst_out, (out.float() - expected.float()).abs().max().item())
        from fitprune_fx.kernels.attention_mass import torch_attention_mass

        ref = torch_attention_mass(query, key, mask, instruction, visual, scale, causal)
        for a, e in zip((cross, selfsum), ref, strict=True):
            rel = ((a - e)[visual].abs().max() / e[visual].abs().max().clamp(min=1e-30)).item()
            worst_mass = max(worst_mass, rel)
        if s == lengths[-1] and device == "cuda":
            sdpa = lambda a=args: F.scaled_dot_product_attention(  # noqa: E731
                a[0], a[1], a[2], attn_mask=a[3], scale=a[6], enable_gqa=True
            )
            times = (timed_ms(lambda a=args: cuda_attention_with_mass(*a), device), timed_ms(sdpa, device))
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    ok = worst_out <= tol and worst_mass <= 1e-3 and not fell_back
    speed = f"; S={lengths[-1]}: fused {times[0]:.2f} ms, SDPA alone {times[1]:.2f} ms" if times else ""
    detail = f"output vs SDPA max |diff| {worst_out:.1e}, mass max rel diff {worst_mass:.1e}{speed}"
    if fell_back:
        detail += f"; FELL BACK: {fell_back[0][:200]}"
    print(f"kernel fused {name}: {detail}", flush=True)
    return Row(
        "kernel", f"fused attention + mass vs SDPA and the PyTorch op, {name}", detail, "ok" if ok else "FAIL"
    )


# ----------------------------------------------------------------------------------- pass
def _prompt(model, device: str) -> dict:
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(6, 9)], seed=1)  # row 0 left-padded by 7
    return {k: v.to(device) for k, v in inputs.items()}


def _recipe(model) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE)


def check_pass(device: str, smoke: bool) -> list[Row]:
    compiler = "eager" if smoke else "inductor"
    rows, kept_fp32 = [], None
    for name, dtype in DTYPES.items():
        torch._dynamo.reset()
        model = tiny_llava(num_layers=4, seed=3).to(device, dtype).eval()
        inputs = _prompt(model, device)
        backend = fitprune_backend(_recipe(model), compiler=compiler)
        with torch.no_grad():
            out = torch.compile(model, backend=backend)(**inputs)
            ref = reference_prefill(model, **inputs, prune=PRUNE)
        kept = [k.tolist() for k in ref.kept_final]
        pruned = len(backend.pruned_graphs) == 1 and out.logits.shape[1] == ref.kept_final[0].numel()
        last = (out.logits[:, -1].float() - ref.logits[:, -1].float()).abs().max().item()
        top1 = bool((out.logits[:, -1].argmax(-1) == ref.logits[:, -1].argmax(-1)).all())
        if name == "fp32":
            kept_fp32 = kept
            diff = 0.0
            for b in range(2):
                final = ref.kept_final[b]
                valid = inputs["attention_mask"][b, final].bool()
                diff = max(diff, (out.logits[b][valid] - ref.logits[b, final][valid]).abs().max().item())
            ok = pruned and diff <= 1e-4
            detail = f"logits at kept positions max |diff| {diff:.1e} (tolerance 1e-4)"
        else:
            same = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(kept, kept_fp32, strict=True)]
            ok = pruned
            detail = (
                f"kept sets vs fp32: Jaccard {min(same):.3f}; last-token top-1 equal: {top1}; "
                f"last-token max |diff| {last:.2e}"
            )
        if not pruned:
            detail += f"; NOT PRUNED: {backend.summary()[:300]}"
        rows.append(
            Row("pass", f"compiled ({compiler}) vs eager reference, {name}", detail, "ok" if ok else "FAIL")
        )
        print(f"pass {name}: {detail}", flush=True)
    return rows


# ----------------------------------------------------------------------------------- generate
def check_generate(device: str, smoke: bool) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # flash attention takes no mask, so it gets one unpadded prompt (padded batches need a mask)
    backends = {"math": (SDPBackend.MATH, torch.float32, True)}
    if device == "cuda":
        backends["memory-efficient"] = (SDPBackend.EFFICIENT_ATTENTION, torch.float32, True)
        backends["flash"] = (SDPBackend.FLASH_ATTENTION, torch.float16, False)
    rows = []
    for name, (sdpa, dtype, padded) in backends.items():
        torch._dynamo.reset()
        oracle = tiny_llava(num_layers=4, seed=5).to(device, dtype).eval()
        model = copy.deepcopy(oracle)
        inputs = _prompt(model, device)
        if not padded:
            inputs = {k: v[1:] for k, v in inputs.items()}  # the longer prompt: no padding
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        try:
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), MaskingReference(oracle, PRUNE):
                expected = oracle.generate(**inputs, **gen)
            fitprune_fx.compile(model, _recipe(model), compiler="eager" if smoke else "inductor")
            with torch.no_grad(), sdpa_kernel(sdpa):
                got = model.generate(**inputs, **gen)
        except Exception as e:  # noqa: BLE001  (a backend that cannot take this input is a finding)
            rows.append(
                Row("generate", f"SDPA {name}, {dtype}", f"{type(e).__name__}: {str(e)[:200]}", "info")
            )
            print(f"generate {name}: {type(e).__name__}: {e}", flush=True)
            continue
        new = inputs["input_ids"].shape[1]
        equal = (got[:, new:] == expected[:, new:]).float().mean().item()
        runs = model.fitprune_backend.pruned_runs
        ok = runs >= 1 and (equal == 1.0 or dtype != torch.float32)
        detail = f"{100 * equal:.0f} % of new tokens equal pruning-as-masking; pruned prefill runs {runs}"
        shape = "left-padded batch 2" if padded else "batch 1"
        rows.append(Row("generate", f"SDPA {name}, {dtype}, {shape}", detail, "ok" if ok else "FAIL"))
        print(f"generate {name}: {detail}", flush=True)
    return rows


# ----------------------------------------------------------------------------------- capture
def check_capture(device: str, smoke: bool) -> list[Row]:
    if device != "cuda":
        return [Row("capture", "reduce-overhead (CUDA graphs)", "needs CUDA", "skipped")]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_llava(num_layers=4, seed=6).to(device).eval()
    plain = copy.deepcopy(model)
    inputs = _prompt(model, device)
    backend = fitprune_backend(_recipe(model), mode="reduce-overhead")

    def sync_checked(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        calls = []

        def run(*args):
            calls.append(1)  # per graph: call 1 warms up, call 2 records, later calls replay
            with sync_free() if len(calls) > 2 else contextlib.nullcontext():
                return compiled(*args)

        return run

    model.compile(backend=sync_checked)
    fitprune_fx.compile(plain, _recipe(plain))
    other = {
        k: v.to(device) for k, v in make_inputs(model, [PromptSpec(3, 5), PromptSpec(6, 9)], seed=2).items()
    }
    try:
        with torch.no_grad():
            # Not cloned: outputs of an earlier replay must survive the later ones (the backend
            # copies them out of the graph's pool, `cudagraph_outputs.py`).
            prompts = [inputs, other, inputs, other, inputs]
            outs = [model(**p).logits for p in prompts]
            expected = [plain(**p).logits for p in prompts]
        diff = max((o - e).abs().max().item() for o, e in zip(outs, expected, strict=True))
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        ok = diff <= 1e-4 and len(backend.pruned_graphs) >= 1 and skips == 0
        detail = (
            f"5 prefills of 2 prompts (warm-up, record, replays), all outputs read after the last, "
            f"vs default mode: max |diff| {diff:.1e}; cudagraph skips {skips}"
        )
        status = "ok" if ok else "FAIL"
    except Exception as e:  # noqa: BLE001
        detail, status = f"{type(e).__name__}: {str(e)[:300]}", "FAIL"
    print(f"capture: {detail}", flush=True)
    rows = [Row("capture", "reduce-overhead pruned prefill, replays sync-free", detail, status)]
    return rows + [_static_decode_capture(device)]


def _static_decode_capture(device: str) -> Row:
    """A pruned prefill into a static cache, then the decode steps transformers compiles by itself
    on a GPU (its default `compile_config`: reduce-overhead, i.e. CUDA graphs): the tokens equal a
    dynamic cache's and no CUDA graph is skipped (the cache's buffers and validities were given
    fixed addresses before the compiled prefill, `static_cache.initialize_early`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_llava(num_layers=4, seed=6).to(device).eval()
    dynamic = copy.deepcopy(model)
    inputs = _prompt(model, device)
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    try:
        fitprune_fx.compile(dynamic, _recipe(dynamic))
        fitprune_fx.compile(model, _recipe(model))
        with torch.no_grad():
            expected = dynamic.generate(**inputs, **gen)
            got = model.generate(**inputs, cache_implementation="static", **gen)
        new = inputs["input_ids"].shape[1]
        equal = (got[:, new:] == expected[:, new:]).float().mean().item()
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        compiled = hasattr(model, "_compiled_call")
        ok = equal == 1.0 and compiled and skips == 0 and model.fitprune_backend.pruned_runs == 1
        detail = (
            f"{100 * equal:.0f} % of 16 new tokens equal the dynamic cache's; decode compiled by "
            f"transformers: {compiled}; cudagraph skips {skips}"
        )
        status = "ok" if ok else "FAIL"
    except Exception as e:  # noqa: BLE001
        detail, status = f"{type(e).__name__}: {str(e)[:300]}", "FAIL"
    print(f"capture (static cache decode): {detail}", flush=True)
    return Row("capture", "static cache: pruned prefill, CUDA-graph decode steps", detail, status)


# ----------------------------------------------------------------------------------- speed
def check_speed(device: str, smoke: bool, budget_s: float) -> list[Row]:
    """`benchmarks/prefill_matrix.py`: 32 layers at LLaVA-1.5-7B width in bf16, batch 1 and 8, 642
    and 2880-visual-token prompts, default and reduce-overhead modes, against unpruned with the
    FLOPs ideal and the goals beside; on CUDA its table and JSON go to the clone's docs/gpu/."""
    torch._dynamo.reset()
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "prefill_matrix.py"
    if not script.exists():
        return [
            Row(
                "speed",
                "benchmarks/prefill_matrix.py",
                f"not found at {script} (run from a clone)",
                "skipped",
            )
        ]
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) if smoke else root / "docs" / "gpu"
        argv = ["--smoke"] if smoke else ["--device", "cuda", "--budget-s", str(budget_s)]
        saved = sys.argv, list(sys.path)
        sys.argv = [str(script), *argv, "--out-dir", str(out_dir)]
        sys.path.insert(0, str(script.parent))  # as `python benchmarks/prefill_matrix.py`
        try:
            result = runpy.run_path(str(script), run_name="prefill_matrix")["main"](sys.argv[1:])
        finally:
            sys.argv, sys.path[:] = saved
    rows = []
    where = (
        f"{result['sizes']['layers']} layers x hidden {result['sizes']['hidden']}, {result['sizes']['dtype']}"
    )
    for r in result["prefill"]:
        base = r["ms"]["unpruned"]
        cells = ", ".join(
            f"{n} {base / ms:.2f}x (ideal {result['ideal'][n]:.2f}x)"
            for n, ms in r["ms"].items()
            if n != "unpruned"
        )
        peak = r["peak_mib"].get("70")
        mem = f"; peak MiB 70 {peak:.0f} vs {r['peak_mib']['unpruned']:.0f}" if peak else ""
        pruned = all(v > 0 for n, v in r["pruned_runs"].items() if n != "unpruned")
        what = f"{r['mode']}, batch {r['batch']}, {r['tokens']} tokens ({where})"
        rows.append(Row("speed", what, f"unpruned {base:.2f} ms; {cells}{mem}", "info" if pruned else "FAIL"))
    for mode, comp in result["compile_s"].items():
        ratios = ", ".join(f"{n} {s / comp['unpruned']:.2f}x" for n, s in comp.items() if n != "unpruned")
        rows.append(Row("speed", f"compile time vs unpruned, {mode}", ratios, "info"))
    if result["launches"]:
        base = result["launches"]["unpruned"]
        per = ", ".join(
            f"{n} {(c - base) / result['pruning_layers'][n]:.1f}"
            for n, c in result["launches"].items()
            if result["pruning_layers"].get(n)
        )
        rows.append(
            Row("speed", "kernel launches per pruning layer", f"unpruned {base} per prefill; {per}", "info")
        )
    if result["decode"]:
        d = result["decode"]
        ratios = ", ".join(
            f"{n} {v['tokens_per_s'] / d['unpruned']['tokens_per_s']:.2f}x" for n, v in d.items()
        )
        rows.append(Row("speed", "decode tokens/s vs unpruned (batch 1)", ratios, "info"))
    rows += [Row("speed", "skipped", s, "info") for s in result["skipped"]]
    return rows


# ----------------------------------------------------------------------------------- main
def summary(rows: list[Row], header: str) -> str:
    lines = [header, "", "| section | check | result | status |", "|---|---|---|---|"]
    lines += [f"| {r.section} | {r.check} | {r.result} | {r.status} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter (what CI runs)")
    p.add_argument("--sections", nargs="+", default=["kernel", "pass", "generate", "capture", "speed"])
    p.add_argument(
        "--speed-budget-s", type=float, default=240.0, help="the speed section starts no stage after this"
    )
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        p.error("no CUDA device: run with --smoke (CPU, tiny sizes) or on a GPU machine")
    if args.smoke and "kernel" in args.sections and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1 before starting Python")
    import transformers

    triton_version = "absent"
    with contextlib.suppress(ImportError):
        import triton

        triton_version = triton.__version__
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    header = (
        f"fitprune-fx gpu_check on {gpu}: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, triton {triton_version}"
    )
    print(header, flush=True)
    checks = {
        "kernel": check_kernels,
        "pass": check_pass,
        "generate": check_generate,
        "capture": check_capture,
        "speed": lambda d, s: check_speed(d, s, args.speed_budget_s),
    }
    rows: list[Row] = []
    start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows += checks[name](device, args.smoke)
        except Exception as e:  # noqa: BLE001  (one broken section must not hide the others)
            rows.append(Row(name, "section", f"{type(e).__name__}: {str(e)[:300]}", "FAIL"))
            traceback.print_exc()
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = summary(rows, header + f"; {time.perf_counter() - start:.0f} s in all")
    print("\n" + table)
    docs = Path(__file__).resolve().parents[2] / "docs"
    if device == "cuda" and docs.is_dir():  # a clone: the record docs/on-a-gpu.md quotes
        slug = gpu.replace(" ", "-").lower()
        path = docs / "gpu" / f"{datetime.date.today().isoformat()}-{slug}-gpu_check.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            f"# gpu_check\n\n`python -m fitprune_fx.gpu_check {' '.join(argv or sys.argv[1:])}`\n\n{table}\n"
        )
        print(f"wrote {path}")
    return 1 if any(r.status == "FAIL" for r in rows) else 0
