"""Never silently wrong: what the backend refuses, leaves unpruned with a warning, or scores per row."""

from __future__ import annotations

import copy

import pytest
import torch

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID, PromptSpec, make_inputs, tiny_llava
from graph_harness import KeptRecorder

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _recipe(model, prune, **kw) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=prune, **kw)


def test_sliding_windows_without_recorded_positions_are_left_unpruned_with_one_warning():
    """A transformers release whose attention calls `cache.update(k, v, layer)` without its keyword
    arguments (5.17) cannot hand key positions to the attention, and a window counts positions: such
    a model runs unpruned, exact, with one warning that names the fix. Simulated here by dropping
    the keywords on the way into the cache update."""
    from transformers.cache_utils import Cache

    model = tiny_llava("mistral", num_layers=3, seed=2, sliding_window=12)
    plain = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=3)
    fitprune_fx.compile(model, _recipe(model, {0: 5, 1: 3}), compiler="eager")
    update = Cache.update  # the patched update (compile installs it): restored as it was
    try:
        Cache.update = lambda self, k, v, layer_idx, *args, **kwargs: update(self, k, v, layer_idx)
        with pytest.warns(UserWarning, match="record no key positions"), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        Cache.update = update
    with torch.no_grad():
        expected = plain.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)
    backend = model.fitprune_backend
    assert not backend.pruned_graphs
    assert "upgrade transformers" in backend.summary()


def test_each_backend_runs_its_own_scorer_function():
    """Two lambdas with the same qualified name: each backend still runs its own."""
    model = tiny_llava(num_layers=2, seed=6)
    inputs = make_inputs(model, [PromptSpec(2, 3)], seed=1)
    scorers = [
        lambda s: -torch.arange(s.visual.shape[1], dtype=torch.float32).expand_as(s.visual),  # delete last
        lambda s: torch.arange(s.visual.shape[1], dtype=torch.float32).expand_as(s.visual),  # delete first
    ]
    assert scorers[0].__qualname__ == scorers[1].__qualname__
    recorders = [
        KeptRecorder(fitprune_backend(_recipe(model, {0: 5}), scorer=f, compiler="eager")) for f in scorers
    ]
    for recorder in recorders:  # both backends exist before either graph runs
        with torch.no_grad():
            torch._dynamo.reset()
            torch.compile(model, backend=recorder)(**inputs)
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    everything = set(range(inputs["input_ids"].shape[1]))
    assert recorders[0].kept[0][0].tolist() == sorted(everything - set(visual[-5:]))
    assert recorders[1].kept[0][0].tolist() == sorted(everything - set(visual[:5]))


def test_fastv_scores_from_the_last_real_token_of_a_right_padded_row():
    """Right padding on a direct call: each row scores from its own last prompt token."""
    model = tiny_llava("qwen2", num_layers=3, seed=8)
    inputs = make_inputs(model, [PromptSpec(1, 6), PromptSpec(4, 1)], seed=9)
    right = {k: v.clone() for k, v in inputs.items()}
    for b in range(2):  # move each row's padding to the right
        n = int(inputs["attention_mask"][b].sum())
        right["input_ids"][b] = torch.cat([inputs["input_ids"][b, -n:], inputs["input_ids"][b, :-n]])
        right["attention_mask"][b] = torch.cat(
            [inputs["attention_mask"][b, -n:], inputs["attention_mask"][b, :-n]]
        )
    assert not bool(right["attention_mask"][:, -1].all())  # some row really ends in padding
    prune = {1: 6}
    backend = fitprune_backend(_recipe(model, prune, scorer="fastv"), compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**right)
    ref = reference_prefill(model, **right, prune=prune, scorer="fastv")
    for b in range(2):
        valid = right["attention_mask"][b, ref.kept_final[b]].bool()
        torch.testing.assert_close(
            out.logits[b][valid], ref.logits[b, ref.kept_final[b]][valid], atol=1e-4, rtol=1e-4
        )


def test_a_graph_break_inside_the_decoder_leaves_it_unpruned_with_a_warning():
    model = tiny_llava(num_layers=3, seed=4)
    inputs = make_inputs(model, [PromptSpec(2, 3)], seed=5)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.model.language_model.layers[1].register_forward_pre_hook(lambda *a: torch._dynamo.graph_break())
    backend = fitprune_backend(_recipe(model, {0: 4, 2: 3}), compiler="eager")
    with pytest.warns(UserWarning, match="graph break split the"), torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert not backend.pruned_graphs
    assert "graph break split the" in backend.summary()


def test_a_call_that_dynamo_runs_eagerly_warns_that_nothing_was_pruned():
    model = tiny_llava(num_layers=3, seed=4)
    fitprune_fx.compile(model, _recipe(model, {0: 4}), compiler="eager")
    with torch.no_grad():
        model(**make_inputs(model, [PromptSpec(2, 3)], seed=5))
        assert model.fitprune_backend.pruned_runs == 1
        # a new batch size is one too many. (Not monkeypatch: since pytest 9.2 its undo deletes a
        # config entry, which hides it for the rest of the process.)
        with torch._dynamo.config.patch(recompile_limit=1):
            with pytest.warns(UserWarning, match="ran no pruned graph.*recompile_limit"):
                model(**make_inputs(model, [PromptSpec(2, 3), PromptSpec(1, 1)], seed=6))
    assert model.fitprune_backend.pruned_runs == 1


def test_a_graph_break_between_merge_and_decoder_warns_instead_of_running_silently_unpruned():
    """A model whose image merge lands in another graph than its decoder (here LLaVA with a forced
    graph break at the decoder's entry) cannot be pruned from the decoder graph: one warning.
    (Qwen2-VL, where this happens by design, marks its visual tokens instead: test_qwen_vl.py.)"""
    model = tiny_llava(num_layers=3, seed=11)
    inputs = make_inputs(model, [PromptSpec(2, 4)], seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    decoder = model.model.language_model
    forward = decoder.forward

    def broken_forward(*args, **kwargs):
        torch._dynamo.graph_break()
        return forward(*args, **kwargs)

    decoder.forward = broken_forward
    backend = fitprune_backend(_recipe(model, {1: 2}), compiler="eager")
    with pytest.warns(UserWarning, match="WITHOUT pruning.*graph") as caught, torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs).logits
    torch.testing.assert_close(out, expected)
    assert not backend.pruned_graphs
    assert len([w for w in caught if "fitprune" in str(w.message)]) == 1


def test_a_model_no_family_claims_compiles_unchanged_with_one_warning():
    """A text-only Llama: no family's layout matches its decoder; outputs stay those of the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(4, 128, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    info = ModelInfo(name="llama", num_layers=2, num_visual_tokens=4, hidden_size=64, intermediate_size=128)
    backend = fitprune_backend(Recipe(model=info, prune={0: 2}), compiler="eager")
    with pytest.warns(UserWarning, match="no family claims this model") as caught, torch.no_grad():
        out = torch.compile(model, backend=backend)(input_ids=ids).logits
    assert len([w for w in caught if "fitprune" in str(w.message)]) == 1
    torch.testing.assert_close(out, expected)
    assert not backend.pruned_graphs


def test_models_with_other_head_sizes_in_one_process_are_all_pruned():
    """Dynamo makes a float attribute (attention `scaling`) a graph input once the same code ran
    with two values; the backend keeps floats static, so every model is still pruned exactly."""
    torch._dynamo.config.specialize_float = False  # as a fresh process has it
    for heads in (4, 2, 8):
        model = tiny_llava(num_layers=3, num_heads=heads, num_kv_heads=heads // 2, seed=heads)
        inputs = make_inputs(model, [PromptSpec(2, 4)], seed=heads)
        backend = fitprune_backend(_recipe(model, {0: 5, 1: 3}), compiler="eager")
        recorder = KeptRecorder(backend)
        with torch.no_grad():
            out = torch.compile(model, backend=recorder)(**inputs)
        ref = reference_prefill(model, **inputs, prune={0: 5, 1: 3})
        assert len(backend.pruned_graphs) == 1, backend.summary()
        torch.testing.assert_close(out.logits[0], ref.logits[0, ref.kept_final[0]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "flash_attention_2", "kernels-community/flash-attn"])
def test_other_attention_implementations_are_refused_before_compiling(implementation):
    """The pass reads SDPA calls: any other implementation is refused by fitprune_fx.compile with the
    setting and the fix named, and nothing is compiled."""
    model = tiny_llava(num_layers=2)
    model.model.language_model.config._attn_implementation = implementation
    with pytest.raises(fitprune_fx.UnsupportedAttention) as caught:
        fitprune_fx.compile(model, _recipe(model, {0: 2}), compiler="eager")
    message = str(caught.value)
    assert f'attn_implementation="{implementation}"' in message
    assert 'attn_implementation="sdpa"' in message and 'set_attn_implementation("sdpa")' in message
    assert not hasattr(model, "fitprune_backend") and model._compiled_call_impl is None
