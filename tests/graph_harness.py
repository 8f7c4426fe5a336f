"""Run the pass on a captured decoder graph many times without re-tracing the model.

Dynamo tracing a tiny LLaVA costs seconds; property tests need hundreds of recipes. So each
(model, batch, images, sequence length) is traced once with static shapes (`dynamic=False`: no
automatic-dynamic cross-talk between captures that share LLaVA's code objects), the original
decoder graph is kept, and every run applies the current backend to a fresh copy of it. The
compiled model still goes through Dynamo's calling path (guards, cache write-back, lm_head graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from fitprune_fx.backend import FitpruneBackend
from fitprune_fx.families import graph_layouts
from fitprune_fx.passes.locate import copy_graph_module, has_decoder_layers
from fitprune_fx.passes.token_ops import select_kept_tokens


class CapturedDecoder:
    """A model compiled once whose decoder graph is re-transformed by the backend given to `run`."""

    def __init__(self, model: torch.nn.Module, dynamic: bool | None = False):
        self.model = model
        self.backend: Callable | None = None
        self.version = 0
        self.calls = 0
        self.compiled = torch.compile(model, backend=self._capture, dynamic=dynamic)

    def _capture(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if not any(has_decoder_layers(gm, layout) for layout in graph_layouts()):
            return gm.forward
        entry = {"version": -1, "impl": None}

        def dispatch(*args):
            if entry["version"] != self.version:  # a new backend: transform a fresh copy
                entry["impl"] = self.backend(copy_graph_module(gm), example_inputs)
                entry["version"] = self.version
            self.calls += 1
            return entry["impl"](*args)

        return dispatch

    def run(self, backend: Callable, **inputs):
        """Run the compiled model with `backend` applied to its decoder graph."""
        self.backend = backend
        self.version += 1
        calls = self.calls
        with torch.no_grad():
            out = self.compiled(**inputs)
        assert self.calls == calls + 1, "the compiled decoder graph did not run (Dynamo fell back?)"
        return out


def plain_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The unchanged graph, as a backend-shaped callable (the 'original outputs' of a test)."""
    return gm.forward


class KeptRecorder:
    """Backend wrapper that records each pruning layer's kept indices (eager graphs only)."""

    def __init__(self, backend: FitpruneBackend):
        self.backend = backend
        self.kept: list[torch.Tensor] = []
        self.graph_module: torch.fx.GraphModule | None = None  # the last graph it transformed

    def __call__(self, gm, example_inputs):
        fn = self.backend(gm, example_inputs)
        graph_module = getattr(fn, "graph_module", None) or fn.__self__  # pruned, or unchanged (eager)
        extra = getattr(fn, "extra_inputs", lambda args: ())  # the token-count inputs of a pruned graph
        for node in graph_module.graph.nodes:
            if node.target in (select_kept_tokens, torch.ops.fitprune.select_kept_tokens_like.default):
                node.target = self._record
            elif node.target is torch.ops.fitprune.select_kept_padded.default:  # any visual count
                node.target = self._record_padded
        graph_module.recompile()
        self.graph_module = graph_module
        return lambda *args: graph_module.forward(*args, *extra(args))

    def _record_padded(self, scores, visual, valid, length, keep):
        kept, real = torch.ops.fitprune.select_kept_padded(scores, visual, valid, length, keep)
        self.kept.append(kept)  # void slots (real False) appear only in a batch of different counts
        return kept, real

    def _record(self, scores, visual, num_delete_or_length):
        num_delete = num_delete_or_length
        if isinstance(num_delete, torch.Tensor):  # select_kept_tokens_like: keeps that tensor's length
            num_delete = scores.shape[1] - num_delete_or_length.shape[0]
        kept = select_kept_tokens(scores, visual, num_delete)
        self.kept.append(kept)
        return kept


def compose_kept(kept_per_layer: list[torch.Tensor], seq_len: int, batch: int) -> list[list[torch.Tensor]]:
    """Original positions kept after each pruning layer, from per-layer indices into the current sequence."""
    pos = torch.arange(seq_len).expand(batch, seq_len)
    out = []
    for kept in kept_per_layer:
        pos = torch.gather(pos, 1, kept)
        out.append([pos[b] for b in range(batch)])
    return out


def assert_pass_matches_masking(
    inputs: dict, logits: torch.Tensor, kept: list[torch.Tensor], masking, expected: torch.Tensor, prune: dict
) -> None:
    """Kept sets after every pruning layer equal pruning as masking's (`masking.deleted`), and the
    pruned `logits` equal masking's `expected` at the kept real positions (fp32, atol 1e-4)."""
    batch, seq_len = inputs["input_ids"].shape
    ours = compose_kept(kept, seq_len, batch)
    for step, layer in enumerate(sorted(prune)):
        for b in range(batch):
            assert torch.equal(ours[step][b], (~masking.deleted[layer][b]).nonzero().squeeze(1)), (step, b)
    for b in range(batch):
        final = ours[-1][b]
        valid = inputs["attention_mask"][b, final].bool()
        torch.testing.assert_close(logits[b][valid], expected[b, final][valid], atol=1e-4, rtol=1e-4)


def assert_pass_matches_reference(
    inputs: dict, out, recorder: KeptRecorder, ref, prune: dict[int, int]
) -> None:
    """Kept sets equal the reference's after every pruning layer; text is never deleted; logits at
    the kept positions equal the reference's (fp32, atol 1e-4)."""
    from fitprune_fx.testbed.tiny import IMAGE_TOKEN_ID

    batch, seq_len = inputs["input_ids"].shape
    ours = compose_kept(recorder.kept, seq_len, batch)
    assert len(ours) == len(ref.kept[0]) == len(prune)
    for step in range(len(prune)):
        for b in range(batch):
            assert torch.equal(ours[step][b], ref.kept[b][step]), f"pruning step {step}, example {b}"
    for b in range(batch):
        final = ours[-1][b]
        text = (inputs["input_ids"][b] != IMAGE_TOKEN_ID).nonzero().flatten()
        assert set(text.tolist()) <= set(final.tolist()), "a text token was deleted"
        assert len(final) == seq_len - sum(prune.values())
        torch.testing.assert_close(out.logits[b], ref.logits[b, final], atol=1e-4, rtol=1e-4)


def assert_greedy_generate_matches_masking(
    model, recipe, inputs: dict, prune: dict[int, int], name: str
) -> float:
    """Compile `model` with `recipe` and greedy-generate 6 tokens; an uncompiled copy under
    pruning as masking (`prune`) must give the same tokens, per-step logits within 1e-4, and the
    model must run exactly one pruned prefill. Returns the worst logit difference."""
    import copy

    import fitprune_fx
    from fitprune_fx.masking_reference import MaskingReference

    oracle = copy.deepcopy(model)
    fitprune_fx.compile(model, recipe, compiler="eager")
    gen = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(**inputs, **gen)
    with torch.no_grad(), MaskingReference(oracle, prune):
        expected = oracle.generate(**inputs, **gen)
    assert torch.equal(got.sequences, expected.sequences)
    worst = max((a - e).abs().max().item() for a, e in zip(got.scores, expected.scores, strict=True))
    assert worst <= 1e-4, worst
    assert model.fitprune_backend.pruned_runs == 1
    print(f"{name}: generate per-step logits max |diff| {worst:.2e}")
    return worst


def assert_each_example_pruned_like_alone(
    model, oracle, backend, calls, visual_ids, recipe, first_static: bool = False
) -> None:
    """Each (batch, examples alone) of `calls` on one compiled `model`: every example's logits at its
    kept tokens (right-aligned in the pruned output) equal pruning as masking on the example alone,
    with the recipe's deletions for that example's own visual count. `recipe`: a Recipe, or a
    fraction dict {layer: fraction} for `oracle`'s config."""
    import dataclasses

    from fitprune_fx import ModelInfo, Recipe
    from fitprune_fx.masking_reference import MaskingReference

    def plan_for(n: int) -> dict[int, int]:
        if isinstance(recipe, Recipe):
            return dict(recipe.deletions_for(n))
        info = dataclasses.replace(ModelInfo.from_config(oracle.config), num_visual_tokens=n)
        return dict(Recipe.from_fractions(info, recipe).prune)

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for batch, alone in calls:
            runs = backend.pruned_runs
            logits = compiled(**batch).logits
            assert backend.pruned_runs == runs + 1
            for e, inputs in enumerate(alone):
                prune = plan_for(int(torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids)).sum()))
                with MaskingReference(oracle, prune) as masking:
                    expected = oracle(**inputs).logits[0]
                deleted = torch.zeros_like(masking.deleted[min(prune)][0])
                for layer in prune:
                    deleted |= masking.deleted[layer][0]
                kept = (~deleted).nonzero().squeeze(1)
                ours = logits[e, logits.shape[1] - len(kept) :]  # real tokens are right-aligned
                torch.testing.assert_close(ours, expected[kept], atol=1e-4, rtol=1e-4, msg=f"example {e}")
    if not first_static:
        assert backend.pruned_graphs[-1].result.any_visual_count, backend.summary()


def right_padded(inputs: dict) -> dict:
    """The same prompts with each row's padding moved to its right end (ids, mask, token types)."""
    out = dict(inputs)
    lengths = inputs["attention_mask"].sum(dim=1)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in inputs:
            rows = [torch.roll(r, -(r.shape[0] - int(n))) for r, n in zip(inputs[key], lengths, strict=True)]
            out[key] = torch.stack(rows)
    return out


def append_chunk(model, cache, mask: torch.Tensor, n: int, padded: bool, generator: torch.Generator):
    """Run n random text tokens per row on (cache, mask); with `padded`, the first row's first n - 1
    are padding (a batched later turn whose rows differ in length: padding inside the sequence).
    Returns (the chunk's logits, the mask with the chunk)."""
    from fitprune_fx.testbed.tiny import PAD_TOKEN_ID

    ids = torch.randint(4, model.config.text_config.vocab_size, (mask.shape[0], n), generator=generator)
    new = torch.ones_like(ids)
    if padded:
        new[0, : n - 1] = 0
        ids[0, : n - 1] = PAD_TOKEN_ID
    mask = torch.cat([mask, new], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits, mask
