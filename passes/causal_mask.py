"""Give a maskless causal decoder graph a 4-D mask, so that a batch of different visual counts can
be compacted with void slots.

transformers hands SDPA no mask when nothing is padded (`is_causal=True` instead): `generate`
builds its masks outside the compiled forward and skips them for an all-ones attention mask. A
batch whose examples carry different visual counts (images of different sizes, prompts of equal
length) is then compacted with void slots (`padded_compaction`), which need a mask to hide the
void columns from the later layers. This pass writes the mask SDPA's `is_causal` stands for:
[B, 1, S, S] bool, lower-triangular, made from the residual stream entering layer 0 (its batch
and length, static or symbolic), passed to every layer's SDPA with `is_causal=False`. The
attention is the same; the mask is then a per-token tensor like transformers' own.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .locate import DecoderGraph, PerTokenTensor, example_value


def causal_mask_like(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i may attend key j <= i; tokens [B, S, ...]."""
    b, s = tokens.shape[0], tokens.shape[1]
    causal = torch.ones((s, s), dtype=torch.bool, device=tokens.device).tril()
    return causal.expand(b, 1, s, s)


def needs_causal_mask(dec: DecoderGraph) -> bool:
    """Every layer's attention is causal by SDPA's flag alone, and no per-token mask exists."""
    return (
        not dec.continues
        and all(s.attn_mask is None and s.is_causal for s in dec.sites.values())
        and not any(t.role.startswith("attention_mask") for t in dec.per_token)
    )


def insert_causal_mask(graph: fx.Graph, dec: DecoderGraph, fake_mode) -> fx.Node:
    """Insert the mask after the image merge, hand it to every layer's SDPA (`is_causal=False`),
    and record it in `dec` (sites, per-token tensors). Returns the mask node."""
    with graph.inserting_after(dec.merge):
        mask = graph.call_function(causal_mask_like, (dec.merge,))
    with fake_mode:
        mask.meta["example_value"] = causal_mask_like(example_value(dec.merge))
    mask.meta["val"] = mask.meta["example_value"]
    for layer, site in dec.sites.items():
        sdpa = site.sdpa
        args = list(sdpa.args)
        if len(args) > 3:
            args[3] = mask
        else:
            sdpa.update_kwarg("attn_mask", mask)
        if len(args) > 5:
            args[5] = False
        else:
            sdpa.update_kwarg("is_causal", False)
        sdpa.args = tuple(args)
        dec.sites[layer] = dataclasses.replace(site, attn_mask=mask, is_causal=False)
    dec.per_token.append(PerTokenTensor(mask, (2, 3), "attention_mask"))
    return mask
