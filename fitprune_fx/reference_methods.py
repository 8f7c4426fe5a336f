"""Eager references of the published methods' scorers (the test oracle of `passes/method_scorers`).

One example at a time, over the tokens present at a pruning layer, written from the methods'
definitions with loops and boolean indexing; nothing here is shared with the pass. Each function
returns the scores of the visual tokens in position order ([n] fp32); the reference deletes the
lowest first, ties to the lower position (`reference.lowest_first`).

Definitions (the spec the pass's scorers must match):
  * "last_token": for each head, the last non-padding row's probabilities at the visual columns,
    divided by their sum (a softmax over the visual keys alone); the mean over heads.
  * "text_raters": A = head mean of the probabilities; instruction rows T (non-visual, non-padding,
    after the last visual token); relevance r_t = mean of A[t, visual]; raters = {t in T : r_t >=
    mean of r over T}; score = mean over raters of A[t, visual]. No instruction rows: all zeros.
  * "duplication": p = options "pivots" (default 8) pivots, picked one at a time as the visual token
    of largest squared key norm (all kv heads; the first on ties) not yet picked; score = 2 for a
    pivot, else minus the largest cosine similarity of its hidden state (entering the layer) to a
    pivot's.
"""

from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("last_token", "text_raters", "duplication")
NEEDS_LAYER_STATE = ("duplication",)  # reads hidden states and keys, not only probabilities


def score_method(
    name: str,
    probs: Tensor,
    visual: Tensor,
    valid: Tensor,
    options: dict,
    hidden: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Scores [n] of the visual rows of one example. probs: [H, L, L] fp32; visual, valid: [L] bool;
    hidden: [L, C] the residual stream entering the layer; keys: [Hkv, L, D] post-RoPE."""
    vis = [int(i) for i in visual.nonzero().flatten()]
    if name == "last_token":
        last = int(valid.nonzero().flatten()[-1])
        per_head = []
        for h in range(probs.shape[0]):
            row = probs[h, last, vis]
            per_head.append(row / row.sum())
        return torch.stack(per_head).mean(dim=0)
    if name == "text_raters":
        mean = probs.mean(dim=0)  # [L, L]
        text = [t for t in range(vis[-1] + 1, visual.numel()) if valid[t] and not visual[t]]
        if not text:
            return torch.zeros(len(vis))
        relevance = {t: float(mean[t, vis].mean()) for t in text}
        threshold = sum(relevance.values()) / len(text)
        raters = [t for t in text if relevance[t] >= threshold]
        return torch.stack([mean[t, vis] for t in raters]).mean(dim=0)
    if name == "duplication":
        if hidden is None or keys is None:
            raise ValueError("the duplication reference needs the layer's hidden states and keys")
        norms = {j: float(keys[:, j].float().pow(2).sum()) for j in vis}
        pivots: list[int] = []
        for _ in range(min(int(options.get("pivots", 8)), len(vis))):
            best = max((j for j in vis if j not in pivots), key=lambda j: (norms[j], -j))
            pivots.append(best)
        scores = []
        for j in vis:
            if j in pivots:
                scores.append(2.0)
                continue
            sims = [torch.cosine_similarity(hidden[j].float(), hidden[p].float(), dim=0) for p in pivots]
            scores.append(-float(max(sims)))
        return torch.tensor(scores)
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")
