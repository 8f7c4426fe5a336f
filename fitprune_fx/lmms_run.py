"""`fitprune-fx eval`: score a model with lmms-eval unpruned and pruned by a recipe, side by side.

Both runs go through lmms-eval's own evaluator (`simple_evaluate`) with one model object: first
unpruned, then compiled in place with the recipe (`fitprune_fx.compile`). The table shows each
task's metrics for both, the recipe's FLOPs reduction and the median prefill time of each run.
Needs the `[eval]` extra (lmms-eval 0.7.x).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class EvalRun:
    """Metrics per task ({task: {metric: value}}) and prefill times (seconds) of one run."""

    metrics: dict[str, dict[str, float]]
    prefill_seconds: list[float] = field(default_factory=list)

    @property
    def prefill_ms(self) -> float:
        return 1000 * statistics.median(self.prefill_seconds) if self.prefill_seconds else float("nan")


def evaluate(
    model: nn.Module,
    processor: Any,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> EvalRun:
    """One lmms-eval run of `model` as it is (compiled or not) on `tasks`."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from fitprune_fx.lmms_model import FitpruneLmms

    wrapper = FitpruneLmms(model, processor, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        result = simple_evaluate(
            model=wrapper,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    finally:
        wrapper.detach()
    metrics = {}
    for task, values in result["results"].items():
        metrics[task] = {
            k.split(",")[0]: float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and "stderr" not in k
        }
    return EvalRun(metrics, wrapper.prefill_seconds)


def table(unpruned: EvalRun, pruned: EvalRun, reduction: float) -> str:
    """Markdown: metric per task unpruned vs pruned, FLOPs reduction, prefill time and speed-up."""
    lines = [
        "| task | metric | unpruned | pruned | FLOPs reduction | prefill ms unpruned | prefill ms pruned "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    speed = unpruned.prefill_ms / pruned.prefill_ms if pruned.prefill_ms else float("nan")
    for task, metrics in pruned.metrics.items():
        for name, value in metrics.items():
            base = unpruned.metrics.get(task, {}).get(name, float("nan"))
            lines.append(
                f"| {task} | {name} | {base:.4f} | {value:.4f} | {reduction:.1%} | "
                f"{unpruned.prefill_ms:.1f} | {pruned.prefill_ms:.1f} | {speed:.2f}x |"
            )
    return "\n".join(lines)
