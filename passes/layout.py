"""How a model family's decoder shows up in a Dynamo graph: the one place the pass learns names.

A family module (`fitprune_fx.families.*`) states its layout; everything in `passes/` reads module
paths and the image merge through it, so the pass itself names no model. Module paths come from
`node.meta["nn_module_stack"]`: the innermost entry of the model's own module tree (`module_path`),
e.g. "L['self'].model.<decoder>.layers.3.self_attn".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

_ROOT = "L['self']"  # how Dynamo names the module its frame starts at
VISION_RE = re.compile(r"vision|visual|clip|siglip", re.IGNORECASE)


def _module_classes(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return " ".join(getattr(kind, "__name__", str(kind)) for _, kind in stack.values())


def _extends(path: str, parent: str) -> bool:
    return path.startswith(parent) and path[len(parent) : len(parent) + 1] in (".", "[")


def module_path(node: fx.Node) -> str:
    """Innermost path of the model's own module tree around a node, e.g.
    "L['self'].model.<decoder>.layers.3.self_attn".

    `nn_module_stack` lists every module whose forward is running, outermost first. A submodule's
    path extends its parent's; an entry that does not extend the one before it is a module called
    from outside the tree: a function that a hub-kernel decorator turned into a global module
    (`G['...modeling_llama'].apply_rotary_pos_emb` since transformers 5.25), or any other wrapper.
    Such entries are skipped, so a wrapper never moves a node out of its layer (contract item
    `module-tree`, `passes/graph_contract.py`).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = ""
    for entry, _ in stack.values():
        entry = str(entry)
        if not path or _extends(entry, path):
            path = entry
    return path


@dataclass(frozen=True)
class DecoderLayout:
    """Module names of a decoder stack and the op that merges image features into the embeddings.

    `decoder` is the attribute path of the text decoder (its `layers` list and final `norm` live
    under it); the vision tower has `layers` too, so the decoder part is what tells them apart.
    `merge_methods` are the tensor methods that scatter image features into token embeddings.
    `causal`: every decoder self-attention is causal whatever mask the model passes, so scoring
    may add causality to the mask (the Triton scorer then skips tiles above the diagonal).
    `layer_classes`: class names of the decoder layers, for a layout whose module paths and merge
    look like another family's (Gemma 3's bidirectional image attention vs LLaVA's causal one).
    """

    decoder: str
    merge_methods: tuple[str, ...] = ()
    merge_ops: tuple = ()  # ops that stand for the merge (visual-token marks: visual_token_marks.py)
    causal: bool = True
    layer_classes: tuple[str, ...] = ()  # when set: only layers of these classes (tells look-alikes apart)
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)
    _scope_re: re.Pattern = field(init=False, repr=False, compare=False)
    _norm_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `<decoder>.layers.3`, `<decoder>.layers[3]`, `<decoder>.layers['3']`; or `L['self'].layers.3`
        # when Dynamo's frame starts at the decoder itself (after a graph break in the model around it)
        root = rf"(?:{re.escape(self.decoder)}|^{re.escape(_ROOT)})"
        prefix = root + r"\.layers(?:\.|\[')?"
        object.__setattr__(self, "_layer_re", re.compile(prefix + r"(\d+)(?:'\])?(?:\]|\.|$)"))
        object.__setattr__(self, "_scope_re", re.compile(prefix + r"\d+(?:'\])?\]?$"))
        object.__setattr__(self, "_norm_re", re.compile(root + r"\.norm$"))

    def _in_decoder(self, node: fx.Node, path: str, layer: bool = True) -> bool:
        """A path under the frame's root is the decoder's only if no module around it is visual; with
        `layer_classes`, a node of a `layer` must be inside one of them."""
        if layer and self.layer_classes and not set(_module_classes(node).split()) & set(self.layer_classes):
            return False
        return not path.startswith(_ROOT + ".") or not VISION_RE.search(_module_classes(node))

    def layer_index(self, node: fx.Node) -> int | None:
        """Decoder layer a node belongs to, or None outside the decoder layers. A graph input read by
        several layers is outside, whatever module stack Dynamo gave it (an input it lifts lazily,
        where first read, carries that place's stack: Gemma 3's sliding mask behind a static
        cache, layer 0's); one read by a single layer (its weights, its cache's keys and recorded
        positions) is that layer's."""
        if node.op == "placeholder" and len({self.layer_index(u) for u in node.users} - {None}) > 1:
            return None
        path = module_path(node)
        m = self._layer_re.search(path)
        return int(m.group(1)) if m and self._in_decoder(node, path) else None

    def in_layer_scope(self, node: fx.Node) -> bool:
        """True for nodes of a decoder layer's own forward (not of a submodule such as self_attn)."""
        path = module_path(node)
        return bool(self._scope_re.search(path)) and self._in_decoder(node, path)

    def is_final_norm(self, node: fx.Node) -> bool:
        path = module_path(node)
        return bool(self._norm_re.search(path)) and self._in_decoder(node, path, layer=False)

    def is_image_merge(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in self.merge_methods
        if node.op == "call_function" and node.target in self.merge_ops:
            return True
        targets = tuple(getattr(t, name) for name in self.merge_methods for t in (torch, torch.Tensor))
        return node.op == "call_function" and node.target in targets

    def layers(self, gm: fx.GraphModule) -> list[int]:
        """Sorted decoder layer indices present in the graph."""
        return sorted({i for n in gm.graph.nodes if (i := self.layer_index(n)) is not None})
