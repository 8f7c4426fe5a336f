"""Synthetic visual QA on "shapes" images, used to train and evaluate `shapes-llava`.

An image is 48x48 pixels: a 3x3 grid of 16x16 cells on a dark background. Each occupied cell
holds one shape (a kind and a colour) drawn in its centre, so with 4x4-pixel patches a cell is
4x4 = 16 visual tokens and a shape mostly covers the middle 2x2 of them. Questions need either
one cell ("what colour is the shape in row 2 column 3 ?"), counting over the whole image
("how many red shapes are there ?") or a global search ("is there a blue circle ?"). Every
answer is a single word of a fixed vocabulary (see `VOCAB`).

Everything is driven by a `random.Random`, so a seed fixes a dataset; `make_dataset` derives
different seeds for the "train" and "test" splits.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID  # 16 pixels
BACKGROUND = (24, 24, 24)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
KINDS = ("circle", "square", "triangle", "cross")
PLURAL = {k: k + "s" for k in KINDS}
MIN_SHAPES, MAX_SHAPES = 2, 7

# Question kinds and how often they are drawn.
QUESTION_WEIGHTS = {
    "cell_colour": 0.25,  # one cell decides the answer
    "cell_kind": 0.25,
    "count_colour": 0.15,  # counting over all cells
    "count_kind": 0.1,
    "count_all": 0.1,
    "exists": 0.15,  # global search for one colour+kind pair
}

PROMPT = "USER: <image>\n{question} ASSISTANT:"

# Every word that can appear in a prompt or an answer (the tokenizer's vocabulary).
VOCAB = (
    [
        "USER:",
        "ASSISTANT:",
        "what",
        "colour",
        "is",
        "the",
        "shape",
        "in",
        "row",
        "column",
        "how",
        "many",
        "shapes",
        "are",
        "there",
        "a",
        "?",
        "yes",
        "no",
    ]
    + [str(i) for i in range(10)]
    + list(COLOURS)
    + list(KINDS)
    + list(PLURAL.values())
)


@dataclass
class Example:
    """One question about one image; `answer` is a single vocabulary word."""

    image: Image.Image
    question: str
    answer: str
    kind: str  # which entry of QUESTION_WEIGHTS produced it


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple, x0: int, y0: int) -> None:
    """Draw a shape of about 10x10 pixels with top-left corner (x0, y0)."""
    s = 10
    if kind == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=colour)
    elif kind == "cross":
        draw.rectangle([x0 + 3, y0, x0 + 6, y0 + s - 1], fill=colour)
        draw.rectangle([x0, y0 + 3, x0 + s - 1, y0 + 6], fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def make_scene(rng: random.Random) -> dict[tuple[int, int], tuple[str, str]]:
    """Random scene: {(row, col) 0-based: (colour, kind)} with MIN..MAX_SHAPES shapes."""
    n = rng.randint(MIN_SHAPES, MAX_SHAPES)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return {cell: (rng.choice(list(COLOURS)), rng.choice(KINDS)) for cell in sorted(cells)}


def render(scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random) -> Image.Image:
    """RGB image of a scene; each shape is jittered by up to 1 pixel inside its cell."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (r, c), (colour, kind) in scene.items():
        x0 = c * CELL + 3 + rng.randint(-1, 1)
        y0 = r * CELL + 3 + rng.randint(-1, 1)
        _draw_shape(draw, kind, COLOURS[colour], x0, y0)
    return img


def ask(scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random, qkind: str):
    """(question, answer) of kind `qkind` about `scene`."""
    if qkind in ("cell_colour", "cell_kind"):
        (r, c), (colour, kind) = rng.choice(sorted(scene.items()))
        if qkind == "cell_colour":
            return f"what colour is the shape in row {r + 1} column {c + 1} ?", colour
        return f"what shape is in row {r + 1} column {c + 1} ?", kind
    if qkind == "count_colour":
        colour = rng.choice(list(COLOURS))
        n = sum(v[0] == colour for v in scene.values())
        return f"how many {colour} shapes are there ?", str(n)
    if qkind == "count_kind":
        kind = rng.choice(KINDS)
        n = sum(v[1] == kind for v in scene.values())
        return f"how many {PLURAL[kind]} are there ?", str(n)
    if qkind == "count_all":
        return "how many shapes are there ?", str(len(scene))
    if qkind == "exists":
        # Half the time ask about a pair that is present, so "yes" and "no" are balanced.
        if rng.random() < 0.5:
            colour, kind = rng.choice(sorted(scene.values()))
        else:
            colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
        answer = "yes" if (colour, kind) in scene.values() else "no"
        return f"is there a {colour} {kind} ?", answer
    raise ValueError(f"unknown question kind {qkind!r}")


def make_example(rng: random.Random, qkind: str | None = None) -> tuple[Image.Image, str, str]:
    """One random (image, question, answer); `qkind` forces the question kind."""
    ex = _make(rng, qkind)
    return ex.image, ex.question, ex.answer


def _make(rng: random.Random, qkind: str | None = None) -> Example:
    if qkind is None:
        qkind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    scene = make_scene(rng)
    image = render(scene, rng)
    question, answer = ask(scene, rng, qkind)
    return Example(image, question, answer, qkind)


SPLIT_OFFSETS = {"train": 0, "test": 1_000_003, "calib": 2_000_003}


def make_dataset(n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """`n` examples; the same (n, seed, split) always gives the same list, splits never share
    a random stream."""
    rng = random.Random(seed * 7_919 + SPLIT_OFFSETS[split])
    return [_make(rng) for _ in range(n)]


def prompt(question: str) -> str:
    """The chat prompt the model was trained on."""
    return PROMPT.format(question=question)


def write_question_file(examples: list[Example], out_dir: str | Path) -> dict[str, Path]:
    """Write LLaVA-style `questions.jsonl` (question_id, image, text), `answers.jsonl`
    (question_id, text) and `images/NNNNNN.png` under `out_dir`; returns the three paths."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    qpath, apath = out / "questions.jsonl", out / "answers.jsonl"
    with open(qpath, "w") as qf, open(apath, "w") as af:
        for i, ex in enumerate(examples):
            name = f"{i:06d}.png"
            ex.image.save(images / name)
            qf.write(json.dumps({"question_id": i, "image": name, "text": ex.question}) + "\n")
            af.write(json.dumps({"question_id": i, "text": ex.answer}) + "\n")
    return {"questions": qpath, "answers": apath, "images": images}


def read_question_file(
    questions: str | Path, images: str | Path, answers: str | Path | None = None
) -> list[Example]:
    """Read back what `write_question_file` wrote (answers are "" when no answers file)."""
    by_id: dict = {}
    if answers is not None:
        for line in Path(answers).read_text().splitlines():
            row = json.loads(line)
            by_id[row["question_id"]] = row["text"]
    out = []
    for line in Path(questions).read_text().splitlines():
        row = json.loads(line)
        with Image.open(Path(images) / row["image"]) as im:
            image = im.convert("RGB")
        out.append(Example(image, row["text"], by_id.get(row["question_id"], ""), "file"))
    return out
