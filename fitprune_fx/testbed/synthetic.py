"""Synthetic visual QA on "shapes" images, used to train and evaluate `shapes-llava`.

An image is 48x48 pixels: a 3x3 grid of 16x16 cells on a dark background. Each occupied cell
holds one shape (a kind and a colour) of 8x8 pixels drawn in its centre, so with 4x4-pixel
patches a cell is 4x4 = 16 visual tokens and a shape covers exactly the middle 2x2 of them. Each cell has a
one-word name (`CELL_NAMES`, e.g. "top-left"). Questions need either one cell ("what colour is
the shape at top-left ?", "what shape is at centre ?") or counting over the whole image ("how
many red shapes are there ?", "how many circles are there ?", "how many shapes are there ?").
Every answer is a single word of a fixed vocabulary (see `VOCAB`).

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
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
MIN_SHAPES, MAX_SHAPES = 2, 6
SHAPE_SIZE = 8  # pixels: exactly the middle 2x2 patches of a cell, so every shape is 4 tokens
# One word per cell, row-major: a position question is a single lookup, not row+column.
CELL_NAMES = (
    "top-left", "top", "top-right",
    "left", "centre", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip

# Question kinds and how often they are drawn (the harder kinds are drawn more often).
QUESTION_WEIGHTS = {
    "cell_colour": 0.25,  # one cell decides the answer
    "cell_kind": 0.3,
    "count_colour": 0.25,  # counting over all cells
    "count_all": 0.2,
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
        "at",
        "how",
        "many",
        "shapes",
        "are",
        "there",
        "?",
    ]
    + [str(i) for i in range(10)]
    + list(COLOURS)
    + list(KINDS)
    + list(PLURAL.values())
    + list(CELL_NAMES)
)


@dataclass
class Example:
    """One question about one image; `answer` is a single vocabulary word."""

    image: Image.Image
    question: str
    answer: str
    kind: str  # which entry of QUESTION_WEIGHTS produced it


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple, x0: int, y0: int) -> None:
    """Draw a shape of SHAPE_SIZE x SHAPE_SIZE pixels with top-left corner (x0, y0)."""
    s = SHAPE_SIZE
    t = s // 3  # cross arm half-width offset
    if kind == "circle":
        draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=colour)
    elif kind == "square":
        draw.rectangle([x0 + 1, y0 + 1, x0 + s - 2, y0 + s - 2], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=colour)
    elif kind == "cross":
        draw.rectangle([x0 + t, y0, x0 + s - 1 - t, y0 + s - 1], fill=colour)
        draw.rectangle([x0, y0 + t, x0 + s - 1, y0 + s - 1 - t], fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def make_scene(rng: random.Random) -> dict[tuple[int, int], tuple[str, str]]:
    """Random scene: {(row, col) 0-based: (colour, kind)} with MIN..MAX_SHAPES shapes."""
    n = rng.randint(MIN_SHAPES, MAX_SHAPES)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return {cell: (rng.choice(list(COLOURS)), rng.choice(KINDS)) for cell in sorted(cells)}


def render(scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random) -> Image.Image:
    """RGB image of a scene; each shape sits in the middle 8x8 pixels (2x2 patches) of its cell."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = (CELL - SHAPE_SIZE) // 2  # 4 pixels = one patch
    for (r, c), (colour, kind) in scene.items():
        x0 = c * CELL + margin
        y0 = r * CELL + margin
        _draw_shape(draw, kind, COLOURS[colour], x0, y0)
    return img


def ask(scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random, qkind: str) -> tuple[str, str]:
    """(question, answer) of kind `qkind` about `scene`."""
    if qkind in ("cell_colour", "cell_kind"):
        (r, c), (colour, kind) = rng.choice(sorted(scene.items()))
        name = CELL_NAMES[r * GRID + c]
        if qkind == "cell_colour":
            return f"what colour is the shape at {name} ?", colour
        return f"what shape is at {name} ?", kind
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
    raise ValueError(f"unknown question kind {qkind!r}")


def make_example(rng: random.Random, qkind: str | None = None) -> tuple[Image.Image, str, str]:
    """One random (image, question, answer); `qkind` forces the question kind."""
    ex = _make(rng, qkind)
    return ex.image, ex.question, ex.answer


def _make(rng: random.Random, qkind: str | None = None) -> Example:
    """Random scene, its image and one question (of a random kind unless `qkind` is given)."""
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
