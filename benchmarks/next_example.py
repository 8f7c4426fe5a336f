"""LLaVA-NeXT: one fraction recipe, two image sizes, two visual counts, tokens per layer for each.

    python benchmarks/next_example.py                     # tiny random LLaVA-NeXT, Inductor
    python benchmarks/next_example.py --compiler eager --threads 1

LLaVA-NeXT tiles an image at any resolution: its visual count (base tile + unpadded grid + one
newline token per row) depends on the image's size and aspect ratio. A format-2 recipe states
deletions as fractions of the visual tokens present; the pass turns them into static counts for
the count in the graph it compiles. Each new visual count compiles one more decoder graph
(bounded by `torch._dynamo.config.recompile_limit`); `backend.summary()` lists them. Outputs are
checked against the eager reference.
"""

from __future__ import annotations

import argparse
import time

import torch

from fitprune_fx import fitprune_backend
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import PromptSpec, make_next_inputs, next_image_tokens, tiny_llava_next


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tiny_llava_next(num_layers=args.layers, seed=0)
    recipe = Recipe.from_fractions(
        ModelInfo.from_config(model.config), {1: 0.3, 2: 0.2}
    )  # half, in two steps
    print(f"recipe (format 2): {recipe.to_dict()['prune_fraction']} of the visual tokens present\n")
    backend = fitprune_backend(recipe, compiler=args.compiler)
    compiled = torch.compile(model, backend=backend)

    for height, width in [(32, 64), (64, 64)]:
        inputs = make_next_inputs(model, [PromptSpec(before=2, after=6)], [(height, width)], seed=0)
        n = next_image_tokens(model.config, height, width)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = compiled(**inputs)
        seconds = time.perf_counter() - t0
        prune = recipe.deletions_for(n)
        ref = reference_prefill(
            model,
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["attention_mask"],
            prune=prune,
            image_sizes=inputs["image_sizes"],
        )
        error = (out.logits[0] - ref.logits[0, ref.kept_final[0]]).abs().max().item()
        report = backend.pruned_graphs[-1].result
        print(f"image {height}x{width} (height x width): {n} visual tokens, deleted per layer {prune}")
        prompt = inputs["input_ids"].shape[1]
        print(f"  tokens per layer (prompt {prompt}): {' -> '.join(report.tokens_per_layer)}")
        print(f"  reference tokens per layer: {' -> '.join(map(str, ref.tokens_per_layer[0]))}")
        print(f"  cache lengths: {[layer.keys.shape[-2] for layer in out.past_key_values.layers]}")
        print(f"  max |logits - reference| = {error:.2e}; first call {seconds:.1f} s\n")
        assert error < 1e-3, "compiled pruned model disagrees with the eager reference"

    print(backend.summary().splitlines()[-1])


if __name__ == "__main__":
    main()
