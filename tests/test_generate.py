"""Greedy `generate` with a pruned prefill, against the eager reference's own decode loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import StaticCache

from fitprune_fx.generation import (
    UnsupportedCacheError,
    check_generate_path,
    generate_is_compiled,
)
from fitprune_fx.generation import compile as fitprune_compile
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.positioned_cache import cache_update_gets_attention_keywords
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.reference import reference_generate
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
from graph_harness import right_padded

NEW_TOKENS = 8
PADDED = [PromptSpec(2, 4), PromptSpec(5, 2), PromptSpec(0, 3)]  # three prompt lengths, left-padded
PRUNE = {0: 5, 1: 3}  # of the 16 visual tokens per image of the tiny model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own model: start from an empty Dynamo cache (no recompile-limit spill)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(text_model: str = "llama"):
    return tiny_llava(text_model=text_model, num_layers=3, seed=7)


def _recipe(model, prune: dict[int, int]) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=prune)


def _generate(model, inputs: dict, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, **kwargs
        )


def _reference(model, inputs: dict, prune: dict[int, int]) -> torch.Tensor:
    return reference_generate(
        model,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["attention_mask"],
        prune=prune,
        max_new_tokens=NEW_TOKENS,
    )


def _cache_lengths(out) -> list[int]:
    return [layer.keys.shape[-2] for layer in out.past_key_values.layers]


def _expected_cache_lengths(prompt_len: int, prune: dict[int, int], num_layers: int) -> list[int]:
    """Layer l caches what entered it (deletions after earlier layers), plus the decoded tokens."""
    decoded = NEW_TOKENS - 1  # the last new token is never fed back
    return [prompt_len - sum(d for k, d in prune.items() if k < li) + decoded for li in range(num_layers)]


@pytest.mark.parametrize(
    ("text_model", "prompts"),
    [("llama", [PromptSpec(3, 5)]), ("llama", PADDED), ("qwen2", PADDED)],
    ids=["llama-batch1", "llama-padded3", "qwen2-padded3"],
)
def test_pruned_generate_matches_reference(text_model, prompts):
    """Token-identical to the eager oracle; the prefill was pruned on the generate path (report, caches)."""
    model = _model(text_model)
    inputs = make_inputs(model, prompts, seed=3)
    expected = _reference(model, inputs, PRUNE)

    fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")
    out = _generate(model, inputs)

    assert out.sequences.shape == expected.shape
    assert torch.equal(out.sequences, expected)
    pruned = model.fitprune_backend.pruned_graphs
    assert len(pruned) == 1 and pruned[0].result.deletions == PRUNE
    prompt_len = inputs["input_ids"].shape[1]
    assert _cache_lengths(out) == _expected_cache_lengths(prompt_len, PRUNE, 3)


def test_zero_recipe_generate_equals_plain_generate():
    """Scoring at every layer but deleting nothing changes no generated token, padded batch included."""
    model = _model()
    inputs = make_inputs(model, PADDED, seed=5)
    plain = _generate(model, inputs)

    fitprune_compile(model, _recipe(model, {0: 0, 2: 0}), compiler="eager")
    out = _generate(model, inputs)

    assert [r.action for r in model.fitprune_backend.reports].count("pruned") == 1
    assert torch.equal(out.sequences, plain.sequences)
    prompt_len = inputs["input_ids"].shape[1]
    assert _cache_lengths(out) == _cache_lengths(plain) == [prompt_len + NEW_TOKENS - 1] * 3


def test_second_generate_reuses_compiled_graphs():
    """Decode recompiles once (dynamic cache length); a new image, same prompt shape: no compile."""
    model = _model()
    first = make_inputs(model, PADDED, seed=3)
    fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")
    backend = model.fitprune_backend

    _generate(model, first)
    decode = [r for r in backend.reports if r.action == "unchanged" and "no image merge" in r.reason]
    assert len(backend.pruned_graphs) == 1
    assert len(decode) == 2, backend.summary()  # first decode step static, then one dynamic recompile
    compiled = len(backend.reports)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    second = make_inputs(model, PADDED, seed=4)  # same token layout, new images
    assert torch.equal(second["input_ids"], make_inputs(model, PADDED, seed=4)["input_ids"])
    assert not torch.equal(second["pixel_values"], first["pixel_values"])
    out = _generate(model, second)

    assert len(backend.reports) == compiled, backend.summary()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(out.sequences, _reference(model, second, PRUNE))

    # A new prompt length: one prefill recompile with a symbolic length, still pruned; decode reused.
    third = make_inputs(model, [PromptSpec(6, 4), PromptSpec(1, 2), PromptSpec(0, 9)], seed=6)
    assert third["input_ids"].shape[1] != first["input_ids"].shape[1]
    out = _generate(model, third)
    new = backend.reports[compiled:]
    assert [r for r in new if r.action == "pruned"] == backend.pruned_graphs[1:]
    assert len(backend.pruned_graphs) == 2
    assert not [r for r in new if "no image merge" in r.reason], backend.summary()
    assert torch.equal(out.sequences, _reference(model, third, PRUNE))


@pytest.mark.skipif(cache_update_gets_attention_keywords(), reason="served: tests/test_static_cache.py")
def test_static_caches_are_rejected_without_the_keyword_channel():
    """Without the channel a static layer's holes could not be forbidden: refused before anything runs."""
    model = _model()
    inputs = make_inputs(model, PADDED, seed=3)
    fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")

    with pytest.raises(UnsupportedCacheError, match="'dynamic' caches"):
        _generate(model, inputs, cache_implementation="static")
    static = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(UnsupportedCacheError, match="StaticCache.*DynamicCache"):
        _generate(model, inputs, past_key_values=static)
    assert model.fitprune_backend.reports == []  # refused before anything ran


def test_right_padding_and_a_later_turn_padded_inside_match_masking():
    """Right-padded prompts, then a second turn whose rows differ in length (padding inside the
    sequence), continuing the pruned cache: tokens and per-step logits equal pruning as masking on
    the same inputs, as transformers itself runs them unpruned."""
    if not cache_update_gets_attention_keywords():  # the left-padding cut: refused at run time
        model = _model()
        fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")
        with pytest.raises(RuntimeError, match="left padding"):
            _generate(model, right_padded(make_inputs(model, PADDED, seed=3)))
        return
    model = _model()
    oracle = copy.deepcopy(model)
    inputs = right_padded(make_inputs(model, PADDED, seed=3))
    assert not inputs["attention_mask"][:, -1].all()  # some row ends in padding
    fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")
    gen = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    turn = torch.tensor([[0, 0, 9, 10], [11, 12, 13, 14], [0, 15, 16, 17]])
    results = []
    for runner in (model, oracle):
        with torch.no_grad(), MaskingReference(oracle, PRUNE):  # only the oracle's attention reads it
            first = runner.generate(**inputs, **gen)
            ids = torch.cat([first.sequences, turn], dim=1)
            mask = torch.cat(
                [inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long), (turn != 0).long()], 1
            )
            second = runner.generate(
                input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **gen
            )
        results.append((first, second))
    (got1, got2), (exp1, exp2) = results
    assert torch.equal(got1.sequences, exp1.sequences) and torch.equal(got2.sequences, exp2.sequences)
    scores = [*zip(got1.scores, exp1.scores, strict=True), *zip(got2.scores, exp2.scores, strict=True)]
    worst = max((a - e).abs().max().item() for a, e in scores)
    assert worst <= 1e-4, worst
    assert model.fitprune_backend.pruned_runs == 1


def test_torch_compile_wrapper_generate_never_reaches_backend():
    """The documented trap: torch.compile(model)'s .generate is not compiled; we say so."""
    model = _model()
    inputs = make_inputs(model, [PromptSpec(1, 2)], seed=1)
    from fitprune_fx.backend import fitprune_backend

    backend = fitprune_backend(_recipe(model, PRUNE), compiler="eager")
    wrapper = torch.compile(model, backend=backend)
    _generate(wrapper, inputs)
    assert backend.reports == []
    assert "no graph compiled" in backend.summary()
    with pytest.warns(UserWarning, match="never called"):
        assert not check_generate_path(wrapper)
    with pytest.raises(TypeError, match="_orig_mod"):
        fitprune_compile(wrapper, _recipe(model, PRUNE))

    fitprune_compile(model, _recipe(model, PRUNE), compiler="eager")
    assert generate_is_compiled(model) and generate_is_compiled(wrapper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_generate_path(model)


def test_inductor_padded_generate_matches_reference():
    """The default compiler (Inductor) on the padded batch: still token-identical."""
    model = _model()
    inputs = make_inputs(model, PADDED, seed=3)
    expected = _reference(model, inputs, PRUNE)
    fitprune_compile(model, _recipe(model, PRUNE))
    out = _generate(model, inputs)
    assert len(model.fitprune_backend.pruned_graphs) == 1
    assert torch.equal(out.sequences, expected)
    assert _cache_lengths(out) == _expected_cache_lengths(inputs["input_ids"].shape[1], PRUNE, 3)


def test_inplace_compile_alone_decodes_a_padded_batch():
    """`model.compile(backend=fitprune_backend(recipe))` with nothing else: padded generate is exact."""
    from fitprune_fx.backend import fitprune_backend

    model = _model()
    inputs = make_inputs(model, PADDED, seed=3)
    expected = _reference(model, inputs, PRUNE)
    backend = fitprune_backend(_recipe(model, PRUNE), compiler="eager")
    model.compile(backend=backend)
    out = _generate(model, inputs)
    assert len(backend.pruned_graphs) == 1
    assert torch.equal(out.sequences, expected)
    assert _cache_lengths(out) == _expected_cache_lengths(inputs["input_ids"].shape[1], PRUNE, 3)
