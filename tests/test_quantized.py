"""Quantized language models (torchao) under the pass, against pruning as masking on the same
quantized model; and the run-time fallback when a per-layer partition fails.

Quantized weights are tensor subclasses: the per-layer compile builds plain fake inputs, so it
refuses them and the pruned graph is compiled whole (`layer_compile`); both settings of
`compile_by_layer` are checked.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
from graph_harness import assert_greedy_generate_matches_masking

torchao = pytest.importorskip("torchao")
from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
PRUNE = {1: 6, 2: 4}


def quantized_llava(config) -> torch.nn.Module:
    model = tiny_llava(num_layers=3, seed=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model.model.language_model, config)
    return model


def worst_at_kept(logits, expected, deleted, inputs) -> float:
    """max |logits - expected| at the positions kept after the last pruning layer (real tokens)."""
    worst = 0.0
    for b in range(inputs["input_ids"].shape[0]):
        kept = (~deleted[max(PRUNE)][b]).nonzero().squeeze(1)
        valid = inputs["attention_mask"][b, kept].bool()
        assert logits.shape[1] == kept.numel()
        worst = max(worst, (logits[b][valid] - expected[b, kept][valid]).abs().max().item())
    return worst


def pruned_prefill(model, inputs, **options):
    backend = fitprune_backend(
        Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE), progress=False, **options
    )
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(**inputs).logits
    assert len(backend.pruned_graphs) == 1 and backend.pruned_runs == 1, backend.summary()
    return out, backend


@pytest.mark.parametrize("by_layer", [True, False])
def test_int8_weight_only_prefill_equals_masking(by_layer):
    model = quantized_llava(Int8WeightOnlyConfig())
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    out, backend = pruned_prefill(model, inputs, compile_by_layer=by_layer)
    assert backend.pruned_graphs[0].partitions is None  # quantized weights: compiled whole
    with torch.no_grad(), MaskingReference(oracle, PRUNE) as masking:
        expected = oracle(**inputs).logits
    assert worst_at_kept(out, expected, masking.deleted, inputs) <= 1e-4


def test_int8_dynamic_prefill_within_plain_compiles_own_difference():
    """Dynamic activation quantization rounds per call: the pruned model is held to the difference
    plain torch.compile shows against eager on the same model (twice it, to leave room)."""
    model = quantized_llava(Int8DynamicActivationInt8WeightConfig())
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    out, _ = pruned_prefill(model, inputs)
    with torch.no_grad():
        plain = torch.compile(copy.deepcopy(oracle))(**inputs).logits
        own = (plain - oracle(**inputs).logits).abs().max().item()
        with MaskingReference(oracle, PRUNE) as masking:
            expected = oracle(**inputs).logits
    worst = worst_at_kept(out, expected, masking.deleted, inputs)
    print(f"int8 dynamic: pruned vs masking {worst:.2e}, plain compile vs eager {own:.2e}")
    assert worst <= 2 * own + 1e-5


def test_int8_weight_only_greedy_generate_matches_masking():
    model = quantized_llava(Int8WeightOnlyConfig())
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=4)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE)
    assert_greedy_generate_matches_masking(model, recipe, inputs, PRUNE, "int8 weight-only")


def test_a_model_loaded_with_torchao_config_is_pruned(tmp_path):
    """transformers' route: `from_pretrained(..., quantization_config=TorchAoConfig(...))`."""
    from transformers import LlavaForConditionalGeneration, TorchAoConfig

    tiny_llava(num_layers=3, seed=1).save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), attn_implementation="sdpa"
    ).eval()
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert is_traceable_wrapper_subclass(weight)  # quantized by the config
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    out, _ = pruned_prefill(model, inputs, compiler="eager")
    with torch.no_grad(), MaskingReference(oracle, PRUNE) as masking:
        expected = oracle(**inputs).logits
    assert worst_at_kept(out, expected, masking.deleted, inputs) <= 1e-4


def test_a_partition_that_fails_at_run_time_falls_back_to_the_whole_graph(monkeypatch):
    """A per-layer partition raising on its first call: one warning, the graph compiled whole answers
    the same call, pruned and equal to masking; later calls use the whole graph."""
    from fitprune_fx import layer_compile

    model = tiny_llava(num_layers=4, seed=1).eval()
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(3, 5)], seed=2)  # batch 1: layers 2-3 share a compile
    calls = {"n": 0}

    def failing(self, *args):
        calls["n"] += 1
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(layer_compile._Partition, "__call__", failing)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE)
    fitprune_fx.compile(model, recipe, progress=False)
    with pytest.warns(UserWarning, match="partition of decoder graph .* failed at run time"), torch.no_grad():
        out = model(**inputs).logits
    backend = model.fitprune_backend
    assert calls["n"] == 1 and backend.pruned_runs == 1 and backend.pruned_graphs[0].partitions is None
    with torch.no_grad(), MaskingReference(oracle, PRUNE) as masking:
        expected = oracle(**inputs).logits
    assert worst_at_kept(out, expected, masking.deleted, inputs) <= 1e-4
    with torch.no_grad():
        again = model(**inputs).logits
    assert calls["n"] == 1 and torch.equal(again, out)


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "fp8"])
def test_other_quantizers_are_refused_before_compiling_with_their_name(method):
    model = tiny_llava(num_layers=2)
    model.config.quantization_config = {"quant_method": method}
    with pytest.raises(fitprune_fx.UnsupportedQuantizer) as caught:
        fitprune_fx.compile(model, Recipe(model=ModelInfo.from_config(model.config), prune={0: 2}))
    message = str(caught.value)
    assert f"quantized with {method}" in message and "TorchAoConfig" in message
    assert not hasattr(model, "fitprune_backend")


def test_torchao_config_passes_fitprune_compile(tmp_path):
    from transformers import LlavaForConditionalGeneration, TorchAoConfig

    tiny_llava(num_layers=3, seed=1).save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), attn_implementation="sdpa"
    ).eval()
    fitprune_fx.compile(
        model, Recipe(model=ModelInfo.from_config(model.config), prune=PRUNE), compiler="eager"
    )
    with torch.no_grad():
        out = model(**make_inputs(model, [PromptSpec(3, 5)], seed=2)).logits
    assert model.fitprune_backend.pruned_runs == 1 and out.shape[1] == 3 + 5 + 16 + 1 - sum(PRUNE.values())
