"""The published methods' scorers (`passes/method_scorers`) against their eager references
(`fitprune_fx/reference_methods`, run inside the explicit-removal reference), and what a scorer sees
(`ScoringInputs`: hidden states, values, original positions, token kinds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_pass import captured, model, recipes

from fitprune_fx.backend import fitprune_backend
from fitprune_fx.passes.scorers import TokenKind, register_scorer, token_kinds
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, num_image_tokens
from graph_harness import KeptRecorder, assert_pass_matches_reference

METHODS = ["last_token", "text_raters", "duplication"]


def run_method(name, prompts, seed, prune, scorer, options=None):
    m = model(name)
    inputs = make_inputs(m, prompts, seed=seed)
    cap = captured(name, len(prompts), prompts[0].images)
    recipe = Recipe(
        model=ModelInfo.from_config(m.config), prune=prune, scorer=scorer, scorer_options=options or {}
    )
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    out = cap.run(recorder, **inputs)
    assert [r.action for r in recorder.backend.reports] == ["pruned"]
    applied = dict(sorted(recipe.pruning_plan(num_image_tokens(m) * prompts[0].images).items()))
    ref = reference_prefill(
        m,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["attention_mask"],
        prune=applied,
        scorer=scorer,
        scorer_options=options or {},
    )
    assert_pass_matches_reference(inputs, out, recorder, ref, applied)
    return ref


@st.composite
def cases(draw):
    """A model, a left-padded batch with the image(s) anywhere, a method and its options."""
    name = draw(st.sampled_from(["llama", "llama-mha", "qwen2", "llava-hr"]))
    batch = draw(st.sampled_from([1, 3]))
    images = draw(st.sampled_from([1, 2]))
    prompts = []
    for i in range(batch):
        total = 8 if i == 0 else draw(st.integers(1, 8))
        after = draw(st.integers(1, total))
        prompts.append(PromptSpec(before=total - after, after=after, images=images))
    scorer = draw(st.sampled_from([*METHODS, "fitprune", "fastv"]))
    options = {"pivots": draw(st.integers(1, 12))} if scorer == "duplication" else {}
    if draw(st.booleans()):
        options["merge"] = True
    return name, draw(st.permutations(prompts)), draw(st.integers(0, 2**16)), scorer, options


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), case=cases())
@example(
    data=None, case=("llama", [PromptSpec(2, 4), PromptSpec(5, 2), PromptSpec(0, 3)], 3, "last_token", {})
)
@example(
    data=None, case=("qwen2", [PromptSpec(0, 8, images=2), PromptSpec(3, 1, images=2)], 5, "text_raters", {})
)
@example(
    data=None, case=("llama-mha", [PromptSpec(4, 4), PromptSpec(1, 1)], 11, "duplication", {"pivots": 3})
)
def test_methods_keep_what_their_references_keep(data, case):
    """Kept sets at every pruning layer and logits at kept positions equal the eager reference, on
    padded batches with one or two images anywhere, GQA and plain multi-head attention; with token
    merging (option merge) on any scorer, FitPrune's fused scoring included."""
    name, prompts, seed, scorer, options = case
    m = model(name)
    n = num_image_tokens(m)
    prune = {1: 8} if data is None else data.draw(recipes(m.config.text_config.num_hidden_layers, n))
    run_method(name, prompts, seed, prune, scorer, options)


def test_methods_delete_different_tokens():
    """The methods are not one method under three names: on one batch their kept sets differ."""
    prompts = [PromptSpec(3, 5), PromptSpec(1, 2)]
    kept = {s: run_method("llama", prompts, 1, {0: 10}, s).kept for s in [*METHODS, "fastv"]}
    as_sets = {s: [set(k[0].tolist()) for k in ks] for s, ks in kept.items()}
    names = list(as_sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert as_sets[a] != as_sets[b], (a, b)


def test_duplication_keeps_its_pivots():
    """Every pivot survives (score 2): with pivots = visual count - deleted, the kept visual tokens
    are exactly the largest-key-norm ones, read off the reference's scores."""
    ref = run_method("llama", [PromptSpec(2, 3)], 4, {1: 12}, "duplication", {"pivots": 4})
    scores = ref.scores[1][0]
    assert int((scores == 2.0).sum()) == 4
    kept = set(ref.kept[0][0].tolist())
    assert set(ref.visual_positions[1][0][scores == 2.0].tolist()) <= kept


def test_scorer_sees_hidden_states_values_positions_and_kinds():
    """A custom scorer reads what the model computes: the hidden states entering the layer equal the
    model's own (`output_hidden_states`) at the first pruning layer and hold the kept tokens at a
    later one; values have the keys' length; positions are the original ones of the tokens present
    (a scorer that deletes the earliest visual tokens); kinds mark system, visual, between,
    instruction and padding tokens."""
    seen = []

    @register_scorer("test_records_inputs")
    def record(inputs):
        seen.append(inputs)
        return inputs.positions.float()  # delete the earliest visual tokens first

    m = model("llama")
    prompts = [PromptSpec(2, 3, images=2), PromptSpec(0, 1, images=2)]
    inputs = make_inputs(m, prompts, seed=2)
    cap = captured("llama", 2, 2)
    n = 2 * num_image_tokens(m)
    recipe = Recipe(model=ModelInfo.from_config(m.config), prune={0: 5, 1: 7}, scorer="test_records_inputs")
    cap.run(fitprune_backend(recipe, compiler="eager"), **inputs)
    with torch.no_grad():
        full = m(**inputs, output_hidden_states=True)
    first, second = seen[-2:]  # the pass also ran it on fake tensors (shape propagation)
    torch.testing.assert_close(first.hidden, full.hidden_states[0])
    assert first.value.shape[-2] == first.key.shape[-2] == first.hidden.shape[1]
    s = inputs["input_ids"].shape[1]
    assert torch.equal(first.positions, torch.arange(s).expand(2, s))
    d = recipe.pruning_plan(n)[0]  # counts are per image: 5 per image
    assert d == 10
    # after layer 0 deleted the d earliest visual tokens of each example
    visual = inputs["input_ids"] == m.config.image_token_id
    expected = []
    for b in range(2):
        gone = visual[b].nonzero().flatten()[:d]
        keep = torch.ones(s, dtype=torch.bool)
        keep[gone] = False
        expected.append(keep.nonzero().flatten())
    assert torch.equal(second.positions, torch.stack(expected))
    assert second.hidden.shape[1] == s - d
    kinds = first.token_kinds()
    for b in range(2):
        vis = visual[b].nonzero().flatten()
        pad = (inputs["attention_mask"][b] == 0).nonzero().flatten()
        assert torch.equal((kinds[b] == TokenKind.VISUAL).nonzero().flatten(), vis)
        assert torch.equal((kinds[b] == TokenKind.PADDING).nonzero().flatten(), pad)
        text = [i for i in range(s) if i not in set(vis.tolist()) | set(pad.tolist())]
        for i in text:
            want = (
                TokenKind.SYSTEM
                if i < vis[0]
                else TokenKind.INSTRUCTION
                if i > vis[-1]
                else TokenKind.BETWEEN
            )
            assert kinds[b, i] == want, (b, i)
    assert (kinds == TokenKind.BETWEEN).sum() == 2 * prompts[0].between
    assert n == int((kinds == TokenKind.VISUAL).sum()) / 2


def test_token_kinds_without_visual_tokens_are_instruction():
    valid = torch.tensor([[False, True, True]])
    kinds = token_kinds(valid, torch.zeros_like(valid))
    assert kinds.tolist() == [[TokenKind.PADDING, TokenKind.INSTRUCTION, TokenKind.INSTRUCTION]]


def test_duplication_needs_hidden_states():
    from fitprune_fx.passes.method_scorers import duplication_score
    from fitprune_fx.passes.scorers import ScoringInputs

    q = torch.randn(1, 2, 4, 8)
    inputs = ScoringInputs(q, q, None, True, 0.3, torch.ones(1, 4, dtype=torch.bool), 0, 1, {})
    with pytest.raises(ValueError, match="hidden states entering the layer"):
        duplication_score(inputs)


def test_random_per_example_draws_afresh_for_every_example_and_call():
    """Identical examples in one batch delete different tokens, exactly d visual ones and no text,
    and over many draws every visual token goes about equally often (uniform choice)."""
    m = model("llama")
    prompts = [PromptSpec(3, 4)] * 3
    inputs = make_inputs(m, prompts, seed=0)
    recipe = Recipe(model=ModelInfo.from_config(m.config), prune={1: 8}, scorer="random_per_example")
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    compiled = torch.compile(m, backend=recorder, dynamic=False)
    visual = (inputs["input_ids"][0] == m.config.image_token_id).nonzero().flatten()
    n, d, calls = visual.numel(), 8, 40
    deleted = torch.zeros(inputs["input_ids"].shape[1])
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(calls):
            compiled(**inputs)
    assert len(recorder.kept) == calls
    for kept in recorder.kept:  # [3, S - d] positions (the first pruning layer)
        sets = [frozenset(k.tolist()) for k in kept]
        assert len(set(sets)) > 1, "identical examples deleted the same tokens"
        for k in sets:
            gone = set(range(inputs["input_ids"].shape[1])) - k
            assert len(gone) == d and gone <= set(visual.tolist())
            deleted[list(gone)] += 1
    frequency = deleted[visual] / (3 * calls)  # each ~ d / n; s.d. ~0.046 over 120 draws
    assert (frequency - d / n).abs().max() < 0.25, frequency
    assert len({tuple(k[0].tolist()) for k in recorder.kept}) > calls // 2  # calls differ too


def test_merging_changes_the_kept_tokens_states_not_the_kept_set():
    """Merging keeps the same tokens as deletion, and the logits differ (the deleted tokens'
    states went somewhere): the option is not a no-op."""
    prompts = [PromptSpec(2, 4)]
    dropped = run_method("llama", prompts, 9, {0: 12, 2: 2}, "fitprune")
    merged = run_method("llama", prompts, 9, {0: 12, 2: 2}, "fitprune", {"merge": True})
    assert [k.tolist() for k in dropped.kept[0]] == [k.tolist() for k in merged.kept[0]]
    final = dropped.kept_final[0]
    assert (dropped.logits[0, final] - merged.logits[0, final]).abs().max() > 1e-3


def test_merging_in_a_batch_of_different_image_sizes_equals_each_example_alone():
    """Qwen2.5-VL, a first call mixing a 4- and a 9-token image (void-slot compaction): each
    example's last-token logits equal the eager reference merging on the example alone (so no
    deleted token was merged into a void slot), and differ from deleting without merging."""
    from fitprune_fx.testbed.batching import batch_prompts
    from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl

    m = tiny_qwen_vl("qwen2_5_vl", num_layers=3, seed=4)
    alone = [make_qwen_inputs(m, [2], [9], grid=(4, 4), seed=1), make_qwen_inputs(m, [3], [4], grid=(6, 6))]
    fractions = {0: 0.5, 1: 0.25}
    info = ModelInfo.from_config(m.config)
    merged = Recipe.from_fractions(info, fractions, scorer_options={"merge": True})
    backend = fitprune_backend(merged, compiler="eager")
    with torch.no_grad():
        out = torch.compile(m, backend=backend)(**batch_prompts(alone)).logits[:, -1]
    assert backend.pruned_graphs and backend.pruned_graphs[0].result.padded
    for e, inputs in enumerate(alone):
        n = int((inputs["mm_token_type_ids"] == 1).sum())
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        args = (m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
        plan = merged.pruning_plan(n)
        ref = reference_prefill(*args, prune=plan, scorer_options={"merge": True}, **extra)
        torch.testing.assert_close(out[e], ref.logits[0, -1], atol=1e-4, rtol=1e-4)
        dropped = reference_prefill(*args, prune=plan, **extra)
        assert (dropped.logits[0, -1] - out[e]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "scorer, options",
    [("duplication", {"pivots": 3}), ("text_raters", {}), ("fitprune", {"merge": True})],
)
def test_methods_through_inductor_equal_the_reference(scorer, options):
    """Inductor (C++ on CPU) compiles the methods' scorers and the merge (sorts, scatter-adds,
    normalisation) to the eager reference's logits: a batch of two, its counts sized per call.
    FitPrune's layers of one shape share a compile with merging too; the other scorers' graphs
    compile whole (Inductor's lowering of their sorts and softmaxes assumes a bound on the length,
    which a compile shared across lengths may not)."""
    from fitprune_fx.testbed.tiny import tiny_llava

    m = tiny_llava("llama", num_layers=3, seed=5)
    prune = {0: 4, 1: 6, 2: 3}  # layers 1 and 2 alike: one compile
    recipe = Recipe(model=ModelInfo.from_config(m.config), prune=prune, scorer=scorer, scorer_options=options)
    backend = fitprune_backend(recipe)
    inputs = make_inputs(m, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend=backend, dynamic=False)(**inputs)
    assert len(backend.pruned_graphs) == 1
    if scorer == "fitprune":  # layers 1 and 2 share one compile
        partitions, compiled = backend.pruned_graphs[0].partitions
        assert compiled < partitions
    args = (m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    ref = reference_prefill(*args, prune=prune, scorer=scorer, scorer_options=options)
    for b in range(2):
        torch.testing.assert_close(out.logits[b], ref.logits[b, ref.kept_final[b]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "scorer, options", [("last_token", {}), ("text_raters", {}), ("duplication", {"merge": True})]
)
def test_methods_on_qwen_vl_equal_the_reference(scorer, options):
    """Qwen2.5-VL (M-RoPE positions, the visual marks' graph), a left-padded batch of two: kept sets
    at both pruning layers and logits at the kept positions equal the eager reference's."""
    from fitprune_fx.testbed.tiny_qwen import IMAGE, make_qwen_inputs, tiny_qwen_vl
    from graph_harness import compose_kept

    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=21)
    inputs = make_qwen_inputs(model, [2, 5], [4, 2], seed=3)
    fractions = {0: 0.25, 2: 0.25}
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), fractions, scorer=scorer,
                                   scorer_options=options)  # fmt: skip
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=recorder)(**inputs).logits
    n = int((inputs["input_ids"][0] == IMAGE).sum())
    prune = recipe.pruning_plan(n)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    ref = reference_prefill(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                            prune=prune, scorer=scorer, scorer_options=options, **extra)  # fmt: skip
    ours = compose_kept(recorder.kept, inputs["input_ids"].shape[1], 2)
    for step in range(len(prune)):
        for b in range(2):
            assert torch.equal(ours[step][b], ref.kept[b][step]), (step, b)
    for b in range(2):
        kept = ours[-1][b]
        valid = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(out[b][valid], ref.logits[b, kept][valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scorer", METHODS)
def test_methods_in_bfloat16_keep_text_and_track_the_reference(scorer):
    """bf16: the scorers compute in fp32 from bf16 tensors; kept sets agree with the fp32-scored
    reference on the bf16 model up to rounding (overlap >= 0.8), text is never deleted."""
    from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID
    from graph_harness import compose_kept

    m = model("llama", torch.bfloat16)
    prompts = [PromptSpec(3, 5), PromptSpec(1, 2)]
    inputs = make_inputs(m, prompts, seed=1)
    options = {"merge": True} if scorer == "text_raters" else {}
    recipe = Recipe(
        model=ModelInfo.from_config(m.config), prune={0: 4, 1: 4}, scorer=scorer, scorer_options=options
    )
    recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager"))
    out = captured("llama", 2, 1, torch.bfloat16).run(recorder, **inputs)
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape[1] == inputs["input_ids"].shape[1] - 8
    ref = reference_prefill(m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                            prune={0: 4, 1: 4}, scorer=scorer, scorer_options=options)  # fmt: skip
    ours = compose_kept(recorder.kept, inputs["input_ids"].shape[1], 2)
    for b in range(2):
        text = (inputs["input_ids"][b] != IMAGE_TOKEN_ID).nonzero().flatten()
        assert set(text.tolist()) <= set(ours[-1][b].tolist())
        overlap = len(set(ours[-1][b].tolist()) & set(ref.kept_final[b].tolist())) / len(ref.kept_final[b])
        assert overlap >= 0.8
