"""Prefill speed of FitPrune vs the FLOPs bound, with the pass's overheads measured alongside.

    python benchmarks/speed.py                      # CPU: two widths side by side (below)
    python benchmarks/speed.py --widths small --recipes 50 70 --repeats 15
    python benchmarks/speed.py --device cuda        # LLaVA-1.5-7B dimensions (32 layers) in bfloat16
    python benchmarks/speed.py --quick --compiler eager   # CI smoke run (seconds, no timing claims)

The model is a randomly initialised LLaVA with LLaVA-1.5's token geometry: a system prompt,
576 visual tokens (a 1-layer CLIP tower on a 24 x 24 patch grid, image 96 / patch 4, cheap on
purpose) and a question. On CPU one run measures two widths and prints them side by side:
"small" (8 layers, hidden 512) and "7b" (4 layers of LLaVA-1.5-7B's width, hidden 4096, 32
heads), since by operation count the small width overstates the relative cost of scoring about
sevenfold. What is timed is the whole compiled forward of one prompt (batch 1,
``logits_to_keep=1`` as in generate's prefill): the vision tower's share is reported so that the
decoder dominates. Every variant goes through the same backend, ``fitprune_backend``:

* ``unpruned``    -- ``Recipe(prune={})``: the pass finds nothing to do (plain Inductor graph);
* ``score-only``  -- the 60 % recipe's layers deleting one token each: scoring + compaction for a
  FLOPs saving under 1 % (a count of 0 would take the unfused path that zero recipes keep, see
  `passes/insert_fused_scoring.py`);
* ``50``/``60``/... -- the shipped LLaVA-1.5-7B recipes rescaled to this model's depth;
* ``<name>-merged`` -- the same after `merge_small_deletions` (threshold `merge_below` of the
  width: one scoring pass as measured before fused scoring, see `WIDTHS`);
* ``<name>-last_token`` / ``-text_raters`` / ``-duplication`` / ``-token-merge`` (``--methods``) --
  the same counts scored by the published methods' scorers, or with deleted tokens merged into
  kept ones (`passes/token_merging.py`): what each method costs;
* ``<last>-static`` -- the last recipe compiled with constant token counts
  (``symbolic_token_counts=False``): the compile time before kernels were shared;
* ``unpruned-any-length`` / ``<last>-any-length`` -- compiled with ``dynamic=True``: the graph
  Dynamo compiles after a second prompt length (a symbolic length S), whose compile time is
  compared with unpruned's at any length.

Variants run alternately (round robin, start rotated each round), warm-up excluded; medians are
reported. Speed-ups are ratios of medians measured side by side in one run. Also measured:
compile time of every variant (its first call minus a warm call, Inductor caches off and every
C++ kernel built afresh, after a throw-away compile of the model that absorbs one-time costs)
and greedy decode after a pruned prefill (in-place ``model.compile(backend=...)`` +
``generate``): decode-step time against the per-layer cache length the prefill left, and its
throughput against a bound by bytes read per step (the weights once, each example's cache once:
`speed_report.decode_ideal`), at batch 1 and at the width's decode batch. On CPU
each variant is also profiled (`speed_breakdown.py`): its time split into GEMMs, attention,
the pass's ops, compiled code and the rest, each against what its work would take at
unpruned's rates, which says what holds a recipe below its ideal (``--no-breakdown`` skips it).
Tables are Markdown (`speed_report.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import torch
from launches import count_launches, kernel_profile, launches_table
from speed_args import QUANTIZERS, STATIC, parse_args, width_args
from speed_breakdown import breakdown_table, profile_call
from speed_report import (
    ANY_LENGTH,
    INDUCTOR_LINEARS,
    SCORE_ONLY,
    UNPRUNED,
    UNPRUNED_INDUCTOR_LINEARS,
    Results,
    decode_table,
    machine_info,
    machine_line,
    overhead_table,
    prefill_table,
    side_by_side,
)
from timing import (
    StepClock,
    TimedBackend,
    inductor_caches_disabled,
    kernels_built_afresh,
    round_robin,
    synchronize,
    timed,
)
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
)

from fitprune_fx import ModelInfo, Recipe, fitprune_backend, merge_small_deletions

IMAGE_TOKEN_ID = 32000  # LLaVA-1.5's <image> id; text ids are drawn below it
VOCAB_SIZE = 32064


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


def make_prompt(
    model: LlavaForConditionalGeneration, args: argparse.Namespace, images: int = 1
) -> dict[str, torch.Tensor]:
    """`--batch` prompts of one length: BOS + system prompt, the visual tokens of `images` images
    (one block after the other), the question (each prompt its own random text and images)."""
    g = torch.Generator().manual_seed(args.seed)
    vc = model.config.vision_config
    n_visual = (vc.image_size // vc.patch_size) ** 2

    def text(n: int) -> list[int]:
        return torch.randint(4, IMAGE_TOKEN_ID, (n,), generator=g).tolist()

    ids = [
        [1] + text(args.system_tokens) + [IMAGE_TOKEN_ID] * (n_visual * images) + text(args.question_tokens)
        for _ in range(args.batch)
    ]
    pixels = torch.randn((args.batch * images, 3, vc.image_size, vc.image_size), generator=g)
    return {
        "input_ids": torch.tensor(ids, device=args.device),
        "attention_mask": torch.ones((args.batch, len(ids[0])), dtype=torch.long, device=args.device),
        "pixel_values": pixels.to(device=args.device, dtype=args.torch_dtype),
    }


def make_recipes(
    info: ModelInfo,
    names: list[str],
    compaction_only: bool = False,
    merge_below: float = 0.0,
    methods: bool = False,
) -> dict[str, Recipe]:
    """unpruned, score-only (the 60 recipe's layers, one token each) and the shipped recipes rescaled.

    With `compaction_only`, also "<name>-random": the same counts with the `random` scorer, i.e.
    the compaction without attention scoring (separates scoring cost from compaction cost). With
    `merge_below` > 0, also "<name>-merged" where merging small deletions changes the recipe. With
    `methods`, also "<name>-<scorer>" for the published methods' scorers and "<name>-token-merge" (deleted
    tokens merged into kept ones): each method's cost at the same counts.
    """
    shipped = {n: Recipe.load(f"llava-1.5-7b/{n}.json").rescaled_to(info) for n in names}
    if compaction_only:
        shipped.update({f"{n}-random": dataclasses.replace(shipped[n], scorer="random") for n in names})
    if methods:
        for n in names:
            for scorer in ("last_token", "text_raters", "duplication"):
                shipped[f"{n}-{scorer}"] = dataclasses.replace(shipped[n], scorer=scorer)
            shipped[f"{n}-token-merge"] = dataclasses.replace(shipped[n], scorer_options={"merge": True})
    if merge_below > 0:
        for n in names:
            merged = merge_small_deletions(shipped[n], merge_below)
            if merged is not shipped[n]:
                shipped[f"{n}-merged"] = merged
    score_layers = Recipe.load("llava-1.5-7b/60.json").rescaled_to(info).prune
    recipes = {
        UNPRUNED: Recipe(model=info, prune={}),
        SCORE_ONLY: Recipe(model=info, prune=dict.fromkeys(score_layers, 1)),
    }
    recipes.update(shipped)
    return recipes


def decode_step_bytes(model: LlavaForConditionalGeneration) -> dict[str, int]:
    """What a decode step reads, in bytes: the weights (`lm_head`, the decoder's layers and final
    norm; the embedding reads one row) and, per cached token and layer, its keys and values."""
    text = model.config.text_config
    decoder = model.model.language_model
    weights = [*decoder.layers.parameters(), *decoder.norm.parameters(), *model.lm_head.parameters()]
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = model.lm_head.weight.element_size()
    return {
        "decode_weight_bytes": sum(p.numel() * p.element_size() for p in weights),
        "kv_bytes_per_token": 2 * text.num_key_value_heads * head_dim * itemsize,
    }


def unprunable_macs(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> float:
    """Multiply-accumulates per prompt of the work pruning leaves alone: the vision tower, the
    projector and lm_head at the one position ``logits_to_keep=1`` computes.

    The decoder's FLOPs model (`fitprune_fx.flops`) leaves them out; a timed forward runs them,
    and at a 4-layer decoder they weigh 8 times their share in the 32-layer model it stands for.
    """
    from torch.utils.flop_counter import FlopCounterMode

    pv = inputs["pixel_values"]
    hidden = model.config.text_config.hidden_size
    last = torch.zeros((pv.shape[0], 1, hidden), dtype=pv.dtype, device=pv.device)
    tower = model.model.vision_tower
    kept = tower.config._attn_implementation
    tower.set_attn_implementation("eager")  # the counter has no formula for CPU SDPA; eager is matmuls
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.model.get_image_features(pixel_values=pv)
            model.lm_head(last)
    finally:
        tower.set_attn_implementation(kept)
    return counter.get_total_flops() / 2 / pv.shape[0]  # the counter's FLOPs are 2 per MAC


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
    backends = {
        n: fitprune_backend(
            r,
            compiler=args.compiler,
            symbolic_token_counts=not n.endswith(STATIC),
            onednn_linears=not n.endswith(INDUCTOR_LINEARS),
        )
        for n, r in recipes.items()
    }
    timers = {n: TimedBackend(b, args.device) for n, b in backends.items()}
    compiled = {
        n: torch.compile(model, backend=t, dynamic=n.endswith(ANY_LENGTH) or None) for n, t in timers.items()
    }
    names = list(recipes)
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    decoder: dict[str, list[float]] = {n: [] for n in names}  # the decoder graph's share of each call

    def call(name: str) -> float:
        before = len(timers[name].decoder_s)
        took = timed(lambda: compiled[name](**inputs, logits_to_keep=1), args.device)
        decoder[name].append(sum(timers[name].decoder_s[before:]))
        return took

    with torch.no_grad(), tempfile.TemporaryDirectory() as kernels, kernel_profile():  # kernels kept
        with inductor_caches_disabled():  # while the variants run
            # A throw-away compile of the model absorbs what only a process's first compile pays
            # (imports, decomposition tables, the C++ toolchain probe, headers): 5-12 s at small
            # width, which the first variant timed (unpruned) used to be charged. Then every variant
            # builds its kernels afresh: none is loaded from an earlier variant's build.
            with kernels_built_afresh(kernels):
                throwaway = fitprune_backend(recipes[UNPRUNED], compiler=args.compiler, progress=False)
                torch.compile(model, backend=throwaway)(**inputs, logits_to_keep=1)
            for name in tqdm(names, desc="compile (first calls)", file=sys.stdout):
                with kernels_built_afresh(kernels):
                    first[name] = call(name)
        for name in names:  # what the prefill left in the cache: tokens per layer, read off the output
            out = compiled[name](**inputs, logits_to_keep=1)
            results.cache_lengths[name] = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        for _, name in tqdm(list(round_robin(names, args.warmup)), desc="warm-up", file=sys.stdout):
            call(name)
        for name in names:
            decoder[name].clear()
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
        if args.compiler == "inductor":  # launches per prefill (`launches.py`)
            for name in names:
                forward = functools.partial(compiled[name], **inputs, logits_to_keep=1)
                results.launches[name] = count_launches(forward, args.device)
                results.pruning_layers[name] = sum(1 for n in recipes[name].prune.values() if n > 0)
        if args.breakdown and args.device == "cpu":  # where the time goes (`speed_breakdown.py`)
            calls = max(1, min(3, args.repeats // 3))
            for name in tqdm(names, desc="profile", file=sys.stdout):
                forward = functools.partial(compiled[name], **inputs, logits_to_keep=1)
                rows = sorted((profile_call(forward) for _ in range(calls)), key=lambda r: r["total"])
                results.breakdown[name] = rows[len(rows) // 2]  # the median call
    for name in names:
        warm = statistics.median(times[name])
        results.prefill_samples_ms[name] = [1e3 * t for t in times[name]]
        results.prefill_ms[name] = 1e3 * warm
        results.decoder_ms[name] = 1e3 * statistics.median(decoder[name])
        results.compile_s[name] = {"compile_s": first[name] - warm, "backend_s": timers[name].seconds}
        b = backends[name]
        results.reports[name] = [str(r) for r in b.reports]
        results.pruned_graphs[name] = len(b.pruned_graphs)
        pruned = [r.result for r in b.pruned_graphs if r.result is not None]
        prompt = inputs["input_ids"].shape[1]
        results.kept_tokens[name] = [_tokens(t, prompt) for t in pruned[0].tokens_per_layer] if pruned else []
    return timers


def _tokens(length: str, prompt: int) -> int:
    """A reported length ("412", or "S-230" for a graph compiled for any prompt length S) at `prompt`."""
    return prompt - int(length[2:] or 0) if length.startswith("S") else int(length)


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


# ----------------------------------------------------------------------------------- main
def quantize_decoder(model: LlavaForConditionalGeneration, name: str) -> None:
    """torchao's `quantize_` with config `QUANTIZERS[name]` on the decoder (vision tower untouched)."""
    import torchao.quantization as tq

    tq.quantize_(model.model.language_model, getattr(tq, QUANTIZERS[name])())


def run_width(args: argparse.Namespace) -> Results:
    """Every measurement at one width (`width_args`); prints that width's tables."""
    model = build_model(args)
    if args.quantize:
        quantize_decoder(model, args.quantize)
    inputs = make_prompt(model, args)
    info = ModelInfo.from_config(model.config, name=f"speed-bench-{args.layers}x{args.hidden}")
    recipes = make_recipes(info, args.recipes, args.compaction_only, args.merge_below, args.methods)
    if args.static_counts and not args.quick and args.compiler == "inductor":
        last = args.recipes[-1]
        recipes[last + STATIC] = recipes[last]
    if args.device == "cpu":  # the baseline's other half (`speed_report.baseline`)
        recipes[UNPRUNED_INDUCTOR_LINEARS] = recipes[UNPRUNED]
    if args.any_length:
        last = args.recipes[-1]
        recipes[UNPRUNED + ANY_LENGTH] = recipes[UNPRUNED]
        recipes[last + ANY_LENGTH] = recipes[last]
    num_text = inputs["input_ids"].shape[1] - info.num_visual_tokens
    results = Results(
        machine=machine_info(args.device),
        sizes=dict(
            width=args.width,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            intermediate=args.intermediate,
            dtype=args.dtype,
            quantize=args.quantize,
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
            merge_below=args.merge_below,
            batch=args.batch,
            decode_batch=args.decode_batch,
            unprunable_macs=unprunable_macs(model, inputs),
            **decode_step_bytes(model),
        ),
    )
    print(machine_line(results))
    for name, recipe in recipes.items():
        if recipe.prune:
            print(f"recipe {name} at {args.layers} layers: {dict(recipe.prune)}")

    backends = measure_prefill(model, inputs, recipes, results, args)
    prefill = prefill_table(results, recipes, num_text)
    print("\n" + prefill + "\n", flush=True)  # decode (more compiles) comes next
    if args.decode_repeats:
        unpruned = [n for n in (UNPRUNED, UNPRUNED_INDUCTOR_LINEARS) if n in recipes]
        decode_names = [*unpruned, *(n for n in args.decode_recipes or args.recipes if n in recipes)]
        results.decode = measure_decode(model, inputs, backends, decode_names, args)
        if args.decode_batch > 1 and args.decode_batch != args.batch:  # the cache is read per example,
            # the weights once per step
            batched = argparse.Namespace(**{**vars(args), "batch": args.decode_batch})
            prompts = make_prompt(model, batched)
            results.decode_batched = measure_decode(model, prompts, backends, decode_names, batched)
    report = [machine_line(results), prefill, overhead_table(results, recipes)]
    if results.launches:
        report.append(launches_table(results.launches, results.pruning_layers, UNPRUNED, args.device))
    print("\n" + "\n\n".join(report) + "\n")
    if args.markdown:  # the command, then what it printed (before decode and the breakdown)
        command = " ".join(["python benchmarks/speed.py", *sys.argv[1:]])
        args.markdown.write_text(f"`{command}`\n\n" + "\n\n".join(report) + "\n")
    if results.breakdown:
        print(breakdown_table(results.breakdown, results.cache_lengths, UNPRUNED) + "\n")
    if results.decode:
        print(decode_table(results) + "\n")
    if results.decode_batched:
        print(decode_table(results, batched=True) + "\n")
    print("Backend reports (decoder graphs):")
    for name, lines in results.reports.items():
        for line in lines:
            if "pruned" in line:
                print(f"  {name}: {line}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Results]:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    for key in ("recompile_limit", "cache_size_limit"):  # one frame, one entry per backend (variant)
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    runs = {}
    for width in args.widths:
        print(f"\n=== width {width} ===", flush=True)
        torch._dynamo.reset()
        runs[width] = run_width(width_args(args, width))
    if len(runs) > 1:
        print("\n=== side by side ===\n")
        print(side_by_side(runs))
    if args.json:
        data = {w: asdict(r) for w, r in runs.items()}
        args.json.write_text(
            json.dumps(data if len(runs) > 1 else next(iter(data.values())), indent=1, default=str)
        )
    return runs


if __name__ == "__main__":
    main()
