"""A local lmms-eval task made from the synthetic shapes questions (no downloads): `fitprune_shapes`.

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


def write_shapes_task(folder: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write the task under `folder` (created); returns the folder to pass as lmms-eval's include path."""
    out = Path(folder)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, example in enumerate(synthetic.make_dataset(n, seed=seed, split="test")):
        path = images / f"{i:05d}.png"
        example.image.save(path)
        rows.append(
            {"image_path": str(path.resolve()), "question": example.question, "answer": example.answer}
        )
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{TASK}.yaml").write_text(_YAML.format(task=TASK, data=data.resolve()))
    (out / "shapes_task.py").write_text(_FUNCTIONS)
    return out
