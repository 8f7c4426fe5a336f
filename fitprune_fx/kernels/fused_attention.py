"""`fitprune::attention_with_mass`: a pruning layer's attention output and FitPrune's mass in one op.

At a layer that scores tokens, FitPrune needs the softmax probabilities the layer's attention
computes anyway. On CPU the SDPA kernel returns neither them nor its log-sum-exp, so scoring used
to recompute QK^T and the softmax next to SDPA: about one more attention per pruning layer. This
op computes the probabilities once per chunk of query rows and derives both

    out[b, h, i]  = sum over j of P[b, h, i, j] v[b, h // G, j]          (the attention output)
    cross, selfsum                                                       (as `visual_attention_mass`)

CPU: chunked PyTorch, fp32 softmax. With `causal`, a chunk of rows ending at row r reads keys
0..r only (the rest are masked), and chunks of a few dozen rows (little masked work, matmuls still
large enough) make it about as fast as SDPA alone or faster at the sizes measured (`CHUNK_ROWS`).
CUDA: torch's fused attention kernel returning its log-sum-exp (`sdpa_lse.py`), then one Triton
mass kernel over visual columns and the sum of its partials, so the GPU output is SDPA's own and
the scoring costs two launches beside the attention. The op is not differentiable: the pass
uses it only when the query does not require grad (inference).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_mass import (
    CHUNK_ELEMENTS,
    CHUNK_ROWS,
    _triton_unusable,
    allowed_mask,
    chunk_probabilities,
    cuda_attention_mass,
    repeat_kv,
    rows_per_chunk,
    triton_wins,
)
from .sdpa_lse import checked_sdpa_with_lse

# Row chunks as in `attention_mass.py` (CHUNK_ROWS). Timed alone on 1 CPU thread over the 70
# recipe's token counts (642 ... 155, `benchmarks/speed.py` small width): 8 heads of 64, 25.3 ms for
# 8 layers against SDPA's 26.1 (2^19-element chunks, which at 356 / 261 tokens gave 184 / 251 rows:
# 34.3 ms); 32 heads of 128 at 642 / 356 / 229 / 155 tokens, 113.4 ms against SDPA's 145.2 (2^19:
# 126.9). Inside the compiled small-width prefill the 8 calls took 26.6 ms against 28.0 (2^19).

_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor instruction, Tensor visual, "
    "float scale, bool sdpa_is_causal, bool causal) -> (Tensor, Tensor, Tensor)"
)


def torch_attention_with_mass(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    causal: bool,
    chunk_elements: int = CHUNK_ELEMENTS,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, H, S, Dv] in the query's dtype, cross [B, S], selfsum [B, S] fp32).

    query [B, H, S, D], key / value [B, Hkv, S, D|Dv]; `attn_mask` [B|1, 1|H, S, S] bool or additive;
    `causal` adds causality (exact when the mask is causal already) and lets each chunk skip the
    keys after its last row. Fully masked rows (padding queries) give zeros in all three outputs.
    """
    b, h, s, _ = query.shape
    k_t = repeat_kv(key.float(), h).transpose(-1, -2)  # [B, H, D, S]
    v = repeat_kv(value.float(), h)  # [B, H, S, Dv]
    allowed = allowed_mask(attn_mask, causal, s, query.device)  # [B|1, 1|H, S, S]
    weights = torch.stack([instruction, visual], dim=1).float()  # [B, 2, S]: (cross, self) row weights
    out = torch.empty((b, h, s, v.shape[-1]), dtype=torch.float32, device=query.device)
    mass = torch.zeros((b, 2, s), dtype=torch.float32, device=query.device)
    rows = rows_per_chunk(b, h, s, chunk_elements, chunk_rows)
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        n = r1 if causal else s  # keys this chunk can see
        probs, ok = chunk_probabilities(query, k_t, allowed, attn_mask, scale, r0, r1, n)  # [B, H, R, n]
        if not bool(ok.any(dim=-1).all()):  # fully masked rows (padding queries): NaN -> 0
            probs = torch.nan_to_num(probs, nan=0.0)
        out[:, :, r0:r1] = torch.matmul(probs, v[:, :, :n])
        head_max = probs.amax(dim=1)  # [B, R, n]: max over heads before the sum over rows
        mass[:, :, :n] += torch.bmm(weights[:, :, r0:r1], head_max)
    return out.to(query.dtype), mass[:, 0].clone(), mass[:, 1].clone()


@torch.library.custom_op("fitprune::attention_with_mass", mutates_args=(), schema=_SCHEMA)
def attention_with_mass(query, key, value, attn_mask, instruction, visual, scale, sdpa_is_causal, causal):
    """(attention output [B, H, S, Dv], cross [B, S], selfsum [B, S]); types in `_SCHEMA`. The CPU
    implementation ignores `sdpa_is_causal` (its causality is `causal`); see the module docstring."""
    return torch_attention_with_mass(query, key, value, attn_mask, instruction, visual, scale, causal)


def cuda_attention_with_mass(
    query, key, value, attn_mask, instruction, visual, scale, sdpa_is_causal, causal
):
    """SDPA's output from torch's fused kernel with its log-sum-exp (`sdpa_lse.py`), then the mass
    from that lse (one Triton kernel and the sum of its partials); only visual columns are
    computed, the only ones FitPrune's selection reads. Where the Triton mass is not used (fp32
    without TF32, masks it cannot read) or the kernel's lse cannot be had: SDPA, then the mass op's
    CUDA path as it stands. No host synchronisation after a configuration's first call."""
    attention = None
    same_causality = attn_mask is not None or causal == sdpa_is_causal  # the lse is the mass's
    if same_causality and _triton_unusable(query, attn_mask) is None and triton_wins(query):
        attention = checked_sdpa_with_lse(query, key, value, attn_mask, scale, sdpa_is_causal)
    if attention is None:
        out, lse = _sdpa(query, key, value, attn_mask, scale, sdpa_is_causal), None
    else:
        out, lse = attention
    cross, selfsum = cuda_attention_mass(
        query, key, attn_mask, instruction, visual, scale, causal, lse=lse, visual_columns=True
    )
    return out.contiguous(), cross, selfsum


def _sdpa(query, key, value, attn_mask, scale, is_causal):
    enable_gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


attention_with_mass.register_kernel("cuda")(cuda_attention_with_mass)


@attention_with_mass.register_fake
def _attention_with_mass_fake(
    query, key, value, attn_mask, instruction, visual, scale, sdpa_is_causal, causal
):
    b, h, s, _ = query.shape
    mass = (instruction.shape[0], s)
    return (
        query.new_empty((b, h, s, value.shape[-1])),
        query.new_empty(mass, dtype=torch.float32),
        query.new_empty(mass, dtype=torch.float32),
    )
