"""The graph contract (`fitprune_fx.passes.graph_contract`), item by item, on the installed transformers.

Each family's tiny model is traced once with the pruning backend (eager compiler): the decoder graph
as Dynamo gave it is kept for the structural items, and the pruned run is compared with pruning as
masking (the model's own code, no pass code) for the items whose proof is numbers. Expected values
come from the graph metadata read another way (any stack entry, not the module-tree chain), from
the model config, or from the masking oracle.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from torch import fx

from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.families import family_for, graph_layouts
from fitprune_fx.masking_reference import MaskingReference
from fitprune_fx.passes.graph_contract import GRAPH_CONTRACT
from fitprune_fx.passes.locate import (
    SDPA_TARGETS,
    copy_graph_module,
    example_value,
    has_decoder_layers,
    has_final_norm,
    locate_decoder,
)
from fitprune_fx.positioned_cache import cache_update_gets_attention_keywords
from graph_harness import KeptRecorder, assert_pass_matches_masking

FRACTIONS = {0: 0.25, 2: 0.25}
LAYERS = 4


def _llava():
    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

    model = tiny_llava(num_layers=LAYERS, seed=1).eval()
    return model, make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)


def _qwen(variant):
    def build():
        from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs, tiny_qwen_vl

        model = tiny_qwen_vl(variant, num_layers=LAYERS, seed=1)
        return model, make_qwen_inputs(model, [2, 6], [5, 2], seed=3)

    return build


def _gemma3():
    from fitprune_fx.testbed.tiny_gemma3 import make_gemma3_inputs, tiny_gemma3

    model = tiny_gemma3(num_layers=LAYERS, seed=1)
    return model, make_gemma3_inputs(model, [2, 6], [5, 2], images=2, seed=3)


BUILDERS = {
    "llava": _llava,
    "qwen2_5_vl": _qwen("qwen2_5_vl"),
    "qwen3_vl": _qwen("qwen3_vl"),
    "gemma3": _gemma3,
}


class Traced:
    """One family's model traced once through the pruning backend."""

    def __init__(self, name: str):
        torch._dynamo.reset()
        self.model, self.inputs = BUILDERS[name]()
        oracle = copy.deepcopy(self.model)
        self.family = family_for(self.model)
        self.layout = self.family.layout
        recipe = Recipe.from_fractions(ModelInfo.from_config(self.model.config), FRACTIONS)
        self.recorder = KeptRecorder(fitprune_backend(recipe, compiler="eager", progress=False))
        self.graphs: list[fx.GraphModule] = []  # decoder graphs as Dynamo gave them

        def capture(gm, example_inputs):
            if any(has_decoder_layers(gm, layout) for layout in graph_layouts()):
                self.graphs.append(copy_graph_module(gm))
            return self.recorder(gm, example_inputs)

        with torch.no_grad():
            out = torch.compile(self.model, backend=capture)(**self.inputs, use_cache=True)
        self.logits = out.logits
        self.cache_lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        self.cache = out.past_key_values
        self.deletions = self.recorder.backend.pruned_graphs[0].result.deletions
        with torch.no_grad(), MaskingReference(oracle, self.deletions) as masking:
            out = oracle(**self.inputs, use_cache=True)
        self.expected, self.masking = out.logits, masking
        self.oracle, self.oracle_cache = oracle, out.past_key_values
        torch._dynamo.reset()

    @property
    def graph(self) -> fx.GraphModule:
        (graph,) = [g for g in self.graphs if any(self.layout.is_image_merge(n) for n in g.graph.nodes)]
        return graph


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def traced(request) -> Traced:
    return Traced(request.param)


def _layer_from_any_entry(node: fx.Node) -> int | None:
    """The layer named by any entry of the stack (the oracle: no chain, no wrapper rule)."""
    found = None
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        m = re.search(r"language_model\.layers(?:\.|\[')?(\d+)", str(path))
        if m and not re.search(r"vision|visual", getattr(kind, "__name__", "")):
            found = int(m.group(1))
    return found


def test_module_tree(traced):
    """Every node under a decoder layer (wrapped functions included) is placed in that layer."""
    nodes = [n for n in traced.graph.graph.nodes if n.op == "call_function"]
    expected = {n: _layer_from_any_entry(n) for n in nodes}
    assert {traced.layout.layer_index(n) for n in nodes} - {None} == set(range(LAYERS))
    wrong = [(n.name, expected[n], traced.layout.layer_index(n)) for n in nodes if expected[n] is not None]
    assert [w for w in wrong if w[1] != w[2]] == []
    # Since transformers 5.25 the rotary function is a module object at module level: its nodes sit
    # under a `G[...]` entry off the model's tree, and must still be placed in their layer (above).
    wrapped = {
        expected[n]
        for n in nodes
        if any(str(p).startswith("G[") for p, _ in (n.meta.get("nn_module_stack") or {}).values())
    }
    from transformers.models.llama import modeling_llama

    if isinstance(modeling_llama.apply_rotary_pos_emb, torch.nn.Module):  # this transformers wraps it
        assert wrapped == set(range(LAYERS))


def test_one_sdpa_per_layer(traced):
    graph = traced.graph
    decoder = locate_decoder(graph, traced.layout)
    sdpa = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    in_layers = [n for n in sdpa if traced.layout.layer_index(n) is not None]
    assert len(in_layers) == LAYERS == len(decoder.sites)
    config = traced.model.config.get_text_config()
    batch, seq_len = traced.inputs["input_ids"].shape
    for site in decoder.sites.values():
        q, k = example_value(site.query), example_value(site.key)
        assert tuple(q.shape) == (batch, config.num_attention_heads, seq_len, q.shape[-1])
        assert k.shape[2] == seq_len and k.shape[1] in (
            config.num_attention_heads,
            config.num_key_value_heads,
        )


def test_residual_add(traced):
    """Layer l's residual is computed from layers 0..l-1 only (layer 0's: from the embeddings), and
    its residual add reads the attention's output."""
    decoder = locate_decoder(traced.graph, traced.layout)
    for layer, site in decoder.sites.items():
        upstream = _ancestors(site.residual) | {site.residual}
        assert {traced.layout.layer_index(n) for n in upstream} - {None} == set(range(layer))
        assert site.sdpa in _ancestors(site.residual_add) and site.sdpa not in upstream


def test_image_merge(traced):
    decoder = locate_decoder(traced.graph, traced.layout)
    ids = traced.inputs["input_ids"]
    visual = sum(int((ids[0] == t).sum()) for t in traced.family.visual_token_ids(traced.model.config))
    assert decoder.visual_per_example == visual
    first = min(decoder.sites)
    residual = decoder.sites[first].residual
    assert decoder.merge in _ancestors(residual) | {residual}


def test_example_counts(traced):
    """The decoder graph has an input the host reads each example's visual count from, and the
    batch of two ran the padded compaction that reads them (its numbers: `test_literal_sizes`)."""
    decoder = locate_decoder(traced.graph, traced.layout)
    assert decoder.example_counts is not None and decoder.example_counts.op == "placeholder"
    counts = example_value(decoder.example_counts)
    batch = traced.inputs["input_ids"].shape[0]
    if decoder.counts_from_mask:  # the merge's own mask
        assert counts.dtype == torch.bool and counts.shape[:2] == traced.inputs["input_ids"].shape
    else:  # the mark's counts
        assert counts.dtype == torch.long and tuple(counts.shape) == (batch,) and counts.device.type == "cpu"
    assert traced.recorder.backend.pruned_graphs[0].result.padded


def test_per_token_inputs(traced):
    decoder = locate_decoder(traced.graph, traced.layout)
    roles = {t.role for t in decoder.per_token}
    assert "rope" in roles
    assert roles <= {"rope", "attention_mask", "visual_addend"}
    if traced.family.name == "qwen3_vl":
        assert "visual_addend" in roles  # DeepStack


def test_rotary_tables(traced):
    """Every layer's query is computed from a table found (q is post-RoPE); no table comes from the
    embeddings, and each is [B, S, D]."""
    decoder = locate_decoder(traced.graph, traced.layout)
    tables = [t.node for t in decoder.per_token if t.role == "rope"]
    batch, seq_len = traced.inputs["input_ids"].shape
    for site in decoder.sites.values():
        assert any(t in _ancestors(site.query) for t in tables)
    for table in tables:
        assert decoder.merge not in _ancestors(table)
        shape = tuple(example_value(table).shape)
        assert len(shape) == 3 and shape[0] in (1, batch) and shape[1] == seq_len


def test_literal_sizes(traced):
    """Sizes rewritten from shapes: the pruned run's kept sets and logits equal pruning as masking."""
    assert_pass_matches_masking(
        traced.inputs, traced.logits, traced.recorder.kept, traced.masking, traced.expected, traced.deletions
    )


def test_final_norm(traced):
    assert has_final_norm(traced.graph, traced.layout)
    order = {n: i for i, n in enumerate(traced.graph.graph.nodes)}
    norms = [n for n in traced.graph.graph.nodes if traced.layout.is_final_norm(n) and n.op != "placeholder"]
    last_layer = max(order[n] for n in traced.graph.graph.nodes if traced.layout.layer_index(n) == LAYERS - 1)
    assert min(order[n] for n in norms) > last_layer


def test_cache_writeback(traced):
    """Layers up to the first pruning layer cache every token; later ones only what they kept."""
    seq_len = traced.inputs["input_ids"].shape[1]
    expected = [
        seq_len - sum(d for at, d in traced.deletions.items() if at < layer) for layer in range(LAYERS)
    ]
    assert traced.cache_lengths == expected
    # the write-back is a `cat` reached from the attention's key and value (where void rows are filled)
    from fitprune_fx.passes.padded_compaction import _cache_concat

    decoder = locate_decoder(traced.graph, traced.layout)
    output = traced.graph.graph.output_node()
    for layer, site in decoder.sites.items():
        for states in (site.key, site.value):
            cat = _cache_concat(states, layer, traced.layout)
            assert cat not in (None, False), (layer, states)
            assert output in cat.users or any(output in u.users for u in cat.users), layer  # written back


def test_cache_keywords(traced):
    """Each pruned layer's cache records the original positions of the tokens masking leaves it (the
    pass finds a layer's `cache_positions` op by the op's own layer scope); a decode step then hands
    them to the attention through the keyword dict the attention gives `cache.update`, and sizes the
    masks by original positions: every layer that recorded positions takes its mask at them (every
    pruned layer does; where the decoder is entered through an identity compaction the layers before
    record the identity too), and the step's logits equal masking's."""
    import transformers
    from packaging.version import Version

    from fitprune_fx import positioned_cache

    channel = cache_update_gets_attention_keywords()
    assert channel or Version(transformers.__version__) < Version("5.25"), "the keyword channel is gone"
    batch = traced.inputs["input_ids"].shape[0]
    for layer, cached in enumerate(traced.cache.layers):
        earlier = [traced.masking.deleted[at] for at in traced.deletions if at < layer]
        positions = positioned_cache.positions_of(cached)
        if positions is None:  # a layer holding every position may record none
            assert not earlier or not channel, layer
            continue
        present = ~torch.stack(
            [torch.zeros_like(traced.masking.deleted[min(traced.deletions)]), *earlier]
        ).any(0)
        for b in range(batch):
            assert positions[b].tolist() == present[b].nonzero().flatten().tolist(), (layer, b)
    taken = []
    original = positioned_cache.positioned_mask

    def recording(mask, positions, *args):
        taken.append(positions.shape)
        return original(mask, positions, *args)

    step = dict(input_ids=torch.full((batch, 1), 9), use_cache=True)
    if getattr(traced.model.model, "rope_deltas", None) is None:
        # (a direct Qwen-VL call given a 2-D mask numbers its M-RoPE positions over the whole mask;
        # without one, from the cache length: then every cached key is attended, pads included, in both)
        step["attention_mask"] = torch.cat([traced.inputs["attention_mask"], torch.ones(batch, 1).long()], 1)
    with torch.no_grad():
        positioned_cache.positioned_mask = recording
        try:
            logits = traced.model(**step, past_key_values=traced.cache).logits
        finally:
            positioned_cache.positioned_mask = original
        with MaskingReference(traced.oracle, traced.deletions):
            expected = traced.oracle(**step, past_key_values=traced.oracle_cache).logits
    recorded = sum(positioned_cache.positions_of(cached) is not None for cached in traced.cache.layers)
    assert recorded >= (LAYERS - 1 - min(traced.deletions) if channel else 0)  # every pruned layer's
    assert len(taken) == recorded, taken  # without the channel, the left-padding cut
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_attention_interface():
    """The backend's wrapper is transformers' "sdpa" attention; every layer calls it, a windowed model
    with its window as the `sliding_window` keyword."""
    from transformers import AttentionInterface

    from fitprune_fx import pruned_cache
    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

    model = tiny_llava("mistral", num_layers=2).eval()
    model.config.text_config.sliding_window = 12
    fitprune_backend(Recipe(model=ModelInfo.from_config(model.config), prune={}))
    assert AttentionInterface._global_mapping["sdpa"] is pruned_cache.pruned_cache_sdpa
    seen = []
    stock = pruned_cache._stock_sdpa
    decoder = set(model.model.language_model.modules())

    def recording(module, query, key, value, mask, **kwargs):
        if module in decoder:  # the vision tower calls it too
            seen.append(kwargs.get("sliding_window"))
        return stock(module, query, key, value, mask, **kwargs)

    pruned_cache._stock_sdpa = recording
    try:
        with torch.no_grad():
            model(**make_inputs(model, [PromptSpec(2, 3)]))
    finally:
        pruned_cache._stock_sdpa = stock
    assert seen == [12, 12]


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_kernel_that_bakes_the_row_count_is_refused(monkeypatch, dynamic):
    """A hub-style RMSNorm kernel taking the row count (a literal, or a symbolic size with a dynamic
    prompt length): the graph is refused with the fix named, runs unpruned, and equals the model
    (had it been pruned, the kernel would have raised)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava
    from kernel_wrappers import use_row_count_kernel

    model = tiny_llava(num_layers=3, seed=1).eval()
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    with torch.no_grad():
        expected = model(**inputs).logits
    use_row_count_kernel(monkeypatch, LlamaRMSNorm)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={0: 4, 1: 4})
    backend = fitprune_backend(recipe, compiler="eager", progress=False)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="WITHOUT pruning") as caught, torch.no_grad():
        got = torch.compile(model, backend=backend, dynamic=dynamic)(**inputs).logits
    message = " ".join(str(w.message) for w in caught)
    assert "fitprune_test.rows_rms_norm" in message and "use_kernels=False" in message
    assert not backend.pruned_graphs
    torch.testing.assert_close(got, expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("wrapped", ["rotary", "rms_norm", "mlp", "use_kernels"])
def test_functions_wrapped_as_hub_kernels_are_pruned_exactly(monkeypatch, wrapped):
    """Rotary embedding, RMSNorm and MLP each routed through a module object outside the model's tree
    (what the hub-kernel decorator makes of a function), and transformers' own `use_kernels=True`
    (on CPU the hub maps no kernel, so the decorated code runs): kept sets and logits equal pruning
    as masking."""
    from transformers.models.llama import modeling_llama

    import kernel_wrappers
    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

    model = tiny_llava(num_layers=3, seed=1).eval()
    oracle = copy.deepcopy(model)
    inputs = make_inputs(model, [PromptSpec(3, 5), PromptSpec(1, 2)], seed=2)
    prune = {0: 4, 1: 4}
    with torch.no_grad(), MaskingReference(oracle, prune) as masking:
        expected = oracle(**inputs).logits
    if wrapped == "rotary":
        kernel_wrappers.wrap_rotary(monkeypatch, modeling_llama)
    elif wrapped == "rms_norm":
        kernel_wrappers.wrap_rms_norm(monkeypatch, modeling_llama.LlamaRMSNorm)
    elif wrapped == "mlp":
        kernel_wrappers.wrap_mlp(monkeypatch, modeling_llama.LlamaMLP)
    else:
        pytest.importorskip("kernels", reason="transformers' hub kernels need the kernels package (5.25 on)")
        model.set_use_kernels(True)
        assert model.use_kernels
    recorder = KeptRecorder(fitprune_backend(Recipe(model=ModelInfo.from_config(model.config), prune=prune),
                                             compiler="eager", progress=False))  # fmt: skip
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=recorder)(**inputs).logits
    torch._dynamo.reset()
    assert len(recorder.backend.pruned_graphs) == 1 and len(recorder.kept) == 2, recorder.backend.summary()
    assert_pass_matches_masking(inputs, got, recorder.kept, masking, expected, prune)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                todo.append(inp)
    return seen


def test_every_contract_item_names_a_test_that_exists():
    root = Path(__file__).resolve().parents[1]
    for item in GRAPH_CONTRACT:
        path, name = item.test.split("::")
        tree = ast.parse((root / path).read_text())
        names = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert name in names, f"{item.key}: {item.test} does not exist"
        assert (root / re.split(r"[: ]", item.read_by)[0]).exists(), item.read_by
    assert len({item.key for item in GRAPH_CONTRACT}) == len(GRAPH_CONTRACT)


def test_a_triton_kernel_after_a_compaction_is_refused_and_own_ops_are_not():
    """A user Triton kernel (Dynamo's wrapper op) carries a launch grid sized for the old token count:
    refused whatever its arguments; aten and fitprune ops take their sizes from their inputs."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

    from fitprune_fx.passes.locate import UnsupportedGraph
    from fitprune_fx.passes.sequence_length import check_resizable

    graph = fx.Graph()
    x = graph.placeholder("x")
    launch = graph.call_function(triton_kernel_wrapper_mutation, (), {"kernel_idx": 0, "grid": [(50, 1, 1)]})
    with pytest.raises(UnsupportedGraph, match="use_kernels=False"):
        check_resizable(launch, {})
    for target in (torch.ops.aten.mul.Tensor, torch.ops.fitprune.visual_residual_add.default):
        check_resizable(graph.call_function(target, (x, x)), {})  # no error
