"""fp32 CPU linears routed to oneDNN (`passes/onednn_linear.py`): the op equals `F.linear`, the
rewrite moves what its rule says, and a pruned model compiled with it keeps the reference's
tokens and numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fitprune_fx.backend import fitprune_backend
from fitprune_fx.passes.onednn_linear import MIN_ROWS, may_route_linears, route_linears_to_onednn
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

pytestmark = pytest.mark.skipif(not may_route_linears([]), reason="this torch build has no oneDNN")


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    sizes=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    bias=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_onednn_linear_equals_linear(lead, sizes, bias, transposed, seed):
    """Any leading dims, with and without bias, on a strided (transposed) input."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = sizes
    x = torch.randn(*lead, n_in, generator=g)
    if transposed:  # same values, last two dims' strides swapped
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 1 else x
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    out = torch.ops.fitprune.onednn_linear(x, w, b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_opcheck():
    x, w, b = torch.randn(2, 40, 16), torch.randn(24, 16), torch.randn(24)
    torch.library.opcheck(torch.ops.fitprune.onednn_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fitprune.onednn_linear.default, (x, w, None))


class ThreeLinears(torch.nn.Module):
    """Two linears over every row and a rows-1 head, as in a decoder + lm_head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        side = 64
        self.small = torch.nn.Linear(side, 8, dtype=dtype)
        self.large = torch.nn.Linear(side, side, bias=False, dtype=dtype)
        self.head = torch.nn.Linear(side, 4, bias=False, dtype=dtype)

    def forward(self, x):
        h = self.large(x) + self.small(x).sum(-1, keepdim=True)
        return self.head(h[:, -1:])


def routed(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many linears the rewrite moves in Dynamo's graph of `module(x)`, and the rewritten
    graph's output."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(route_linears_to_onednn(gm.graph))
        gm.recompile()
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, backend=backend)(x)
    torch._dynamo.reset()
    return counts[0], out


@pytest.mark.parametrize(
    "rows, dtype, expected",
    [(MIN_ROWS, torch.float32, 3), (MIN_ROWS - 1, torch.float32, 0), (MIN_ROWS, torch.bfloat16, 0)],
)
def test_route_rule(rows, dtype, expected):
    """A prefill moves every fp32 linear (the rows-1 head too); a decode step's few rows and bf16
    stay with Inductor."""
    torch.manual_seed(0)
    module = ThreeLinears(dtype).eval()
    x = torch.randn(1, rows, module.large.in_features, dtype=dtype)
    count, out = routed(module, x)
    assert count == expected
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), atol=1e-3, rtol=1e-3)


def test_a_tensor_subclass_weight_keeps_inductors_linear():
    """A weight that is a tensor subclass (a quantized weight, say) dispatches ops itself and may
    not know the oneDNN op: its linear is not moved, nor the head, whose input it makes a subclass
    too; the large linear is."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    module = ThreeLinears().eval()
    w = module.small.weight.detach()
    module.small.weight = torch.nn.Parameter(TwoTensor(w, w.clone()), requires_grad=False)
    x = torch.randn(1, MIN_ROWS, module.large.in_features)
    count, out = routed(module, x)
    assert count == 1
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), atol=1e-4, rtol=1e-4)


def test_graphs_compiled_for_training_keep_inductors_linears():
    """The op has no backward: a graph that may need one is left to Inductor."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.enable_grad():
        assert not may_route_linears([w])
        assert may_route_linears([w.detach()])
    with torch.no_grad():
        assert may_route_linears([w])


def test_pruned_model_through_onednn_matches_the_reference():
    """Inductor, batch of two (a prefill of 50 rows): every decoder linear goes to oneDNN, the
    layers still share compiles, and kept tokens and logits are the reference's; the decode step
    (2 rows, small weights) keeps Inductor's linears."""
    m = tiny_llava("llama", seed=1)
    prune = {0: 4, 1: 6, 2: 3}
    recipe = Recipe(model=ModelInfo.from_config(m.config), prune=prune)
    inputs = make_inputs(m, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune
    )
    reports = {}
    for on in (True, False):
        backend = fitprune_backend(recipe, onednn_linears=on, progress=False)
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(m, backend=backend)(**inputs)
        for b in range(2):
            torch.testing.assert_close(out.logits[b], ref.logits[b, ref.kept_final[b]], atol=1e-4, rtol=1e-4)
        reports[on] = backend.pruned_graphs[0]
    linears = 7 * m.config.text_config.num_hidden_layers
    assert reports[True].onednn_linears == linears and reports[False].onednn_linears == 0
    assert f"[{reports[True].onednn_linears} linears through oneDNN]" in str(reports[True])
    assert reports[True].partitions == reports[False].partitions == (5, 4)  # layers 1-2 share (batch 2)
    assert reports[True].result.tokens_per_layer == ["25", "21", "15", "12"]
    torch._dynamo.reset()
