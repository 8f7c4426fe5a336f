"""Run-time checks: a graph output read after the call (never a device assert), and pruned
graphs that never read a device value on the host (so CUDA graphs can capture them)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import fitprune_fx.backend as backend_module
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.passes.run_time_checks import (
    RunTimeCheckFailed,
    collect_run_time_checks,
    raise_failed_checks,
)
from fitprune_fx.passes.token_ops import VISUAL_COUNT_ERROR
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
from host_syncs import HostSyncRecorder

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _asserts(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in (torch._assert_async, torch.ops.aten._assert_async.msg)]


def test_fitprune_asserts_become_one_output_and_others_stay():
    def f(x):
        torch._assert_async((x > 0).all(), "fitprune: x must be positive")
        torch._assert_async((x < 10).all(), "user check")  # not ours: left in place
        torch._assert_async((x != 3).any(), "fitprune: x must not be all threes")
        return (x * 2,)

    gm = fx.symbolic_trace(f)
    messages = collect_run_time_checks(gm)
    assert messages == ["fitprune: x must be positive", "fitprune: x must not be all threes"]
    assert [str(n.args[1]) for n in _asserts(gm)] == ["user check"]
    doubled, flags = gm(torch.tensor([1.0, 2.0]))
    assert torch.equal(doubled, torch.tensor([2.0, 4.0])) and flags.tolist() == [True, True]
    raise_failed_checks(flags, messages)  # all hold: no error
    _, flags = gm(torch.tensor([3.0, 3.0]))
    _, negative = gm(torch.tensor([-1.0, 3.0]))
    with pytest.raises(RunTimeCheckFailed, match="all threes"):
        raise_failed_checks(flags, messages)
    with pytest.raises(RunTimeCheckFailed, match="positive"):  # the first failing one is named
        raise_failed_checks(negative, messages)
    assert collect_run_time_checks(fx.symbolic_trace(lambda x: (x + 1,))) == []


def test_pruned_prefill_and_decode_graphs_make_no_host_sync(monkeypatch):
    """generate through the pruned prefill graph and pruned-cache decode graphs: no graph reads a
    device value on the host, no fitprune assert reaches the compiler, every check held."""
    model = tiny_llava(num_layers=3, seed=7)
    inputs = make_inputs(model, [PromptSpec(2, 4), PromptSpec(5, 2)], seed=2)  # left-padded batch
    flags = []
    monkeypatch.setattr(backend_module, "raise_failed_checks", lambda f, m: flags.append((f.clone(), m)))
    backend = fitprune_backend(
        Recipe(model=ModelInfo.from_config(model.config), prune={0: 5, 1: 3}), compiler="eager"
    )
    syncs, leftover_asserts = [], []

    def recording(gm, example_inputs):
        compiled = backend(gm, example_inputs)
        leftover_asserts.extend(_asserts(gm))

        def run(*args):
            with HostSyncRecorder() as recorder:
                out = compiled(*args)
            syncs.append(recorder.syncs)
            return out

        return run

    model.compile(backend=recording)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(backend.pruned_graphs) == 1 and backend.pruned_runs == 1
    assert syncs and all(s == [] for s in syncs), syncs
    assert leftover_asserts == []
    # the prefill graph checks the visual count; decode graphs take each layer's mask at its keys'
    # recorded positions (`positioned_cache`), which holds for any padding: nothing to check there
    assert len(flags) == 1 and flags[0][1] == [VISUAL_COUNT_ERROR] and bool(flags[0][0].all())


def test_mode_and_options_reach_inductor(monkeypatch):
    """`mode=` given to fitprune_backend or to torch.compile(backend=..., mode=...) becomes
    Inductor's config patches (reduce-overhead: CUDA graphs), and then the backend keeps the outputs
    of CUDA-graph replays valid (`cudagraph_outputs.outputs_kept`)."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    import fitprune_fx.backend as backend_module

    kept = []  # under CUDA graphs the compiled callable's outputs are copied out of the pool
    monkeypatch.setattr(backend_module, "outputs_kept", lambda fn: kept.append(fn) or fn)
    model = torch.nn.Linear(4, 4)
    recipe = Recipe(model=ModelInfo.from_config(tiny_llava(num_layers=2).config), prune={0: 1})
    x = torch.randn(2, 4)
    torch.compile(model, backend=fitprune_backend(recipe, mode="reduce-overhead"))(x)
    torch._dynamo.reset()
    torch.compile(model, backend=fitprune_backend(recipe), mode="reduce-overhead")(x)
    torch._dynamo.reset()
    torch.compile(model, backend=fitprune_backend(recipe), options={"max_autotune": True})(x)
    torch._dynamo.reset()
    torch.compile(model, backend=fitprune_backend(recipe))(x)
    assert seen[0].get("triton.cudagraphs") is True and seen[1].get("triton.cudagraphs") is True
    assert seen[2] == {"max_autotune": True} and seen[3] == {}
    assert len(kept) == 2  # the two reduce-overhead compiles only
