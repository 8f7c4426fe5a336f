"""Train `shapes-llava` (or `clutter-llava`) from scratch on a synthetic QA task and save it.

    python benchmarks/train_shapes_llava.py                  # writes fitprune_fx/testbed/models/shapes-llava
    python benchmarks/train_shapes_llava.py --task clutter   # 576 visual tokens: models/clutter-llava
    python benchmarks/train_shapes_llava.py --epochs 2 --steps-per-epoch 20 --out /tmp/shapes

Every step draws fresh images from the generator (no image is seen twice), several questions per
image sharing one image prefix. The loss is the cross-entropy of the single answer token,
predicted at the last prompt position ("ASSISTANT:"), plus a per-visual-token auxiliary loss:
each projected image token must tell the colour and kind painted in its patch and the cell it
lies in, scored against the decoder's own word vectors (see `aux_logits`), so the lookups the
decoder has to learn start from a similarity. With `--attn-weight`, a few attention heads are
guided onto the lookups the questions need (`lookup_attention_loss`): the cell word onto its
cell, the colour word of a count question onto that colour's shapes plus a fixed share on <s>
(so the share tells the count), "ASSISTANT:" onto the key word. Vision tower (CLIP position
embeddings start from 2D sin/cos), projector and decoder are trained together from scratch.
After each epoch the held-out accuracy (split "test") is printed, overall and per question kind.

Training is deterministic for a seed and runs on one CPU thread (see `--threads`); the default
schedule (2200 steps of 16 images x 8 questions) takes under 20 minutes on the shared 2-core
development machine.

The shipped clutter-llava came from six schedules, each starting from the previous one's folder
(2 threads, 8 images per step; 25.4 + 20.2 + 8.8 + 6.6 + 28.1 + 12 minutes on the 2-core machine,
which was also running other work). Its projector reads the CLIP tower's patch embeddings
(`--vision-layers 1 --vision-feature-layer -2`: the hidden state before the one layer), so each
visual token sees only its own 4x4 pixels and a one-patch shape lives in exactly one token:

    python benchmarks/train_shapes_llava.py --task clutter --vision-layers 1 --vision-feature-layer -2 \
        --question-weights cell_colour=0.5,cell_kind=0.5 --epochs 6 --steps-per-epoch 250 \
        --images 8 --threads 2 --max-minutes 25 --out A
    python benchmarks/train_shapes_llava.py --task clutter --init A --vision-layers 1 \
        --vision-feature-layer -2 --question-weights cell_colour=0.5,cell_kind=0.5 --epochs 5 \
        --steps-per-epoch 250 --warmup 50 --images 8 --threads 2 --max-minutes 20 --seed 1 --out B
    python benchmarks/train_shapes_llava.py --task clutter --init B --vision-layers 1 \
        --vision-feature-layer -2 --lookup-layer 1 --lr 1e-3 --warmup 30 --epochs 4 \
        --steps-per-epoch 200 --images 8 --threads 2 --max-minutes 16 --seed 2 \
        --question-weights cell_colour=0.5,cell_kind=0.5 --out C
    python benchmarks/train_shapes_llava.py --task clutter --init C --vision-layers 1 \
        --vision-feature-layer -2 --lookup-layer 1 --isolate-visual --lr 1e-3 --warmup 30 --epochs 3 \
        --steps-per-epoch 200 --images 8 --threads 2 --max-minutes 12 --seed 3 \
        --question-weights cell_colour=0.5,cell_kind=0.5 --out D
    python benchmarks/train_shapes_llava.py --task clutter --init D --reset-qk 0,1 --vision-layers 1 \
        --vision-feature-layer -2 --question-weights cell_colour=0.5,cell_kind=0.5 --epochs 5 \
        --steps-per-epoch 150 --images 8 --questions 2 --threads 2 --lr 2e-3 --warmup 30 --seed 5 \
        --eval-size 128 --max-minutes 28 --out F
    python benchmarks/train_shapes_llava.py --task clutter --init F --vision-layers 1 \
        --vision-feature-layer -2 --question-weights cell_colour=0.3,cell_kind=0.7 --epochs 3 \
        --steps-per-epoch 150 --images 8 --questions 2 --threads 2 --lr 1e-3 --warmup 20 --seed 6 \
        --eval-size 128 --max-minutes 14

A to D used the image-first prompt (the task's prompt then; add `--image-first` to rerun them). The
first two learn the vision features and the lookups in decoder layer 0 (held-out 0.72 after the
first, 1.00 after the second); the third moves the lookup to layer 1 and the fourth keeps visual
tokens from reading each other in layer 0, but the answers still leaked into layer 0 (the question
words after the image could look the cell up there with little attention mass), and random deletion
of half the tokens after layer 0 cost 7 points. The task's prompt is now question-first
(`synthetic.QUESTION_FIRST_PROMPT`), which makes that leak impossible, and the last two schedules
train its routing (`question_first_loss.py`) from D's vision features and word vectors, layers 0 and
1 starting from near-uniform attention (`--reset-qk`): held-out 0.27, 0.48, 0.67, 0.86, 0.87 over
the fifth's epochs (128 questions), then 0.74, 0.95 and 0.97 over the sixth's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from question_first_loss import mixing_mass, question_first_loss  # benchmarks/, next to this script
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from fitprune_fx.testbed import shapes_model, synthetic


def evaluate(model, processor, examples, batch_size: int = 64) -> tuple[float, dict[str, float]]:
    """Overall and per-question-kind accuracy."""
    model.eval()
    preds = shapes_model.predict(model, processor, examples, batch_size)
    model.train()
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, ex in zip(preds, examples, strict=True):
        hits[ex.kind].append(p == ex.answer)
    per_kind = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / len(examples)
    return overall, per_kind


# Training draws count-of-colour questions more often than `synthetic.QUESTION_WEIGHTS` (the
# held-out sets keep those): the position kinds are learnt early, counting one colour is not.
# Clutter: colour at a cell is learnt first (epoch 3 of the first schedule), kinds and finding
# a shape later, so those are drawn more often.
TRAIN_WEIGHTS = {
    "shapes": {"cell_colour": 0.2, "cell_kind": 0.25, "count_colour": 0.35, "count_all": 0.2},
    "clutter": {"cell_colour": 0.15, "cell_kind": 0.45, "find_cell": 0.4},
}
TASKS = {"shapes": synthetic.SHAPES, "clutter": synthetic.CLUTTER}


def sample(
    rng: random.Random,
    n_images: int,
    k: int,
    task: synthetic.Task = synthetic.SHAPES,
    mix: dict | None = None,
):
    """`n_images` random images with `k` questions each: images, [n*k] questions, [n*k] answers.
    `mix`: question kind -> weight (default `TRAIN_WEIGHTS` of the task)."""
    mix = mix or TRAIN_WEIGHTS[task.name]
    kinds, weights = list(mix), list(mix.values())
    images, questions, answers, scenes = [], [], [], []
    for _ in range(n_images):
        scene = synthetic.make_scene(rng, task)
        scenes.append(scene)
        images.append(synthetic.render(scene, rng, task))
        for qkind in rng.choices(kinds, weights=weights, k=k):
            q, a = synthetic.ask(scene, rng, qkind, task)
            questions.append(q)
            answers.append(a)
    return images, questions, answers, scenes


COLOUR_IDS = {c: i + 1 for i, c in enumerate(synthetic.COLOURS)}  # 0 = no shape (or a grey one)
KIND_IDS = {k: i + 1 for i, k in enumerate(synthetic.KINDS)}


def patch_targets(images, scenes, task: synthetic.Task = synthetic.SHAPES):
    """Per-patch labels [n, P] (colour id, kind id; 0 = background or a grey distractor; cell
    index) for the auxiliary loss: a patch is labelled with its cell's shape when at least 4 of its
    16 pixels are painted; every patch is labelled with the cell it lies in. P = 144 (shapes), 576."""
    p = shapes_model.PATCH
    side = task.image_size // p  # 12 (24) patches per row
    per_cell = task.cell // p  # 4 patches per cell side
    colours = torch.zeros(len(images), side, side, dtype=torch.long)
    kinds = torch.zeros_like(colours)
    bg = torch.tensor(synthetic.BACKGROUND)
    for b, (img, scene) in enumerate(zip(images, scenes, strict=True)):
        px = torch.from_numpy(np.array(img)).long()  # [side*4, side*4, 3]
        painted = (px != bg).any(-1).float()
        covered = painted.reshape(side, p, side, p).sum((1, 3)) >= 4  # [side, side]
        for (r, c), (colour, kind) in scene.items():
            if colour not in COLOUR_IDS:  # distractor: background for the labels
                continue
            rows = slice(r * per_cell, (r + 1) * per_cell)
            cols = slice(c * per_cell, (c + 1) * per_cell)
            colours[b, rows, cols] = COLOUR_IDS[colour] * covered[rows, cols]
            kinds[b, rows, cols] = KIND_IDS[kind] * covered[rows, cols]
    idx = torch.arange(side) // per_cell  # cell row/column of each patch row/column
    cells = (idx[:, None] * task.grid + idx[None, :]).flatten()  # [P]
    return colours.flatten(1), kinds.flatten(1), cells.expand(len(images), -1)


def shared_prefix_loss(
    model,
    processor,
    rng: random.Random,
    n_images: int,
    k: int,
    aux_head=None,
    aux_weight: float = 0.0,
    attn_weight: float = 0.0,
    task: synthetic.Task = synthetic.SHAPES,
    mix: dict | None = None,
    lookup_layer: int = 0,
    isolate_visual: bool = False,
) -> torch.Tensor:
    """Answer-token cross-entropy for k questions per image, sharing the image prefix.

    The prompt "<s> USER: <image>x144 {question} ASSISTANT:" is split after the image tokens:
    the prefix (same length for every image) runs once per image, its KV cache is repeated k
    times, and the k question suffixes (right-padded, so causal attention never sees the pads)
    run on top. The result equals running each full prompt separately, at a fraction of the cost.
    With `aux_head`, adds a per-visual-token loss: the projected token must tell the colour and
    kind painted in its patch and the cell it lies in (dense supervision that gets the vision
    tower going quickly and makes "which cell" linearly readable for the decoder's lookups).
    With `attn_weight` (needs eager attention), adds `lookup_attention_loss`. With
    `isolate_visual`, adds `visual_mixing_loss` for the layers before `lookup_layer`.
    """
    images, questions, answers, scenes = sample(rng, n_images, k, task, mix)
    tok = processor.tokenizer
    prefix = processor(images=images, text=["USER: <image>"] * n_images, return_tensors="pt")
    suffix = tok(
        [q + " ASSISTANT:" for q in questions],
        add_special_tokens=False,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    out = model(**prefix, use_cache=True, output_attentions=isolate_visual)  # cache [n, H, 146, D] per layer
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)  # [n*k, H, 146, D]
    sfx = model(input_ids=suffix["input_ids"], past_key_values=cache, output_attentions=attn_weight > 0)
    last = suffix["attention_mask"].sum(1) - 1  # position of "ASSISTANT:" in each suffix
    logits = sfx.logits[torch.arange(len(questions)), last]  # [n*k, V]
    target = torch.tensor(tok.convert_tokens_to_ids(answers))
    loss = F.cross_entropy(logits, target)
    targets = patch_targets(images, scenes, task)  # colours, kinds, cells: [n, P] each
    if attn_weight > 0:
        first_image = int((prefix["input_ids"][0] == shapes_model.IMAGE_ID).nonzero()[0])
        loss = loss + attn_weight * lookup_attention_loss(
            sfx.attentions, questions, last, targets, k, first_image, task, lookup_layer
        )
    if isolate_visual and lookup_layer > 0:
        first_image = int((prefix["input_ids"][0] == shapes_model.IMAGE_ID).nonzero()[0])
        loss = loss + visual_mixing_loss(out.attentions[:lookup_layer], first_image, targets[0].shape[1])
    if aux_head is not None:
        feats = out.image_hidden_states  # [n, P, h], or one [P, h] per image (transformers >= 5.24)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(n_images, -1, aux_head[0].in_features)
        logits = aux_logits(model, tok, aux_head, feats, task)
        labels = list(targets) + [targets[2]] * (len(logits) - len(targets))  # cells read out too
        aux = sum(
            F.cross_entropy(lg.flatten(0, 1), t.flatten()) for lg, t in zip(logits, labels, strict=True)
        )
        loss = loss + aux_weight * aux
    return loss


def visual_mixing_loss(attentions: tuple[torch.Tensor, ...], first_image: int, n_img: int) -> torch.Tensor:
    """Attention mass that visual tokens put on other visual tokens (not themselves), mean per query,
    summed over heads and layers: driven to 0, each token keeps to its own patch until the lookup
    layer, so a deleted token's content is nowhere else. `attentions[l]` is [n, H, L, L]."""
    img = (first_image + torch.arange(n_img)).expand(attentions[0].shape[0], -1)  # [n, P]
    return sum(mixing_mass(a, img) for a in attentions)


def lookup_attention_loss(
    attentions: tuple[torch.Tensor, ...],
    questions: list[str],
    last: torch.Tensor,
    targets: tuple[torch.Tensor, ...],
    k: int,
    first_image: int,
    task: synthetic.Task = synthetic.SHAPES,
    lookup_layer: int = 0,
) -> torch.Tensor:
    """Guide the hops of position, count-of-colour and find questions.

    Position ("what colour is the shape at top-left ?"): layer 0, head 0: the cell-name token
    puts its attention on the painted patches of that cell. Count of colour ("how many red shapes
    are there ?"): layer 0, head 1: the colour word attends to the first token (<s>) with weight 1
    and to every shape of that colour with weight 1 (spread over its painted patches), normalised,
    so the share left on <s> is 1 / (1 + count) and the head's output tells the count. Layer 1,
    head 0: "ASSISTANT:" puts its attention on the key word (cell name or colour). Losses: -log
    of the attention mass on the target positions (hop 0 of position questions, hop 1), cross-
    entropy to the target distribution (counting). `attentions[l]` is [n*k, H, L, 146 + L] (suffix
    queries over prefix + suffix keys); `targets` as returned by `patch_targets` for the n images.
    Find ("where is the red circle ?", clutter): layer 1, head 1: the kind word (which has seen the
    colour word before it) puts its attention on that shape's patches; layer 2, head 0:
    "ASSISTANT:" on the kind word.
    """
    colours, kinds, cells = targets  # [n, P] each
    rows, name_pos, cell_idx = [], [], []  # position questions
    c_rows, c_pos, c_col = [], [], []  # count-of-colour questions
    f_rows, f_pos, f_colour, f_kind = [], [], [], []  # find questions
    for i, q in enumerate(questions):
        words = q.split()
        if words[0] == "where":  # where is the <colour> <kind> ?
            f_rows.append(i)
            f_pos.append(4)
            f_colour.append(COLOUR_IDS[words[3]])
            f_kind.append(KIND_IDS[words[4]])
            continue
        for j, w in enumerate(words):
            if w in task.cell_names:
                rows.append(i)
                name_pos.append(j)
                cell_idx.append(task.cell_names.index(w))
            elif w in synthetic.COLOURS and words[0] == "how":
                c_rows.append(i)
                c_pos.append(j)
                c_col.append(COLOUR_IDS[w])
    n_img = colours.shape[1]
    n_prefix = attentions[1].shape[-1] - attentions[1].shape[-2]
    loss = torch.zeros(())
    if rows:
        rows_t, pos_t, cell_t = torch.tensor(rows), torch.tensor(name_pos), torch.tensor(cell_idx)
        a0 = attentions[lookup_layer][rows_t, 0, pos_t, first_image : first_image + n_img]  # [m, P]
        img = rows_t // k
        on_shape = (cells[img] == cell_t[:, None]) & (colours[img] > 0)  # [m, 144]
        loss = loss - torch.log((a0 * on_shape).sum(-1) + 1e-6).mean()
    if c_rows:
        rows_t, pos_t, col_t = torch.tensor(c_rows), torch.tensor(c_pos), torch.tensor(c_col)
        img = rows_t // k
        mask = (colours[img] == col_t[:, None]).float()  # [m, 144]
        per_cell = torch.zeros(len(c_rows), task.grid**2).scatter_add_(1, cells[img], mask)
        share = mask / per_cell.gather(1, cells[img]).clamp(min=1)  # 1 per shape, over its patches
        weights = torch.cat([torch.ones(len(c_rows), 1), share], 1)  # [m, 1 + 144]: <s>, patches
        target = weights / weights.sum(-1, keepdim=True)
        att = attentions[lookup_layer][rows_t, 1, pos_t]  # [m, keys]
        att = torch.cat([att[:, :1], att[:, first_image : first_image + n_img]], 1)
        loss = loss - (target * torch.log(att + 1e-6)).sum(-1).mean()
        rows, name_pos = rows + c_rows, name_pos + c_pos
    if rows:
        rows_t, pos_t = torch.tensor(rows), torch.tensor(name_pos)
        a1 = attentions[lookup_layer + 1][rows_t, 0, last[rows_t], n_prefix + pos_t]  # [m]
        loss = loss - torch.log(a1 + 1e-6).mean()
    if lookup_layer > 0:  # no question word reads the image before the lookup layer
        early = torch.stack(
            [a[:, :, :, first_image : first_image + n_img].sum(-1) for a in attentions[:lookup_layer]]
        )
        loss = loss + early.mean() * early.shape[2]  # mean image mass per query, summed over heads
    if f_rows:
        rows_t, pos_t = torch.tensor(f_rows), torch.tensor(f_pos)
        img = rows_t // k
        target = (colours[img] == torch.tensor(f_colour)[:, None]) & (
            kinds[img] == torch.tensor(f_kind)[:, None]
        )
        a1 = attentions[lookup_layer + 1][rows_t, 1, pos_t, first_image : first_image + n_img]  # [m, P]
        loss = loss - torch.log((a1 * target).sum(-1) + 1e-6).mean()
        a2 = attentions[lookup_layer + 2][rows_t, 0, last[rows_t], n_prefix + pos_t]  # [m]
        loss = loss - torch.log(a2 + 1e-6).mean()
    return loss


def aux_logits(model, tok, aux_head, feats: torch.Tensor, task: synthetic.Task = synthetic.SHAPES):
    """Per-patch logits [n, P, C] for colour (background + 4), kind (background + 4) and cell (9;
    36 for clutter, which also reads the cell out through `lm_head`: its find answers are cells).

    The class vectors are tied to the decoder's own word vectors: colour and kind to the rows of
    `lm_head` of the answer words, cell to the input embeddings of the cell names. So a visual
    token that says "red" already points to where the answer "red" is read out, and a visual
    token of cell "top-left" already resembles the question word "top-left": the decoder's
    lookups start from a similarity instead of having to be discovered. `aux_head` holds only
    the background scores (Linear h -> 1 for colour and for kind).
    """
    out_w = model.lm_head.weight  # [V, h]
    in_w = model.get_input_embeddings().weight  # [V, h]
    colour_ids = tok.convert_tokens_to_ids(list(synthetic.COLOURS))
    kind_ids = tok.convert_tokens_to_ids(list(synthetic.KINDS))
    cell_ids = tok.convert_tokens_to_ids(list(task.cell_names))
    colour = torch.cat([aux_head[0](feats), feats @ out_w[colour_ids].T], -1)  # [n, P, 5]
    kind = torch.cat([aux_head[1](feats), feats @ out_w[kind_ids].T], -1)  # [n, P, 5]
    cell = feats @ in_w[cell_ids].T  # [n, P, cells]
    if task.unique_pairs:  # clutter: "where is ...?" answers are cell names
        return [colour, kind, cell, feats @ out_w[cell_ids].T]
    return [colour, kind, cell]


def init_2d_positions(model) -> None:
    """Start the CLIP position embeddings from fixed 2D sin/cos features of (row, col), so
    that patches know where they are from step 0 (they stay trainable)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # older transformers wrap the CLIP model
    emb = tower.embeddings.position_embedding.weight  # [1+P, C], row 0 is CLS
    n, c = emb.shape
    side = int(round((n - 1) ** 0.5))
    rows = torch.arange(n - 1) // side
    cols = torch.arange(n - 1) % side
    freqs = 1.0 / (100.0 ** (torch.arange(c // 4) / (c // 4)))  # [C/4]
    feats = [f(pos[:, None] * freqs) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    with torch.no_grad():
        emb[1:] = torch.cat(feats, dim=1)  # [P, C]
        emb[0] = 0.0  # CLS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="shapes")
    ap.add_argument("--out", default=None, help="default: the shipped folder of the task")
    ap.add_argument("--epochs", type=int, default=11)
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--images", type=int, default=16, help="images per step")
    ap.add_argument("--questions", type=int, default=8, help="questions per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--vision-lr-mult", type=float, default=3.0, help="LR multiplier of the CLIP tower")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument(
        "--vision-feature-layer",
        type=int,
        default=-1,
        help="CLIP hidden state the projector reads; -2 with --vision-layers 1 = patch embeddings only, "
        "so no visual token sees another's pixels (clutter)",
    )
    ap.add_argument("--eval-size", type=int, default=256)
    # One thread: on the shared 2-core machine (load average ~5-6 from other jobs) one step took
    # 1.0-1.1 s with 1 thread and 11 s with 2 threads (oversubscription); results are identical.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=19.3, help="stop early and save")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="start from this saved model folder (a second schedule)")
    ap.add_argument(
        "--lookup-layer",
        type=int,
        default=0,
        help="decoder layer of the guided lookups; > 0 also penalises question words reading the "
        "image before it (clutter: 1, so that tokens deleted after layer 0 are missed)",
    )
    ap.add_argument(
        "--isolate-visual",
        action="store_true",
        help="with --lookup-layer > 0, also penalise visual tokens reading other visual tokens before "
        "the lookup layer (clutter: no copy of a shape survives its token's deletion)",
    )
    ap.add_argument(
        "--question-weights",
        default=None,
        help="training mix, e.g. cell_colour=0.25,cell_kind=0.75 (default: TRAIN_WEIGHTS of the task)",
    )
    ap.add_argument(
        "--image-first",
        action="store_true",
        help="train on the image-first prompt (synthetic.PROMPT) whatever the task's own prompt",
    )
    ap.add_argument(
        "--reset-qk",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="re-initialise the query/key projections of these decoder layers (e.g. 0,1) after --init, so "
        "that a changed routing (clutter's question-first prompt) starts from near-uniform attention",
    )
    ap.add_argument("--aux-weight", type=float, default=1.0, help="per-patch auxiliary loss")
    ap.add_argument("--attn-weight", type=float, default=0.5, help="lookup attention loss (0: off)")
    ap.add_argument(
        "--sincos-positions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="2D sin/cos init of the CLIP position embeddings",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    task = TASKS[args.task]
    if args.image_first:
        task = dataclasses.replace(task, prompt=synthetic.PROMPT)
    mix = None
    if args.question_weights:
        mix = {k: float(v) for k, v in (item.split("=") for item in args.question_weights.split(","))}
    processor = shapes_model.build_processor(task)
    model = shapes_model.build_model(
        task=task,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        vision_layers=args.vision_layers,
        vision_hidden=args.vision_hidden,
        vision_feature_layer=args.vision_feature_layer,
        seed=args.seed,
    ).train()
    if args.init:  # continue from saved weights (same task and sizes), with a fresh schedule
        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(args.init).state_dict())
    elif args.sincos_positions:
        init_2d_positions(model)
    for layer in args.reset_qk:  # a new routing: start these layers' attention near uniform
        attn = model.model.language_model.layers[layer].self_attn
        for proj in (attn.q_proj, attn.k_proj):
            torch.nn.init.normal_(proj.weight, std=0.02)
    if args.attn_weight > 0:
        model.set_attn_implementation("eager")  # the lookup loss reads attention weights
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M")
    held_out = synthetic.make_dataset(args.eval_size, seed=args.seed, split="test", task=task)

    # Training-only heads for the per-patch auxiliary loss (not saved with the model).
    aux_head = torch.nn.ModuleList([torch.nn.Linear(args.hidden, 1) for _ in range(2)])
    vision = set(map(id, model.model.vision_tower.parameters()))
    groups = []  # (weight decay, LR multiplier): the vision tower learns faster
    for p in list(model.parameters()) + list(aux_head.parameters()):
        key = (0.05 if p.dim() >= 2 else 0.0, args.vision_lr_mult if id(p) in vision else 1.0)
        for g in groups:
            if (g["weight_decay"], g["lr_mult"]) == key:
                g["params"].append(p)
                break
        else:
            groups.append({"params": [p], "weight_decay": key[0], "lr_mult": key[1]})
    opt = torch.optim.AdamW(
        groups,
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    total = args.epochs * args.steps_per_epoch

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 5%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(total - args.warmup, 1)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for _ in bar:
            if task.question_first:
                loss = question_first_loss(
                    model, processor, rng, args.images, args.questions, sample, patch_targets,
                    aux_head, args.aux_weight, args.attn_weight, task, mix, aux_logits,
                )  # fmt: skip
            else:
                loss = shared_prefix_loss(
                    model,
                    processor,
                    rng,
                    args.images,
                    args.questions,
                    aux_head,
                    args.aux_weight,
                    args.attn_weight,
                    task,
                    mix,
                    args.lookup_layer,
                    args.isolate_visual,
                )
            for g in opt.param_groups:
                g["lr"] = lr_at(step) * g["lr_mult"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step):.1e}")
            if time.time() - start > args.max_minutes * 60:
                break
        acc, per_kind = evaluate(model, processor, held_out)
        kinds = " ".join(f"{k}={v:.2f}" for k, v in per_kind.items())
        minutes = (time.time() - start) / 60
        print(f"epoch {epoch + 1}: held-out accuracy {acc:.3f} ({kinds}) [{minutes:.1f} min]")
        if time.time() - start > args.max_minutes * 60:
            print("time limit reached")
            break

    out = Path(args.out or shapes_model.MODEL_DIRS[task.name])
    out.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("sdpa")
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved to {out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
