"""Accuracy vs FLOPs reduction on shapes-llava: FitPrune vs FastV vs random at matched FLOPs.

For each budget r:
  * fitprune: `fit(model, calibration, r)` on generated calibration questions,
  * random:   the same per-layer schedule as fitprune, tokens chosen by the seeded random scorer,
  * fastv:    one deletion after layer K (default 1, the paper's K=2 in 1-based numbering), the
              smallest count whose reference FLOPs reduction reaches r; if deleting every visual
              token after layer K cannot reach r, K moves earlier (printed in the table).
Every recipe runs through the FitPrune backend (the pass), on held-out questions. The default
top budget is 85 %: on the 4-layer model, layer 0's attention over every token is always paid,
and FitPrune's fit reaches at most ~88.6 % (alpha = 1).

    python benchmarks/accuracy.py                    # writes docs/accuracy.md and docs/accuracy.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from fitprune_fx import ModelInfo, Recipe, fit, fitprune_backend
from fitprune_fx.testbed import synthetic
from fitprune_fx.testbed.shapes_model import answer_ids, encode, load_shapes_llava

ROOT = Path(__file__).resolve().parents[1]


def fastv_recipe(base: Recipe, budget: float, layer: int) -> Recipe:
    """One-shot deletion after `layer` (moved earlier if needed) reaching `budget` FLOPs reduction."""
    n = base.model.num_visual_tokens
    for k in range(layer, -1, -1):
        for d in range(n + 1):
            r = Recipe(model=base.model, prune={k: d}, scorer="fastv", budget=budget)
            if r.reference_reduction() >= budget - 1e-9:
                return r
    raise ValueError(f"FastV cannot reach a {budget:.0%} reduction on this model")


@torch.no_grad()
def accuracy(model, processor, recipe: Recipe, examples, batch_size: int, compiler: str) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fitprune_backend(recipe, compiler=compiler))
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        logits = compiled(**encode(processor, chunk)).logits[:, -1]  # last position: never pruned
        correct += int((logits.argmax(-1) == answer_ids(processor, chunk)).sum())
    return correct / len(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85])
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fastv-layer", type=int, default=1)
    p.add_argument("--compiler", choices=["eager", "inductor"], default="eager")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, processor = load_shapes_llava()
    calibration = synthetic.make_dataset(args.calibration, seed=0, split="calib")
    calib = [encode(processor, calibration[i : i + 16]) for i in range(0, len(calibration), 16)]
    held_out = synthetic.make_dataset(args.eval, seed=0, split="test")

    unpruned = Recipe(model=ModelInfo.from_config(model.config, name="shapes-llava"), prune={})
    runs = [("unpruned", 0.0, unpruned)]
    for budget in args.budgets:
        fitted = fit(model, calib, budget, name="shapes-llava")
        rand = Recipe(model=fitted.model, prune=fitted.prune, scorer="random", scorer_options={"seed": 0})
        runs += [
            ("fitprune", budget, fitted),
            ("fastv", budget, fastv_recipe(fitted, budget, args.fastv_layer)),
            ("random", budget, rand),
        ]

    rows = []
    for method, budget, recipe in tqdm(runs, desc="evaluating"):
        acc = accuracy(model, processor, recipe, held_out, args.batch_size, args.compiler)
        layers = ", ".join(f"{k}:{v}" for k, v in recipe.prune.items() if v)
        rows.append((method, budget, recipe.reference_reduction(), acc, layers))

    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"shapes-llava, {len(held_out)} held-out questions, calibration {args.calibration}",
        "",
        "| method | budget | FLOPs reduction | accuracy | deletions (layer:count) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {b:.0%} | {r:.1%} | {a:.3f} | {layers or '-'} |" for m, b, r, a, layers in rows]
    table = "\n".join(lines)
    print(table)
    (args.out / "accuracy.md").write_text(table + "\n")
    plot(rows, args.out / "accuracy.png")
    print(f"wrote {args.out / 'accuracy.md'} and {args.out / 'accuracy.png'}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(a for m, _, _, a, _ in rows if m == "unpruned")
    ax.axhline(base, color="grey", linestyle="--", label="unpruned")
    for method, marker in (("fitprune", "o"), ("fastv", "s"), ("random", "^")):
        pts = [(r, a) for m, _, r, a, _ in rows if m == method]
        ax.plot([100 * r for r, _ in pts], [a for _, a in pts], marker=marker, label=method)
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("shapes-llava: accuracy at matched FLOPs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
