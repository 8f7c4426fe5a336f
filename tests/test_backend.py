"""The backend end to end: Inductor output vs the reference, dynamic lengths, errors and fallback."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, RecipeError, fitprune_backend, register_scorer
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID, PromptSpec, make_inputs, tiny_llava
from graph_harness import KeptRecorder


def recipe_for(m, prune, **kw) -> Recipe:
    return Recipe(model=ModelInfo.from_config(m.config), prune=prune, **kw)


def fresh_compile(m, backend, **kw):
    torch._dynamo.reset()
    return torch.compile(m, backend=backend, **kw)


def assert_matches_reference(m, inputs, out, prune, **kw):
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune, **kw
    )
    for b in range(inputs["input_ids"].shape[0]):
        torch.testing.assert_close(out.logits[b], ref.logits[b, ref.kept_final[b]], atol=1e-4, rtol=1e-4)
    return ref


@pytest.mark.parametrize("text_model, symbolic", [("llama", False), ("qwen2", True)])
def test_inductor_output_matches_reference_and_code_compacts(text_model, symbolic):
    """Both ways of sizing the layers after a deletion compile to the reference's numbers; with a
    symbol per kept count, the batch of two reads each example's count and pads (`padded_compaction`),
    and layers 1-2 (21 -> 15 and 15 -> 12 tokens) are one compile, called per layer
    (`layer_compile`); layer 0, the first pruning layer, caches no void rows: a compile of its own."""
    m = tiny_llava(text_model, seed=1)
    prune = {0: 4, 1: 6, 2: 3}
    backend = fitprune_backend(recipe_for(m, prune), symbolic_token_counts=symbolic)
    inputs = make_inputs(m, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    compiled = fresh_compile(m, backend)
    with torch.no_grad():
        out, code = run_and_get_code(lambda: compiled(**inputs))
    assert [r.result.tokens_per_layer for r in backend.pruned_graphs] == [["25", "21", "15", "12"]]
    # With symbols, compiled per layer: before the layers, layer 0, layers 1-2 once, the final norm.
    assert backend.pruned_graphs[0].partitions == ((5, 4) if symbolic else None)
    assert out.logits.shape[:2] == (2, 12)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [25, 21, 15]
    assert_matches_reference(m, inputs, out, prune)
    decoder_code = "\n".join(c for c in code if "select_kept" in c)
    selection = "fitprune.select_kept_padded" if symbolic else "aten.sort.stable"
    assert selection in decoder_code  # the kept indices: a length input, or a sort traced inline
    assert "gather_tokens" in decoder_code  # compaction, fused into the kernels that read it
    # per layer, the mask arrives stored: its rows and columns are copied, not indexed per element
    assert ("fitprune.gather_token_pairs" in decoder_code) == symbolic
    if not symbolic:  # static counts: every layer has kernels of its own (with symbols: `partitions`)
        calls = re.findall(r"^\s+(cpp_fused_\w+)\(", decoder_code, flags=re.M)
        assert not {k for k in calls if calls.count(k) > 1}, calls


def test_second_prompt_length_goes_symbolic_and_still_prunes():
    """Dynamo recompiles with a symbolic sequence length; the pass handles it (no fallback)."""
    m = tiny_llava("llama", seed=3)
    prune = {1: 5}
    backend = fitprune_backend(recipe_for(m, prune), compiler="eager")
    compiled = fresh_compile(m, backend)
    lengths = []
    for after in (2, 5, 9):
        inputs = make_inputs(m, [PromptSpec(2, after), PromptSpec(4, 1)], seed=after)
        lengths.append(inputs["input_ids"].shape[1])
        with torch.no_grad():
            out = compiled(**inputs)
        assert_matches_reference(m, inputs, out, prune)
    pruned = backend.pruned_graphs
    assert len(pruned) == 2, backend.summary()  # static first, then one symbolic recompile
    assert pruned[0].result.seq_len == str(lengths[0]) and pruned[1].result.seq_len == "S"
    assert pruned[1].result.tokens_per_layer[2] == "S-5"


def test_symbolic_prompt_length_keeps_kernels_shared_and_matches_reference():
    """The graph Dynamo compiles for any prompt length S (as after a second prompt length) gets a
    symbol per kept count too, sized at each call from that call's S: its layers share kernels
    (with `S - d` expressions every layer inlined its own and none was shared: 65 kernels at 8
    layers), and every length matches the reference."""
    m = tiny_llava("llama", seed=3)
    prune = {0: 4, 1: 6, 2: 3}
    backend = fitprune_backend(recipe_for(m, prune))
    compiled = torch.compile(m, backend=backend, dynamic=True)
    for after in (2, 5, 9):
        inputs = make_inputs(m, [PromptSpec(2, after), PromptSpec(4, 1)], seed=after)
        with torch.no_grad():
            if after == 2:  # run_and_get_code resets Dynamo first: the graph is compiled here
                out, code = run_and_get_code(lambda inputs=inputs: compiled(**inputs))
            else:
                out = compiled(**inputs)
        assert_matches_reference(m, inputs, out, prune)
    assert [r.result.seq_len for r in backend.pruned_graphs] == ["S"], backend.summary()
    assert backend.pruned_graphs[0].partitions is None  # Dynamo's own symbol S: the whole graph
    decoder = "\n".join(c for c in code if "select_kept_padded" in c)  # a batch of 2: padded
    assert decoder.count("torch.ops.fitprune.select_kept_padded.default(") == 3  # a length input each
    calls = re.findall(r"^\s+(cpp_fused_\w+)\(", decoder, flags=re.M)
    assert {k for k in calls if calls.count(k) > 1}, calls  # layers run the same kernels


def test_two_images_scale_recipe_and_image_anywhere():
    m = tiny_llava("mistral", seed=4)
    backend = fitprune_backend(recipe_for(m, {0: 3, 2: 5}), compiler="eager")  # counts per 16 tokens
    prompts = [PromptSpec(0, 3, images=2), PromptSpec(5, 1, images=2, between=4)]
    inputs = make_inputs(m, prompts, seed=5)
    with torch.no_grad():
        out = fresh_compile(m, backend)(**inputs)
    assert backend.pruned_graphs[0].result.deletions == {0: 6, 2: 10}  # scaled to 32 visual tokens
    assert_matches_reference(m, inputs, out, {0: 6, 2: 10})


def test_named_backend_with_options():
    m = tiny_llava("llama", seed=5)
    inputs = make_inputs(m, [PromptSpec(2, 3)], seed=1)
    torch._dynamo.reset()
    recipe = recipe_for(m, {0: 7})
    compiled = torch.compile(m, backend="fitprune", options={"recipe": recipe, "compiler": "eager"})
    with torch.no_grad():
        out = compiled(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 7
    assert_matches_reference(m, inputs, out, {0: 7})
    # every graph went to one backend, reachable afterwards with the same options
    shared = fitprune_fx.named_backend(recipe, compiler="eager")
    assert len(shared.pruned_graphs) == 1 and len(shared.reports) >= 2
    assert "pruned with fitprune after layers [0:-7]" in shared.summary()


def test_user_scorer_function():
    """A user scorer ranks tokens; this one deletes the visual tokens nearest the end of the image."""

    def prefer_early(inputs):
        return -torch.arange(inputs.visual.shape[1], dtype=torch.float32).expand_as(inputs.visual)

    m = tiny_llava("llama", seed=6)
    inputs = make_inputs(m, [PromptSpec(2, 3), PromptSpec(0, 1)], seed=1)
    recorder = KeptRecorder(fitprune_backend(recipe_for(m, {0: 5}), scorer=prefer_early, compiler="eager"))
    with torch.no_grad():
        fresh_compile(m, recorder)(**inputs)
    for b in range(2):
        visual = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten()
        expected = sorted(set(range(inputs["input_ids"].shape[1])) - set(visual[-5:].tolist()))
        assert recorder.kept[0][b].tolist() == expected
    register_scorer("prefer-early", prefer_early)
    named = fitprune_backend(recipe_for(m, {0: 5}, scorer="prefer-early"), compiler="eager")
    assert named.recipe.scorer == "prefer-early"


def test_recipe_for_another_model_is_refused_at_compile():
    m = tiny_llava("llama", seed=0)
    inputs = make_inputs(m, [PromptSpec(2, 3)], seed=1)
    backend = fitprune_backend("llava-1.5-7b/60.json", compiler="eager")
    with pytest.raises(Exception, match=r"hidden size: recipe 4096, model 64.*rescale"):
        fresh_compile(m, backend)(**inputs)

    other = dataclasses.replace(ModelInfo.from_config(m.config), num_layers=5)
    backend = fitprune_backend(Recipe(model=other, prune={4: 2}), compiler="eager")
    with pytest.raises(Exception, match=r"decoder layers: recipe 5, model 3"):
        fresh_compile(m, backend)(**inputs)


def test_unknown_scorer_is_refused():
    m = tiny_llava("llama", seed=0)
    with pytest.raises(RecipeError, match="not registered"):
        fitprune_backend(recipe_for(m, {0: 1}, scorer="no-such-scorer"))


def test_unsupported_model_compiles_unchanged_with_one_warning(capfd):
    """Eager attention has no sdpa node: the pass refuses, output is the model's, one warning that
    names the fix, and nothing else printed about it (no log line repeating the warning)."""
    m = tiny_llava("llama", seed=8)
    m.set_attn_implementation("eager")
    inputs = make_inputs(m, [PromptSpec(2, 3), PromptSpec(0, 1)], seed=1)
    with torch.no_grad():
        expected = m(**inputs).logits
    backend = fitprune_backend(recipe_for(m, {0: 4}), compiler="eager")
    compiled = fresh_compile(m, backend)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(**inputs)
        compiled(**make_inputs(m, [PromptSpec(4, 3), PromptSpec(0, 1)], seed=2))
    ours = [w for w in caught if "fitprune" in str(w.message)]
    assert len(ours) == 1 and "WITHOUT pruning" in str(ours[0].message)
    assert 'attn_implementation="sdpa"' in str(ours[0].message)
    assert "fitprune" not in capfd.readouterr().err
    torch.testing.assert_close(out.logits, expected)
    assert not backend.pruned_graphs and "not understood" in backend.summary()


def test_decode_graph_is_left_alone():
    """A graph with decoder layers but no image merge (text-only prompt) compiles unchanged, no warning."""
    m = tiny_llava("llama", seed=9)
    ids = torch.randint(4, 100, (1, 7))
    backend = fitprune_backend(recipe_for(m, {0: 4}), compiler="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = fresh_compile(m, backend)(input_ids=ids)
    assert out.logits.shape[1] == 7
    assert "no image merge" in backend.summary()


def test_new_batch_sizes_keep_pruning():
    """A new batch size makes Dynamo's batch dim dynamic; the pass specializes it and still prunes."""
    m = tiny_llava("llama", seed=10)
    backend = fitprune_backend(recipe_for(m, {1: 5}), compiler="eager")
    compiled = fresh_compile(m, backend)
    for prompts in ([PromptSpec(2, 3)], [PromptSpec(2, 3), PromptSpec(4, 1)], [PromptSpec(0, 2)] * 3):
        inputs = make_inputs(m, prompts, seed=len(prompts))
        with torch.no_grad():
            out = compiled(**inputs)
        assert_matches_reference(m, inputs, out, {1: 5})
    assert "not understood" not in backend.summary()
    assert len(backend.pruned_graphs) >= 3


def test_prefill_without_attention_mask_is_pruned_like_with_one(fresh_dynamo):
    """No `attention_mask`: transformers passes SDPA no mask and `is_causal` (what flash attention
    needs on a GPU); the pass still prunes, and the logits equal those of the same prompt with an
    all-ones mask (where the graph carries a 4-D mask)."""
    model = tiny_llava("llama", num_layers=3, seed=12)
    inputs = make_inputs(model, [PromptSpec(before=3, after=4)], seed=1)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={0: 6, 1: 4})
    outputs = []
    for drop_mask in (True, False):
        torch._dynamo.reset()
        backend = fitprune_backend(recipe, compiler="eager")
        call = {k: v for k, v in inputs.items() if not (drop_mask and k == "attention_mask")}
        with torch.no_grad():
            outputs.append(torch.compile(model, backend=backend)(**call).logits)
        assert [r.result.deletions for r in backend.pruned_graphs] == [{0: 6, 1: 4}]
    assert outputs[0].shape[1] == inputs["input_ids"].shape[1] - 10
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_launches_per_pruning_layer_within_budget():
    """The figure `benchmarks/launches.py` prints (CPU proxy: calls the compiled code makes): what
    each pruning layer adds over unpruned stays within the stated budget, the fused attention is
    one call per pruning layer in place of that layer's SDPA."""
    import sys
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from launches import COMPILED_GRAPH, LAUNCH_BUDGET, count_launches, kernel_profile, per_pruning_layer

    m = tiny_llava(num_layers=3, seed=1)
    inputs = make_inputs(m, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    variants = {"unpruned": {}, "pruned": {0: 4, 1: 6}}
    launches, calls = {}, {}
    for name, prune in variants.items():
        compiled = fresh_compile(m, fitprune_backend(recipe_for(m, prune), progress=False))
        with torch.no_grad(), kernel_profile():
            compiled(**inputs)
            launches[name] = count_launches(lambda c=compiled: c(**inputs), "cpu")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                compiled(**inputs)
        top = [e.name for e in prof.events() if e.cpu_parent and e.cpu_parent.name.startswith(COMPILED_GRAPH)]
        calls[name] = {
            op: top.count(op)
            for op in ("fitprune::attention_with_mass", "aten::_scaled_dot_product_flash_attention_for_cpu")
        }
        assert len(top) == launches[name]
    per_layer = per_pruning_layer(launches, {"pruned": 2}, "unpruned")["pruned"]
    assert 4 <= per_layer <= LAUNCH_BUDGET["cpu"], launches
    sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert calls["pruned"]["fitprune::attention_with_mass"] == 2
    assert calls["unpruned"]["fitprune::attention_with_mass"] == 0
    assert calls["unpruned"][sdpa] - calls["pruned"][sdpa] == 2
