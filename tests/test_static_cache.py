"""Static caches (`cache_implementation="static"`, `StaticCache`) behind a pruned prefill, against
pruning as masking on a dynamic cache (`fitprune_fx/static_cache.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import CompileConfig, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

import fitprune_fx
from fitprune_fx import static_cache
from fitprune_fx.generation import UnsupportedCacheError
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.positioned_cache import cache_update_gets_attention_keywords
from fitprune_fx.recipe import ModelInfo, Recipe
from fitprune_fx.testbed.batching import batch_prompts
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, num_image_tokens, tiny_llava
from fitprune_fx.testbed.tiny_gemma3 import make_gemma3_inputs, tiny_gemma3
from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl
from graph_harness import CapturedDecoder, append_chunk, right_padded

pytestmark = [
    pytest.mark.usefixtures("fresh_dynamo"),
    pytest.mark.skipif(
        not cache_update_gets_attention_keywords(), reason="static caches need transformers' keyword channel"
    ),
]

PADDED = [PromptSpec(2, 4), PromptSpec(5, 2), PromptSpec(0, 3)]  # 24 tokens, left-padded
PRUNE = {0: 5, 1: 3}  # of the 16 visual tokens per image
GEN = dict(do_sample=False, output_scores=True, return_dict_in_generate=True)


def _recipe(model, prune: dict[int, int]) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=prune)


def _masking(oracle, inputs: dict, prune: dict[int, int], **gen):
    with torch.no_grad(), MaskingReference(oracle, prune):
        return oracle.generate(**inputs, **GEN, **gen)


def _assert_same(got, expected) -> float:
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((a - e).abs().max().item() for a, e in zip(got.scores, expected.scores, strict=True))
    assert worst <= 1e-4, worst
    return worst


@pytest.mark.parametrize("window", [None, 12], ids=["full", "sliding-12"])
def test_static_generate_equals_masking(window):
    """A left-padded batch through `cache_implementation="static"`: 12 greedy steps equal pruning as
    masking (dynamic cache), and the static layers after the pruning layers hold the recipe's holes.
    The window of 12 (Mistral) is shorter than the 24-token prompt: it slides in the prefill and
    all through decoding, over slots whose tokens were deleted."""
    kwargs = {} if window is None else dict(text_model="mistral", sliding_window=window)
    model = tiny_llava(num_layers=3, seed=7, **kwargs)
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, PADDED, seed=3)
    fitprune_fx.compile(model, _recipe(model, PRUNE), compiler="eager")
    with torch.no_grad():
        got = model.generate(**inputs, cache_implementation="static", max_new_tokens=12, **GEN)
    worst = _assert_same(got, _masking(oracle, inputs, PRUNE, max_new_tokens=12))
    assert model.fitprune_backend.pruned_runs == 1
    layers = got.past_key_values.layers
    assert all(isinstance(layer, StaticSlidingWindowLayer if window else StaticLayer) for layer in layers)
    if window is None:  # slot = position: layer 2's first 24 slots miss the 8 deleted tokens
        holes = (~layers[2].fitprune_valid[:, :24]).sum(dim=1)
        assert holes.tolist() == [8, 8, 8]
        assert (~layers[0].fitprune_valid).sum() == 0
    # allocated before the compiled prefill, so with the fixed addresses CUDA graphs replay
    assert all(hasattr(t, "_dynamo_static_input_type") for t in (layers[2].keys, layers[2].fitprune_valid))
    print(f"static cache ({window=}): 12 steps, per-step logits max |diff| {worst:.2e}")


def test_gemma3_released_pattern_with_a_static_cache():
    """Gemma 3's five sliding layers (window 8) and one full layer, pruned before both kinds, with a
    static cache: 16 steps (the window slides all along) equal masking on a dynamic cache."""
    model = tiny_gemma3(num_layers=6, full_attention_only=False, window=8, seed=7)
    oracle = copy.deepcopy(model)
    inputs = make_gemma3_inputs(model, [2, 6], [5, 2], seed=8)
    prune = {1: 6, 4: 4}
    fitprune_fx.compile(model, _recipe(model, prune), compiler="eager")
    with torch.no_grad():
        got = model.generate(**inputs, cache_implementation="static", max_new_tokens=16, **GEN)
    worst = _assert_same(got, _masking(oracle, inputs, prune, max_new_tokens=16))
    assert model.fitprune_backend.pruned_runs == 1
    kinds = [type(layer).__name__ for layer in got.past_key_values.layers]
    assert kinds == ["StaticSlidingWindowLayer"] * 5 + ["StaticLayer"], kinds
    print(f"gemma3 released pattern, static cache: 16 steps, per-step logits max |diff| {worst:.2e}")


def test_a_batch_of_three_image_sizes_on_qwen2_5_vl_equals_the_dynamic_cache():
    """Qwen2.5-VL (M-RoPE), one batch of three image sizes (4, 16 and 8 visual tokens, padded
    compaction: void slots in the prefill) and a fraction recipe: a static cache gives the dynamic
    cache's tokens and per-step logits (the dynamic cache's against masking on each example alone:
    `tests/test_any_visual_count.py`)."""
    model = tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=5)
    dynamic = copy.deepcopy(model)
    recipe = Recipe.from_fractions(ModelInfo.from_config(model.config), {0: 0.3, 2: 0.4})
    for m in (model, dynamic):
        fitprune_fx.compile(m, recipe, compiler="eager")
    prompts = [((3, 4), (4, 4)), ((2, 5), (8, 8)), ((1, 2), (4, 8))]
    batch = batch_prompts([make_qwen_inputs(model, [b], [a], grid=g, seed=9) for (b, a), g in prompts])
    gen = dict(GEN, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        expected = dynamic.generate(**batch, **gen)
        got = model.generate(**batch, cache_implementation="static", **gen)
    _assert_same(got, expected)
    assert model.fitprune_backend.pruned_graphs[0].result.padded


def test_a_decode_step_compiled_by_transformers_equals_the_dynamic_cache():
    """transformers' own compiled decode step (`compile_config`, Inductor, mode "default"; what
    `generate` does by itself with a static cache on a GPU) over a pruned static cache gives the
    dynamic cache's tokens; the prefill still went through the FitPrune backend."""
    model = tiny_llava(num_layers=3, seed=7)
    dynamic = copy.deepcopy(model)
    inputs = make_inputs(model, PADDED, seed=3)
    for m in (model, dynamic):
        fitprune_fx.compile(m, _recipe(m, PRUNE), compiler="eager")
    config = CompileConfig(backend="inductor", mode="default", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles decode steps on accelerators only
    with torch.no_grad():
        expected = dynamic.generate(**inputs, max_new_tokens=8, **GEN)
        got = model.generate(
            **inputs, cache_implementation="static", compile_config=config, max_new_tokens=8, **GEN
        )
    assert hasattr(model, "_compiled_call")  # transformers compiled the decode step
    assert model.fitprune_backend.pruned_runs == 1
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((a - e).abs().max().item() for a, e in zip(got.scores, expected.scores, strict=True))
    assert worst <= 1e-4, worst


def test_a_static_cache_reset_and_used_again_and_beam_search():
    """One `StaticCache` for two prompts of different lengths (reset between them, as a server
    reuses one), then beam search (the cache's reorder moves the holes with the keys): each equals
    masking."""
    model = tiny_llava(num_layers=3, seed=7)
    oracle = copy.deepcopy(model)
    first = make_inputs(model, PADDED, seed=3)
    second = make_inputs(model, [PromptSpec(1, 1), PromptSpec(3, 0), PromptSpec(0, 2)], seed=4)
    fitprune_fx.compile(model, _recipe(model, PRUNE), compiler="eager")
    cache = StaticCache(config=model.config.text_config, max_cache_len=48)
    for inputs in (first, second):
        cache.reset()
        with torch.no_grad():
            got = model.generate(**inputs, past_key_values=cache, max_new_tokens=6, **GEN)
        _assert_same(got, _masking(oracle, inputs, PRUNE, max_new_tokens=6))
    with torch.no_grad():
        beams = model.generate(**first, cache_implementation="static", num_beams=3, max_new_tokens=6, **GEN)
    expected = _masking(oracle, first, PRUNE, num_beams=3, max_new_tokens=6)
    assert torch.equal(beams.sequences, expected.sequences)
    assert model.fitprune_backend.pruned_runs == 3


@pytest.mark.parametrize("window", [None, 4])
def test_validity_moves_with_the_keys_through_transformers_updates(window):
    """Contract: the validity of a static layer follows transformers' own update rule (index copy,
    roll past a full window, several tokens into a full window). Keys carry their position (+1, and
    negated where a token was deleted); after every update the validity the attention receives is
    True exactly at the returned keys that are not negative."""
    cls, extra = (
        (StaticLayer, {}) if window is None else (StaticSlidingWindowLayer, {"sliding_window": window})
    )
    layer = cls(max_cache_len=16, **extra)
    cache = type("Cache", (), {"layers": [layer]})()
    prompt = torch.arange(1.0, 7.0)  # 6 tokens
    states = prompt[None, None, :, None].clone()
    static_cache.update(cache, 0, states, states, {}, None)
    holes = torch.tensor([1, 3])  # slots (the window's last 4 positions when it slid)
    layer.keys[0, 0, holes, 0] *= -1
    layer.fitprune_valid[0, holes] = False
    seen = 6
    for q in [1, 1, 1, 3, 1, 2, 1]:
        kwargs = {}
        new = torch.arange(seen + 1.0, seen + 1.0 + q)[None, None, :, None]
        keys, _ = static_cache.update(cache, 0, new, new, kwargs, _stock_cache_update)
        seen += q
        valid = kwargs[static_cache.KEY_VALID]
        assert torch.equal(valid[0], keys[0, 0, :, 0] >= 0), (q, keys[0, 0, :, 0], valid)
        written = keys[0, 0, :, 0][keys[0, 0, :, 0] != 0].abs()
        assert written.max() == seen  # the call's keys are in


def _stock_cache_update(self, key_states, value_states, layer_idx, *args, **kwargs):
    return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)


def test_other_caches_are_refused_before_anything_runs():
    model = tiny_llava(num_layers=3, seed=7)
    inputs = make_inputs(model, PADDED, seed=3)
    fitprune_fx.compile(model, _recipe(model, PRUNE), compiler="eager")
    with pytest.raises(
        UnsupportedCacheError, match="cache_implementation='offloaded'.*'dynamic' and 'static'"
    ):
        model.generate(**inputs, cache_implementation="offloaded", max_new_tokens=2)
    assert model.fitprune_backend.reports == []


MODEL = tiny_llava(num_layers=3, seed=11)
CAPTURED = CapturedDecoder(MODEL)  # the prefill graph, re-pruned per example
ORACLE = copy.deepcopy(MODEL)
EXTRA = 12  # static slots after the prompt


@st.composite
def continuations(draw):
    """A random recipe, prompts (padding on either side), then chunks, padded chunks, crops, reorders."""
    images = draw(st.integers(1, 2))
    layers = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    budget = num_image_tokens(MODEL)
    prune = {}
    for layer in sorted(layers):
        prune[layer] = draw(st.integers(0, budget - sum(prune.values()) - 1))
    prompts = [
        PromptSpec(draw(st.integers(0, 4)), draw(st.integers(1, 4)), images=images)
        for _ in range(draw(st.integers(1, 2)))
    ]
    kinds = st.sampled_from(["chunk", "padded", "crop", "reorder"])
    steps = draw(st.lists(st.tuples(kinds, st.integers(2, 4)), min_size=1, max_size=4))
    return prune, prompts, steps, draw(st.integers(0, 99)), draw(st.sampled_from(["left", "right"]))


def _run_steps(model, cache, mask, steps, seed):
    """Apply the steps; return every chunk's logits. A "padded" chunk's first row is n - 1 padding
    tokens and one real one (a batched later turn whose rows differ in length); a crop removes
    appended tokens only, at most what the static cache holds past the prompt."""
    g = torch.Generator().manual_seed(seed)
    out, appended = [], 0
    for kind, n in steps:
        if kind in ("chunk", "padded"):
            n = min(n, EXTRA - appended)
            if not n:
                continue
            logits, mask = append_chunk(model, cache, mask, n, kind == "padded", g)
            out.append(logits)
            appended += n
        elif kind == "crop":
            n = min(n, appended)
            cache.crop(-n)
            mask = mask[:, :-n] if n else mask
            appended -= n
        else:
            perm = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(n))
            cache.reorder_cache(perm)
            mask = mask[perm]
    return out


EXAMPLES = [  # (prune, prompts, steps, seed, padding side)
    ({0: 3, 2: 5}, [PromptSpec(3, 2), PromptSpec(0, 4)],
     [("padded", 3), ("chunk", 2), ("crop", 2), ("reorder", 1), ("chunk", 3)], 5, "right"),
    ({1: 5, 2: 4}, [PromptSpec(1, 3, images=2), PromptSpec(4, 1, images=2)],
     [("chunk", 4), ("crop", 3), ("padded", 2), ("reorder", 1)], 7, "left"),
]  # fmt: skip


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(continuations())
@example(EXAMPLES[0]).via("right padding, a padded later turn, crop, reorder")
@example(EXAMPLES[1]).via("two images, left padding")
def test_static_chunks_crop_reorder_match_masking(case):
    """A pruned prefill into a `StaticCache`, then k-token chunks, padded later turns, crop(-k) and
    beam reorder, against pruning as masking on a dynamic cache: logits of every call within 1e-4,
    and each static layer holds exactly the deleted tokens' slots as holes."""
    prune, prompts, steps, seed, side = case
    inputs = make_inputs(MODEL, prompts, seed=seed)
    if side == "right":
        inputs = right_padded(inputs)
    deletions = {k: v * prompts[0].images for k, v in prune.items()}
    prompt = inputs["input_ids"].shape[1]
    cache = StaticCache(config=MODEL.config.text_config, max_cache_len=prompt + EXTRA)
    out = CAPTURED.run(fitprune_fx.fitprune_backend(_recipe(MODEL, prune), compiler="eager"), **inputs,
                       past_key_values=cache)  # fmt: skip
    holes = [int((~layer.fitprune_valid[0, :prompt]).sum()) for layer in cache.layers]
    assert holes == [sum(d for k, d in deletions.items() if k < layer) for layer in range(3)]
    pruned = _run_steps(MODEL, cache, inputs["attention_mask"], steps, seed)
    with MaskingReference(ORACLE, deletions), torch.no_grad():
        ref = ORACLE(**inputs)
        expected = _run_steps(ORACLE, ref.past_key_values, inputs["attention_mask"], steps, seed)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], atol=1e-4, rtol=1e-4)
    assert len(pruned) == len(expected)
    for a, b in zip(pruned, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_later_turn_image_on_a_static_cache_runs_unpruned_with_a_warning():
    """A static layer that holds a sequence attends over all its slots: a later turn's image there
    is not pruned (one warning that says so) and equals masking that leaves later turns alone."""
    model = tiny_llava(num_layers=3, seed=7)
    oracle = copy.deepcopy(model)
    first = make_inputs(model, PADDED, seed=3)
    turn = make_inputs(model, [PromptSpec(1, 2)] * 3, seed=5)
    fitprune_fx.compile(model, _recipe(model, PRUNE), compiler="eager")
    outs = []
    for runner in (model, oracle):  # (masking runs on a dynamic cache)
        cache = StaticCache(config=model.config.text_config, max_cache_len=64) if runner is model else None
        with torch.no_grad(), MaskingReference(oracle, PRUNE):
            a = runner(**first, past_key_values=cache)
            mask = torch.cat([first["attention_mask"], turn["attention_mask"]], dim=1)
            call = dict(input_ids=turn["input_ids"], pixel_values=turn["pixel_values"], attention_mask=mask)
            if runner is model:
                with pytest.warns(UserWarning, match="continues an existing KV cache"):
                    b = runner(**call, past_key_values=a.past_key_values)
            else:
                b = runner(**call, past_key_values=a.past_key_values)
        outs.append(b.logits[:, -1])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert model.fitprune_backend.pruned_runs == 1


def test_an_uncompiled_model_with_a_static_cache_is_unchanged_by_the_patches():
    """The cache patches are process-wide: a model no backend compiled, decoding with a static
    cache through them, gives transformers' own tokens and logits (a dynamic cache's)."""
    fitprune_fx.fitprune_backend(_recipe(tiny_llava(num_layers=3, seed=7), PRUNE))  # installs the patches
    model = tiny_llava(text_model="mistral", sliding_window=10, num_layers=3, seed=8)
    inputs = make_inputs(model, PADDED, seed=3)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=12, **GEN)
        got = model.generate(**inputs, cache_implementation="static", max_new_tokens=12, **GEN)
    _assert_same(got, expected)
    assert any(getattr(layer, "fitprune_valid", None) is not None for layer in got.past_key_values.layers)
