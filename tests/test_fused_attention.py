"""`fitprune::attention_with_mass` (a pruning layer's attention output and FitPrune's mass in one op)
against float64 full-matrix oracles, and the pass choosing it: at deleting layers of the built-in
scorer only, with the same kept tokens and outputs as the unfused path."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention_mass import Case, assert_close, cases, naive_mass

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.kernels.attention_mass import torch_attention_mass
from fitprune_fx.kernels.fused_attention import torch_attention_with_mass
from fitprune_fx.passes.scorers import fastv_score
from fitprune_fx.tiny import PromptSpec, make_inputs, tiny_llava

CAUSAL_MASKS = ("pad-bool", "pad-float", "bias")  # masks that are causal in every row


def naive_attention(case: Case, value: torch.Tensor) -> torch.Tensor:
    """Attention output [B, H, S, Dv] in float64 from the full matrix; fully masked rows give 0."""
    b, h, s, _ = case.query.shape
    groups = h // case.key.shape[1]
    out = torch.zeros(b, h, s, value.shape[-1], dtype=torch.float64)
    for e in range(b):
        for head in range(h):
            logits = (case.query[e, head].double() @ case.key[e, head // groups].double().T) * case.scale
            logits = (logits + case.bias[e, head].double()).masked_fill(~case.allowed[e, head], float("-inf"))
            probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)
            out[e, head] = probs @ value[e, head // groups].double()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case=cases(),
    chunk=st.sampled_from([1, 50, 1 << 30]),
    rows=st.sampled_from([3, 32, 1 << 30]),
    dv=st.sampled_from([4, 8]),
    data=st.data(),
)
def test_fused_op_matches_full_matrix_attention_and_mass(case, chunk, rows, dv, data):
    """Output and mass == the float64 specification, chunked down to one row (by the element budget
    or the row cap) or not at all, with causal key truncation wherever the mask is causal already."""
    b, _, s, _ = case.query.shape
    value = torch.randn(b, case.key.shape[1], s, dv, generator=torch.Generator().manual_seed(s)).to(
        case.query.dtype
    )
    exact_causal = case.is_causal or case.kind in CAUSAL_MASKS
    causal = exact_causal and data.draw(st.booleans(), label="causal truncation")
    out, cross, selfsum = torch_attention_with_mass(
        case.query, case.key, value, case.attn_mask, case.instruction, case.visual, case.scale,
        causal or case.is_causal, chunk_elements=chunk, chunk_rows=rows,
    )  # fmt: skip
    assert out.dtype == case.query.dtype and out.shape == (b, case.query.shape[1], s, dv)
    tol = 2e-5 if case.query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), naive_attention(case, value), atol=tol, rtol=tol)
    assert_close((cross, selfsum), naive_mass(case), atol=2e-5, rtol=2e-5)


def test_op_equals_sdpa_on_a_left_padded_causal_prompt_with_gqa():
    """The CPU op against PyTorch's own SDPA (real rows; padding rows are 0, not NaN), bf16 too."""
    g = torch.Generator().manual_seed(0)
    b, hkv, groups, s, d = 2, 2, 3, 70, 16
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(b, hkv * groups, s, d, generator=g).to(dtype)
        k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
        valid = torch.arange(s)[None] >= torch.tensor([0, 9])[:, None]  # [B, S], left padding
        mask = (torch.ones(s, s, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
        visual = valid & (torch.arange(s) >= 12) & (torch.arange(s) < 60)
        out, _, _ = torch.ops.fitprune.attention_with_mass(
            q, k, v, mask, ~visual & valid, visual, d**-0.5, False, True
        )
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[1, :, 9:], expected[1, :, 9:], atol=tol, rtol=tol)
        torch.testing.assert_close(out[0], expected[0], atol=tol, rtol=tol)
        assert not out.isnan().any() and (out[1, :, :9] == 0).all()


def test_opcheck():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=g) for _ in range(3))
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    visual = (torch.arange(12) >= 2) & (torch.arange(12) < 9)
    args = (q, k, v, mask, (~visual).expand(2, -1), visual.expand(2, -1), 0.3, False, True)
    torch.library.opcheck(torch.ops.fitprune.attention_with_mass.default, args)


PROMPTS = [PromptSpec(before=3, after=5), PromptSpec(before=6, after=2)]


def _run(model, inputs, recipe: Recipe, *, grad: bool = False, scorer=None):
    torch._dynamo.reset()
    backend = fitprune_backend(recipe, compiler="eager", scorer=scorer)
    with torch.set_grad_enabled(grad):
        logits = torch.compile(model, backend=backend)(**inputs).logits
    (report,) = backend.pruned_graphs
    return logits.detach(), report.result


def test_pass_fuses_at_deleting_layers_of_the_builtin_scorer_only():
    """Fused at layers that delete (not the count-0 one), not with another scorer, not when the
    graph requires grad; the unfused and fused runs keep the same tokens and give the same logits."""
    model = tiny_llava(num_layers=4, seed=2)
    inputs = make_inputs(model, PROMPTS, seed=3)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={0: 5, 1: 0, 2: 4})
    fused, result = _run(model, inputs, recipe)
    assert result.fused_scoring == [0, 2]
    unfused, result = _run(model, inputs, recipe, grad=True)  # weights require grad: no fusion
    assert result.fused_scoring == []
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    _, result = _run(model, inputs, recipe, scorer=fastv_score)
    assert result.fused_scoring == []


def test_cuda_kernel_is_sdpa_plus_the_mass_without_host_sync(monkeypatch):
    """The CUDA registration (run here on CPU tensors, Triton made to fail so the mass falls back
    to PyTorch): SDPA's own output and the mass op's, with no host synchronisation."""
    from fitprune_fx.kernels import attention_mass, fused_attention, triton_mass
    from host_syncs import HostSyncRecorder

    def broken(*args, **kwargs):
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(triton_mass, "triton_attention_mass", broken)
    monkeypatch.setattr(attention_mass, "_TRITON_FAILED", set())
    monkeypatch.setattr(attention_mass, "_WARNED", set())
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 20, 8, generator=g)
    k, v = (torch.randn(2, 2, 20, 8, generator=g) for _ in range(2))
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    visual = ((torch.arange(20) >= 3) & (torch.arange(20) < 15)).expand(2, -1)
    args = (q, k, v, mask, ~visual, visual, 0.35, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one "PyTorch, not Triton" warning
        with HostSyncRecorder() as recorder:
            out, cross, selfsum = fused_attention.cuda_attention_with_mass(*args)
    assert recorder.syncs == []
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.35, enable_gqa=True)
    assert torch.equal(out, expected)
    for a, e in zip(
        (cross, selfsum), torch_attention_mass(q, k, mask, ~visual, visual, 0.35, True), strict=True
    ):
        assert torch.equal(a, e)


def test_instruction_rows_read_padding_at_original_positions():
    """The fused scorer's instruction rows at a later pruning layer: padding is read off the
    uncompacted mask (additive or bool) at the kept tokens' original positions; with no mask there
    is no padding. Expected rows written out by hand: non-padding, non-visual, after the layer's
    last visual token."""
    from fitprune_fx.passes.scorers import instruction_rows_at

    s = 9
    padding = torch.zeros(2, s, dtype=torch.bool)
    padding[1, 7:] = True  # example 1 is right-padded: positions 7 and 8 are padding
    visible = torch.ones(s, s, dtype=torch.bool).tril() & ~padding[:, None, None, :]  # [B, 1, S, S]
    additive = torch.zeros(2, 1, s, s).masked_fill(~visible, torch.finfo(torch.float32).min)
    # Kept tokens after an earlier deletion (original positions), and which of them are visual.
    positions = torch.tensor([[0, 1, 2, 4, 6, 7, 8], [0, 1, 3, 4, 5, 7, 8]])
    visual = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    for mask in (additive, visible):
        assert torch.equal(instruction_rows_at(mask, visual, positions), expected)
    # Without a mask every token is real: example 1's positions 7 and 8 count then.
    no_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(instruction_rows_at(None, visual, positions), no_mask)
    # Before any deletion (positions None) the mask's own rows are the tokens.
    full_visual = torch.zeros(2, s, dtype=torch.bool)
    full_visual[:, 3:5] = True
    rows = instruction_rows_at(additive, full_visual, None)
    assert rows.tolist() == [[False] * 5 + [True] * 4, [False] * 5 + [True] * 2 + [False] * 2]
