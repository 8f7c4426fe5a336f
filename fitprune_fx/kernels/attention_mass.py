"""`fitprune::visual_attention_mass`: FitPrune's per-token attention mass without the [H, S, S] matrix.

For each example b and key token j, with P[b, h, i, j] the softmax attention probabilities
(fp32 softmax of `scale * q_h k_{h // G}^T`, masked; G = H / Hkv for grouped-query attention):

    cross[b, j]   = sum over i with instruction[b, i] of  max_h P[b, h, i, j]
    selfsum[b, j] = sum over i with visual[b, i]      of  max_h P[b, h, i, j]

(the FitPrune score of DESIGN.md section 2 is `cross * selfsum / n`). The max over heads is
taken before the sum over rows, so neither can be split into per-head matmuls.

The op is one node for Inductor (a fake implementation gives its shapes). Implementations:

* PyTorch (CPU, and the reference): the exact `attention_probs` computation of
  `passes/scorers.py`, chunked over query rows so that only [B, H, R, S] lives at a time;
  chunks without a weighted row are skipped (they would add exact zeros).
* Triton (CUDA, `triton_mass.py`): a log-sum-exp pass, then a tiled pass that recomputes
  probabilities as exp(logit - lse) per (query block, key block) tile, keeps the running max
  over heads in registers and reduces rows with the weights. It reads the mask tile by tile.

The CUDA path never reads a device value on the host (no synchronisation, so a pruned prefill
can be captured in a CUDA graph): the choice between Triton and PyTorch looks at shapes and
dtypes only, and a Triton compile or launch error falls back to PyTorch with one warning.
"""

import warnings

import torch
from torch import Tensor

# Row chunks of the PyTorch implementations (this op and `fused_attention.py`): at most CHUNK_ROWS
# query rows, fewer where the chunk's [B, H, R, S] fp32 probabilities would pass CHUNK_ELEMENTS
# (8 MB: long prompts, large batches). Rows set the cost: a causal chunk computes its R x R
# diagonal block in full (half of it masked), and too few rows make small matmuls. Timed alone on
# 1 CPU thread (causal, at 642 / 356 / 261 / 176 tokens, 8 heads of 64; 642 / 356 / 229 tokens,
# 32 heads of 128), this op took 11.2 ms against 13.8 and 64.7 ms against 85.3 with the earlier
# 2^19-element chunks (184 / 251 rows at 356 / 261 tokens, 8 heads); the fused op, see there.
CHUNK_ROWS = 32
CHUNK_ELEMENTS = 1 << 21


def rows_per_chunk(b: int, h: int, s: int, chunk_elements: int, chunk_rows: int) -> int:
    """Query rows per chunk for [B, H, S, S] attention (see CHUNK_ROWS)."""
    return max(1, min(chunk_rows, chunk_elements // max(1, b * h * s)))


def allowed_mask(attn_mask: Tensor | None, is_causal: bool, seq_len: int, device: torch.device) -> Tensor:
    """[B|1, 1|H, S, K] bool: which keys each query may attend to (mask and causality combined).

    The one rule for every scorer: an additive float mask masks entries at or below half the
    dtype minimum (transformers writes dtype-min, not -inf). K = S without a mask; with one, K is
    its width (a chunk continuing a cache: the cached keys, then the chunk's), and causality is
    aligned to the last S keys.
    """
    if attn_mask is None:
        allowed = torch.ones((1, 1, seq_len, seq_len), dtype=torch.bool, device=device)
    elif attn_mask.dtype == torch.bool:
        allowed = attn_mask
    else:
        allowed = attn_mask > torch.finfo(attn_mask.dtype).min / 2
    if is_causal:
        keys = allowed.shape[-1]
        rows = torch.arange(seq_len, device=device)[:, None] + (keys - seq_len)  # each row's own key
        causal = torch.arange(keys, device=device)[None, :] <= rows
        allowed = allowed & causal
    return allowed


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D] for grouped-query attention (kv head h // G serves query head
    h, G = H / Hkv): an expand and one copy, no `repeat_interleave` (no repeats tensor)."""
    b, hkv, s, d = x.shape
    return x if hkv == heads else x[:, :, None].expand(b, hkv, heads // hkv, s, d).reshape(b, heads, s, d)


def chunk_probabilities(
    query: Tensor,
    k_t: Tensor,
    allowed: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    r0: int,
    r1: int,
    n: int,
) -> tuple[Tensor, Tensor]:
    """fp32 softmax probabilities [B, H, R, n] of query rows r0..r1 over keys 0..n, and which of
    those keys each row may see ([B|1, 1|H, R, n]). A fully masked row gives NaN.

    k_t [B, H, D, S] (fp32, heads repeated); `allowed` from `allowed_mask`; an additive float
    `attn_mask` is added where allowed.
    """
    ok = allowed[:, :, r0:r1, :n]
    additive = attn_mask is not None and attn_mask.dtype != torch.bool
    bias = torch.where(ok, attn_mask[:, :, r0:r1, :n].float() if additive else 0.0, float("-inf"))
    logits = torch.matmul(query[:, :, r0:r1].float(), k_t[..., :n]).mul_(scale).add_(bias)
    return logits.softmax(dim=-1), ok


def torch_attention_mass(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    is_causal: bool,
    chunk_elements: int = CHUNK_ELEMENTS,
    skip_unweighted: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[Tensor, Tensor]:
    """PyTorch implementation: (cross [B, S], selfsum [B, S]) fp32, chunked over query rows.

    query [B, H, S, D], key [B, Hkv, S, D]; instruction / visual [B, S] bool row weights.
    With a single chunk the result is bit-identical to materialising all probabilities.
    `skip_unweighted` skips chunks whose rows carry no weight, which reads the weights on the
    host; the CUDA path turns it off (same result, no synchronisation).
    """
    b, h, s, _ = query.shape
    k_t = repeat_kv(key.float(), h).transpose(-1, -2)  # [B, H, D, S]
    allowed = allowed_mask(attn_mask, is_causal, s, query.device)  # [B|1, 1|H, S, S]
    shared_mask = allowed.shape[1] == 1  # one mask for all heads: NaN rows are NaN in every head
    weights = torch.stack([instruction, visual], dim=1).float()  # [B, 2, S]: (cross, self) row weights
    first = 0
    if skip_unweighted:
        rows_used = (instruction | visual).any(dim=0)  # [S]: rows that carry weight in some example
        first = int(rows_used.to(torch.int8).argmax()) if bool(rows_used.any()) else s  # earlier: weight 0
    rows = rows_per_chunk(b, h, s, chunk_elements, chunk_rows)
    mass = torch.zeros((weights.shape[0], 2, s), dtype=torch.float32, device=query.device)
    for r0 in range(first, s, rows):
        r1 = min(s, r0 + rows)
        if skip_unweighted and not bool(rows_used[r0:r1].any()):
            continue  # every row of this chunk has weight 0: it would add exact zeros
        n = r1 if is_causal else s  # keys this chunk can see (causal: none after its last row)
        probs, _ = chunk_probabilities(query, k_t, allowed, attn_mask, scale, r0, r1, n)  # [B, H, R, n]
        if not shared_mask:  # a per-head mask can fully mask a row in some heads only
            probs = torch.nan_to_num(probs, nan=0.0)
        # Max over heads first, then rows are summed; fully masked rows (padding queries) give
        # NaN, cleared here on [B, R, n] rather than on [B, H, R, n]. They carry no weight.
        head_max = torch.nan_to_num(probs.amax(dim=1), nan=0.0)  # [B, R, n]
        mass[:, :, :n] += torch.bmm(weights[:, :, r0:r1].expand(head_max.shape[0], -1, -1), head_max)
    return mass[:, 0].clone(), mass[:, 1].clone()  # separate outputs: a custom op may not alias


_SCHEMA = (
    "(Tensor query, Tensor key, Tensor? attn_mask, Tensor instruction, Tensor visual, "
    "float scale, bool is_causal) -> (Tensor, Tensor)"
)


@torch.library.custom_op("fitprune::visual_attention_mass", mutates_args=(), schema=_SCHEMA)
def visual_attention_mass(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    is_causal: bool,
) -> tuple[Tensor, Tensor]:
    """(cross [B, S], selfsum [B, S]) fp32 attention mass from instruction / visual rows to each key."""
    return torch_attention_mass(query, key, attn_mask, instruction, visual, scale, is_causal)


# (dtype, head_dim, mask dtype, causal) launches whose Triton compile or launch failed: PyTorch from then on.
_TRITON_FAILED: set[tuple] = set()
_WARNED: set[str] = set()


def cuda_attention_mass(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    instruction: Tensor,
    visual: Tensor,
    scale: float,
    is_causal: bool,
    lse: Tensor | None = None,
    visual_columns: bool = False,
) -> tuple[Tensor, Tensor]:
    """The CUDA implementation: Triton when it can run and wins, PyTorch otherwise (one warning
    per failure reason; fp32 without TF32 goes to PyTorch by choice, silently).

    `lse` [B, H, S] (natural log, from the attention kernel) and `visual_columns` are passed to
    the Triton kernel (see there). Decides from shapes, dtypes and torch's settings only, so it
    never synchronises with the device.
    """
    args = (query, key, attn_mask, instruction, visual, scale, is_causal)
    launch = (query.dtype, query.shape[-1], None if attn_mask is None else attn_mask.dtype, is_causal)
    reason = _triton_unusable(query, attn_mask)
    if reason is None and launch not in _TRITON_FAILED and triton_wins(query):  # failed: warned once
        try:
            from .triton_mass import triton_attention_mass

            tf32 = query.dtype == torch.float32
            return triton_attention_mass(*args, lse, visual_columns=visual_columns, tf32=tf32)
        except Exception as e:  # noqa: BLE001  (a compile or launch error of any kind: never crash)
            _TRITON_FAILED.add(launch)
            reason = f"the Triton kernel failed for {launch}: {type(e).__name__}: {str(e)[:300]}"
    if reason is not None:
        _warn_once(reason)
    return torch_attention_mass(*args, skip_unweighted=False)


def triton_wins(query: Tensor) -> bool:
    """Whether the Triton kernel is the faster choice for this dtype. fp16 / bf16: always. fp32:
    only where torch allows TF32 matmuls (`torch.set_float32_matmul_precision("high")`); with
    IEEE fp32 products Triton lost to the PyTorch op's cuBLAS matmuls (167 against 62 ms at
    S = 3000 on an H200), so fp32 at "highest" precision (torch's default) uses PyTorch."""
    return query.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"


def _triton_unusable(query: Tensor, attn_mask: Tensor | None) -> str | None:
    """Why the Triton kernel cannot take these inputs (None: it can). Reads metadata only."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'fitprune-fx[triton]')"
    if attn_mask is None:
        return None
    b, h, s, _ = query.shape
    fits = attn_mask.dim() == 4 and all(
        size in (1, full) for size, full in zip(attn_mask.shape, (b, h, s, s), strict=True)
    )
    if not fits or attn_mask.shape[-1] != s:
        return f"attention mask of shape {tuple(attn_mask.shape)} is not [B|1, 1|H, S|1, S] for {(b, h, s)}"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fitprune: attention mass computed with PyTorch, not Triton: {reason}", stacklevel=3)


visual_attention_mass.register_kernel("cuda")(cuda_attention_mass)


@visual_attention_mass.register_fake
def _visual_attention_mass_fake(query, key, attn_mask, instruction, visual, scale, is_causal):
    shape = (instruction.shape[0], query.shape[2])
    return query.new_empty(shape, dtype=torch.float32), query.new_empty(shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


def _backward(ctx, grad_cross, grad_self):
    return (None,) * 7


# The scores only choose which tokens to keep (through a sort), so the op is non-differentiable:
# its outputs never require grad, which lets AOTAutograd trace models whose weights require grad.
visual_attention_mass.register_autograd(_backward, setup_context=_setup_context)
