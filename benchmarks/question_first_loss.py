"""Training loss of a question-first task (clutter-llava): "USER: {question} <image> ASSISTANT:".

With the question before the image, the image tokens cannot share one prefix across questions (each
question changes what follows it), so every (image, question) pair runs as its own prompt. The
routing the guidance loss asks for, in decoder layers:

    layer 0, head 0: the visual token of the asked shape reads the cell word of the question (its
                     query knows its own cell: a content match), which marks it as the asked one;
    layer 1, head 0: "ASSISTANT:" reads the marked token, and with it the shape's colour and kind.

"ASSISTANT:" cannot look the answer up in layer 0 (its query there knows only its own word), and
a penalty keeps visual tokens from reading other visual tokens in layer 0 (`mixing_mass`), so the
answer stays in that one token until layer 1: a visual token deleted after layer 0 takes its shape
with it.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from fitprune_fx.testbed import shapes_model, synthetic


def image_positions(input_ids: torch.Tensor, n_img: int) -> torch.Tensor:
    """[B, P] positions of each prompt's visual tokens (they start at different places: the
    questions differ in length and the batch is left-padded)."""
    first = (input_ids == shapes_model.IMAGE_ID).int().argmax(1)  # [B]
    return first[:, None] + torch.arange(n_img)


def mixing_mass(attention: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Mean attention mass a visual token puts on other visual tokens, summed over heads.
    `attention` [B, H, L, L], `img` [B, P] visual positions."""
    rows = torch.arange(len(img))[:, None, None]
    block = attention.permute(0, 2, 3, 1)[rows, img[:, :, None], img[:, None, :]]  # [B, P, P, H]
    others = block.sum(2) - block.diagonal(dim1=1, dim2=2).transpose(1, 2)  # [B, P, H]
    return others.mean() * attention.shape[1]


def question_first_loss(
    model,
    processor,
    rng: random.Random,
    n_images: int,
    k: int,
    sample,
    patch_targets,
    aux_head=None,
    aux_weight: float = 0.0,
    attn_weight: float = 0.0,
    task: synthetic.Task = synthetic.CLUTTER,
    mix: dict | None = None,
    aux_logits=None,
) -> torch.Tensor:
    """Answer cross-entropy of n_images x k prompts, plus the guidance above (`attn_weight`, needs
    eager attention) and the per-patch auxiliary loss (`aux_head`, on the first prompt of each image).
    `sample`, `patch_targets` and `aux_logits` are the training script's."""
    images, questions, answers, scenes = sample(rng, n_images, k, task, mix)
    texts = [task.prompt.format(question=q) for q in questions]
    batch = processor(
        images=[im for im in images for _ in range(k)], text=texts, return_tensors="pt", padding=True
    )
    out = model(**batch, output_attentions=attn_weight > 0, logits_to_keep=1)
    tok = processor.tokenizer
    target = torch.tensor(tok.convert_tokens_to_ids(answers))
    loss = F.cross_entropy(out.logits[:, -1], target)
    colours, kinds, cells = patch_targets(images, scenes, task)  # [n, P] each
    n_img = colours.shape[1]
    if attn_weight > 0:
        att = out.attentions  # per layer [n*k, H, L, L]; the last position is "ASSISTANT:"
        img = image_positions(batch["input_ids"], n_img)  # [n*k, P]
        rows = torch.arange(len(questions))
        cell_ids = torch.tensor(tok.convert_tokens_to_ids(list(task.cell_names)))
        is_cell = torch.isin(batch["input_ids"], cell_ids)  # one cell word per question
        word = is_cell.int().argmax(1)  # [n*k]
        cell = (cell_ids[:, None] == batch["input_ids"][rows, word]).int().argmax(0)  # cell index
        image = rows // k
        on_shape = (cells[image] == cell[:, None]) & (colours[image] > 0)  # [n*k, P]: one patch
        shape = img[rows, on_shape.int().argmax(1)]  # [n*k] position of the asked shape's token
        hop0 = att[0][rows, 0, shape, word]  # the asked shape's token on the cell word
        hop1 = att[1][rows, 0, -1, shape]  # "ASSISTANT:" on the asked shape's token
        guide = -torch.log(hop0 + 1e-6).mean() - torch.log(hop1 + 1e-6).mean()
        loss = loss + attn_weight * guide + mixing_mass(att[0], img)
    if aux_head is not None:
        feats = out.image_hidden_states  # [n*k, P, h], or one [P, h] per image
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(n_images, k, n_img, -1)[:, 0]
        logits = aux_logits(model, tok, aux_head, feats, task)
        labels = [colours, kinds, cells] + [cells] * (len(logits) - 3)
        aux = sum(
            F.cross_entropy(lg.flatten(0, 1), t.flatten()) for lg, t in zip(logits, labels, strict=True)
        )
        loss = loss + aux_weight * aux
    return loss
