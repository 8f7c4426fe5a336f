"""Continuing a pruned KV cache: the per-layer mask cut, and every cache operation, against oracles
(any padding, sliding windows, the positions each pruned layer records).

Two references written apart from `fitprune_fx.pruned_cache`:
- for the mask cut, the original mask with the deleted columns removed (built from their positions);
- for whole models, pruning as masking (`MaskingReference`), which keeps every token in an
  unpruned model's own `DynamicCache` and hides deleted keys.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.positioned_cache import positions_of
from fitprune_fx.pruned_cache import PADDING_ERROR, cut_mask_to_pruned_keys
from fitprune_fx.reference_continuation import ReferenceContinuation
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, num_image_tokens, tiny_llava
from graph_harness import CapturedDecoder, append_chunk, right_padded

# ----------------------------------------------------------------------------------------------
# the mask cut, against removing the deleted columns by position


@st.composite
def pruned_layer_masks(draw):
    """A left-padded mask over (prompt, decoded, new chunk) and a layer's deleted prompt columns."""
    batch = draw(st.integers(1, 3))
    prompt = draw(st.integers(4, 12))
    decoded = draw(st.integers(0, 4))
    q = draw(st.integers(1, 5))
    pads = [draw(st.integers(0, prompt - 2)) for _ in range(batch)]
    d = draw(st.integers(0, prompt - 1 - max(pads)))
    total = prompt + decoded + q
    valid = torch.ones(batch, total, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    rows = torch.arange(prompt + decoded, total)[:, None]
    causal = torch.arange(total)[None, :] <= rows  # [q, total]
    mask = valid[:, None, None, :] & causal[None, None]  # [B, 1, q, total]
    deleted = []  # per row: d real prompt columns, any of them
    for p in pads:
        perm = torch.randperm(prompt - p, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        deleted.append(sorted((perm[:d] + p).tolist()))
    return mask, deleted, q


@settings(max_examples=60, deadline=None)
@given(pruned_layer_masks(), st.booleans())
def test_cut_equals_removing_deleted_columns(case, additive):
    mask, deleted, q = case
    if additive:  # the float form: 0 = attend, dtype-min = masked
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    total = mask.shape[-1]
    expected = torch.stack(
        [mask[b][..., [c for c in range(total) if c not in set(deleted[b])]] for b in range(mask.shape[0])]
    )
    keys = total - len(deleted[0])
    assert torch.equal(cut_mask_to_pruned_keys(mask, keys, q), expected)


def test_cut_refuses_padding_after_a_real_column():
    """Right padding (or a later turn padded inside the sequence) would make the cut wrong."""
    valid = torch.tensor([[True, True, True, False, True, True]])  # a padding column in the old part
    mask = valid[:, None, None, :].expand(1, 1, 2, 6).clone()
    with pytest.raises(RuntimeError, match="left padding"):
        cut_mask_to_pruned_keys(mask, 4, 2)
    assert "padding_side = 'left'" in PADDING_ERROR


# ----------------------------------------------------------------------------------------------
# whole models: pruned prefill, then chunks and cache operations, against pruning as masking

MODEL = tiny_llava(num_layers=3, seed=11)
N_VISUAL = num_image_tokens(MODEL)
CAPTURED = CapturedDecoder(MODEL)  # the prefill graph, re-pruned per example
ORACLE_MODEL = copy.deepcopy(MODEL)
WINDOW = 5  # shorter than every prompt: the window slides in the prefill and in every later call
WINDOWED = tiny_llava("mistral", num_layers=3, seed=11, sliding_window=WINDOW)  # every layer slides
CAPTURED_WINDOWED = CapturedDecoder(WINDOWED)
ORACLE_WINDOWED = copy.deepcopy(WINDOWED)


@st.composite
def continuations(draw):
    """A recipe, a batch (images anywhere, one or two; padded left or right), whether every layer
    slides, and a list of cache steps (chunks, chunks whose first row is padded at its start,
    crops, reorders)."""
    images = draw(st.integers(1, 2))
    prune = draw(
        st.dictionaries(st.integers(0, 2), st.integers(0, 5), min_size=1, max_size=3).filter(
            lambda p: sum(p.values()) <= N_VISUAL
        )
    )
    prompts = [
        PromptSpec(draw(st.integers(0, 4)), draw(st.integers(1, 4)), images=images)
        for _ in range(draw(st.integers(1, 2)))
    ]
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("chunk"), st.integers(1, 4)),
                st.tuples(st.just("padded"), st.integers(2, 4)),
                st.tuples(st.just("crop"), st.integers(1, 3)),
                st.tuples(st.just("reorder"), st.integers(0, 9)),
            ),
            min_size=1,
            max_size=5,
        )
    )
    windowed, side = draw(st.booleans()), draw(st.sampled_from(["left", "right"]))
    return prune, prompts, steps, draw(st.integers(0, 99)), windowed, side


def _run_reference_steps(continuation, batch, steps, seed):
    """The same steps on the eager reference's own caches (explicit removal, no transformers cache)."""
    g = torch.Generator().manual_seed(seed)
    out, appended = [], 0
    for kind, n in steps:
        if kind == "chunk":
            out.append(continuation.extend(torch.randint(4, 128, (batch, n), generator=g)))
            appended += n
        elif kind == "crop":
            n = min(n, appended)  # a rollback removes appended tokens only
            if n:
                continuation.crop(n)
                appended -= n
        else:
            continuation.reorder(torch.randperm(batch, generator=torch.Generator().manual_seed(n)))
    return out


def _run_steps(model, cache, mask, steps, seed, windowed=False):
    """Apply the steps to (cache, mask) with `model`; return the logits of every chunk. A "padded"
    chunk gives its first row n - 1 padding tokens before one real one (a batched later turn whose
    rows differ in length: padding inside the sequence). Sliding-window layers record their past
    from here on, as assisted decoding has them do, so that a crop can roll them back; transformers'
    window layers roll back only the last forward's tokens (as assisted decoding crops), so with
    `windowed` a crop removes at most those."""
    cache.activate_past_recording()
    g = torch.Generator().manual_seed(seed)
    out, appended, last = [], 0, 0
    for kind, n in steps:
        if kind in ("chunk", "padded"):
            logits, mask = append_chunk(model, cache, mask, n, kind == "padded", g)
            out.append(logits)
            appended, last = appended + n, n
        elif kind == "crop":
            n = min(n, last if windowed else appended)  # a rollback removes appended tokens only
            cache.crop(-n)
            mask = mask[:, :-n] if n else mask
            appended, last = appended - n, 0
        else:
            perm = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(n))
            cache.reorder_cache(perm)
            mask = mask[perm]
    return out


EXAMPLES = [  # (prune, prompts, steps, seed, windowed, padding side)
    ({0: 3, 2: 5}, [PromptSpec(3, 2), PromptSpec(0, 4)],
     [("padded", 3), ("chunk", 2), ("crop", 2), ("reorder", 1), ("chunk", 1)], 5, False, "right"),
    ({1: 5, 2: 4}, [PromptSpec(1, 3, images=2), PromptSpec(4, 1, images=2)],
     [("chunk", 4), ("crop", 3), ("padded", 2), ("reorder", 1), ("chunk", 3)], 7, True, "left"),
    ({0: 5}, [PromptSpec(2, 1)], [("chunk", 1)] * 3 + [("crop", 1), ("chunk", 2)], 3, True, "right"),
]  # fmt: skip


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(continuations())
@example(EXAMPLES[0]).via("right padding, a padded later turn")
@example(EXAMPLES[1]).via("every layer slides, two images")
@example(EXAMPLES[2]).via("a window, right padding, decode steps")
def test_chunks_crop_reorder_match_masking_reference(case):
    """k-token chunks, padded later turns, crop(-k) and beam reorder after a pruned prefill, with
    left or right padding and with or without sliding windows, against pruning as masking (and
    the eager reference, which models no windows and no padded later turns). Every pruned layer's
    cache records its keys' original positions: the tokens masking leaves it."""
    prune, prompts, steps, seed, windowed, side = case
    model, captured, oracle = (WINDOWED, CAPTURED_WINDOWED, ORACLE_WINDOWED) if windowed else (
        MODEL, CAPTURED, ORACLE_MODEL)  # fmt: skip
    inputs = make_inputs(model, prompts, seed=seed)
    if side == "right":
        inputs = right_padded(inputs)
    deletions = {k: v * prompts[0].images for k, v in prune.items()}  # the recipe scaled to the images
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune=prune)
    out = captured.run(fitprune_backend(recipe, compiler="eager"), **inputs)
    prompt = inputs["input_ids"].shape[1]
    kept = [prompt - sum(d for k, d in deletions.items() if k < li) for li in range(3)]
    stored = [min(n, WINDOW - 1) if windowed else n for n in kept]
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == stored
    positions = [positions_of(layer) for layer in out.past_key_values.layers]
    pruned = _run_steps(model, out.past_key_values, inputs["attention_mask"], steps, seed, windowed)

    with MaskingReference(oracle, deletions) as masking, torch.no_grad():
        ref = oracle(**inputs)
        expected = _run_steps(oracle, ref.past_key_values, inputs["attention_mask"], steps, seed, windowed)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], atol=1e-4, rtol=1e-4)
    for li in range(3):
        earlier = [masking.deleted[k] for k in deletions if k < li]
        if positions[li] is None:  # a layer holding every position may record none
            assert not earlier, li
            continue
        present = ~torch.stack([torch.zeros_like(masking.deleted[min(deletions)]), *earlier]).any(dim=0)
        for b in range(len(prompts)):
            assert positions[li][b].tolist() == present[b].nonzero().flatten().tolist()[-stored[li] :]
    assert len(pruned) == len(expected)
    for a, b in zip(pruned, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    if windowed or any(kind == "padded" for kind, _ in steps):
        return
    _, continuation = ReferenceContinuation.after_prefill(model, **inputs, prune=deletions)
    removed = _run_reference_steps(continuation, len(prompts), steps, seed)
    for a, b in zip(pruned, removed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("windowed", [False, True], ids=["full", "window"])
def test_batch_select_repeat_deepcopy_keep_pruned_caches_exact(windowed):
    """The batch operations of contrastive search / num_return_sequences, and deepcopy: the rows
    come back swapped, so positions that did not follow their row would show."""
    model, captured, oracle = (WINDOWED, CAPTURED_WINDOWED, ORACLE_WINDOWED) if windowed else (
        MODEL, CAPTURED, ORACLE_MODEL)  # fmt: skip
    prune = {0: 4, 1: 6}
    inputs = make_inputs(model, [PromptSpec(2, 3), PromptSpec(0, 5)], seed=4)
    out = captured.run(
        fitprune_backend(Recipe(model=ModelInfo.from_config(model.config), prune=prune), compiler="eager"),
        **inputs,
    )
    with MaskingReference(oracle, prune), torch.no_grad():
        ref = oracle(**inputs)
    results = []
    for runner, cache in ((model, out.past_key_values), (oracle, ref.past_key_values)):
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(2)  # rows 0 0 1 1
        cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1 0
        mask = inputs["attention_mask"][[1, 0]]
        ids = torch.tensor([[9, 10, 11], [12, 13, 14]])
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        with torch.no_grad(), MaskingReference(oracle, prune):
            results.append(runner(input_ids=ids, attention_mask=mask, past_key_values=cache).logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)
    kept = inputs["input_ids"].shape[1] - 10
    assert out.past_key_values.layers[2].keys.shape[-2] == (min(kept, WINDOW - 1) if windowed else kept)


@pytest.mark.parametrize("window", [None, 6])
def test_mask_sizes_count_original_positions(window):
    """A layer whose cache holds fewer keys but records their positions reports the mask sizes of a
    layer of its kind that holds every key (transformers' own rule), below and past the window."""
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    from fitprune_fx import positioned_cache

    positioned_cache.install()
    kind = (lambda: DynamicLayer()) if window is None else (lambda: DynamicSlidingWindowLayer(window))
    for seen in (3, 5, 6, 9, 14):
        cache = Cache(layers=[kind(), kind(), kind()])  # layer 2: like layer 1, but pruned
        keys = torch.randn(1, 1, seen, 4)
        for layer in cache.layers[:2]:
            layer.update(keys, keys)
        cache.layers[2].update(keys[:, :, :2], keys[:, :, :2])  # two kept keys of `seen`
        cache.layers[2].fitprune_positions = torch.tensor([[0, seen - 1]])
        for q in (1, 3):
            assert cache.get_mask_sizes(q, 2) == cache.layers[1].get_mask_sizes(q), (seen, q)
        assert cache.get_seq_length(2) == cache.get_seq_length(1) == seen


def test_a_windowed_prefill_without_a_cache_is_pruned():
    """use_cache=False: no cache update, so no positions are recorded and none are needed; a model
    whose every layer slides is still pruned, and its last token's logits equal masking's."""
    model = copy.deepcopy(WINDOWED)
    inputs = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=6)
    prune = {0: 5, 1: 3}
    backend = fitprune_backend(
        Recipe(model=ModelInfo.from_config(model.config), prune=prune), compiler="eager"
    )
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs, use_cache=False).logits
        with MaskingReference(ORACLE_WINDOWED, prune):
            expected = ORACLE_WINDOWED(**inputs, use_cache=False).logits
    assert len(backend.pruned_graphs) == 1, backend.summary()
    torch.testing.assert_close(out[:, -1], expected[:, -1], atol=1e-4, rtol=1e-4)
