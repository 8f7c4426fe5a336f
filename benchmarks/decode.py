"""Decode speed after a pruned prefill against a plain compile, side by side in one process.

    python benchmarks/decode.py                       # 8 layers at hidden 512, 637-token prompt, CPU
    python benchmarks/decode.py --layers 4 --steps 32 --rounds 2

Both arms are the same random LLaVA compiled with Inductor: one with `fitprune_fx.compile` and a
recipe (its later layers cache fewer keys, each with its original position, and every decode step
takes each layer's mask at those positions: `fitprune_fx/positioned_cache.py`), one with
`model.compile()`. Time per new token = (generate 2 + steps tokens - generate 2 tokens) / steps, the
best of `rounds` alternating rounds, after a warm-up that compiles the prefill and decode graphs.
"""

from __future__ import annotations

import argparse
import copy

import torch
from timing import round_robin, timed

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fractions", default="1:0.5,3:0.5", help="layer:fraction of visual tokens deleted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    width = dict(
        hidden_size=args.hidden, num_heads=8, num_kv_heads=8, intermediate_size=args.hidden * 43 // 16
    )
    pruned = tiny_llava(num_layers=args.layers, image_size=192, patch_size=8, seed=1, **width)
    plain = copy.deepcopy(pruned)
    inputs = make_inputs(pruned, [PromptSpec(20, 40)], seed=2)  # 576 visual tokens
    fractions = {int(k): float(v) for k, v in (p.split(":") for p in args.fractions.split(","))}
    recipe = Recipe.from_fractions(ModelInfo.from_config(pruned.config), fractions)
    fitprune_fx.compile(pruned, recipe)
    plain.compile()
    arms = {"pruned": pruned, "plain": plain}

    def generate(model, tokens: int):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    for name, model in arms.items():  # compile the prefill and the decode graphs
        print(f"warming up {name} (compiles)", flush=True)
        generate(model, args.steps + 2)
        generate(model, 2)
    best = dict.fromkeys(arms, float("inf"))
    for r, name in round_robin(list(arms), args.rounds):
        short = timed(lambda m=arms[name]: generate(m, 2), "cpu")
        long = timed(lambda m=arms[name]: generate(m, args.steps + 2), "cpu")
        best[name] = min(best[name], (long - short) / args.steps * 1e3)
        print(
            f"round {r + 1}/{args.rounds} {name}: {(long - short) / args.steps * 1e3:.2f} ms/token",
            flush=True,
        )
    with torch.no_grad():
        out = pruned.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    kept = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    print(
        f"\n{args.layers} layers, hidden {args.hidden}, prompt {inputs['input_ids'].shape[1]} tokens, "
        f"recipe {fractions}, {torch.get_num_threads()} threads; pruned cache lengths per layer {kept}"
    )
    print("| arm | decode ms/token | plain / arm |")
    print("|---|---|---|")
    for name in arms:
        print(f"| {name} | {best[name]:.2f} | {best['plain'] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
