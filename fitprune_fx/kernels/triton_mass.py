"""Triton kernels for `fitprune::visual_attention_mass` (works with triton 3.6 and 3.9).

Two passes over QK^T, neither of which writes an [H, S, S] tensor:

1. `_row_lse_kernel`, grid (query blocks, H, B): online log-sum-exp of each query row's masked
   logits (base 2: logits * scale * log2(e)), like the softmax statistics of a flash-attention
   forward without the value product. Result lse2 [B, H, S] fp32.
2. `_mass_kernel`, grid (key blocks, query blocks, B): for one [BLOCK_M, BLOCK_N] tile of
   (query i, key j), loop over kv heads (load the key tile once) and the query heads sharing it,
   recompute p = exp2(logit2 - lse2[i]) and keep max_h p in registers; then sum the tile's rows
   with the instruction / visual weights and store the [BLOCK_N] partial sums of this query
   block into partial[B, query blocks, S]. Summing the partials over query blocks in PyTorch
   is a fixed-order (deterministic) second stage; no atomics, so scores repeat bit for bit.

Tiles above the causal diagonal and query blocks without a weighted row are skipped.
Masks: causal flag + optional per-key validity [B|1, S] (see `reduce_mask`). Inputs may be
fp16 / bf16 / fp32; dots accumulate in fp32 and fp32 inputs use IEEE (not TF32) products.
Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies bf16 bit patterns in `tl.dot`
(triton-lang/triton#11584), so under it bf16 tiles are cast to fp32 first (`DOT_FP32`); that is
the same arithmetic, since bf16 x bf16 products are exact in fp32.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _row_lse_kernel(
    Q, K, KV_VALID, LSE,
    S, D, G, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_s,
    sl_b, sl_h, sl_s,
    IS_CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this block
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    q = tl.load(
        Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * sk_b + (h // G) * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(logit - m_i)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)  # keys past the block's last row are masked
    # while loops, not range(): triton 3.6's interpreter turns runtime ints into 1-element arrays
    # that range() cannot take (3.9 accepts both); compiled, both are the same scf loop.
    start_n = 0
    while start_n < hi:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k_t = tl.load(
            k_base + offs_n[None, :] * sk_s + offs_d[:, None] * sk_d,
            mask=col_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]: the key tile, transposed by addressing
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
        logits = tl.dot(q, k_t, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        allowed = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        if HAS_KV_VALID:
            kv = tl.load(KV_VALID + b * sv_b + offs_n * sv_s, mask=col_ok, other=0)
            allowed = allowed & (kv != 0)[None, :]
        logits = tl.where(allowed, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(logits - m_safe[:, None]), axis=1)
        m_i = m_new
        start_n += BLOCK_N
    # base-2 lse of each row; -inf for a fully masked row (a padding query)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE + b * sl_b + h * sl_h + offs_m * sl_s, lse, mask=row_ok)


@triton.jit
def _mass_kernel(
    Q, K, LSE, KV_VALID, W_INSTR, W_VIS, P_CROSS, P_SELF,
    S, D, HKV, G, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sl_b, sl_h, sl_s,
    sv_b, sv_s,
    sw_b, sw_s,
    sp_b, sp_m, sp_s,
    IS_CAUSAL: tl.constexpr, HAS_KV_VALID: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows i
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key columns j
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    col_ok = offs_n < S
    w_instr = tl.load(W_INSTR + b * sw_b + offs_m * sw_s, mask=row_ok, other=0.0)  # [BLOCK_M]
    w_vis = tl.load(W_VIS + b * sw_b + offs_m * sw_s, mask=row_ok, other=0.0)
    active = tl.max(w_instr + w_vis, axis=0) > 0  # some row of this block carries weight
    if IS_CAUSAL:
        active = active & (pid_n * BLOCK_N < (pid_m + 1) * BLOCK_M)  # tile not wholly above diagonal
    if active:
        allowed = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        if HAS_KV_VALID:
            kv = tl.load(KV_VALID + b * sv_b + offs_n * sv_s, mask=col_ok, other=0)
            allowed = allowed & (kv != 0)[None, :]
        head_max = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # probabilities are >= 0
        kvh = 0
        while kvh < HKV:  # a while loop for triton 3.6's interpreter, as in _row_lse_kernel
            k_t = tl.load(
                K + b * sk_b + kvh * sk_h + offs_n[None, :] * sk_s + offs_d[:, None] * sk_d,
                mask=col_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )  # [BLOCK_D, BLOCK_N], shared by the G query heads of this kv head
            if DOT_FP32:
                k_t = k_t.to(tl.float32)
            r = 0
            while r < G:
                h = kvh * G + r
                q = tl.load(
                    Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )  # [BLOCK_M, BLOCK_D]
                if DOT_FP32:
                    q = q.to(tl.float32)
                lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m * sl_s, mask=row_ok, other=0.0)
                logits = tl.dot(q, k_t, input_precision="ieee") * qk_scale
                p = tl.where(allowed, tl.exp2(logits - lse[:, None]), 0.0)
                head_max = tl.maximum(head_max, p)
                r += 1
            kvh += 1
        cross = tl.sum(head_max * w_instr[:, None], axis=0)  # [BLOCK_N]
        selfsum = tl.sum(head_max * w_vis[:, None], axis=0)
        out = b * sp_b + pid_m * sp_m + offs_n * sp_s
        tl.store(P_CROSS + out, cross, mask=col_ok)
        tl.store(P_SELF + out, selfsum, mask=col_ok)


def row_lse(
    query: Tensor,
    key: Tensor,
    key_valid: Tensor | None,
    scale: float,
    is_causal: bool,
    block_m: int = 64,
    block_n: int = 64,
) -> Tensor:
    """Base-2 log-sum-exp [B, H, S] fp32 of each query row's masked logits (-inf: fully masked)."""
    b, h, s, d = query.shape
    lse = torch.empty((b, h, s), dtype=torch.float32, device=query.device)
    kv, sv = _key_valid_arg(key_valid, query)
    grid = (triton.cdiv(s, block_m), h, b)
    _row_lse_kernel[grid](
        query, key, kv, lse,
        s, d, h // key.shape[1], scale * LOG2E,
        *query.stride(), *key.stride(), *sv, *lse.stride(),
        IS_CAUSAL=is_causal, HAS_KV_VALID=key_valid is not None, DOT_FP32=_dot_fp32(query),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return lse


def triton_attention_mass(
    query: Tensor,
    key: Tensor,
    key_valid: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    is_causal: bool,
    lse: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[Tensor, Tensor]:
    """(cross [B, S], selfsum [B, S]) fp32 with the mask `causal & key_valid[b, j]`.

    query [B, H, S, D], key [B, Hkv, S, D] (any strides); key_valid [B|1, S] bool or None;
    instruction / visual [B, S] bool row weights. `lse` [B, H, S] (natural log, e.g. from an
    attention kernel) skips the log-sum-exp pass. Block sizes must be >= 16 (tl.dot).
    """
    b, h, s, d = query.shape
    if lse is None:
        lse2 = row_lse(query, key, key_valid, scale, is_causal, block_m, block_n)
    else:
        lse2 = lse.float() * LOG2E
    w_instr = instruction.expand(b, s).to(torch.float32).contiguous()
    w_vis = visual.expand(b, s).to(torch.float32).contiguous()
    blocks_m = triton.cdiv(s, block_m)
    # partial[b, m, j]: rows of query block m summed; tiles skipped by the kernel stay 0
    p_cross = torch.zeros((b, blocks_m, s), dtype=torch.float32, device=query.device)
    p_self = torch.zeros_like(p_cross)
    kv, sv = _key_valid_arg(key_valid, query)
    grid = (triton.cdiv(s, block_n), blocks_m, b)
    _mass_kernel[grid](
        query, key, lse2, kv, w_instr, w_vis, p_cross, p_self,
        s, d, key.shape[1], h // key.shape[1], scale * LOG2E,
        *query.stride(), *key.stride(), *lse2.stride(), *sv, *w_instr.stride(), *p_cross.stride(),
        IS_CAUSAL=is_causal, HAS_KV_VALID=key_valid is not None, DOT_FP32=_dot_fp32(query),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return p_cross.sum(dim=1), p_self.sum(dim=1)


def _key_valid_arg(key_valid: Tensor | None, query: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """int8 [B|1, S] validity tensor and its (batch, seq) strides; batch stride 0 broadcasts."""
    if key_valid is None:
        return torch.ones(1, dtype=torch.int8, device=query.device), (0, 0)
    kv = key_valid.to(torch.int8).contiguous()
    return kv, (0 if kv.shape[0] == 1 else kv.stride(0), kv.stride(1))


def _dot_fp32(query: Tensor) -> bool:
    """Cast dot operands to fp32: only for bf16 under the interpreter (see the module docstring)."""
    return query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
