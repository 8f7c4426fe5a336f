"""Train `shapes-llava` from scratch on the synthetic shapes QA task and save it.

    python benchmarks/train_shapes_llava.py                  # writes fitprune_fx/models/shapes-llava
    python benchmarks/train_shapes_llava.py --epochs 2 --steps-per-epoch 20 --out /tmp/shapes

Every step draws fresh images from the generator (no image is seen twice), several questions per
image. The loss is the cross-entropy of the single answer token, predicted at the last prompt
position ("ASSISTANT:"), plus a per-visual-token auxiliary loss (colour and kind painted in each
patch, through a throw-away linear head). Vision tower (CLIP position embeddings start from 2D
sin/cos), projector and decoder are trained together from scratch. After each epoch the
held-out accuracy (split "test") is printed, overall and per question kind.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fitprune_fx import shapes_model, synthetic


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


def sample(rng: random.Random, n_images: int, k: int):
    """`n_images` random images with `k` questions each: images, [n*k] questions, [n*k] answers."""
    kinds, weights = list(synthetic.QUESTION_WEIGHTS), list(synthetic.QUESTION_WEIGHTS.values())
    images, questions, answers, scenes = [], [], [], []
    for _ in range(n_images):
        scene = synthetic.make_scene(rng)
        scenes.append(scene)
        images.append(synthetic.render(scene, rng))
        for qkind in rng.choices(kinds, weights=weights, k=k):
            q, a = synthetic.ask(scene, rng, qkind)
            questions.append(q)
            answers.append(a)
    return images, questions, answers, scenes


COLOUR_IDS = {c: i + 1 for i, c in enumerate(synthetic.COLOURS)}  # 0 = no shape
KIND_IDS = {k: i + 1 for i, k in enumerate(synthetic.KINDS)}


def patch_targets(images, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch labels [n, 144] (colour id, kind id; 0 = background) for the auxiliary loss:
    a patch is labelled with its cell's shape when at least 4 of its 16 pixels are painted."""
    p = shapes_model.PATCH
    side = synthetic.IMAGE_SIZE // p  # 12 patches per row
    per_cell = synthetic.CELL // p  # 4 patches per cell side
    colours = torch.zeros(len(images), side, side, dtype=torch.long)
    kinds = torch.zeros_like(colours)
    bg = torch.tensor(synthetic.BACKGROUND)
    for b, (img, scene) in enumerate(zip(images, scenes, strict=True)):
        px = torch.from_numpy(np.array(img)).long()  # [48, 48, 3]
        painted = (px != bg).any(-1).float()  # [48, 48]
        covered = painted.reshape(side, p, side, p).sum((1, 3)) >= 4  # [12, 12]
        for (r, c), (colour, kind) in scene.items():
            rows = slice(r * per_cell, (r + 1) * per_cell)
            cols = slice(c * per_cell, (c + 1) * per_cell)
            colours[b, rows, cols] = COLOUR_IDS[colour] * covered[rows, cols]
            kinds[b, rows, cols] = KIND_IDS[kind] * covered[rows, cols]
    return colours.flatten(1), kinds.flatten(1)


def shared_prefix_loss(
    model,
    processor,
    rng: random.Random,
    n_images: int,
    k: int,
    aux_head=None,
    aux_weight: float = 0.0,
) -> torch.Tensor:
    """Answer-token cross-entropy for k questions per image, sharing the image prefix.

    The prompt "<s> USER: <image>x144 {question} ASSISTANT:" is split after the image tokens:
    the prefix (same length for every image) runs once per image, its KV cache is repeated k
    times, and the k question suffixes (right-padded, so causal attention never sees the pads)
    run on top. The result equals running each full prompt separately, at a fraction of the cost.
    With `aux_head`, adds a per-visual-token loss: the projected token must tell the colour and
    kind painted in its patch (dense supervision that gets the vision tower going quickly).
    """
    images, questions, answers, scenes = sample(rng, n_images, k)
    tok = processor.tokenizer
    prefix = processor(images=images, text=["USER: <image>"] * n_images, return_tensors="pt")
    suffix = tok(
        [q + " ASSISTANT:" for q in questions],
        add_special_tokens=False,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    out = model(**prefix, use_cache=True)  # ids [n, 146] -> cache [n, H, 146, D] per layer
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)  # [n*k, H, 146, D]
    logits = model(input_ids=suffix["input_ids"], past_key_values=cache).logits  # [n*k, L, V]
    last = suffix["attention_mask"].sum(1) - 1  # position of "ASSISTANT:" in each suffix
    logits = logits[torch.arange(len(questions)), last]  # [n*k, V]
    target = torch.tensor(tok.convert_tokens_to_ids(answers))
    loss = F.cross_entropy(logits, target)
    if aux_head is not None:
        feats = out.image_hidden_states.reshape(n_images, -1, aux_head[0].in_features)  # [n, 144, h]
        colours, kinds = patch_targets(images, scenes)  # [n, 144] each
        aux = F.cross_entropy(aux_head[0](feats).flatten(0, 1), colours.flatten())
        aux = aux + F.cross_entropy(aux_head[1](feats).flatten(0, 1), kinds.flatten())
        loss = loss + aux_weight * aux
    return loss


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
    ap.add_argument("--out", default=str(shapes_model.MODEL_DIR))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--images", type=int, default=32, help="images per step")
    ap.add_argument("--questions", type=int, default=4, help="questions per image")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=256)
    # One thread: on a shared 2-core machine, 2 threads ran 3-4x slower per step than 1.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=19.3, help="stop early and save")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-weight", type=float, default=1.0, help="per-patch auxiliary loss")
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
    processor = shapes_model.build_processor()
    model = shapes_model.build_model(
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        vision_layers=args.vision_layers,
        vision_hidden=args.vision_hidden,
        seed=args.seed,
    ).train()
    if args.sincos_positions:
        init_2d_positions(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M")
    held_out = synthetic.make_dataset(args.eval_size, seed=args.seed, split="test")

    # Training-only heads for the per-patch auxiliary loss (not saved with the model).
    n_cls = len(synthetic.COLOURS) + 1, len(synthetic.KINDS) + 1
    aux_head = torch.nn.ModuleList([torch.nn.Linear(args.hidden, n) for n in n_cls])
    params = list(model.parameters()) + list(aux_head.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
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
            loss = shared_prefix_loss(
                model, processor, rng, args.images, args.questions, aux_head, args.aux_weight
            )
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved to {out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
