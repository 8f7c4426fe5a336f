"""What a user reads: summary() lines, errors raised through Dynamo, progress and warning output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fitprune_fx import ModelInfo, Recipe, RecipeError, fitprune_backend
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _recipe(model, prune) -> Recipe:
    return Recipe(model=ModelInfo.from_config(model.config), prune=prune)


def test_summary_of_a_symbolic_graph_speaks_of_prompt_length():
    model = tiny_llava(num_layers=3, seed=1)
    backend = fitprune_backend(_recipe(model, {0: 5, 1: 3}), compiler="eager")
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(**make_inputs(model, [PromptSpec(2, 3)]))
    line = str(backend.pruned_graphs[0])
    assert "tokens per layer S -> S-5 -> S-8 -> S-8 (S = prompt length" in line, line
    assert " s" not in line.split("tokens per layer")[1].split("(")[0]  # no Dynamo symbol such as s29


def test_wrong_model_error_lists_every_mismatch_at_the_head_of_dynamos_error():
    recipe_model = tiny_llava(num_layers=2, seed=1)
    model = tiny_llava(num_layers=3, hidden_size=32, seed=2)
    backend = fitprune_backend(_recipe(recipe_model, {0: 3}), compiler="eager")
    with pytest.raises(Exception) as raised, torch.no_grad():
        torch.compile(model, backend=backend)(**make_inputs(model, [PromptSpec(2, 3)]))
    head = str(raised.value)[:400]  # Dynamo prefixes the backend's repr: it must stay short
    assert "RecipeError: recipe is for another model" in head, head
    for mismatch in (
        "decoder layers: recipe 2, model 3",
        "hidden size: recipe 64, model 32",
        "visual tokens",
    ):
        assert mismatch in str(raised.value)
    assert isinstance(raised.value.__cause__ or raised.value, (RecipeError, Exception))
    failed = [r for r in backend.reports if "compile raised RecipeError" in str(r)]
    assert len(failed) == 1  # the graph whose compile raised has a reason too
    assert all(r.reason for r in backend.reports)


def test_one_progress_line_before_each_decoder_compile(monkeypatch, capfd):
    import torch._inductor.compile_fx as compile_fx_module

    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: gm.forward)
    model = tiny_llava(num_layers=3, seed=3)
    inputs = make_inputs(model, [PromptSpec(2, 3)])
    backend = fitprune_backend(_recipe(model, {0: 5}))
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fitprune:")]
    index = backend.pruned_graphs[0].index
    said = f"fitprune: compiling pruned decoder graph {index} (3 layers) with Inductor; the first call waits"
    assert lines == [said + " for it"], err
    assert "[compiled in" in str(backend.pruned_graphs[0])
    quiet = fitprune_backend(_recipe(model, {0: 5}), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=quiet)(**inputs)
    assert "fitprune:" not in capfd.readouterr().err


GRAPH_BREAK_PROBE = """
import torch
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
model = tiny_llava(num_layers=2)
backend = fitprune_backend(Recipe(model=ModelInfo.from_config(model.config), prune={0: 3}), compiler="eager")
FIRST
with torch.no_grad():
    torch.compile(model, backend=backend)(**make_inputs(model, [PromptSpec(2, 3)]))
print(backend.summary())
"""


def test_the_placeholder_check_graph_break_is_quiet_and_others_are_not():
    """transformers' `get_placeholder_mask` `.item()` break printed 31 lines per process; it is
    known and harmless for the pass, so it is dropped; a user's own `.item()` break still prints."""
    quiet = subprocess.run(
        [sys.executable, "-c", GRAPH_BREAK_PROBE.replace("FIRST", "")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "pruned with fitprune" in quiet.stdout
    assert "Graph break" not in quiet.stderr and "get_placeholder_mask" not in quiet.stderr, quiet.stderr
    own = "torch.compile(lambda x: x * x.sum().item(), backend=backend)(torch.ones(3))"
    loud = subprocess.run(
        [sys.executable, "-c", GRAPH_BREAK_PROBE.replace("FIRST", own)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Graph break from `Tensor.item()`" in loud.stderr


def test_an_unpadded_batch_1_call_and_generate_warn_nothing(capfd):
    """The old padded-decode hint fired on unpadded batch-1 calls; no fitprune warning may fire on
    the plain path (direct call, then generate), and nothing but progress lines goes to stderr."""
    import warnings

    import fitprune_fx

    model = tiny_llava(num_layers=3, seed=4)
    inputs = make_inputs(model, [PromptSpec(2, 3)], seed=4)
    assert bool(inputs["attention_mask"].all())
    fitprune_fx.compile(model, _recipe(model, {0: 5}), compiler="eager")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [str(w.message) for w in caught if "fitprune" in str(w.message)] == []
    assert model.fitprune_backend.pruned_runs == 2
    assert [line for line in capfd.readouterr().err.splitlines() if "fitprune" in line] == []
