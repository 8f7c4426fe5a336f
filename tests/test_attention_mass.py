"""`fitprune::visual_attention_mass`: PyTorch op vs a naive full matrix, mask reduction, Inductor,
and the Triton kernels vs the PyTorch op under Triton's CPU interpreter (in a subprocess, so
that TRITON_INTERPRET=1 never leaks into other tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitprune_fx.kernels.attention_mass import reduce_mask, torch_attention_mass
from fitprune_fx.passes.scorers import ScoringInputs, attention_probs, fitprune_score, token_validity

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MASK_KINDS = ["none", "pad-bool", "pad-float", "pad-unmasked", "random-bool", "per-head", "bias"]


@dataclass
class Case:
    query: torch.Tensor  # [B, H, S, D]
    key: torch.Tensor  # [B, Hkv, S, D]
    attn_mask: torch.Tensor | None
    is_causal: bool
    allowed: torch.Tensor  # [B, H, S, S] bool, the mask's meaning (for the naive oracle)
    bias: torch.Tensor  # [B, H, S, S] fp32 additive bias on allowed entries
    instruction: torch.Tensor  # [B, S] bool
    visual: torch.Tensor  # [B, S] bool
    scale: float
    kind: str

    def args(self):
        return (
            self.query,
            self.key,
            self.attn_mask,
            self.instruction,
            self.visual,
            self.scale,
            self.is_causal,
        )


def build_case(
    b: int, hkv: int, groups: int, s: int, d: int, dtype: torch.dtype, kind: str, seed: int
) -> Case:
    """A random case; everything not given (layout, padding, causality, weights) comes from `seed`."""
    h = hkv * groups
    g = torch.Generator().manual_seed(seed)
    coin = lambda: bool(torch.rand(1, generator=g) < 0.5)  # noqa: E731
    if coin():  # the graph's q is often a transposed view of [B, S, H, D]
        query = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    else:
        query = torch.randn(b, h, s, d, generator=g).to(dtype)
    if coin():
        query = query * 4  # peaked, near one-hot probabilities
    key = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    pads = torch.randint(0, s, (b,), generator=g) if kind.startswith("pad") else torch.zeros(b)
    key_valid = torch.arange(s)[None, :] >= pads[:, None]  # [B, S] left padding
    bias = torch.zeros(b, h, s, s)
    is_causal = False
    if kind == "none":
        attn_mask, is_causal = None, coin()
        allowed = (tril if is_causal else torch.ones(s, s, dtype=torch.bool)).expand(b, h, s, s)
    elif kind.startswith("pad"):
        allowed = (tril & key_valid[:, None, :])[:, None]  # [B, 1, S, S]
        mask = allowed
        if kind == "pad-unmasked":  # old transformers: fully masked (padding) rows attend everywhere
            mask = allowed | ~allowed.any(dim=-1, keepdim=True)
        if kind == "pad-float":
            attn_mask = torch.zeros(b, 1, s, s, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        else:
            attn_mask = mask
        allowed = mask.expand(b, h, s, s)
    elif kind in ("random-bool", "per-head"):
        attn_mask = torch.rand(b, h if kind == "per-head" else 1, s, s, generator=g) < 0.7
        is_causal = coin()
        allowed = (attn_mask & tril if is_causal else attn_mask).expand(b, h, s, s)
    else:  # "bias": an additive float mask with real values (ALiBi-like) and masked entries
        allowed = (torch.rand(b, 1, s, s, generator=g) < 0.8) & tril
        values = torch.randn(b, 1, s, s, generator=g).to(dtype)
        attn_mask = values.masked_fill(~allowed, torch.finfo(dtype).min)
        allowed = allowed.expand(b, h, s, s)
        bias = values.float().masked_fill(~allowed, 0).expand(b, h, s, s)
    rows = torch.rand(b, s, generator=g)
    visual = (rows < 0.5) & key_valid
    instruction = (rows > 0.7) & key_valid
    scale = d**-0.5 if coin() else 1.0
    return Case(query, key, attn_mask, is_causal, allowed, bias, instruction, visual, scale, kind)


@st.composite
def cases(draw, kinds=MASK_KINDS, dtypes=(torch.float32, torch.float16, torch.bfloat16), max_len=40):
    """Random shapes (grouped-query heads, odd lengths), masks of several kinds and row weights."""
    return build_case(
        b=draw(st.integers(1, 3)),
        hkv=draw(st.integers(1, 2)),
        groups=draw(st.integers(1, 3)),
        s=draw(st.integers(1, max_len)),
        d=draw(st.sampled_from([4, 8, 12, 16, 24])),
        dtype=draw(st.sampled_from(dtypes)),
        kind=draw(st.sampled_from(kinds)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def naive_mass(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification with the full [B, H, S, S] matrix in float64, one example at a time."""
    b, h, s, _ = case.query.shape
    groups = h // case.key.shape[1]
    cross, selfsum = torch.zeros(b, s, dtype=torch.float64), torch.zeros(b, s, dtype=torch.float64)
    for e in range(b):
        probs = torch.zeros(h, s, s, dtype=torch.float64)
        for head in range(h):
            q = case.query[e, head].double()
            k = case.key[e, head // groups].double()
            logits = (q @ k.T) * case.scale + case.bias[e, head].double()
            logits = logits.masked_fill(~case.allowed[e, head], float("-inf"))
            p = logits.softmax(dim=-1)
            probs[head] = torch.where(case.allowed[e, head].any(dim=-1, keepdim=True), p, 0.0)
        head_max = probs.amax(dim=0)  # [S(i), S(j)]
        cross[e] = head_max[case.instruction[e]].sum(dim=0)
        selfsum[e] = head_max[case.visual[e]].sum(dim=0)
    return cross, selfsum


def assert_close(actual: tuple, expected: tuple, atol: float, rtol: float) -> float:
    """Compare (cross, selfsum) pairs; return the max abs difference."""
    diff = 0.0
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol)
        diff = max(diff, (a.double() - e.double()).abs().max().item() if a.numel() else 0.0)
    return diff


# ---------------------------------------------------------------------------------------------
# PyTorch implementation (CPU)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(), chunk=st.sampled_from([1, 50, 1 << 30]))
def test_torch_op_matches_naive_full_matrix(case, chunk):
    """Chunked (down to one row per chunk) PyTorch implementation == float64 full-matrix spec."""
    ours = torch_attention_mass(*case.args(), chunk_elements=chunk)
    assert_close(ours, naive_mass(case), atol=2e-5, rtol=2e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(dtypes=(torch.float32,)))
def test_op_on_cpu_is_the_torch_implementation_and_fitprune_score_is_unchanged(case):
    """The registered op dispatches to PyTorch on CPU, and `fitprune_score` gives the scores of the
    materialising formula (up to fp32 summation order: the op sums rows with one bmm)."""
    op = torch.ops.fitprune.visual_attention_mass(*case.args())
    for a, e in zip(op, torch_attention_mass(*case.args()), strict=True):
        assert torch.equal(a, e)
    visual = case.visual
    inputs = ScoringInputs(case.query, case.key, case.attn_mask, case.is_causal, case.scale, visual, 0, 0, {})
    b, s = visual.shape
    head_max = attention_probs(inputs).amax(dim=1)
    pos = torch.arange(s).expand(b, s)
    last_visual = torch.where(visual, pos, -1).amax(dim=1, keepdim=True)
    instruction = token_validity(inputs) & ~visual & (pos > last_visual)
    cross = (head_max * instruction.unsqueeze(-1)).sum(dim=1)
    n = visual.sum(dim=1, keepdim=True).clamp(min=1)
    before = cross * ((head_max * visual.unsqueeze(-1)).sum(dim=1) / n)
    torch.testing.assert_close(fitprune_score(inputs), before, rtol=1e-5, atol=1e-7)


def test_opcheck():
    case = build_case(2, 2, 2, 9, 8, torch.float16, "pad-float", seed=1)
    torch.library.opcheck(torch.ops.fitprune.visual_attention_mass.default, case.args())


# ---------------------------------------------------------------------------------------------
# Mask reduction (what the Triton path needs), checked on CPU


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(dtypes=(torch.float32, torch.float16)))
def test_reduce_mask_is_exact_on_weighted_rows(case):
    """LLaVA masks (causal + left padding, bool or float, padding rows masked or not) reduce to
    causal & key validity; whenever a mask reduces, the reduced form gives identical results."""
    s = case.query.shape[2]
    reduced = reduce_mask(case.attn_mask, case.is_causal, case.instruction | case.visual, s)
    if case.kind.startswith("pad") or case.kind == "none":
        assert reduced is not None
    if reduced is None:
        return
    causal, key_valid = reduced
    rebuilt = None if key_valid is None else key_valid[:, None, None, :].expand(-1, 1, s, s)
    ours = torch_attention_mass(
        case.query, case.key, rebuilt, case.instruction, case.visual, case.scale, causal
    )
    for a, e in zip(ours, torch_attention_mass(*case.args()), strict=True):
        assert torch.equal(a, e)


def test_reduce_mask_rejects_what_the_kernel_cannot_express():
    s = 6
    rows = torch.ones(1, s, dtype=torch.bool)
    tril = torch.ones(s, s, dtype=torch.bool).tril()
    per_head = tril.expand(1, 2, s, s)
    assert reduce_mask(per_head, False, rows, s) is None
    bias = torch.zeros(1, 1, s, s).masked_fill(~tril, torch.finfo(torch.float32).min)
    causal, key_valid = reduce_mask(bias, False, rows, s)  # 0 / dtype-min: a plain causal mask
    assert causal and key_valid.all()
    bias[0, 0, 3, 1] = 0.5  # a real additive bias
    assert reduce_mask(bias, False, rows, s) is None
    hole = tril.clone()
    hole[4, 2] = False  # a key hidden from one row only
    assert reduce_mask(hole[None, None], False, rows, s) is None
    rows[0, 4] = False  # ... unless that row carries no weight
    assert reduce_mask(hole[None, None], False, rows, s) is not None
    full = torch.ones(1, 1, s, s, dtype=torch.bool)  # bidirectional, shared by a batch of 2
    causal, key_valid = reduce_mask(full, False, torch.ones(2, s, dtype=torch.bool), s)
    assert not causal and key_valid.shape == (2, s) and key_valid.all()


# ---------------------------------------------------------------------------------------------
# Inductor


def test_inductor_keeps_the_op_as_one_node():
    from torch._inductor.utils import run_and_get_code

    case = build_case(2, 2, 2, 12, 8, torch.float32, "pad-float", seed=2)
    query = case.query.clone().requires_grad_(True)  # as in a model whose weights require grad

    def scores(query, key, mask, instruction, visual):
        cross, selfsum = torch.ops.fitprune.visual_attention_mass(
            query * 1.0, key, mask, instruction, visual, case.scale, False
        )
        return cross * selfsum

    args = (query, case.key, case.attn_mask, case.instruction, case.visual)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(scores, backend="inductor", fullgraph=True), *args)
    calls = sum(c.count("torch.ops.fitprune.visual_attention_mass.default(") for c in code)
    assert calls == 1, code
    assert not out.requires_grad  # the op is non-differentiable by design
    torch.testing.assert_close(out, scores(*args), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter


def test_triton_kernels_under_interpreter():
    """Run this module's `test_kernel_*` tests in a subprocess with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_kernel_", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "6 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the subprocess of test_triton_kernels_under_interpreter"
)


@interpreted_only
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case=cases(kinds=["none", "pad-bool", "pad-float", "pad-unmasked"], max_len=48),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
)
def test_kernel_matches_torch(case, blocks):
    """Triton (own log-sum-exp pass) vs the PyTorch op, fp32 / fp16 / bf16, GQA, padding."""
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    s = case.query.shape[2]
    causal, key_valid = reduce_mask(case.attn_mask, case.is_causal, case.instruction | case.visual, s)
    ours = triton_attention_mass(
        case.query, case.key, key_valid, case.instruction, case.visual, case.scale, causal, None, *blocks
    )
    diff = assert_close(ours, torch_attention_mass(*case.args()), atol=2e-5, rtol=2e-5)
    print(f"kernel-vs-torch max abs diff {diff:.3g} ({case.query.dtype}, {case.kind})")


@interpreted_only
def test_kernel_with_given_lse_and_cuda_dispatch():
    """An lse from elsewhere (natural log) skips the lse pass; the CUDA kernel glue (mask
    reduction, then Triton) matches PyTorch, and falls back to it for a per-head mask."""
    from fitprune_fx.kernels.attention_mass import _visual_attention_mass_cuda
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    case = build_case(2, 2, 3, 37, 24, torch.float32, "pad-float", seed=3)
    ref = torch_attention_mass(*case.args())
    logits = (
        case.query.float()
        @ case.key.float()
        .repeat_interleave(case.query.shape[1] // case.key.shape[1], dim=1)
        .transpose(-1, -2)
    ) * case.scale
    lse = logits.masked_fill(~case.allowed, float("-inf")).logsumexp(dim=-1)
    _, key_valid = reduce_mask(case.attn_mask, False, case.instruction | case.visual, case.query.shape[2])
    given_lse = triton_attention_mass(
        case.query, case.key, key_valid, case.instruction, case.visual, case.scale, True, lse, 16, 16
    )
    assert_close(given_lse, ref, atol=2e-5, rtol=2e-5)
    assert_close(_visual_attention_mass_cuda(*case.args()), ref, atol=2e-5, rtol=2e-5)
    per_head = build_case(1, 1, 2, 20, 8, torch.float32, "per-head", seed=4)
    fallback = _visual_attention_mass_cuda(*per_head.args())
    for a, e in zip(fallback, torch_attention_mass(*per_head.args()), strict=True):
        assert torch.equal(a, e)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_at_production_tiles(dtype):
    """The tile shapes a 7B model launches (head_dim 128, 64-wide blocks) at small S, GQA, padding."""
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    case = build_case(2, 2, 2, 150, 128, dtype, "pad-bool", seed=11)
    s = case.query.shape[2]
    causal, key_valid = reduce_mask(case.attn_mask, case.is_causal, case.instruction | case.visual, s)
    ours = triton_attention_mass(
        case.query, case.key, key_valid, case.instruction, case.visual, case.scale, causal, None, 64, 64
    )
    diff = assert_close(ours, torch_attention_mass(*case.args()), atol=2e-5, rtol=2e-5)
    print(f"production tiles max abs diff {diff:.3g} ({dtype})")


@interpreted_only
def test_kernel_llava_like_prompt():
    """A left-padded LLaVA-like batch: system text, a block of visual tokens, then the question."""
    from fitprune_fx.kernels.attention_mass import _visual_attention_mass_cuda

    b, h, hkv, s, d = 2, 4, 2, 70, 16
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, h, s, d, generator=g, dtype=torch.float16)
    key = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float16)
    valid = torch.arange(s)[None, :] >= torch.tensor([[0], [9]])
    mask = torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, :]
    pos = torch.arange(s)[None, :]
    visual = (pos >= torch.tensor([[5], [14]])) & (pos < torch.tensor([[53], [62]]))
    instruction = valid & (pos >= torch.tensor([[53], [62]]))
    args = (query, key, mask[:, None], instruction, visual, d**-0.5, False)
    diff = assert_close(_visual_attention_mass_cuda(*args), torch_attention_mass(*args), atol=2e-5, rtol=2e-5)
    print(f"llava-like max abs diff {diff:.3g}")
