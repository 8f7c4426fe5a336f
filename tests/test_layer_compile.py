"""Per-layer compile: the split graph computes what the pruned graph computes, which layers share
one compile, the compiled model against the eager reference, and the cases that are not split."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fitprune_fx import ModelInfo, Recipe, fitprune_backend, layer_compile
from fitprune_fx.families import graph_layouts
from fitprune_fx.passes.locate import has_decoder_layers
from fitprune_fx.passes.split_layers import split_by_layer
from fitprune_fx.reference import reference_prefill
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
from graph_harness import CapturedDecoder


class PrunedGraph:
    """An eager FitPrune backend that keeps the pruned graph and the arguments of its last call."""

    def __init__(self, prune: dict[int, int], model) -> None:
        recipe = Recipe(model=ModelInfo.from_config(model.config), prune=prune)
        self.backend = fitprune_backend(recipe, compiler="eager", progress=False)
        self.graph: fx.GraphModule | None = None
        self.extra = None
        self.args: tuple = ()

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        run = self.backend(gm, example_inputs)
        self.graph, self.extra = run.graph_module, run.extra_inputs

        def call(*args):
            self.args = args
            return run(*args)

        return call


def _layout(gm: fx.GraphModule):
    return next(lay for lay in graph_layouts() if has_decoder_layers(gm, lay))


def _split_and_compare(prune: dict[int, int], prompts: list[PromptSpec], layers: int = 4):
    """Split the pruned decoder graph; its partitions run uncompiled must give the pruned graph's
    outputs bit for bit. Returns the split."""
    m = tiny_llava("llama", num_layers=layers, seed=7)
    inputs = make_inputs(m, prompts, seed=8)
    pruned = PrunedGraph(prune, m)
    CapturedDecoder(m).run(pruned, **inputs)
    args = (*pruned.args, *pruned.extra(pruned.args))
    expected = pruned.graph(*args)
    split = split_by_layer(pruned.graph, _layout(pruned.graph))
    assert split is not None
    calls: dict[str, tuple] = {}  # partition -> (its inputs, its outputs) in this run
    for name in split.inputs:
        getattr(split.module, name).register_forward_hook(
            lambda module, args, out, name=name: calls.__setitem__(name, (args, out))
        )
    with torch.no_grad():
        got = split(*args)
    _assert_same(got, expected)
    # A group shares one compile: its first partition's program, run on each member's inputs,
    # must give that member's outputs.
    for first, *others in split.groups:
        for name in others:
            with torch.no_grad():
                _assert_same(getattr(split.module, first)(*calls[name][0]), calls[name][1])
    return split


def _assert_same(got, expected) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b


@pytest.mark.parametrize(
    "prompts, layers_shared",
    [
        ([PromptSpec(3, 5, images=2, between=3)], ["submod_1", "submod_2", "submod_3", "submod_4"]),
        (
            [PromptSpec(3, 5, images=2, between=3), PromptSpec(1, 2, images=2)],
            ["submod_2", "submod_3", "submod_4"],
        ),
    ],
    ids=["batch-1", "batch-2-padded"],
)
def test_split_runs_like_the_pruned_graph_and_pruning_layers_share_one_program(prompts, layers_shared):
    """Every layer deletes: the decoder is entered through an identity compaction of counted
    length (`entry_compaction`), so at batch 1 all four are one program, the first (whose input is
    the whole prompt) and the last (whose unread outputs are aligned with the others') included; the
    partitions before and after the layers are programs of their own. At batch 2 the graph reads
    each example's count and pads (`padded_compaction`): the layers after the first pruning layer
    fill the void rows of their caches, so the first pruning layer is a program of its own."""
    split = _split_and_compare({0: 4, 1: 6, 2: 3, 3: 2}, prompts)
    alone = [[f"submod_{i}"] for i in range(6) if f"submod_{i}" not in layers_shared]
    assert sorted(map(sorted, split.groups)) == sorted([*alone, layers_shared])


@pytest.mark.parametrize(
    "prune, shared",
    [
        # a batch of 2: padded (see above), so layers up to the first pruning layer share nothing
        ({1: 5}, [["submod_3", "submod_4"]]),  # layers 2, 3: unpruned after the pruning layer
        ({0: 3, 2: 4}, [["submod_2", "submod_4"]]),  # layers 1, 3: unpruned, void rows filled
        ({0: 0, 1: 2}, [["submod_3", "submod_4"]]),  # layer 0 deletes nothing: no count of its own
    ],
    ids=["one-layer", "every-other", "count-0-layer"],
)
def test_split_runs_like_the_pruned_graph_for_other_recipes(prune, shared):
    """Unpruned layers between pruning layers, a layer that scores but deletes nothing: the
    split still computes the same outputs, and only layers of one program share a compile."""
    split = _split_and_compare(prune, [PromptSpec(2, 4), PromptSpec(0, 6)])
    alone = [[name] for name in split.inputs if not any(name in group for group in shared)]
    assert sorted(map(sorted, split.groups)) == sorted(alone + shared)


@pytest.mark.parametrize(
    "where, error",
    [
        ("_compile_alone", layer_compile.SharedCompileRefused("test: a guard on a partition's sizes")),
        ("split_by_layer", RuntimeError("test: the split failed")),
    ],
    ids=["refused", "split-failed"],
)
def test_a_failed_per_layer_compile_falls_back_to_the_whole_graph(monkeypatch, where, error):
    """A partition whose compile needs a fact about its sizes is not shared, and a split that
    fails is not used: the whole graph is compiled instead, and the output is the reference's."""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(layer_compile, where, fail)
    m = tiny_llava("llama", seed=1)
    prune = {0: 4, 1: 6, 2: 3}
    backend = fitprune_backend(Recipe(model=ModelInfo.from_config(m.config), prune=prune), progress=False)
    inputs = make_inputs(m, [PromptSpec(3, 5)], seed=2)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend=backend)(**inputs)
    (report,) = backend.pruned_graphs
    assert report.partitions is None and report.compile_s is not None
    ref = reference_prefill(
        m, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], prune=prune
    )
    torch.testing.assert_close(out.logits[0], ref.logits[0, ref.kept_final[0]], atol=1e-4, rtol=1e-4)


def test_a_compile_that_guards_on_its_sizes_is_refused():
    """`x.view(2, -1)` on a length-s input needs s even: compiled for every s, that is a guard,
    so the compile cannot be shared."""
    from torch._dynamo.source import ConstantSource
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    symbol = shape_env.create_symbol(8, ConstantSource("s"), dynamic_dim=DimDynamic.DYNAMIC)
    with mode:
        x = torch.empty((shape_env.create_symintnode(symbol, hint=8),))
    gm = fx.symbolic_trace(lambda x: (x.view(2, -1) * 2,))
    with pytest.raises(layer_compile.SharedCompileRefused, match="assumed"):
        layer_compile._compile_alone(gm, [x], {}, compile_fx)
