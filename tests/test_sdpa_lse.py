"""`kernels/sdpa_lse.py`: SDPA's output with its log-sum-exp from torch's private attention ops.

Checked on CPU: the output equals the public `F.scaled_dot_product_attention` bit for bit and the
lse is the float64 log-sum-exp of the masked logits, for every mask form transformers passes;
the CUDA ops' shapes (the efficient kernel's padded lse) on the meta device; the bias's layout;
and which dtypes and precisions choose the Triton mass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitprune_fx.kernels.attention_mass import triton_wins
from fitprune_fx.kernels.sdpa_lse import BIAS_ALIGNMENT, additive_bias, sdpa_with_lse


def _inputs(b, h, hkv, s, d, dtype, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    valid = torch.arange(s)[None, :] >= torch.arange(b)[:, None] * 3  # left padding 0, 3, 6 ...
    allowed = (torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, :])[:, None]  # [B, 1, S, S]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padding rows see all (no empty rows)
    if mask_kind == "none":
        return q, k, v, None, torch.ones(s, s, dtype=torch.bool).tril()[None, None], True
    if mask_kind == "bool":
        return q, k, v, allowed, allowed, False
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return q, k, v, additive, allowed, False


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_output_is_sdpa_and_lse_is_the_masked_logsumexp(mask_kind, dtype, heads):
    h, hkv = heads
    q, k, v, mask, allowed, causal = _inputs(2, h, hkv, 21, 16, dtype, mask_kind)
    out, lse = sdpa_with_lse(q, k, v, mask, 0.3, causal)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True
    )
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, h, 21)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * 0.3
    truth = logits.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the kernel's own rounding of q k^T
    torch.testing.assert_close(lse.double(), truth, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype, mask_kind", [(torch.bfloat16, "none"), (torch.bfloat16, "bool"), (torch.float32, "none")]
)
def test_cuda_ops_shapes_on_meta(dtype, mask_kind):
    """On a CUDA-like device the flash op (no mask, 16-bit) or the efficient op runs; the latter's
    lse is padded to a multiple of 32 rows and comes back sliced to S."""
    q, k, v, mask, _, causal = _inputs(2, 4, 2, 37, 16, dtype, mask_kind)
    meta = torch.device("meta")
    mask = None if mask is None else mask.to(meta)
    out, lse = sdpa_with_lse(q.to(meta), k.to(meta), v.to(meta), mask, 0.25, causal)
    assert out.shape == (2, 4, 37, 16) and out.dtype == dtype
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32


@pytest.mark.parametrize("keys", [21, 24, 40])
def test_bias_is_additive_aligned_and_broadcast(keys):
    mask = torch.rand(2, 1, 5, keys, generator=torch.Generator().manual_seed(keys)) < 0.6
    bias = additive_bias(mask, torch.float16, (2, 3, 5, keys))
    assert bias.shape == (2, 3, 5, keys) and bias.dtype == torch.float16
    assert bias.stride(1) == 0 and bias.stride(-1) == 1 and bias.stride(-2) % BIAS_ALIGNMENT == 0
    assert torch.equal(bias == 0, mask.expand(2, 3, 5, keys))
    assert bool((bias[~mask.expand(2, 3, 5, keys)] == float("-inf")).all())
    additive = torch.zeros(1, 1, 5, keys).masked_fill(~mask[:1], -3.0)
    assert torch.equal(additive_bias(additive, torch.float32, (1, 2, 5, keys))[0, 1], additive[0, 0])


def test_triton_mass_is_chosen_for_16_bit_and_for_fp32_only_with_tf32():
    q16, q32 = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 8)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_wins(q16) and not triton_wins(q32)
        torch.set_float32_matmul_precision("high")
        assert triton_wins(q16) and triton_wins(q32)
    finally:
        torch.set_float32_matmul_precision(precision)
