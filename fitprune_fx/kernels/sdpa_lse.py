"""SDPA's output together with its log-sum-exp, from torch's own fused attention kernels.

FitPrune's mass needs each query row's softmax normaliser. The fused attention kernels compute it
anyway (their backward needs it) and torch's private ops return it; the public
`F.scaled_dot_product_attention` does not. Calling the private op directly, with the mask
prepared as the public function prepares it, gives the same output as the layer's SDPA and makes
the separate log-sum-exp pass of the mass kernel unnecessary:

* CUDA, no mask, fp16 / bf16, head dim <= 256: `aten._scaled_dot_product_flash_attention`
  (lse [B, H, S] fp32);
* CUDA otherwise: `aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True)`
  (lse [B, H, ceil(S / 32) * 32] fp32, sliced here);
* CPU: `aten._scaled_dot_product_flash_attention_for_cpu` (lse [B, H, S] fp32), which lets the
  composition be tested without a GPU.

All three return the natural-log lse of `scale * q k^T + bias` over the allowed keys (the mask and
causality). These are facts about torch's private ops, so the caller checks the lse against its
own pass the first time a configuration runs (`attention_mass.py`) and falls back if they differ.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_mass import repeat_kv

LN2 = 0.6931471805599453

# The efficient kernel wants its bias's last dimension dense and the row stride a multiple of 8
# elements; torch pads the bias and slices it back (aten's preprocess_mask, Inductor's
# sdpa_constraint use the same alignment).
BIAS_ALIGNMENT = 8


def sdpa_with_lse(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, scale: float, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """(out [B, H, S, Dv] in the query's dtype, lse [B, H, S] fp32 natural log) of SDPA.

    query [B, H, S, D], key / value [B, Hkv, S, D|Dv] (grouped heads are repeated first, as SDPA's
    `enable_gqa` does for these kernels); `attn_mask` None or [B|1, 1|H, S, S] bool / additive.
    Raises what torch raises for inputs its kernels do not take (the caller falls back).
    """
    b, h, s, _ = query.shape
    if key.shape[1] != h:
        key, value = repeat_kv(key, h), repeat_kv(value, h)
    bias = None if attn_mask is None else additive_bias(attn_mask, query.dtype, (b, h, s, key.shape[2]))
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=bias, scale=scale
        )
        return out, lse
    if bias is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale
        )[:2]
        return out, lse
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, 0.0, is_causal, scale=scale
    )[:2]
    return out, lse[..., :s]


def additive_bias(attn_mask: Tensor, dtype: torch.dtype, shape: tuple[int, int, int, int]) -> Tensor:
    """The mask as the fused kernels take it: additive in `dtype` (bool False -> -inf), last dim
    padded to BIAS_ALIGNMENT and sliced back (aligned rows), broadcast dims expanded (stride 0)."""
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_mask.device)
        bias = torch.where(attn_mask, zero, torch.full_like(zero, float("-inf")))
    else:
        bias = attn_mask.to(dtype)
    keys = bias.shape[-1]
    if keys % BIAS_ALIGNMENT or bias.stride(-2) % BIAS_ALIGNMENT or bias.stride(-1) != 1:
        pad = -keys % BIAS_ALIGNMENT
        bias = F.pad(bias, (0, pad))[..., :keys]
    return bias.expand(shape)


# Configurations (device, dtypes, mask kind, causality, grouped heads) whose lse was checked
# against the Triton lse pass: True = agreed, False = failed or disagreed (never used again).
_CHECKED: dict[tuple, bool] = {}


def checked_sdpa_with_lse(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, scale: float, is_causal: bool
) -> tuple[Tensor, Tensor] | None:
    """`sdpa_with_lse`, or None (the caller computes its own lse) where torch's kernel raised or,
    the first time a configuration runs, its lse disagreed with `triton_mass.row_lse` (one warning
    each). The check reads a device value, so it waits for a call that may synchronise (not
    under `torch.cuda.set_sync_debug_mode`, not while a CUDA graph is captured)."""
    config = (
        query.device.type,
        query.dtype,
        None if attn_mask is None else (attn_mask.dtype, attn_mask.shape[1] == 1),
        is_causal,
        key.shape[1] != query.shape[1],
    )
    if _CHECKED.get(config) is False:
        return None
    try:
        out, lse = sdpa_with_lse(query, key, value, attn_mask, scale, is_causal)
    except Exception as e:  # noqa: BLE001  (a kernel that does not take these inputs: fall back)
        _CHECKED[config] = False
        _warn(f"torch's attention kernel raised for {config}: {type(e).__name__}: {str(e)[:300]}")
        return None
    if config not in _CHECKED and _may_synchronise(query):
        from .triton_mass import row_lse

        ours = row_lse(query, key, attn_mask, scale, is_causal, tf32=False) * LN2  # natural log
        # Rows with an allowed key; tolerance for 16-bit / TF32 products (a convention error, e.g.
        # base 2, no scale, misaligned rows, is off by far more)
        gap = ((lse - ours).abs() - 2e-3 * ours.abs()).where(ours.isfinite(), 0.0)
        worst = gap.amax().item() if gap.numel() else 0.0
        _CHECKED[config] = worst <= 2e-2
        if not _CHECKED[config]:
            _warn(f"torch's attention lse differs from the mass kernel's by {worst:.3g} for {config}")
            return None
    return out, lse


def _may_synchronise(query: Tensor) -> bool:
    if query.device.type != "cuda":
        return True
    return torch.cuda.get_sync_debug_mode() == 0 and not torch.cuda.is_current_stream_capturing()


def _warn(what: str) -> None:
    warnings.warn(
        f"fitprune: {what}; the scoring layer runs SDPA and a separate log-sum-exp pass instead",
        stacklevel=3,
    )
