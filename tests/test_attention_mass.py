"""`fitprune::visual_attention_mass`: PyTorch op vs a naive full matrix, Inductor, the CUDA dispatch
path (fallback, no host sync), the Triton kernels compiled for GPUs, and the kernels vs the PyTorch
op under Triton's CPU interpreter (in a subprocess, so TRITON_INTERPRET=1 never leaks elsewhere)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitprune_fx.kernels.attention_mass import torch_attention_mass
from fitprune_fx.passes.scorers import ScoringInputs, attention_probs, fitprune_score, token_validity
from host_syncs import HostSyncRecorder

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
@given(case=cases(), chunk=st.sampled_from([1, 50, 1 << 30]), rows=st.sampled_from([3, 32, 1 << 30]))
def test_torch_op_matches_naive_full_matrix(case, chunk, rows):
    """Chunked (down to one row per chunk, by the element budget or the row cap, or not at all)
    PyTorch implementation == float64 full-matrix spec."""
    ours = torch_attention_mass(*case.args(), chunk_elements=chunk, chunk_rows=rows)
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
# The CUDA dispatch path: fallback and host synchronisation, checked on CPU


def test_cuda_path_falls_back_to_pytorch_with_one_warning(monkeypatch):
    """A Triton compile or launch error gives the PyTorch result and one warning, then PyTorch
    without retrying Triton for that launch configuration; and the fallback makes no host sync."""
    pytest.importorskip("triton")
    from fitprune_fx.kernels import attention_mass, triton_mass

    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(triton_mass, "triton_attention_mass", broken)
    monkeypatch.setattr(attention_mass, "_TRITON_FAILED", set())
    monkeypatch.setattr(attention_mass, "_WARNED", set())
    case = build_case(2, 2, 2, 21, 8, torch.float16, "pad-bool", seed=5)
    with pytest.warns(UserWarning, match="PyTorch, not Triton: the Triton kernel failed.*no kernel image"):
        first = attention_mass.cuda_attention_mass(*case.args())
    with HostSyncRecorder() as recorder, warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        second = attention_mass.cuda_attention_mass(*case.args())
    assert recorder.syncs == []
    assert len(attempts) == 1
    for a, b, e in zip(first, second, torch_attention_mass(*case.args()), strict=True):
        assert torch.equal(a, e) and torch.equal(b, e)


def test_cuda_path_refuses_masks_the_kernel_cannot_read(monkeypatch):
    """Shapes only decide: a mask wider than the keys (a cache-sized mask) goes to PyTorch."""
    pytest.importorskip("triton")
    from fitprune_fx.kernels import attention_mass

    monkeypatch.setattr(attention_mass, "_WARNED", set())
    case = build_case(1, 1, 2, 12, 8, torch.float32, "pad-bool", seed=6)
    wide = torch.ones(1, 1, 12, 15, dtype=torch.bool)
    assert "is not [B|1, 1|H, S|1, S]" in attention_mass._triton_unusable(case.query, wide)
    assert attention_mass._triton_unusable(case.query, case.attn_mask) is None
    assert attention_mass._triton_unusable(case.query, torch.ones(1, 2, 1, 12, dtype=torch.bool)) is None


# ---------------------------------------------------------------------------------------------
# Triton kernels compiled for GPUs (no GPU needed: triton builds cubins with its own ptxas)


def compile_for_gpu(fn, dtype: str, mask: str, causal: bool, arch: int):
    """Compile a kernel of `triton_mass` down to a cubin for `sm_{arch}` at production tiles."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fitprune_fx.kernels import triton_mass

    pointers = {"Q": dtype, "K": dtype, "MASK": mask, "W_INSTR": "u8", "W_VIS": "u8"}
    constexprs = {
        "IS_CAUSAL": causal,
        "MASK_KIND": {"fp16": triton_mass.MASK_NONE, "u8": triton_mass.MASK_BOOL}.get(
            mask, triton_mass.MASK_ADDITIVE
        ),
        "DOT_FP32": False,
        "DOT_PRECISION": "tf32" if dtype == "fp32" else "ieee",
        "VISUAL_COLUMNS": True,
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_D": 128,
        "BLOCK": 128,
    }
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("qk_scale", "mask_floor", "lse_to_base2"):
            signature[name] = "fp32"
        elif name[0].isupper() and name not in ("S", "D", "G", "HKV", "BLOCKS_M"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "i32"  # sizes and strides below 2^31 are specialised to i32
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", arch, 32))


@pytest.mark.parametrize(
    "dtype, mask, causal, arch",
    [("bf16", "u8", True, 90), ("fp16", "fp16", False, 80), ("fp32", "fp16", True, 90)],
)
def test_kernels_compile_for_gpus_with_64_bit_batch_offsets(dtype, mask, causal, arch):
    """The three kernels compile to cubins for A100 / H100 (bf16 `tl.dot` and TF32 fp32 dots
    included, which the interpreter cannot run), and batch / head program ids are widened to 64
    bits before any multiplication with a stride, so B*H*S*D past 2^31 elements cannot overflow."""
    from fitprune_fx.kernels import triton_mass

    kernels = ((triton_mass._row_lse_kernel, "yz"), (triton_mass._mass_kernel, "z"))
    for fn, axes in (*kernels, (triton_mass._sum_partials_kernel, "y")):
        kernel = compile_for_gpu(fn, dtype, mask, causal, arch)
        assert kernel.asm["cubin"], fn.__name__
        ttir = kernel.asm["ttir"]
        for axis in axes:
            pid = re.search(rf"(%\w+) = tt.get_program_id {axis} : i32", ttir).group(1)
            named = re.compile(re.escape(pid) + r"(?![\w])")
            uses = [ln.strip() for ln in ttir.splitlines() if named.search(ln) and "get_program_id" not in ln]
            assert uses and all("arith.extsi" in u and "to i64" in u for u in uses), (fn.__name__, uses)


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
    assert "9 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the subprocess of test_triton_kernels_under_interpreter"
)


@interpreted_only
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(max_len=48), blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_kernel_matches_torch(case, blocks):
    """Triton (own log-sum-exp pass) vs the PyTorch op: every mask kind (none, left padding as
    bool / float / unmasked padding rows, random, per-head, additive bias), fp32 / fp16 / bf16, GQA."""
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    ours = triton_attention_mass(*case.args(), None, *blocks)
    diff = assert_close(ours, torch_attention_mass(*case.args()), atol=2e-5, rtol=2e-5)
    print(f"kernel-vs-torch max abs diff {diff:.3g} ({case.query.dtype}, {case.kind})")


@interpreted_only
def test_kernel_with_given_lse():
    """An lse from elsewhere (natural log, e.g. an attention kernel's) skips the lse pass."""
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    case = build_case(2, 2, 3, 37, 24, torch.float32, "pad-float", seed=3)
    logits = (
        case.query.float()
        @ case.key.float()
        .repeat_interleave(case.query.shape[1] // case.key.shape[1], dim=1)
        .transpose(-1, -2)
    ) * case.scale
    lse = logits.masked_fill(~case.allowed, float("-inf")).logsumexp(dim=-1)
    given_lse = triton_attention_mass(*case.args(), lse, 16, 16)
    assert_close(given_lse, torch_attention_mass(*case.args()), atol=2e-5, rtol=2e-5)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_at_production_tiles(dtype):
    """The tile shapes a 7B model launches (head_dim 128, 64-wide blocks) at small S, GQA, padding."""
    from fitprune_fx.kernels.triton_mass import triton_attention_mass

    case = build_case(2, 2, 2, 150, 128, dtype, "pad-bool", seed=11)
    ours = triton_attention_mass(*case.args(), None, 64, 64)
    diff = assert_close(ours, torch_attention_mass(*case.args()), atol=2e-5, rtol=2e-5)
    print(f"production tiles max abs diff {diff:.3g} ({dtype})")


@interpreted_only
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_llava_like_prompt_through_cuda_path_without_host_sync(causal):
    """A left-padded LLaVA-like batch (system text, visual block, question) through the CUDA
    implementation: Triton's result, and not one device value read on the host on the way."""
    from fitprune_fx.kernels.attention_mass import cuda_attention_mass

    b, h, hkv, s, d = 2, 4, 2, 70, 16
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, h, s, d, generator=g, dtype=torch.float16)
    key = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float16)
    valid = torch.arange(s)[None, :] >= torch.tensor([[0], [9]])
    mask = torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, :]
    pos = torch.arange(s)[None, :]
    visual = (pos >= torch.tensor([[5], [14]])) & (pos < torch.tensor([[53], [62]]))
    instruction = valid & (pos >= torch.tensor([[53], [62]]))
    args = (query, key, mask[:, None], instruction, visual, d**-0.5, causal)
    with HostSyncRecorder() as recorder, warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to PyTorch would warn
        ours = cuda_attention_mass(*args)
    assert recorder.syncs == []
    diff = assert_close(ours, torch_attention_mass(*args), atol=2e-5, rtol=2e-5)
    print(f"llava-like max abs diff {diff:.3g}")


def _fused_case(case: Case) -> tuple:
    """The fused op's arguments for `case`: a value tensor, causality folded into a mask that is
    not causal by itself (the op's contract: with a mask, `causal` means the mask is causal)."""
    g = torch.Generator().manual_seed(case.query.shape[2])
    value = torch.randn(case.key.shape, generator=g).to(case.query.dtype)
    mask, sdpa_causal = case.attn_mask, case.is_causal
    if mask is not None:
        sdpa_causal = False
        if case.is_causal and mask.dtype == torch.bool:
            mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool).tril()
    args = (case.query, case.key, value, mask, case.instruction, case.visual, case.scale)
    return (*args, sdpa_causal, case.is_causal)


@interpreted_only
@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(max_len=40))
def test_kernel_fused_cuda_path_is_sdpa_with_its_lse_and_the_mass(case):
    """The fused op's CUDA implementation on CPU tensors: torch's attention kernel with its lse
    (the CPU flash kernel stands in for CUDA's), checked once against the lse pass, then the mass
    from that lse over visual columns. The output is SDPA's own; the mass at visual columns is the
    PyTorch op's; after the first call of a configuration no device value is read on the host."""
    from fitprune_fx.kernels import sdpa_lse
    from fitprune_fx.kernels.fused_attention import cuda_attention_with_mass

    args = _fused_case(case)
    query, key, value, mask, instruction, visual, scale, sdpa_causal, causal = args
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 takes the Triton path only with TF32 allowed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither a fallback nor a disagreeing lse
            cuda_attention_with_mass(*args)
            with HostSyncRecorder() as recorder:
                out, cross, selfsum = cuda_attention_with_mass(*args)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert recorder.syncs == []
    assert all(sdpa_lse._CHECKED.values())
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=sdpa_causal, scale=scale, enable_gqa=True
    )
    rows = mask is None or mask.any(dim=-1, keepdim=True).all()  # SDPA kernels differ on empty rows
    if rows is True or bool(rows):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    ref = torch_attention_mass(query, key, mask, instruction, visual, scale, causal)
    cols = visual.expand_as(cross)
    # the lse is torch's kernel's: in 16-bit its own rounding (up to 5e-5 relative measured)
    tol = 2e-5 if query.dtype == torch.float32 else 2e-4
    assert_close((cross[cols], selfsum[cols]), (ref[0][cols], ref[1][cols]), atol=tol, rtol=tol)


@interpreted_only
def test_kernel_fused_cuda_path_refuses_an_lse_that_disagrees(monkeypatch):
    """If torch's kernel returned an lse of another convention, the first call of the
    configuration finds out, warns once, and every call computes its own lse: same results."""
    from fitprune_fx.kernels import sdpa_lse
    from fitprune_fx.kernels.fused_attention import cuda_attention_with_mass

    honest = sdpa_lse.sdpa_with_lse
    monkeypatch.setattr(sdpa_lse, "_CHECKED", {})
    monkeypatch.setattr(sdpa_lse, "sdpa_with_lse", lambda *a: (honest(*a)[0], honest(*a)[1] * 0.5))
    case = build_case(2, 2, 2, 33, 16, torch.float16, "pad-bool", seed=8)
    args = _fused_case(case)
    with pytest.warns(UserWarning, match="lse differs from the mass kernel's"):
        first = cuda_attention_with_mass(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = cuda_attention_with_mass(*args)
    assert list(sdpa_lse._CHECKED.values()) == [False]
    ref = torch_attention_mass(*case.args())
    cols = case.visual
    for got in (first, second):
        assert_close((got[1][cols], got[2][cols]), (ref[0][cols], ref[1][cols]), atol=2e-5, rtol=2e-5)
