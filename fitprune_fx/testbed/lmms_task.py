"""Local lmms-eval tasks made from the synthetic shapes questions (no downloads): `fitprune_shapes`,
and `fitprune_shapes_sizes`, the same questions on images of several sizes (`IMAGE_SIZES`).

`write_shapes_task(folder, n)` writes the images, a JSON-lines dataset, the task YAML and the small
Python module the YAML points to; `TaskManager(include_path=folder)` then finds the task. Questions
come from the held-out split of `testbed.synthetic`; the shipped `shapes-llava` answers with one
word (it was trained on the next word only, so the task generates one token); exact match.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import synthetic

TASK = "fitprune_shapes"
SIZES_TASK = "fitprune_shapes_sizes"  # the same questions, each image resized to one of `IMAGE_SIZES`
IMAGE_SIZES = [(56, 56), (56, 112), (84, 56), (112, 112), (56, 84), (84, 84)]
"""(height, width) of the sizes task's images, in turn: a model that takes images at their own
resolution (Qwen-VL, any-resolution tiling) gets a different visual count for each."""

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_task.doc_to_visual
doc_to_text: !function shapes_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  do_sample: false
  until: ["\\n"]
process_results: !function shapes_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

_FUNCTIONS = '''"""lmms-eval functions of the fitprune_shapes task (written by testbed/lmms_task.py)."""

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].strip().lower())}
'''


def write_shapes_task(
    folder: str | Path,
    n: int = 64,
    seed: int = 0,
    task: str = TASK,
    answers: list[str] | None = None,
) -> Path:
    """Write `task` (TASK, or SIZES_TASK: images resized in turn to `IMAGE_SIZES`) under `folder`
    (created); returns the folder to pass as lmms-eval's include path. `answers` replaces the
    questions' own answers (a test that scores a model against answers it computed itself)."""
    if task not in (TASK, SIZES_TASK):
        raise ValueError(f"unknown local task {task!r}; known: {TASK}, {SIZES_TASK}")
    out = Path(folder)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, example in enumerate(synthetic.make_dataset(n, seed=seed, split="test")):
        path = images / f"{task}-{i:05d}.png"
        image = example.image
        if task == SIZES_TASK:
            height, width = IMAGE_SIZES[i % len(IMAGE_SIZES)]
            image = image.resize((width, height))
        image.save(path)
        answer = example.answer if answers is None else answers[i]
        rows.append({"image_path": str(path.resolve()), "question": example.question, "answer": answer})
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{task}.yaml").write_text(_YAML.format(task=task, data=data.resolve()))
    (out / "shapes_task.py").write_text(_FUNCTIONS)
    return out
