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

A `Task` holds one geometry and question mix. `SHAPES` (above, the module constants) is the task of
the shipped `shapes-llava`; `CLUTTER` is LLaVA-1.5's token geometry: 96x96 pixels, a 6x6 grid of
16-pixel cells, 24x24 = 576 visual tokens at 4-pixel patches, 4 to 8 coloured shapes (one of each
colour-kind pair at most) among 6 grey distractor shapes, each shape a 4x4-pixel sprite filling
exactly one patch (`SPRITES`), and only questions whose answer sits in that one token: the colour
or the kind of the shape at a named cell (36 cells). Its prompt puts the question before the
image (`QUESTION_FIRST_PROMPT`), so that no word after the image knows the question in decoder
layer 0 and the answer must be read from the shape's own token in a later layer. With at most 8
of 576 tokens informative, which tokens a pruned model keeps decides its answers. A third kind,
"where is the red circle ?" (`find_cell`), is generated but not in the mix (not learnt in the
training budget).
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
QUESTION_FIRST_PROMPT = "USER: {question} <image> ASSISTANT:"
DISTRACTOR = (150, 150, 150)  # grey shapes that no question asks about (CLUTTER)

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


@dataclass(frozen=True)
class Task:
    """One synthetic task: image geometry, scene statistics and question mix."""

    name: str
    image_size: int
    grid: int
    cell_names: tuple[str, ...]
    min_shapes: int
    max_shapes: int
    question_weights: dict[str, float]
    distractors: int = 0  # grey shapes in empty cells, never asked about
    unique_pairs: bool = False  # at most one shape per (colour, kind), so "where is the red circle ?"
    extra_words: tuple[str, ...] = ()  # vocabulary beyond the shapes task's (before the cell names)
    shape_size: int = SHAPE_SIZE  # pixels; 4 = one patch (`SPRITES`), 8 = the middle 2x2 patches
    prompt: str = PROMPT  # chat template; "{question}" and "<image>" in either order

    @property
    def question_first(self) -> bool:
        """Whether its prompt puts the question before the image."""
        return self.prompt.index("{question}") < self.prompt.index("<image>")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    @property
    def vocab(self) -> list[str]:
        """Every word of its prompts and answers (the tokenizer's vocabulary)."""
        return [w for w in VOCAB if w not in CELL_NAMES] + list(self.extra_words) + list(self.cell_names)


SHAPES = Task("shapes", IMAGE_SIZE, GRID, CELL_NAMES, MIN_SHAPES, MAX_SHAPES, QUESTION_WEIGHTS)
CLUTTER = Task(
    "clutter",
    image_size=96,
    grid=6,
    cell_names=tuple(f"{row}{col}" for row in "abcdef" for col in "123456"),  # a1 .. f6, row-major
    min_shapes=4,
    max_shapes=8,
    question_weights={"cell_colour": 0.5, "cell_kind": 0.5},
    distractors=6,
    unique_pairs=True,
    extra_words=("where",),
    shape_size=4,
    # Question before image: no word after the image knows the question before layer 1, so no
    # decoder layer-0 attention can look up the asked cell, and a token deleted after layer 0 is lost.
    prompt=QUESTION_FIRST_PROMPT,
)

# One-patch shapes (4x4 pixels, "#" painted): four patterns no rotation or shift turns into another.
SPRITES = {
    "circle": (".##.", "#..#", "#..#", ".##."),
    "square": ("####", "####", "####", "####"),
    "triangle": ("...#", "..##", ".###", "####"),
    "cross": ("#..#", ".##.", ".##.", "#..#"),
}


@dataclass
class Example:
    """One question about one image; `answer` is a single vocabulary word."""

    image: Image.Image
    question: str
    answer: str
    kind: str  # which entry of QUESTION_WEIGHTS produced it
    template: str = PROMPT  # the task's chat prompt

    @property
    def text(self) -> str:
        """The chat prompt of this question (the task's template)."""
        return self.template.format(question=self.question)


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


def make_scene(rng: random.Random, task: Task = SHAPES) -> dict[tuple[int, int], tuple[str, str]]:
    """Random scene: {(row, col) 0-based: (colour, kind)} with min..max coloured shapes, then the
    task's distractors as ("grey", kind) in other cells."""
    n = rng.randint(task.min_shapes, task.max_shapes)
    cells = rng.sample([(r, c) for r in range(task.grid) for c in range(task.grid)], n + task.distractors)
    if not task.distractors and not task.unique_pairs:  # SHAPES: its original draw order
        return {cell: (rng.choice(list(COLOURS)), rng.choice(KINDS)) for cell in sorted(cells)}
    if task.unique_pairs:
        pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], n)
    else:
        pairs = [(rng.choice(list(COLOURS)), rng.choice(KINDS)) for _ in range(n)]
    scene = dict(zip(sorted(cells[:n]), pairs, strict=True))
    for cell in sorted(cells[n:]):
        scene[cell] = ("grey", rng.choice(KINDS))
    return scene


def render(
    scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random, task: Task = SHAPES
) -> Image.Image:
    """RGB image of a scene. 8-pixel shapes sit in the middle 8x8 pixels (2x2 patches) of their
    cell; 4-pixel shapes (`SPRITES`) fill the cell's second patch of its second patch row."""
    img = Image.new("RGB", (task.image_size, task.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    margin = (task.cell - SHAPE_SIZE) // 2  # 4 pixels = one patch
    for (r, c), (colour, kind) in scene.items():
        x0 = c * task.cell + margin
        y0 = r * task.cell + margin
        fill = COLOURS.get(colour, DISTRACTOR)
        if task.shape_size == 4:
            for dy, row in enumerate(SPRITES[kind]):
                for dx, ch in enumerate(row):
                    if ch == "#":
                        draw.point((x0 + dx, y0 + dy), fill=fill)
        elif task.shape_size == SHAPE_SIZE:
            _draw_shape(draw, kind, fill, x0, y0)
        else:
            raise ValueError(f"task {task.name!r}: shape_size {task.shape_size} is not 4 (one patch) or 8")
    return img


def ask(
    scene: dict[tuple[int, int], tuple[str, str]], rng: random.Random, qkind: str, task: Task = SHAPES
) -> tuple[str, str]:
    """(question, answer) of kind `qkind` about `scene` (never about a distractor)."""
    coloured = sorted((cell, v) for cell, v in scene.items() if v[0] in COLOURS)
    if qkind in ("cell_colour", "cell_kind"):
        (r, c), (colour, kind) = rng.choice(coloured)
        name = task.cell_names[r * task.grid + c]
        if qkind == "cell_colour":
            return f"what colour is the shape at {name} ?", colour
        return f"what shape is at {name} ?", kind
    if qkind == "find_cell":  # needs unique (colour, kind) pairs
        (r, c), (colour, kind) = rng.choice(coloured)
        return f"where is the {colour} {kind} ?", task.cell_names[r * task.grid + c]
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


def make_example(
    rng: random.Random, qkind: str | None = None, task: Task = SHAPES
) -> tuple[Image.Image, str, str]:
    """One random (image, question, answer); `qkind` forces the question kind."""
    ex = _make(rng, qkind, task)
    return ex.image, ex.question, ex.answer


def _make(rng: random.Random, qkind: str | None = None, task: Task = SHAPES) -> Example:
    """Random scene, its image and one question (of a random kind unless `qkind` is given)."""
    weights = task.question_weights
    if qkind is None:
        qkind = rng.choices(list(weights), weights=list(weights.values()))[0]
    scene = make_scene(rng, task)
    image = render(scene, rng, task)
    question, answer = ask(scene, rng, qkind, task)
    return Example(image, question, answer, qkind, task.prompt)


SPLIT_OFFSETS = {"train": 0, "test": 1_000_003, "calib": 2_000_003}


def make_dataset(n: int, seed: int = 0, split: str = "train", task: Task = SHAPES) -> list[Example]:
    """`n` examples; the same (n, seed, split, task) always gives the same list, splits never
    share a random stream."""
    rng = random.Random(seed * 7_919 + SPLIT_OFFSETS[split])
    return [_make(rng, task=task) for _ in range(n)]


def prompt(question: str, task: Task = SHAPES) -> str:
    """The chat prompt the task's model was trained on."""
    return task.prompt.format(question=question)


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
    questions: str | Path, images: str | Path, answers: str | Path | None = None, task: Task = SHAPES
) -> list[Example]:
    """Read back what `write_question_file` wrote (answers are "" when no answers file); the
    examples' prompts use `task`'s template (the file holds only the questions)."""
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
        out.append(Example(image, row["text"], by_id.get(row["question_id"], ""), "file", task.prompt))
    return out
