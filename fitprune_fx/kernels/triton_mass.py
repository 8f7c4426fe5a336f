"""Triton kernels for FitPrune's attention mass (works with triton 3.6 and 3.9).

Neither pass writes an [H, S, S] tensor:

1. `_row_lse_kernel`, grid (query blocks, H, B): online log-sum-exp of each query row's masked
   logits (base 2: logits * scale * log2(e)), like the softmax statistics of a flash-attention
   forward without the value product. Result lse2 [B, H, S] fp32. Skipped when the attention
   kernel already returned its lse (`sdpa_lse.py`): then the mass costs one kernel.
2. `_mass_kernel`, grid (key blocks, query blocks, B): for one [BLOCK_M, BLOCK_N] tile of
   (query i, key j), loop over kv heads (load the key tile once) and the query heads sharing it,
   recompute p = exp2(logit2 - lse2[i]) and keep max_h p in registers; then sum the tile's rows
   with the instruction / visual weights and store the [BLOCK_N] partial sums of this query
   block into partial[B, query blocks, S]. Only tiles that count are computed (the others store
   zeros): a query block with a weighted row, a key block below the diagonal (causal) and, with
   `visual_columns`, holding a visual key (FitPrune reads scores of visual tokens only).
3. `_sum_partials_kernel`, grid (key blocks, B): both partial sums over query blocks, in a fixed
   order (deterministic); no atomics, so scores repeat bit for bit.

Masks are read tile by tile from the attention mask itself ([B|1, 1|H, S, S], bool or additive
float with transformers' "dtype-min means masked"), and the bool row weights as bytes, so the host
never inspects a device value: a launch makes no device-to-host synchronisation and can be
captured in a CUDA graph.

Batch and head offsets are 64-bit (B*H*S*D can pass 2^31 elements). Inputs may be fp16 / bf16 /
fp32; dots accumulate in fp32; fp32 inputs use IEEE products unless `tf32` (the caller passes it
where torch allows TF32 matmuls). Triton's CPU interpreter (TRITON_INTERPRET=1) multiplies bf16
bit patterns in `tl.dot` (triton-lang/triton#11584), so under it bf16 tiles are cast to fp32 first
(`DOT_FP32`); that is the same arithmetic, since bf16 x bf16 products are exact in fp32.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _masked_logits(
    q, k_t, offs_m, offs_n, row_ok, col_ok, mask_ptr, sm_i, sm_j, mask_floor, qk_scale,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Base-2 logits of one [BLOCK_M, BLOCK_N] tile, -inf where attention is not allowed."""
    logits = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    allowed = row_ok[:, None] & col_ok[None, :]
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND != 0:
        m = tl.load(mask_ptr + offs_m[:, None] * sm_i + offs_n[None, :] * sm_j, mask=allowed, other=0)
        if MASK_KIND == 1:  # bool mask (read as uint8): True = attend
            allowed = allowed & (m != 0)
        else:  # additive: entries at or below half the dtype minimum are masked, others add
            m = m.to(tl.float32)
            allowed = allowed & (m > mask_floor)
            logits = logits + tl.where(allowed, m, 0.0) * 1.4426950408889634
    return tl.where(allowed, logits, float("-inf"))


@triton.jit
def _row_lse_kernel(
    Q, K, MASK, LSE,
    S, D, G, qk_scale, mask_floor,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sm_b, sm_h, sm_i, sm_j,
    sl_b, sl_h, sl_s,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)  # 64-bit batch / head offsets
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
    mask_base = MASK + b * sm_b + h * sm_h
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
        logits = _masked_logits(
            q, k_t, offs_m, offs_n, row_ok, col_ok, mask_base, sm_i, sm_j, mask_floor, qk_scale,
            IS_CAUSAL, MASK_KIND, DOT_PRECISION,
        )  # fmt: skip
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
    Q, K, LSE, MASK, W_INSTR, W_VIS, P_CROSS, P_SELF,
    S, D, HKV, G, qk_scale, mask_floor, lse_to_base2,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sl_b, sl_h, sl_s,
    sm_b, sm_h, sm_i, sm_j,
    si_b, si_s, sv_b, sv_s,
    sp_b, sp_m, sp_s,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VISUAL_COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows i
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key columns j
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    col_ok = offs_n < S
    # row weights: bool tensors read as bytes (or float weights), broadcast batches by stride 0
    w_instr = tl.load(W_INSTR + b * si_b + offs_m * si_s, mask=row_ok, other=0).to(tl.float32)
    w_vis = tl.load(W_VIS + b * sv_b + offs_m * sv_s, mask=row_ok, other=0).to(tl.float32)
    active = tl.max(w_instr + w_vis, axis=0) > 0  # some row of this block carries weight
    if IS_CAUSAL:
        active = active & (pid_n * BLOCK_N < (pid_m + 1) * BLOCK_M)  # tile not wholly above diagonal
    if VISUAL_COLUMNS:  # only visual keys are scored: a block without one is not computed
        visual_cols = tl.load(W_VIS + b * sv_b + offs_n * sv_s, mask=col_ok, other=0).to(tl.float32)
        active = active & (tl.max(visual_cols, axis=0) > 0)
    cross = tl.zeros([BLOCK_N], tl.float32)
    selfsum = tl.zeros([BLOCK_N], tl.float32)
    if active:
        head_max = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # probabilities are >= 0
        # Head pointers advance by their strides (heads run 0..H-1 in order: h = kvh * G + r),
        # so no head index is multiplied out in 32 bits.
        k_head = K + b * sk_b
        q_head = Q + b * sq_b
        lse_head = LSE + b * sl_b
        mask_head = MASK + b * sm_b
        kvh = 0
        while kvh < HKV:  # a while loop for triton 3.6's interpreter, as in _row_lse_kernel
            k_t = tl.load(
                k_head + offs_n[None, :] * sk_s + offs_d[:, None] * sk_d,
                mask=col_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )  # [BLOCK_D, BLOCK_N], shared by the G query heads of this kv head
            if DOT_FP32:
                k_t = k_t.to(tl.float32)
            r = 0
            while r < G:
                q = tl.load(
                    q_head + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & (offs_d[None, :] < D),
                    other=0.0,
                )  # [BLOCK_M, BLOCK_D]
                if DOT_FP32:
                    q = q.to(tl.float32)
                lse = tl.load(lse_head + offs_m * sl_s, mask=row_ok, other=0.0)
                # A fully masked row (-inf here; NaN, +-inf or about the dtype minimum from an
                # attention kernel) has every p = 0 whatever lse is used: 0, scaled without overflow.
                lse = tl.where((lse == lse) & (tl.abs(lse) < 1e30), lse, 0.0) * lse_to_base2
                logits = _masked_logits(
                    q, k_t, offs_m, offs_n, row_ok, col_ok, mask_head, sm_i, sm_j, mask_floor,
                    qk_scale, IS_CAUSAL, MASK_KIND, DOT_PRECISION,
                )  # fmt: skip
                p = tl.exp2(logits - lse[:, None])  # masked entries: exp2(-inf) = 0
                head_max = tl.maximum(head_max, p)
                q_head += sq_h
                lse_head += sl_h
                mask_head += sm_h  # sm_h = 0 for a mask shared by all heads
                r += 1
            k_head += sk_h
            kvh += 1
        cross = tl.sum(head_max * w_instr[:, None], axis=0)  # [BLOCK_N]
        selfsum = tl.sum(head_max * w_vis[:, None], axis=0)
    out = b * sp_b + pid_m * sp_m + offs_n * sp_s
    tl.store(P_CROSS + out, cross, mask=col_ok)  # every tile stores: the partials need no zeroing
    tl.store(P_SELF + out, selfsum, mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    P_CROSS, P_SELF, CROSS, SELF, S, BLOCKS_M, sp_b, sp_m, sp_s, so_b, so_s, BLOCK: tl.constexpr,
):  # fmt: skip
    """CROSS[b, j] = sum over m of P_CROSS[b, m, j] (and SELF), m in increasing order."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    cross = tl.zeros([BLOCK], tl.float32)
    selfsum = tl.zeros([BLOCK], tl.float32)
    part = b * sp_b + offs * sp_s
    m = 0
    while m < BLOCKS_M:
        cross += tl.load(P_CROSS + part, mask=ok, other=0.0)
        selfsum += tl.load(P_SELF + part, mask=ok, other=0.0)
        part += sp_m
        m += 1
    tl.store(CROSS + b * so_b + offs * so_s, cross, mask=ok)
    tl.store(SELF + b * so_b + offs * so_s, selfsum, mask=ok)


def row_lse(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    is_causal: bool,
    block_m: int = 64,
    block_n: int = 64,
    tf32: bool = False,
) -> Tensor:
    """Base-2 log-sum-exp [B, H, S] fp32 of each query row's masked logits (-inf: fully masked)."""
    b, h, s, d = query.shape
    lse = torch.empty((b, h, s), dtype=torch.float32, device=query.device)
    mask, strides, kind, floor = _mask_args(attn_mask, query)
    grid = (triton.cdiv(s, block_m), h, b)
    _row_lse_kernel[grid](
        query, key, mask, lse,
        s, d, h // key.shape[1], scale * LOG2E, floor,
        *query.stride(), *key.stride(), *strides, *lse.stride(),
        IS_CAUSAL=is_causal, MASK_KIND=kind, DOT_FP32=_dot_fp32(query), DOT_PRECISION=_precision(tf32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return lse


def triton_attention_mass(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    is_causal: bool,
    lse: Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    *,
    visual_columns: bool = False,
    tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """(cross [B, S], selfsum [B, S]) fp32, the op's contract (see `attention_mass.py`).

    query [B, H, S, D], key [B, Hkv, S, D] (any strides); attn_mask None or [B|1, 1|H, S, S] bool
    or additive float; instruction / visual [B|1, S] bool row weights. `lse` [B, H, S] (natural
    log, e.g. from the attention kernel, `sdpa_lse.py`) skips the log-sum-exp pass. With
    `visual_columns`, key blocks without a visual key are not computed (their columns are 0). Launches: the
    lse pass (unless given), the mass, the sum of its partials. Block sizes must be >= 16.
    """
    b, h, s, d = query.shape
    if lse is None:
        lse, to_base2 = row_lse(query, key, attn_mask, scale, is_causal, block_m, block_n, tf32), 1.0
    else:
        to_base2 = LOG2E  # the kernel scales the natural-log lse as it reads it
    w_instr, w_vis = _row_weights(instruction, b), _row_weights(visual, b)
    blocks_m = triton.cdiv(s, block_m)
    # partial[b, m, j]: rows of query block m summed (every tile writes, computed or not)
    p_cross = torch.empty((b, blocks_m, s), dtype=torch.float32, device=query.device)
    p_self = torch.empty_like(p_cross)
    mask, strides, kind, floor = _mask_args(attn_mask, query)
    grid = (triton.cdiv(s, block_n), blocks_m, b)
    _mass_kernel[grid](
        query, key, lse, mask, w_instr, w_vis, p_cross, p_self,
        s, d, key.shape[1], h // key.shape[1], scale * LOG2E, floor, to_base2,
        *query.stride(), *key.stride(), *lse.stride(), *strides,
        *_batch_strides(w_instr), *_batch_strides(w_vis), *p_cross.stride(),
        IS_CAUSAL=is_causal, MASK_KIND=kind, DOT_FP32=_dot_fp32(query), DOT_PRECISION=_precision(tf32),
        VISUAL_COLUMNS=visual_columns,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    cross = torch.empty((b, s), dtype=torch.float32, device=query.device)
    selfsum = torch.empty_like(cross)
    block = 128
    _sum_partials_kernel[(triton.cdiv(s, block), b)](
        p_cross, p_self, cross, selfsum, s, blocks_m, *p_cross.stride(), *cross.stride(), BLOCK=block
    )
    return cross, selfsum


def _row_weights(weights: Tensor, batch: int) -> Tensor:
    """Row weights as the kernel loads them: a bool tensor viewed as bytes (no copy)."""
    if weights.dim() == 1:
        weights = weights[None]
    return weights.view(torch.uint8) if weights.dtype == torch.bool else weights.float()


def _batch_strides(weights: Tensor) -> tuple[int, int]:
    """(batch stride, token stride) with 0 for a batch of 1 (broadcast)."""
    return (0 if weights.shape[0] == 1 else weights.stride(0)), weights.stride(1)


def _precision(tf32: bool) -> str:
    return "tf32" if tf32 else "ieee"


def _mask_args(attn_mask: Tensor | None, query: Tensor) -> tuple[Tensor, tuple[int, ...], int, float]:
    """(mask tensor, its 4 strides with 0 on broadcast dims, MASK_* kind, masked-entry floor).

    Only metadata is read (shapes, strides, dtype): no device value reaches the host. A bool mask
    is reinterpreted as uint8 without a copy.
    """
    if attn_mask is None:
        return query, (0, 0, 0, 0), MASK_NONE, 0.0
    if attn_mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-d [B|1, 1|H, S, S], got shape {tuple(attn_mask.shape)}")
    shape, stride = attn_mask.shape, attn_mask.stride()
    strides = tuple(0 if size == 1 else st for size, st in zip(shape, stride, strict=True))
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), strides, MASK_BOOL, 0.0
    return attn_mask, strides, MASK_ADDITIVE, torch.finfo(attn_mask.dtype).min / 2


def _dot_fp32(query: Tensor) -> bool:
    """Cast dot operands to fp32: only for bf16 under the interpreter (see the module docstring)."""
    return query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
