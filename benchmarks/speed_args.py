"""Command line of `benchmarks/speed.py`: its options, the model widths it runs, the quantizers."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Widths the benchmark runs (the CPU default runs "small" and "7b" side by side). `merge_below` is
# the threshold (decoder layers) of the "-merged" variants: one scoring pass at that width as the
# "one scoring pass" row measured it before scoring was fused into the layer's attention (0.24 and
# 0.047 then; about 0.001 and 0.014 now), kept so that the merged rows stay comparable across runs.
STATIC = "-static"  # variant suffix: constant token counts (the compile before shared kernels)
WIDTHS = {
    "small": dict(layers=8, hidden=512, heads=8, intermediate=1376, repeats=21, warmup=2, new_tokens=64,
                  decode_repeats=9, decode_batch=8, merge_below=0.25),  # ~0.5 s prefill on 1 thread
    "7b": dict(layers=4, hidden=4096, heads=32, intermediate=11008, repeats=5, warmup=1, new_tokens=16,
               decode_repeats=2, decode_batch=0, merge_below=0.025),  # LLaVA-1.5-7B's layer, 4 of them
    "gpu": dict(layers=32, hidden=4096, heads=32, intermediate=11008, repeats=9, warmup=2, new_tokens=64,
                decode_repeats=3, decode_batch=8, merge_below=0.1),  # LLaVA-1.5-7B
    "quick": dict(layers=2, hidden=64, heads=2, intermediate=172, repeats=2, warmup=1, new_tokens=4,
                  decode_repeats=1, decode_batch=2, merge_below=0.0),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prefill speed of FitPrune vs the FLOPs bound (see benchmarks/speed.py)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipes", nargs="+", default=["50", "60", "70"], help="shipped LLaVA-1.5-7B recipes (budget %%)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default per width)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per variant (default per width)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=sorted(QUANTIZERS),
        help="quantize the decoder's linears with torchao first: every variant, unpruned included, "
        "runs on the same quantized model (what pruning adds on top of quantization)",
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
        "--new-tokens", type=int, default=None, help="decode tokens per generate (default per width)"
    )
    p.add_argument(
        "--decode-repeats",
        type=int,
        default=None,
        help="timed generate calls per variant (0 skips; default per width)",
    )
    p.add_argument("--decode-warmup", type=int, default=1)
    p.add_argument(
        "--decode-batch",
        type=int,
        default=None,
        help="also time decode at this batch (default per width: small 8, 7b none; 0 or 1 skips)",
    )
    p.add_argument(
        "--vision-repeats", type=int, default=5, help="eager vision-tower timings for its share (0 skips)"
    )
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the profiled calls that split each variant's time by kind of work (CPU)",
    )
    p.add_argument(
        "--compaction-only",
        action="store_true",
        help="also time each recipe with the random scorer (compaction cost without scoring)",
    )
    p.add_argument(
        "--methods",
        action="store_true",
        help="also time each recipe with the published methods' scorers and with merging (same counts)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch", type=int, default=1, help="prompts per call (decode reads batch x cache, weights once)"
    )
    p.add_argument(
        "--widths",
        nargs="+",
        choices=sorted(WIDTHS),
        default=None,
        help="model widths to run side by side (CPU default: small 7b; CUDA: gpu; --quick: quick)",
    )
    p.add_argument(
        "--merge-below",
        type=float,
        default=None,
        help="threshold (decoder layers) of the -merged variants (default per width; 0: none)",
    )
    p.add_argument(
        "--static-counts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compile the last recipe with constant token counts (the compile before shared kernels)",
    )
    p.add_argument(
        "--any-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compile unpruned and the last recipe for any prompt length (dynamic=True)",
    )
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run: 2 tiny layers, few repeats")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    p.add_argument(
        "--markdown", type=Path, default=None, help="also write the command and its prefill tables here"
    )
    args = p.parse_args(argv)
    if args.widths is None:
        args.widths = (
            ["quick"] if args.quick else ["gpu"] if args.device.startswith("cuda") else ["small", "7b"]
        )
    if any(getattr(args, k) is not None for k in ("layers", "hidden", "heads", "intermediate")):
        args.widths = args.widths[:1]  # explicit sizes: one width, those sizes over its defaults
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.torch_dtype = getattr(torch, args.dtype)
    for name in args.widths:
        w = width_args(args, name)
        if w.hidden % w.heads:
            p.error(f"--hidden {w.hidden} is not a multiple of --heads {w.heads}")
    return args


def width_args(args: argparse.Namespace, width: str) -> argparse.Namespace:
    """`args` with one width's sizes and repeat counts filled in (explicit options win)."""
    w = argparse.Namespace(**vars(args))
    defaults = WIDTHS[width]
    w.width = width
    for key in (
        "layers",
        "hidden",
        "heads",
        "repeats",
        "new_tokens",
        "decode_repeats",
        "decode_batch",
        "merge_below",
    ):
        if getattr(w, key) is None:
            setattr(w, key, defaults[key])
    if w.intermediate is None:
        w.intermediate = (
            defaults["intermediate"] if w.hidden == defaults["hidden"] else round(2.6875 * w.hidden)
        )
    if w.warmup is None:
        w.warmup = defaults["warmup"]
    if args.quick:
        w.vision_repeats = min(w.vision_repeats, 1)
    return w


QUANTIZERS = {
    "int8-weight-only": "Int8WeightOnlyConfig",
    "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
}
