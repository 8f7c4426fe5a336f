"""Find the pieces of a decoder inside a Dynamo FX graph, through its family's `DecoderLayout`.

Everything is found from node metadata (`nn_module_stack`, `example_value`) and graph structure,
never from graph indices or node names, because Dynamo splits and names graphs differently
across versions. Whatever is not recognised raises `UnsupportedGraph` with the reason, and the
backend then compiles the graph unchanged.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import sys
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guard_int

from .layout import VISION_RE, DecoderLayout, module_path
from .visual_token_marks import is_visual_residual_add, is_visual_token_mark

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_ADD_TARGETS = (operator.add, torch.add, operator.iadd)


class UnsupportedGraph(Exception):
    """The graph is not a decoder graph the pass understands; the message says why."""


class NoVisualTokens(UnsupportedGraph):
    """A decoder graph without an image merge (text-only prompt, decode step): nothing to prune."""


class CacheContinuation(UnsupportedGraph):
    """A chunk with an image merge whose attention reads cached keys: not pruned (exact, unpruned)."""


class UnevenVisualTokens(ValueError):
    """The examples of a batch carry different visual-token counts: a user error, so it raises.

    The same condition is asserted at run time when the total happens to split evenly.
    """


@dataclass
class AttentionSite:
    """One decoder layer's attention call and the residual add that follows it."""

    layer: int
    sdpa: fx.Node
    query: fx.Node  # [B, H, S, D], post-RoPE
    key: fx.Node  # [B, H or Hkv, S_kv, D], post-RoPE, includes the cache
    value: fx.Node  # [B, H or Hkv, S_kv, Dv]
    attn_mask: fx.Node | None  # [B|1, 1|H, S, S_kv] bool or additive float, or None
    is_causal: bool
    scale: float | None
    residual_add: fx.Node  # residual + o_proj(attention)
    residual: fx.Node  # the residual stream entering the layer


@dataclass(eq=False)
class PerTokenTensor:
    """A tensor made outside the decoder layers, consumed by them, with token dims to compact."""

    node: fx.Node
    token_dims: tuple[int, ...]
    role: str  # "rope", "attention_mask" (or "attention_mask_rows", continuing a cache) or
    # "visual_addend" (read between layers, not by them)


@dataclass
class DecoderGraph:
    """What the pass needs to know about a decoder graph."""

    sites: dict[int, AttentionSite]
    merge: fx.Node  # the family's (last) merge op: (inputs_embeds, image_mask, image_features)
    image_masks: list[fx.Node]  # one per merge (images, videos): [B, S, 1 or D] or [B, S] bool
    batch_size: int | torch.SymInt
    seq_len: int | torch.SymInt
    visual_per_example: int  # its value in this trace (a hint when `visual_total` is a symbol)
    per_token: list[PerTokenTensor] = field(default_factory=list)
    # Visual tokens of the whole batch: an int, or a SymInt when Dynamo made it dynamic and the
    # caller asked to keep it so (`locate_decoder(specialize=False)`); then so is a dynamic batch.
    visual_total: int | torch.SymInt = 0
    # The graph nodes it is computed from: the mark's count (a node or an int), or the merges' sources.
    visual_total_from: tuple = ()
    # A graph input the host reads each example's visual count from before a call: a [B] CPU tensor
    # from the family's mark, or the merge's own mask when it is a graph input (`_mask_input`); None
    # if neither: then every example must hold the same count.
    example_counts: fx.Node | None = None
    counts_from_mask: bool = False  # `example_counts` is a [B, S] or [B, S, 1] bool mask to sum
    # The chunk continues a KV cache (a later chat turn with an image): each layer's keys are its
    # cached ones followed by the chunk's, and its mask is [B|1, 1|H, S, cached + S].
    continues: bool = False


def example_value(node: fx.Node):
    """The fake value Dynamo recorded for a node (tensor, SymInt, ...), or None."""
    return node.meta.get("example_value", node.meta.get("val"))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm with its own graph (node meta copied shallowly): a failed rewrite leaves gm intact."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def has_decoder_layers(gm: fx.GraphModule, layout: DecoderLayout) -> bool:
    return any(layout.layer_index(n) is not None for n in gm.graph.nodes)


def locate_hidden_size(gm: fx.GraphModule, layout: DecoderLayout) -> int | None:
    """Hidden size of the decoder: last dim of the residual stream at a layer's own scope."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _ADD_TARGETS and layout.in_layer_scope(n):
            value = example_value(n)
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                return int(value.shape[-1])
    return None


def has_image_merge(gm: fx.GraphModule, layout: DecoderLayout) -> bool:
    """True when the graph merges image features into the embeddings."""
    return any(layout.is_image_merge(n) for n in gm.graph.nodes)


def has_unrecognised_attention(gm: fx.GraphModule, layouts: list[DecoderLayout]) -> bool:
    """True when the graph calls SDPA outside the decoder layers the layouts know and outside vision
    modules: decoder layers under another module path, or split into per-layer graphs by a break."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        if any(layout.layer_index(node) is not None for layout in layouts):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        names = " ".join(f"{path} {getattr(kind, '__name__', kind)}" for path, kind in stack.values())
        if not stack:  # a frame Dynamo resumed after a graph break: ask the source which class it is
            names = " ".join(_classes_on_stack(node.meta.get("stack_trace") or ""))
        if not VISION_RE.search(names):
            return True
    return False


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+)')


def _classes_on_stack(stack_trace: str) -> list[str]:
    """Names of the classes whose source holds the frames of a node's stack trace."""
    return [name for path, line in _FRAME_RE.findall(stack_trace) if (name := _class_at(path, int(line)))]


@functools.cache
def _class_at(path: str, line: int) -> str | None:
    module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == path), None)
    if module is None:
        return None
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            try:
                lines, start = inspect.getsourcelines(cls)
            except (OSError, TypeError):
                continue
            if start <= line < start + len(lines):
                return cls.__name__
    return None


def has_final_norm(gm: fx.GraphModule, layout: DecoderLayout) -> bool:
    """True when the decoder's final norm (after its last layer) is in this graph."""
    return any(layout.is_final_norm(n) for n in gm.graph.nodes)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The FX graph as a networkx DiGraph (edge producer -> consumer)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def _sdpa_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None, bool, float | None]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    mask = bound.get("attn_mask")
    if mask is not None and not isinstance(mask, fx.Node):
        raise UnsupportedGraph(f"attention mask of {node.name} is a constant, not a tensor")
    if bound.get("dropout_p", 0.0) not in (0, 0.0):
        raise UnsupportedGraph(f"{node.name} uses attention dropout; run the model in eval mode")
    is_causal = bool(bound.get("is_causal", False))
    return bound["query"], bound["key"], bound["value"], mask, is_causal, bound.get("scale")


def _find_residual_add(
    graph: nx.DiGraph, layer: int, sdpa: fx.Node, layout: DecoderLayout
) -> tuple[fx.Node, fx.Node]:
    """The first add in the layer's own scope that consumes the attention output.

    Its other operand is the residual stream entering the layer; it must not depend on the
    attention itself (that would not be a pre-norm residual block).
    """
    downstream = nx.descendants(graph, sdpa)
    candidates = [
        n
        for n in downstream
        if n.op == "call_function"
        and n.target in _ADD_TARGETS
        and layout.layer_index(n) == layer
        and layout.in_layer_scope(n)  # the layer's own scope, not a submodule
    ]
    order = {n: i for i, n in enumerate(sdpa.graph.nodes)}
    for add in sorted(candidates, key=order.__getitem__):
        for a, b in ((0, 1), (1, 0)):
            x, y = add.args[a], add.args[b]
            if isinstance(x, fx.Node) and isinstance(y, fx.Node) and y in downstream and x not in downstream:
                return add, x
    raise UnsupportedGraph(f"layer {layer}: no residual add after the attention found")


def _find_image_merges(gm: fx.GraphModule, layout: DecoderLayout) -> list[fx.Node]:
    """The merge nodes, in order; several (images, then videos) must form a chain, each scattering
    into the previous one's result, so the last one holds every visual row."""
    merges = [n for n in gm.graph.nodes if layout.is_image_merge(n)]
    if not merges:
        raise NoVisualTokens("no image merge in this decoder graph (decode step or text-only prompt)")
    for before, after in zip(merges, merges[1:], strict=False):
        if after.args[0] is not before or is_visual_token_mark(after):
            raise UnsupportedGraph(
                f"{len(merges)} image merge nodes ({merges[0].target}) that do not form one chain"
            )
    return merges


def _per_token_tensors(
    gm: fx.GraphModule,
    graph: nx.DiGraph,
    merge: fx.Node,
    sites: dict[int, AttentionSite],
    seq_len,
    layout: DecoderLayout,
    continues: bool = False,
) -> list[PerTokenTensor]:
    """Tensors created outside the layers and read by them that carry the sequence dimension.

    Each is told by its role in the data flow, not by the module that made it: the attention mask is
    an SDPA's mask operand, the rotary tables feed only queries and keys (`_is_rotary_table`), the
    residual stream comes from the image merge. Anything else is refused. In a chunk that
    `continues` a cache, a 4-D tensor whose rows are the chunk's tokens and whose columns are not
    (cached + chunk) is the attention mask, read directly or taken at the cached keys' positions
    inside each layer (`positioned_cache`): its rows are compacted, its columns are not
    ("attention_mask_rows")."""
    masks = {s.attn_mask for s in sites.values() if s.attn_mask is not None}
    from_embeddings = nx.descendants(graph, merge) | {merge}  # rotary tables come from positions alone
    paths = _attention_operand_paths(sites, layout)
    found: list[PerTokenTensor] = []
    for node in gm.graph.nodes:
        if layout.layer_index(node) is not None or node.op in ("output", "get_attr"):
            continue
        users_in_layers = [u for u in node.users if layout.layer_index(u) is not None]
        if not users_in_layers:
            continue
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            continue
        shape = tuple(value.shape)
        if not any(same_size(d, seq_len) for d in shape):
            continue
        if (
            continues
            and value.dim() == 4
            and same_size(shape[2], seq_len)
            and not same_size(shape[3], seq_len)
        ):
            found.append(PerTokenTensor(node, (2,), "attention_mask_rows"))
        elif node in masks:
            if value.dim() != 4:
                raise UnsupportedGraph(f"attention mask {node.name} has shape {shape}, expected 4-D")
            found.append(PerTokenTensor(node, (2, 3), "attention_mask"))
        elif (
            node not in from_embeddings
            and _is_rotary_table(node, users_in_layers, paths, layout)
            and (
                value.dim() == 3
                and same_size(shape[1], seq_len)
                and not any(same_size(d, seq_len) for d in shape[2:])
            )
        ):
            found.append(PerTokenTensor(node, (1,), "rope"))
        elif layout.is_image_merge(node) or is_visual_residual_add(node):
            continue  # the residual stream: the embeddings (layer 0's input), or between layers
        else:
            raise UnsupportedGraph(
                f"{node.name} (shape {shape}, from {module_path(node) or 'the model'}) is a per-token "
                "tensor read by the decoder layers that the pass does not know how to compact"
            )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_layer = min(order[s.sdpa] for s in sites.values())
    for node in gm.graph.nodes:  # addends of the residual stream between layers (DeepStack)
        if not is_visual_residual_add(node):
            continue
        addend = node.args[1]
        value = example_value(addend)
        if not (isinstance(value, torch.Tensor) and value.dim() == 3 and same_size(value.shape[1], seq_len)):
            raise UnsupportedGraph(f"visual residual addend {addend.name} is not [B, {seq_len}, C]")
        if order[addend] > first_layer:  # its compaction is inserted at the pruning layer
            raise UnsupportedGraph(
                f"visual residual addend {addend.name} is made after the first decoder layer"
            )
        found.append(PerTokenTensor(addend, (1,), "visual_addend"))
    return found


def _is_rotary_table(
    node: fx.Node, users_in_layers: list[fx.Node], paths: dict[int, tuple[set, set]], layout: DecoderLayout
) -> bool:
    """True for a rotary table (cos or sin): read inside each layer only on the way to that layer's
    query or key, never its value (`paths`: `_attention_operand_paths`). Whichever module, function
    or hub-kernel wrapper made it or applies it, this is what RoPE does to the data flow (contract
    item `rotary-tables`)."""
    for user in users_in_layers:
        into_qk, into_v = paths.get(layout.layer_index(user), (set(), set()))
        if user not in into_qk or user in into_v:
            return False
    return True


def _attention_operand_paths(
    sites: dict[int, AttentionSite], layout: DecoderLayout
) -> dict[int, tuple[set, set]]:
    """Per layer: the layer's nodes its attention's query or key is computed from, and those its
    value is computed from."""
    return {
        layer: (
            _layer_ancestors(site.query, layer, layout) | _layer_ancestors(site.key, layer, layout),
            _layer_ancestors(site.value, layer, layout),
        )
        for layer, site in sites.items()
    }


def _layer_ancestors(node: fx.Node, layer: int, layout: DecoderLayout) -> set[fx.Node]:
    """`node` and the nodes of layer `layer` it is computed from (the walk stops at the layer's edge)."""
    seen, todo = {node}, [node]
    while todo:
        for inp in todo.pop().all_input_nodes:
            if inp not in seen and layout.layer_index(inp) == layer:
                seen.add(inp)
                todo.append(inp)
    return seen


def same_size(a, b) -> bool:
    """Equal sizes, static or symbolic."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return a == b


def locate_decoder(gm: fx.GraphModule, layout: DecoderLayout, specialize: bool = True) -> DecoderGraph:
    """Analyse a Dynamo graph holding a decoder laid out as `layout`; raise UnsupportedGraph if not one.

    `specialize` (default): a batch size or visual count that Dynamo made dynamic is made static
    again with a guard (a graph per value). False keeps them symbols (the pass then sizes its
    compactions per call, `token_count_inputs`).
    """
    merges = _find_image_merges(gm, layout)
    merge = merges[-1]
    image_masks = [m.args[1] if len(m.args) > 1 else m.kwargs.get("mask") for m in merges]
    embeds = example_value(merge)
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        raise UnsupportedGraph("image merge output is not [batch, seq, hidden]")
    batch, seq_len, hidden = embeds.shape
    example_counts = None
    if isinstance(batch, torch.SymInt) and specialize:
        # A new batch size made Dynamo's batch dim dynamic. Static per-example counts need it
        # static: specialize with a guard, so each batch size gets its own graph.
        batch = guard_int(batch)
    if is_visual_token_mark(merge):  # (embeds, visual [B, S], count): the count is an argument
        count = merge.args[2]
        num_visual = example_value(count) if isinstance(count, fx.Node) else count
        total_from = (count,)
        counts = merge.args[3] if len(merge.args) > 3 else merge.kwargs.get("counts")
        if isinstance(counts, fx.Node) and counts.op == "placeholder":
            example_counts = counts
        if not isinstance(num_visual, (int, torch.SymInt)):
            raise UnsupportedGraph(f"visual-token mark without a visual count ({count!r})")
    else:
        source_nodes = [m.args[2] if len(m.args) > 2 else m.kwargs["source"] for m in merges]
        num_visual = sum(example_value(features).numel() // hidden for features in source_nodes)
        total_from = (int(hidden), *source_nodes)
        example_counts = _mask_input(image_masks)
    if isinstance(num_visual, torch.SymInt) and specialize:
        # Dynamo made the count dynamic (image count or LLaVA-NeXT image size changed). The recipe
        # needs a static count: specialize on this one with a guard, so each distinct count gets
        # its own graph (up to torch._dynamo.config.recompile_limit); the length stays symbolic.
        num_visual = guard_int(num_visual)
    uneven = isinstance(num_visual, int) and isinstance(batch, int) and num_visual % batch
    if uneven and example_counts is None:  # with counts the host reads, a batch may mix them
        raise UnevenVisualTokens(
            f"fitprune: {num_visual} visual tokens do not split evenly over a batch of {batch}: the "
            "pruned graph needs the same visual count in every example (same image count and, for "
            "LLaVA-NeXT, image sizes that give the same count); call the model with batch 1, or "
            "batch only prompts whose images give the same visual count"
        )

    graph = to_networkx(gm.graph)
    sites: dict[int, AttentionSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        layer = layout.layer_index(node)
        if layer is None:
            continue
        if layer in sites:
            raise UnsupportedGraph(f"layer {layer} has more than one attention call")
        query, key, value, mask, is_causal, scale = _sdpa_args(node)
        add, residual = _find_residual_add(graph, layer, node, layout)
        sites[layer] = AttentionSite(layer, node, query, key, value, mask, is_causal, scale, add, residual)
    if not sites:
        raise UnsupportedGraph(
            "no scaled_dot_product_attention in the decoder layers: the model runs another attention "
            'implementation (eager?); load it with attn_implementation="sdpa" or call '
            'model.set_attn_implementation("sdpa") before compiling'
        )
    layers = sorted(sites)
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise UnsupportedGraph(f"decoder layers {layers} are not contiguous in this graph")
    continues = False
    for site in sites.values():
        q = example_value(site.query)
        if q is None or q.dim() != 4 or not same_size(q.shape[2], seq_len):
            raise UnsupportedGraph(f"layer {site.layer}: query is not [B, H, {seq_len}, D] (a decode step?)")
        k = example_value(site.key)
        if k is None or k.dim() != 4:
            raise UnsupportedGraph(f"layer {site.layer}: key is not 4-D")
        if not same_size(k.shape[2], seq_len):
            continues = True  # the layer reads cached keys before the chunk's own
    if continues and any(
        example_value(s.attn_mask) is None or example_value(s.attn_mask).dim() != 4 for s in sites.values()
    ):
        raise CacheContinuation(
            "this prompt chunk brings an image but continues an existing KV cache without a 4-D mask "
            "for it; this chunk runs unpruned (exact) against the cache as it is"
        )

    return DecoderGraph(
        sites=sites,
        merge=merge,
        image_masks=image_masks,
        batch_size=batch,
        seq_len=seq_len,
        visual_per_example=_hint(num_visual) // _hint(batch),
        per_token=_per_token_tensors(gm, graph, merge, sites, seq_len, layout, continues),
        visual_total=num_visual,
        visual_total_from=total_from,
        example_counts=example_counts,
        counts_from_mask=example_counts is not None and not is_visual_token_mark(merge),
        continues=continues,
    )


def _mask_input(image_masks: list[fx.Node]) -> fx.Node | None:
    """The merge's mask when there is one merge and its [B, S] or [B, S, 1] bool mask is a graph input
    (contract item `example-counts`): the host can then read each example's visual count off the
    call's own arguments. LLaVA's image-placeholder check breaks the graph just before the merge,
    so the mask arrives as an input; a mask computed inside the graph gives None."""
    if len(image_masks) != 1 or image_masks[0] is None or image_masks[0].op != "placeholder":
        return None
    mask = example_value(image_masks[0])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 3):
        return None
    return image_masks[0] if mask.dim() == 2 or same_size(mask.shape[2], 1) else None


def _hint(size: int | torch.SymInt) -> int:
    """A size's value in this trace (a symbol's hint)."""
    return size if isinstance(size, int) else int(size.node.hint)
