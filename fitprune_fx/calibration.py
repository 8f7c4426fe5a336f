"""Calibration inputs for fitting: LLaVA question files and iterables of processor outputs.

A *question file* is the LLaVA evaluation format: one JSON object per line with at least
``question_id``, ``image`` (a file name relative to an image folder) and ``text`` (the question).
Each line becomes one processor output built with the model's own processor and its chat
template; without a chat template the LLaVA-1.5 prompt ``"USER: <image>\\n{text} ASSISTANT:"``
is used and a warning says so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FALLBACK_TEMPLATE = "USER: {image}\n{text} ASSISTANT:"


class CalibrationError(ValueError):
    """A calibration file or input is malformed; the message says what and where."""


def read_question_file(path: str | Path) -> list[dict[str, Any]]:
    """Parse a LLaVA question file (JSON lines); blank lines are skipped."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            fields = ("image", "text")
            missing = [k for k in fields if k not in q] if isinstance(q, dict) else list(fields)
            if missing:
                raise CalibrationError(
                    f"{path}:{lineno}: expected an object with question_id, image and text; missing {missing}"
                )
            questions.append(q)
    return questions


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) else "<image>"


def has_chat_template(processor: Any) -> bool:
    """Whether the processor (or its tokenizer) carries a chat template."""
    if getattr(processor, "chat_template", None):
        return True
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(tok, "chat_template", None))


def build_prompt(processor: Any, text: str) -> str:
    """One user turn with one image and `text`, through the chat template when there is one.

    An ``<image>`` already present in `text` is removed (the template places the image).
    Without a chat template the LLaVA-1.5 format :data:`FALLBACK_TEMPLATE` is used.
    """
    image = _image_token(processor)
    text = text.replace(image, "").strip()
    if has_chat_template(processor):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(image=image, text=text)


def load_question_file(
    path: str | Path,
    images: str | Path,
    processor: Any,
    limit: int | None = None,
) -> list[dict[str, Tensor]]:
    """Processor outputs (batch of one each) for the questions in a LLaVA question file.

    `images` is the folder the ``image`` fields are relative to; `limit` keeps the first N.
    """
    from PIL import Image

    questions = read_question_file(path)[:limit]
    if not questions:
        raise CalibrationError(f"{path}: no questions")
    if not has_chat_template(processor):
        warnings.warn(
            "the processor has no chat template; calibration prompts use the LLaVA-1.5 format "
            f"{FALLBACK_TEMPLATE!r}",
            stacklevel=2,
        )
    out = []
    for q in questions:
        file = Path(images) / q["image"]
        if not file.is_file():
            raise CalibrationError(
                f"image {q['image']!r} of question {q.get('question_id')!r} not found in {images}"
            )
        with Image.open(file) as img:
            rgb = img.convert("RGB")
        prompt = build_prompt(processor, str(q["text"]))
        enc = processor(images=rgb, text=prompt, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if torch.is_tensor(v)})
    return out


def as_batches(calibration: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Tensor]]:
    """Normalise an iterable of processor outputs to dicts of batched tensors.

    Each item needs ``input_ids`` ([S] or [b, S]); ``attention_mask`` defaults to all ones and
    ``pixel_values`` ([3, H, W] or [n_images, 3, H, W]) is passed through. A single dict (one
    batch) is accepted as well as an iterable of them.
    """
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    for i, item in enumerate(calibration):
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise CalibrationError(
                f"calibration item {i} is not a processor output (a dict with input_ids, "
                "attention_mask, pixel_values)"
            )
        batch = {k: v for k, v in item.items() if torch.is_tensor(v)}
        ids = batch["input_ids"]
        if ids.dim() == 1:
            batch["input_ids"] = ids = ids[None]
            if "attention_mask" in batch:
                batch["attention_mask"] = batch["attention_mask"].reshape(1, -1)
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(ids)
        pv = batch.get("pixel_values")
        if pv is not None and pv.dim() == 3:
            batch["pixel_values"] = pv[None]
        yield batch
