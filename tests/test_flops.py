"""FLOPs models: the reference one (labels of published recipes) and the full one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fitprune_fx.flops import (
    FlopsReport,
    full_flops_reduction,
    full_layer_flops,
    reference_flops_reduction,
    reference_layer_flops,
    visual_tokens_per_layer,
)

FAST = settings(max_examples=60, deadline=None)


@st.composite
def shapes(draw):
    """Model dimensions and a valid prune dict (total <= num_visual)."""
    num_layers = draw(st.integers(1, 12))
    num_visual = draw(st.integers(1, 600))
    hidden = draw(st.integers(1, 5000))
    intermediate = draw(st.integers(1, 15000))
    prune, left = {}, num_visual
    for layer in draw(st.lists(st.integers(0, num_layers - 1), unique=True, max_size=num_layers)):
        prune[layer] = draw(st.integers(0, left))
        left -= prune[layer]
    return prune, num_layers, num_visual, hidden, intermediate


def test_reference_layer_flops_by_hand():
    # n=2 before, n'=1 after, h=3, m=5: 3*2*9 + 2*2*2*3 + 1*9 + 3*1*3*5 = 54 + 24 + 9 + 45
    assert reference_layer_flops(2, 1, 3, 5) == 132


def test_reference_layer_charges_rest_after_deletion():
    # Deleting tokens after a layer must lower that layer's own o_proj/MLP cost, not its attention.
    h, m = 16, 40
    assert reference_layer_flops(10, 10, h, m) - reference_layer_flops(10, 7, h, m) == 3 * (h * h + 3 * h * m)


@FAST
@given(shapes(), st.integers(0, 200))
def test_zero_recipe_reduces_nothing(shape, num_text):
    _, num_layers, num_visual, h, m = shape
    assert reference_flops_reduction({}, num_layers, num_visual, h, m) == 0.0
    assert full_flops_reduction({}, num_layers, num_visual, h, m, num_text=num_text) == 0.0


@FAST
@given(st.integers(1, 40), st.integers(1, 700), st.integers(1, 8192), st.integers(1, 20000))
def test_delete_everything_after_layer_0_reference(num_layers, n, h, m):
    # Independent arithmetic: layer 0 pays attention on n tokens and nothing after; the
    # unpruned model pays attention + o_proj + MLP on n tokens in every layer.
    pruned = 3 * n * h * h + 2 * n * n * h
    unpruned = num_layers * (3 * n * h * h + 2 * n * n * h + n * h * h + 3 * n * h * m)
    got = reference_flops_reduction({0: n}, num_layers, n, h, m)
    assert abs(got - (1 - pruned / unpruned)) < 1e-12


@FAST
@given(st.integers(1, 40), st.integers(1, 700), st.integers(0, 300), st.integers(1, 4096))
def test_delete_everything_after_layer_0_full(num_layers, n, t, h):
    m = 3 * h

    # Causal: a sequence of S tokens has S*(S+1)/2 query-key pairs; scores and weighted sum
    # each cost h per pair. MHA: q, k, v each S*h*h.
    def layer(s_in, s_out):
        return 3 * s_in * h * h + h * s_in * (s_in + 1) + s_out * h * h + 3 * s_out * h * m

    pruned = layer(t + n, t) + (num_layers - 1) * layer(t, t)
    unpruned = num_layers * layer(t + n, t + n)
    got = full_flops_reduction({0: n}, num_layers, n, h, m, num_text=t)
    assert abs(got - (1 - pruned / unpruned)) < 1e-12


@FAST
@given(shapes())
def test_full_model_without_text_or_mask_is_the_reference(shape):
    prune, num_layers, num_visual, h, m = shape
    counts = visual_tokens_per_layer(prune, num_layers, num_visual)
    for a, b in zip(counts[:-1], counts[1:], strict=True):
        assert full_layer_flops(a, b, h, m, causal=False) == reference_layer_flops(a, b, h, m)
    assert full_flops_reduction(
        prune, num_layers, num_visual, h, m, causal=False
    ) == reference_flops_reduction(prune, num_layers, num_visual, h, m)


@FAST
@given(shapes(), st.integers(1, 400))
def test_full_reduction_below_reference_with_text_no_mask(shape, num_text):
    # Text tokens add cost nothing can remove and cross terms that shrink only linearly.
    prune, num_layers, num_visual, h, m = shape
    ref = reference_flops_reduction(prune, num_layers, num_visual, h, m)
    full = full_flops_reduction(prune, num_layers, num_visual, h, m, num_text=num_text, causal=False)
    assert full <= ref + 1e-12
    if sum(prune.values()) > 0:
        assert full < ref


@FAST
@given(shapes(), st.integers(1, 400))
def test_full_reduction_not_above_reference_with_enough_text_causal(shape, num_text):
    # The causal mask halves the quadratic term; enough text outweighs that (see docstring).
    prune, num_layers, num_visual, h, m = shape
    t = num_text
    while t * (4 * h + 3 * m + t + 1) < num_visual * num_visual:
        t += 1
    ref = reference_flops_reduction(prune, num_layers, num_visual, h, m)
    full = full_flops_reduction(prune, num_layers, num_visual, h, m, num_text=t)
    assert full <= ref + 1e-12


def test_causal_full_reduction_can_exceed_reference_with_one_text_token():
    # Documented limit of the ordering: LLaVA-1.5-7B dims, 1 text token, deletions only after
    # the last layer. If this stops holding, the docstring of full_flops_reduction is stale.
    h, m, n, layers = 4096, 11008, 576, 32
    ref = reference_flops_reduction({31: 100}, layers, n, h, m)
    assert full_flops_reduction({31: 100}, layers, n, h, m, num_text=1) > ref
    assert full_flops_reduction({31: 100}, layers, n, h, m, num_text=7) <= ref


@FAST
@given(
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 100),
    st.sampled_from([(32, 8), (28, 4), (8, 1), (4, 4)]),
)
def test_gqa_only_shrinks_k_and_v_projections(n_in, cut, t, heads_kv):
    heads, kv = heads_kv
    h, m = 64 * heads // 4, 200
    n_out = max(n_in - cut, 0)
    s = t + n_in
    mha = full_layer_flops(n_in, n_out, h, m, num_text=t)
    gqa = full_layer_flops(n_in, n_out, h, m, num_text=t, num_heads=heads, num_kv_heads=kv)
    assert abs((mha - gqa) - 2 * s * h * h * (1 - kv / heads)) < 1e-6 * mha + 1e-9


@FAST
@given(shapes(), st.integers(0, 100))
def test_one_more_deleted_token_costs_less(shape, t):
    prune, num_layers, num_visual, h, m = shape
    total = sum(prune.values())
    if total == num_visual:
        return
    more = dict(prune)
    layer = num_layers - 1
    more[layer] = more.get(layer, 0) + 1
    assert reference_flops_reduction(more, num_layers, num_visual, h, m) > reference_flops_reduction(
        prune, num_layers, num_visual, h, m
    )
    assert full_flops_reduction(more, num_layers, num_visual, h, m, num_text=t) > full_flops_reduction(
        prune, num_layers, num_visual, h, m, num_text=t
    )


@FAST
@given(shapes(), st.integers(0, 100))
def test_report_rows_totals_and_reductions_agree(shape, t):
    prune, num_layers, num_visual, h, m = shape
    report = FlopsReport.build(prune, num_layers, num_visual, h, m, num_text=t)
    counts = visual_tokens_per_layer(prune, num_layers, num_visual)
    assert [r.layer for r in report.rows] == list(range(num_layers))
    assert [r.tokens_in for r in report.rows] == counts[:-1]
    assert [r.tokens_out for r in report.rows] == counts[1:]
    assert report.reference_total == sum(r.reference_flops for r in report.rows)
    assert report.full_total == sum(r.full_flops for r in report.rows)
    ref = reference_flops_reduction(prune, num_layers, num_visual, h, m)
    full = full_flops_reduction(prune, num_layers, num_visual, h, m, num_text=t)
    assert abs(report.reference_reduction - ref) < 1e-12
    assert abs(report.full_reduction - full) < 1e-12


def test_report_table_has_a_line_per_layer_and_the_reductions():
    report = FlopsReport.build({0: 3, 2: 4}, 4, 10, 32, 64, num_text=5)
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == 1 + 4 + 3  # header, layers, total, reductions, legend of the columns
    assert lines[1].split()[:3] == ["0", "10", "7"]
    assert lines[3].split()[:3] == ["2", "7", "3"]
    assert f"{100 * report.reference_reduction:.2f}%" in lines[-2]
    assert f"{100 * report.full_reduction:.2f}%" in lines[-2]
    assert lines[-1].startswith("ref: the FitPrune paper's FLOPs model")
    assert "full: every projection" in lines[-1]
