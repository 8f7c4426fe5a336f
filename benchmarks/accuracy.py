"""Accuracy vs FLOPs reduction on the test-bed models: FitPrune vs FastV vs random at matched FLOPs.

Two models: `shapes-llava` (144 visual tokens; counting questions) and `clutter-llava` (576 visual
tokens, LLaVA-1.5's geometry; every answer sits in the 4 tokens of one shape among distractors).

For each budget r:
  * fitprune: `fit(model, calibration, r)` on generated calibration questions,
  * random:   the same per-layer schedule as fitprune, tokens chosen by the seeded random scorer,
              repeated over `--random-seeds` seeds (mean, spread and range reported),
  * fastv:    one deletion after layer K (default 1, the paper's K=2 in 1-based numbering), the
              smallest count whose reference FLOPs reduction reaches r; if deleting every visual
              token after layer K cannot reach r, K moves earlier (printed in the table).
Every recipe runs through the FitPrune backend (the pass), on held-out questions that share no
(image, question) pair with the calibration set. Each accuracy comes with a 95 % Wilson interval
and a per-question-kind breakdown, so a difference smaller than the interval or than random's
seed spread reads as what it is: noise. The default top budget is 85 %: on the 4-layer model,
layer 0's attention over every token is always paid, and FitPrune's fit reaches at most ~88.6 %.

    python benchmarks/accuracy.py                    # shapes-llava: docs/accuracy-shapes.{md,png}
    python benchmarks/accuracy.py --task clutter     # clutter-llava: docs/accuracy-clutter.{md,png}

docs/accuracy.md (a page of the documentation site) includes both models' files.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fitprune_fx import ModelInfo, Recipe, fit, fitprune_backend, merge_small_deletions
from fitprune_fx.recipe_shapes import one_layer_recipe
from fitprune_fx.testbed import synthetic
from fitprune_fx.testbed.shapes_model import MODEL_DIRS, answer_ids, encode, load_shapes_llava

TASKS = {"shapes": synthetic.SHAPES, "clutter": synthetic.CLUTTER}

ROOT = Path(__file__).resolve().parents[1]


def fastv_recipe(base: Recipe, budget: float, layer: int) -> Recipe:
    """One-shot deletion after `layer` (moved earlier if needed) reaching `budget` FLOPs reduction."""
    return one_layer_recipe(base.model, budget, layer, scorer="fastv")


@torch.no_grad()
def correctness(model, processor, recipe: Recipe, examples, batch_size: int, compiler: str) -> torch.Tensor:
    """[N] bool: which held-out questions the pruned model answers right (last-position argmax)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fitprune_backend(recipe, compiler=compiler))
    right = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        logits = compiled(**encode(processor, chunk)).logits[:, -1]  # last position: never pruned
        right.append(logits.argmax(-1) == answer_ids(processor, chunk))
    return torch.cat(right)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def disjoint_held_out(held_out, calibration):
    """Held-out questions minus any (image, question) pair the calibration set also holds."""
    seen = {(ex.image.tobytes(), ex.question) for ex in calibration}
    return [ex for ex in held_out if (ex.image.tobytes(), ex.question) not in seen]


@dataclass
class TestBed:
    """A test-bed model, its calibration batches and its held-out questions (with a mask per kind)."""

    model: object
    processor: object
    name: str
    calib: list  # encoded batches of 16
    held_out: list  # sharing no (image, question) pair with the calibration set
    drawn: int  # questions drawn before that
    masks: dict[str, torch.Tensor]  # question kind -> [N] bool

    @classmethod
    def load(cls, task_name: str, calibration: int, n_eval: int, eval_seed: int) -> TestBed:
        task = TASKS[task_name]
        model, processor = load_shapes_llava(MODEL_DIRS[task_name])
        questions = synthetic.make_dataset(calibration, seed=0, split="calib", task=task)
        calib = [encode(processor, questions[i : i + 16]) for i in range(0, len(questions), 16)]
        drawn = synthetic.make_dataset(n_eval, seed=eval_seed, split="test", task=task)
        held_out = disjoint_held_out(drawn, questions)
        masks = {k: torch.tensor([ex.kind == k for ex in held_out]) for k in task.question_weights}
        return cls(model, processor, MODEL_DIRS[task_name].name, calib, held_out, len(drawn), masks)


@dataclass
class Row:
    method: str
    budget: float
    reduction: float
    deletions: str
    right: list[torch.Tensor]  # one [N] bool per run (random: one per seed)

    def accuracies(self) -> list[float]:
        return [float(r.float().mean()) for r in self.right]

    def cell(self, mask: torch.Tensor | None = None) -> str:
        """Accuracy over all questions (or those of `mask`): one run, or mean ± s.d. over seeds."""
        accs = [float((r if mask is None else r[mask]).float().mean()) for r in self.right]
        if len(accs) == 1:
            return f"{accs[0]:.3f}"
        return f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="shapes", help="which test-bed model")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85])
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--eval", type=int, default=768)
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out questions")
    p.add_argument("--random-seeds", type=int, default=5, help="seeds of the random scorer (>= 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fastv-layer", type=int, default=1)
    p.add_argument("--compiler", choices=["eager", "inductor"], default="eager")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--merge-below",
        type=float,
        default=0.0,
        help="also run FitPrune's recipe after merge_small_deletions at this threshold (decoder layers)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bed = TestBed.load(args.task, args.calibration, args.eval, args.eval_seed)
    model, processor, name, calib, held_out, drawn, masks = (
        bed.model, bed.processor, bed.name, bed.calib, bed.held_out, bed.drawn, bed.masks
    )  # fmt: skip

    unpruned = Recipe(model=ModelInfo.from_config(model.config, name=name), prune={})
    plans = [("unpruned", 0.0, [unpruned])]
    for budget in args.budgets:
        fitted = fit(model, calib, budget, name=name)
        randoms = [
            Recipe(model=fitted.model, prune=fitted.prune, scorer="random", scorer_options={"seed": s})
            for s in range(args.random_seeds)
        ]
        plans.append(("fitprune", budget, [fitted]))
        merged = merge_small_deletions(fitted, args.merge_below) if args.merge_below > 0 else fitted
        if merged is not fitted:
            plans.append((f"fitprune, merged below {args.merge_below:g}", budget, [merged]))
        plans += [
            ("fastv", budget, [fastv_recipe(fitted, budget, args.fastv_layer)]),
            (f"random ({args.random_seeds} seeds)", budget, randoms),
        ]

    rows = []
    bar = tqdm(total=sum(len(r) for _, _, r in plans), desc="evaluating")
    for method, budget, recipes in plans:
        right = []
        for recipe in recipes:
            right.append(correctness(model, processor, recipe, held_out, args.batch_size, args.compiler))
            bar.update(1)
        layers = ", ".join(f"{k}:{v}" for k, v in recipes[0].prune.items() if v)
        rows.append(Row(method, budget, recipes[0].reference_reduction(), layers or "-", right))
    bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    table = render(rows, masks, len(held_out), drawn, args, name)
    print(table)
    md, png = args.out / f"accuracy-{args.task}.md", args.out / f"accuracy-{args.task}.png"
    md.write_text(table + "\n")
    plot(rows, png, f"{name}: accuracy at matched FLOPs")
    print(f"wrote {md} and {png} (docs/accuracy.md includes them)")


def render(rows: list[Row], masks: dict[str, torch.Tensor], n: int, drawn: int, args, name: str) -> str:
    command = " ".join(["python benchmarks/accuracy.py", *sys.argv[1:]])
    header = [
        f"`{command}`",
        "",
        f"{name}, {n} held-out questions (seed {args.eval_seed}; {drawn - n} of {drawn} drawn dropped "
        f"as also in the calibration set), calibration {args.calibration}. Accuracy with its 95 % Wilson "
        f"interval; random: mean ± standard deviation over {args.random_seeds} scorer seeds, the range "
        "of the seeds' accuracies and the mean's standard error. Per question kind (count of questions "
        "in brackets):",
        "",
    ]
    return "\n".join(header + table_lines(rows, masks, n))


def table_lines(rows: list[Row], masks: dict[str, torch.Tensor], n: int) -> list[str]:
    """The markdown table: one line per row, with intervals (one run) or the seeds' range."""
    kinds = list(masks)
    lines = [
        "| method | budget | FLOPs reduction | accuracy | 95 % interval / seeds | "
        + " | ".join(f"{k} ({int(masks[k].sum())})" for k in kinds)
        + " | deletions (layer:count) |",
        "|---" * (6 + len(kinds)) + "|",
    ]
    for row in rows:
        accs = row.accuracies()
        if len(accs) == 1:
            low, high = wilson(int(row.right[0].sum()), n)
            interval = f"{low:.3f}–{high:.3f}"
        else:
            error = statistics.stdev(accs) / len(accs) ** 0.5
            interval = f"seeds {min(accs):.3f}–{max(accs):.3f}, s.e. {error:.3f}"
        per_kind = " | ".join(row.cell(masks[k]) for k in kinds)
        lines.append(
            f"| {row.method} | {row.budget:.0%} | {row.reduction:.1%} | {row.cell()} | {interval} | "
            f"{per_kind} | {row.deletions} |"
        )
    return lines


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Accuracy against FLOPs reduction, one line per method: Wilson intervals, or (several runs:
    seeds) their standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    n = len(rows[0].right[0])
    base = rows[0].accuracies()[0]
    ax.axhline(base, color="grey", linestyle="--", label="unpruned")
    methods = list(dict.fromkeys(r.method for r in rows[1:]))  # in table order, "unpruned" drawn above
    for method, marker in zip(methods, "os^DvP*Xh", strict=False):
        picked = [r for r in rows if r.method == method]
        x = [100 * r.reduction for r in picked]
        y = [statistics.mean(r.accuracies()) for r in picked]
        if len(picked[0].right) > 1:  # seed spread
            err = [statistics.stdev(r.accuracies()) for r in picked]
        else:  # Wilson interval, as a (lower, upper) distance
            bounds = [wilson(int(r.right[0].sum()), n) for r in picked]
            err = [
                [a - lo for a, (lo, _) in zip(y, bounds, strict=True)],
                [hi - a for a, (_, hi) in zip(y, bounds, strict=True)],
            ]
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=method, alpha=0.85)
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{title}\n(bars: 95 % Wilson interval; random: s.d. over seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
