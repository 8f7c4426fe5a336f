"""Pruned `generate` on a left-padded batch with the one-liner, printing each layer's cache length.

    python benchmarks/generate_example.py                 # tiny random LLaVA, Inductor
    python benchmarks/generate_example.py --compiler eager --threads 1

The script is an ordinary generate script plus one line, `fitprune_fx.generation.compile(model,
recipe)` (exported as `fitprune_fx.compile`). After generation, layers up to and including the
first pruning layer cache every prompt token, later layers only the kept ones; the output is
checked against the eager reference's own decode loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitprune_fx.generation import compile as fitprune_compile
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_generate
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, num_image_tokens, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tiny_llava(num_layers=args.layers, seed=0)
    prompts = [PromptSpec(before=2, after=6), PromptSpec(before=0, after=2), PromptSpec(before=4, after=1)]
    inputs = make_inputs(model, prompts, seed=0)  # left-padded: three prompt lengths
    n = num_image_tokens(model)
    prune = {1: n // 4, 2: n // 4}  # delete half of the visual tokens, in two steps
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune=prune)

    fitprune_compile(model, recipe, compiler=args.compiler)  # <- the one line

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True
        )
    seconds = time.perf_counter() - start

    lengths = inputs["attention_mask"].sum(-1).tolist()
    print(f"batch of {len(prompts)} prompts, lengths {lengths} (padded to {inputs['input_ids'].shape[1]})")
    print(f"{n} visual tokens per image; recipe deletes {prune} (layer: tokens)")
    print(f"generate: {args.new_tokens} new tokens in {seconds:.1f} s (includes compilation)")
    print("per-layer KV cache length after generation:")
    for layer, cache in enumerate(out.past_key_values.layers):
        print(f"  layer {layer}: {cache.keys.shape[-2]}")
    print(model.fitprune_backend.summary())
    expected = reference_generate(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
        prune=prune, max_new_tokens=args.new_tokens,
    )  # fmt: skip
    same = torch.equal(out.sequences, expected)
    print(f"new tokens identical to the eager reference: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
