"""Token-pruning methods compared at matched FLOPs on the test-bed models, through the same pass.

Every method is a recipe (where and how many visual tokens go, at a reference FLOPs budget) and a
scorer (which ones), run by the FitPrune backend on held-out questions:

  * fitprune:      `fit` on calibration questions, FitPrune's scorer;
  * fitprune+merge: the same recipe, deleted tokens merged into kept ones (option merge);
  * fastv:         one deletion after layer 1 (`one_layer_recipe`), FastV's scorer;
  * pyramid:       PyramidDrop's 4 stages (`staged_recipe`), the last token's attention (`last_token`);
  * text_raters:   FitPrune's fitted schedule, SparseVLM-style text raters (the scorer alone differs);
  * duplication:   one deletion after layer 1, DART-style duplication to pivots (`duplication`);
  * random:        FitPrune's fitted schedule, a fresh uniform draw per example (`random_per_example`),
                   over --random-seeds torch seeds: mean, spread and the mean's standard error;
  * random, same positions: the seeded `random` scorer (the same ordinals in every example),
                   over the same seeds, to show how much wider its spread is.

Accuracies come with 95 % Wilson intervals and per question kind. Writes docs/methods-<task>.md and
.png; docs/methods.md (a page of the documentation site) includes them, with what the test beds can
and cannot tell and the cost table that `benchmarks/speed.py --methods --markdown
docs/methods-speed.md` writes.

    python benchmarks/methods.py --task clutter
    python benchmarks/methods.py --task shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from accuracy import TASKS, Row, TestBed, correctness, plot, table_lines
from tqdm import tqdm

from fitprune_fx import ModelInfo, Recipe, fit
from fitprune_fx.recipe_shapes import one_layer_recipe, staged_recipe

ROOT = Path(__file__).resolve().parents[1]


def plans_for(fitted: Recipe, budget: float, args) -> list[tuple[str, list[Recipe], list[int | None]]]:
    """(method, recipes, torch seeds) at one budget; a seed of None runs without reseeding."""
    info = fitted.model
    seeds = list(range(args.random_seeds))

    def with_scorer(scorer: str, **fields) -> Recipe:  # FitPrune's schedule, another scorer
        return Recipe(model=info, prune=fitted.prune, scorer=scorer, budget=budget, **fields)

    return [
        ("fitprune", [fitted], [None]),
        ("fitprune+merge", [dataclasses.replace(fitted, scorer_options={"merge": True})], [None]),
        ("fastv", [one_layer_recipe(info, budget, args.one_layer, "fastv")], [None]),
        ("pyramid", [staged_recipe(info, budget, args.stages, "last_token")], [None]),
        ("text_raters", [with_scorer("text_raters")], [None]),
        ("duplication", [one_layer_recipe(info, budget, args.one_layer, "duplication")], [None]),
        (f"random ({len(seeds)} seeds)", [with_scorer("random_per_example")] * len(seeds), seeds),
        (
            f"random, same positions ({len(seeds)} seeds)",
            [with_scorer("random", scorer_options={"seed": s}) for s in seeds],
            [None] * len(seeds),
        ),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="clutter", help="which test-bed model")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8])
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out questions")
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--one-layer", type=int, default=1, help="FastV's and DART's layer (0-based)")
    p.add_argument("--stages", type=int, default=4, help="PyramidDrop's stages")
    p.add_argument("--compiler", choices=["eager", "inductor"], default="eager")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bed = TestBed.load(args.task, args.calibration, args.eval, args.eval_seed)
    model, processor, name, held_out = bed.model, bed.processor, bed.name, bed.held_out

    info = ModelInfo.from_config(model.config, name=name)
    plans = [("unpruned", 0.0, [Recipe(model=info, prune={})], [None])]
    for budget in tqdm(args.budgets, desc="fitting"):
        fitted = fit(model, bed.calib, budget, name=name)
        plans += [
            (method, budget, recipes, seeds) for method, recipes, seeds in plans_for(fitted, budget, args)
        ]

    rows = []
    bar = tqdm(total=sum(len(r) for _, _, r, _ in plans), desc="evaluating")
    for method, budget, recipes, seeds in plans:
        right = []
        for recipe, seed in zip(recipes, seeds, strict=True):
            if seed is not None:
                torch.manual_seed(seed)
            right.append(correctness(model, processor, recipe, held_out, args.batch_size, args.compiler))
            bar.update(1)
        layers = ", ".join(f"{k}:{v}" for k, v in recipes[0].prune.items() if v)
        rows.append(Row(method, budget, recipes[0].reference_reduction(), layers or "-", right))
    bar.close()

    table = render(rows, bed.masks, len(held_out), args, name)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    md, png = args.out / f"methods-{args.task}.md", args.out / f"methods-{args.task}.png"
    md.write_text(table + "\n")
    plot(rows, png, f"{name}: methods at matched FLOPs")
    print(f"wrote {md} and {png} (docs/methods.md includes them)")


def render(rows: list[Row], masks: dict[str, torch.Tensor], n: int, args, name: str) -> str:
    command = " ".join(["python benchmarks/methods.py", *sys.argv[1:]])
    header = [
        f"`{command}`",
        "",
        f"{name}, {n} held-out questions (seed {args.eval_seed}), calibration {args.calibration}, "
        f"compiler {args.compiler}. One run: accuracy and its 95 % Wilson interval; random: mean ± "
        f"standard deviation over {args.random_seeds} seeds, their range and the mean's standard error. "
        "Per question kind (questions in brackets):",
        "",
    ]
    return "\n".join(header + table_lines(rows, masks, n))


if __name__ == "__main__":
    main()
