"""`fitprune-fx demo`: fit, compile and evaluate FitPrune on the shipped shapes-llava model.

1. fit a recipe for the budget on generated calibration questions,
2. compile the model twice with the same backend path (unpruned recipe vs fitted recipe),
3. check the compiled pruned model against the eager reference (tokens per layer, max |dlogits|),
4. evaluate accuracy and prefill latency on held-out questions, side by side, in one table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from fitprune_fx.backend import fitprune_backend
from fitprune_fx.fitting import fit
from fitprune_fx.recipe import Recipe
from fitprune_fx.reference import reference_prefill

from . import synthetic
from .shapes_model import answer_ids, encode, load_shapes_llava


def _batches(processor, examples, batch_size):
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        yield encode(processor, chunk), answer_ids(processor, chunk)


@torch.no_grad()
def evaluate(compiled, processor, examples, batch_size: int, desc: str) -> tuple[float, list[float]]:
    """Accuracy of the greedy next token, and wall time per batch (seconds, first batch excluded)."""
    correct, times = 0, []
    for i, (batch, answers) in enumerate(tqdm(list(_batches(processor, examples, batch_size)), desc=desc)):
        start = time.perf_counter()
        logits = compiled(**batch).logits[:, -1]  # [B, V] at the last (never pruned) position
        if i:  # the first batch pays for compilation
            times.append(time.perf_counter() - start)
        correct += int((logits.argmax(-1) == answers).sum())
    return correct / len(examples), times


@torch.no_grad()
def check_against_reference(model, processor, recipe: Recipe, examples, compiler: str) -> tuple[list, float]:
    """Tokens per layer and max |logits - reference| at kept positions for one batch; `NotPruned`
    when the compiled model ran unpruned."""
    batch = encode(processor, examples)
    backend = fitprune_backend(recipe, compiler=compiler)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(**batch)
    backend.require_pruned()  # else the comparison below has nothing to compare
    n = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    prune = recipe.pruning_plan(n)
    ref = reference_prefill(
        model, batch["input_ids"], batch["pixel_values"], batch["attention_mask"], prune=prune
    )
    err = 0.0
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b, ref.kept_final[b]].bool()  # padding rows are not compared
        diff = out.logits[b][real] - ref.logits[b, ref.kept_final[b]][real]
        err = max(err, float(diff.abs().max()))
    return backend.pruned_graphs[0].result.tokens_per_layer, err


def run_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_shapes_llava()
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layers = model.config.text_config.num_hidden_layers
    print(f"shapes-llava: {layers} decoder layers, {grid * grid} visual tokens per image")

    calibration = synthetic.make_dataset(args.calibration, seed=0, split="calib")
    calib_batches = [b for b, _ in _batches(processor, calibration, args.batch_size)]
    recipe = fit(model, calib_batches, args.budget, name="shapes-llava", progress=True)
    print(recipe.describe())

    held_out = synthetic.make_dataset(args.eval, seed=0, split="test")
    tokens, err = check_against_reference(model, processor, recipe, held_out[:4], args.compiler)
    print(f"compiled vs eager reference: tokens per layer {' -> '.join(tokens)}; max |dlogits| = {err:.2e}")

    rows = []
    unpruned = Recipe(model=recipe.model, prune={})
    for label, r in (("unpruned", unpruned), (f"fitprune {args.budget:.0%}", recipe)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fitprune_backend(r, compiler=args.compiler))
        acc, times = evaluate(compiled, processor, held_out, args.batch_size, label)
        rows.append(
            (label, acc, statistics.median(times) if times else float("nan"), r.reference_reduction())
        )

    base_ms = rows[0][2]
    print(f"\n{'':<16}{'accuracy':>10}{'prefill ms/batch':>18}{'speed-up':>10}{'FLOPs cut':>11}")
    for label, acc, t, red in rows:
        print(f"{label:<16}{acc:>10.3f}{t * 1e3:>18.1f}{base_ms / t:>9.2f}x{red:>10.1%}")
    print(f"({len(held_out)} held-out questions, batch {args.batch_size}, compiler {args.compiler})")
    return 0
