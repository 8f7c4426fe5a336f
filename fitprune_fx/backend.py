"""The TorchDynamo backend: find the decoder graph, run the FitPrune pass, hand it to Inductor.

The recipe is applied before `compile_fx` sees the graph, so its constants are part of the graph
Inductor caches on. Graphs that hold no decoder (vision tower, projector, lm_head) and decode
steps (no image merge) are compiled unchanged. A decoder graph the pass does not understand is
compiled unchanged too, with one warning that says why: never a silently wrong answer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from fitprune_fx.passes import method_scorers  # noqa: F401  (registers the published methods)
from fitprune_fx.passes.attention_marks import strip_sliding_window_marks
from fitprune_fx.passes.cache_positions import lower_cache_positions
from fitprune_fx.passes.layout import DecoderLayout
from fitprune_fx.passes.locate import (
    NoVisualTokens,
    UnsupportedGraph,
    copy_graph_module,
    has_decoder_layers,
    has_final_norm,
    has_image_merge,
    has_unrecognised_attention,
    locate_decoder,
    locate_hidden_size,
)
from fitprune_fx.passes.onednn_linear import may_route_linears, route_linears_to_onednn
from fitprune_fx.passes.prune_visual_tokens import PruneResult, prune_visual_tokens
from fitprune_fx.passes.run_time_checks import collect_run_time_checks, raise_failed_checks
from fitprune_fx.passes.scorers import SCORERS, Scorer, plain_options
from fitprune_fx.passes.token_count_inputs import TokenCountInputs
from fitprune_fx.passes.visual_token_marks import strip_visual_token_marks

from . import layer_compile, pruned_cache
from .cudagraph_outputs import outputs_kept
from .errors import NotPruned
from .families import graph_layouts, install_families
from .recipe import Recipe, RecipeError
from .stack import warn_if_untested

log = logging.getLogger("fitprune_fx")


@dataclass
class GraphReport:
    """What the backend did with one graph Dynamo handed it."""

    index: int
    nodes: int
    action: str  # "pruned" | "unchanged"
    reason: str = ""
    result: PruneResult | None = None
    layers: int = 0  # decoder layers in the graph
    compile_s: float | None = None  # Inductor time of a decoder graph
    partitions: tuple[int, int] | None = None  # compiled per layer: (partitions, distinct compiles)
    onednn_linears: int = 0  # linears routed to oneDNN (`passes/onednn_linear.py`)

    def __str__(self) -> str:
        took = f" [compiled in {self.compile_s:.1f} s]" if self.compile_s is not None else ""
        if self.partitions is not None:
            took = f" [{self.partitions[0]} partitions, {self.partitions[1]} compiled]{took}"
        if self.onednn_linears:
            took = f" [{self.onednn_linears} linears through oneDNN]{took}"
        if self.result is None:
            return f"graph {self.index} ({self.nodes} nodes): unchanged, {self.reason}{took}"
        r = self.result
        layers = ", ".join(f"{layer}:-{d}" for layer, d in r.deletions.items())
        symbolic = " (S = prompt length: one graph serves every length)" if r.seq_len == "S" else ""
        if r.any_visual_count:
            symbolic = (
                " (S = prompt length; one graph serves every prompt length, visual count and batch size: "
                "deletions sized per call)"
            )
        visual = "visual tokens/example" + (" in the call that compiled it" if r.any_visual_count else "")
        return (
            f"graph {self.index} ({self.nodes} nodes): pruned with {r.scorer} after layers [{layers}]; "
            f"{r.visual_tokens} {visual}; tokens per layer "
            f"{' -> '.join(r.tokens_per_layer)}{symbolic}{took}"
        )


@dataclass(repr=False)
class FitpruneBackend:
    """A Dynamo backend callable that applies a recipe. Keep it to read `.reports` afterwards."""

    recipe: Recipe
    compiler: str = "inductor"  # "inductor", or "eager" to run the rewritten graph uncompiled
    mode: str | None = None  # Inductor mode ("reduce-overhead": CUDA graphs, "max-autotune", ...)
    progress: bool = True  # one stderr line before each decoder graph's Inductor compile
    # Each pruning layer's kept count a symbol (`passes/token_count_inputs.py`): the layers share
    # kernels. False: constant counts, one kernel variant per count (longer compile).
    symbolic_token_counts: bool = True
    # Pruned decoder graphs compiled per layer, each distinct layer once (`layer_compile`).
    compile_by_layer: bool = True
    # fp32 CPU prefill linears of understood decoder graphs through oneDNN (`passes/onednn_linear.py`).
    onednn_linears: bool = True
    scorer_fn: Scorer | None = None  # the function pruned graphs call (None: the recipe's named scorer)
    reports: list[GraphReport] = field(default_factory=list)
    pruned_runs: int = 0  # calls of pruned graphs so far (a fallback to eager runs none)
    _warned: set = field(default_factory=set)
    _merge_apart: bool = False  # the last graph compiled merged images but held no decoder layers
    _config: dict = field(default_factory=dict)  # Inductor config patches of the graph being compiled

    def __call__(
        self, gm: fx.GraphModule, example_inputs: list, mode: str | None = None, options: dict | None = None
    ) -> Callable:
        """Dynamo's entry point. `mode` / `options` arrive from `torch.compile(..., mode=, options=)`
        (Inductor's mode and config patches)."""
        self._config = _inductor_config(mode or self.mode, options)
        report = GraphReport(len(self.reports), len(gm.graph.nodes), "unchanged")
        self.reports.append(report)
        try:
            return self._route(gm, example_inputs, report)
        except Exception as e:
            report.reason = report.reason or f"compile raised {type(e).__name__}: {_first_line(e)}"
            raise

    def _route(self, gm: fx.GraphModule, example_inputs: list, report: GraphReport) -> Callable:
        """Prune a decoder graph, or compile it unchanged with the reason in `report`."""
        windows = strip_sliding_window_marks(gm)  # always: the marks are not for Inductor
        layouts = graph_layouts()
        # Families may share a decoder layout and differ in how images enter: prefer the one whose
        # image merge (or visual-token mark) this graph holds.
        # The more specific layout first: a visual-token mark (a marked graph may scatter other tensors
        # too), then a layout that names its layer classes (it claims fewer graphs).
        with_decoder = sorted(
            (lay for lay in layouts if has_decoder_layers(gm, lay)),
            key=lambda lay: (not lay.merge_ops, not lay.layer_classes),
        )
        layout = next((lay for lay in with_decoder if has_image_merge(gm, lay)), None)
        layout = layout or next(iter(with_decoder), None)
        if layout is None:
            report.reason = "no decoder layers in this graph"
            merge = any(has_image_merge(gm, lay) for lay in layouts)
            self._merge_apart |= merge
            if has_unrecognised_attention(gm, layouts):
                report.reason = (
                    "not understood: attention outside the decoder layers of every known model family "
                    "(fitprune_fx.families): no family claims this model, or a graph break split the "
                    "decoder into pieces (accelerate's device_map hooks do: run a model that needs "
                    'several GPUs with tensor parallelism, tp_plan="auto")'
                )
                self._warn_unchanged(report)
            elif merge:
                report.reason += " (image merge only)"
            log.debug("fitprune: %s", report)
            return self._compile(gm, example_inputs)
        report.layers = len(layout.layers(gm))
        # Dynamo compiles a call's graphs in order: a merge-only graph just before this one means
        # the merge and the decoder were split apart. Consumed here, so later decode steps are not
        # mistaken for it.
        merge_apart, self._merge_apart = self._merge_apart, False
        try:
            check_recipe_fits(self.recipe, gm, layout)
            candidate = copy_graph_module(gm)
            token_counts = (
                TokenCountInputs(candidate.graph, _fake_mode(gm)) if self.symbolic_token_counts else None
            )
            report.result = prune_visual_tokens(
                candidate,
                layout,
                self.recipe.pruning_plan,
                _fake_mode(gm),
                scorer=self.recipe.scorer,
                scorer_fn=self.scorer_fn,
                seed=int(self.recipe.scorer_options.get("seed", 0)),
                scorer_options=plain_options(self.recipe.scorer_options),
                merge=bool(self.recipe.scorer_options.get("merge", False)),
                token_counts=token_counts,
                windows=sorted({layout.layer_index(n) for n, _ in windows} - {None}),
                num_heads=self.recipe.model.num_attention_heads,
            )
        except NoVisualTokens as e:
            report.reason = str(e)
            if merge_apart:
                report.reason = (
                    "not understood: the image merge ran in a graph of its own (a graph break between "
                    "the merge and the decoder), so this decoder graph cannot see the visual tokens"
                )
                self._warn_unchanged(report)
            log.info("fitprune: %s", report)
            return self._compile(gm, example_inputs, report, understood=not merge_apart)
        except UnsupportedGraph as e:
            report.reason = f"not understood: {e}"
            self._warn_unchanged(report)
            return self._compile(gm, example_inputs, report)
        report.action = "pruned"
        log.info("fitprune: %s", report)
        fakes = token_counts.fakes if token_counts else []
        compiled = self._compile(
            candidate,
            [*example_inputs, *fakes],
            report,
            layout,
            {f.shape[0].node.expr for f in fakes if f.dtype == torch.uint8},  # the size-only inputs
            understood=True,
        )

        def extra_inputs(args) -> list:  # size-only inputs, one per pruning layer (sized at this call)
            return token_counts.values(args) if token_counts else []

        run = self._count_runs(lambda *args: compiled(*args, *extra_inputs(args)))
        run.graph_module = candidate  # the rewritten graph, for inspection
        run.extra_inputs = extra_inputs  # what a call of graph_module passes after its own inputs
        return run

    def __repr__(self) -> str:  # short: Dynamo puts it at the head of BackendCompilerFailed
        r = self.recipe
        return f"FitpruneBackend(recipe for {r.model.name!r}: {r.model.num_layers} layers, scorer {r.scorer})"

    def _warn_unchanged(self, report: GraphReport) -> None:
        """One warning per distinct reason; every graph's reason stays in `reports`.

        Logged at INFO only: with no logging configured, a WARNING record would print the same
        news a second time (Python's last-resort handler).
        """
        log.info("fitprune: %s", report)
        self.warn_once(
            report.reason.split(";")[0],
            f"fitprune: decoder graph compiled WITHOUT pruning ({report.reason}). "
            "See backend.summary() for every graph.",
        )

    def warn_once(self, kind: str, message: str) -> None:
        """Issue `message` as a UserWarning unless a warning of this `kind` was already issued."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=4)

    @property
    def warned(self) -> bool:
        """Whether this backend has warned about anything (an unpruned graph, an unpruned call)."""
        return bool(self._warned)

    def _count_runs(self, compiled: Callable) -> Callable:
        """Count calls of a pruned graph, so callers can tell a pruned call from an eager fallback."""

        def run(*args):
            self.pruned_runs += 1
            return compiled(*args)

        return run

    def _compile(
        self,
        gm: fx.GraphModule,
        example_inputs: list,
        decoder: GraphReport | None = None,
        layout: DecoderLayout | None = None,
        count_symbols: set | None = None,
        understood: bool = False,
    ) -> Callable:
        """Compile `gm`; its fitprune run-time checks become an output read after each call.

        A decoder graph (`decoder` is its report) announces its Inductor compile on stderr when
        `progress` is on: it is the long wait of a first call (tens of seconds). A pruned one
        (`layout` its decoder's, `count_symbols` its token counts' size symbols) is compiled per
        layer when `layer_compile` can share compiles, else whole. The linears of a decoder graph the
        backend `understood` (pruned, or a decoder of a known family run without an image) may go to
        oneDNN in a prefill (`onednn_linears`).
        """
        strip_visual_token_marks(gm)  # the pass has read them; compiled code never runs them
        lower_cache_positions(gm)  # those the pass left: plain torch ops, fused by Inductor
        messages = collect_run_time_checks(gm)
        if self.compiler == "eager":
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            if decoder is not None and self.progress:
                what = "pruned" if decoder.action == "pruned" else "unpruned"
                if decoder.result is None and decoder.reason.startswith("no image merge"):
                    what = "decode-step"
                sys.stderr.write(
                    f"fitprune: compiling {what} decoder graph {decoder.index} ({decoder.layers} layers) "
                    "with Inductor; the first call waits for it\n"
                )
                sys.stderr.flush()
            start = time.perf_counter()
            if understood and self.onednn_linears and may_route_linears(example_inputs):
                decoder.onednn_linears = route_linears_to_onednn(gm.graph)
                gm.recompile()
            cudagraphs = self._config.get("triton.cudagraphs", False)  # one graph per compile there
            by_layer = None
            if layout is not None and self.compile_by_layer and count_symbols and not cudagraphs:
                by_layer = layer_compile.compile_by_layer(gm, layout, self._config, count_symbols)
            if by_layer is not None:
                compiled = self._whole_graph_on_failure(by_layer, gm, example_inputs, decoder)
                decoder.partitions = (len(by_layer.inputs), len(by_layer.groups))
            else:
                compiled = compile_fx(gm, example_inputs, config_patches=self._config)
            if decoder is not None:
                decoder.compile_s = time.perf_counter() - start
        if messages:
            compiled = _checked(compiled, messages)
        if self.compiler != "eager" and self._config.get("triton.cudagraphs", False):
            compiled = outputs_kept(compiled)  # a later replay must not overwrite what this call returned
        return compiled

    def _whole_graph_on_failure(
        self, by_layer: Callable, gm: fx.GraphModule, example_inputs: list, report: GraphReport
    ) -> Callable:
        """`by_layer`, or, from its first failure on, `gm` compiled whole (the same program): a call
        whose partitions fail at run time is answered by the whole graph, with one warning, never a
        traceback from a partition (the whole graph raises what the model itself would)."""
        from torch._inductor.compile_fx import compile_fx

        current = {"fn": by_layer}

        def run(*args):
            if current["fn"] is by_layer:
                try:
                    return by_layer(*args)
                except Exception as e:
                    self.warn_once(
                        "partition failed",
                        f"fitprune: a per-layer partition of decoder graph {report.index} failed at run time "
                        f"({type(e).__name__}: {_first_line(e)}); compiling the graph whole instead",
                    )
                    report.partitions = None
                    current["fn"] = compile_fx(gm, example_inputs, config_patches=self._config)
            return current["fn"](*args)

        return run

    @property
    def pruned_graphs(self) -> list[GraphReport]:
        return [r for r in self.reports if r.action == "pruned"]

    def why_unpruned(self) -> str:
        """Why nothing was pruned: the reason of the first decoder graph compiled unchanged ("" once a
        graph was pruned)."""
        if self.pruned_graphs:
            return ""
        decoder = [r for r in self.reports if r.layers]
        refused = [r for r in decoder if r.reason.startswith("not understood")]
        if refused or decoder:
            return (refused or decoder)[0].reason
        return self.summary()

    def require_pruned(self) -> None:
        """Raise `NotPruned` with `why_unpruned` unless a graph was pruned and ran."""
        if not self.pruned_graphs or not self.pruned_runs:
            raise NotPruned(self.why_unpruned() or "the pruned graph never ran (a fallback to eager?)")

    def summary(self) -> str:
        """One line per graph compiled so far (what was pruned, or why not), then a pruned-graph count."""
        if not self.reports:
            return (
                "fitprune: no graph compiled yet. If you called .generate on torch.compile(model, ...)'s "
                "result, the backend is never reached: use fitprune_fx.compile(model, recipe) or "
                "model.compile(backend=...) (in place)"
            )
        lines = [str(r) for r in self.reports]
        static = [r.result.visual_tokens for r in self.pruned_graphs if not r.result.any_visual_count]
        dynamic = [r for r in self.pruned_graphs if r.result.any_visual_count]
        if static or dynamic:
            import torch._dynamo

            line = f"{len(static) + len(dynamic)} pruned decoder graph(s)"
            if dynamic:
                line += f": {len(dynamic)} for any visual count and batch size"
            if static:
                line += (
                    f"{',' if dynamic else ':'} {len(static)} for one visual count each "
                    f"{sorted(set(static))} (a first call, or a scorer that reads the count: one graph per "
                    "count, up to torch._dynamo.config.recompile_limit = "
                    f"{torch._dynamo.config.recompile_limit})"
                )
            lines.append(line)
        return "\n".join(lines)


def check_recipe_fits(recipe: Recipe, gm: fx.GraphModule, layout: DecoderLayout) -> None:
    """Refuse a recipe made for another model (a user error, so it raises), naming every mismatch."""
    info = recipe.model
    hidden = locate_hidden_size(gm, layout)
    layers = layout.layers(gm)
    ends_here = has_final_norm(gm, layout)  # the graph holds the decoder's last layer
    mismatches = []
    if layers and ((ends_here and layers[-1] + 1 != info.num_layers) or layers[-1] >= info.num_layers):
        mismatches.append(f"decoder layers: recipe {info.num_layers}, model {layers[-1] + 1}")
    if hidden is not None and hidden != info.hidden_size:
        mismatches.append(f"hidden size: recipe {info.hidden_size}, model {hidden}")
    if mismatches:
        try:
            visual = f"{locate_decoder(gm, layout).visual_per_example} per example in this call"
        except UnsupportedGraph:
            visual = "unknown"
        mismatches.append(f"visual tokens: recipe {info.num_visual_tokens} per image, model {visual}")
        raise RecipeError(
            f"recipe is for another model ({info.name}): "
            + "; ".join(mismatches)
            + ". Fit a recipe for this model (fitprune-fx fit) or rescale one with "
            "Recipe.rescaled_to(ModelInfo.from_config(model.config))"
        )
    if layers and has_image_merge(gm, layout) and (layers[0] != 0 or not ends_here):
        raise UnsupportedGraph(
            f"this graph holds decoder layers {layers[0]}..{layers[-1]} only (a graph break splits "
            "the decoder), so deleted tokens cannot be carried to the layers after it"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def fitprune_backend(
    recipe: Recipe | dict | str | os.PathLike,
    *,
    compiler: str = "inductor",
    scorer: str | Callable | None = None,
    mode: str | None = None,
    progress: bool = True,
    symbolic_token_counts: bool = True,
    compile_by_layer: bool = True,
    onednn_linears: bool = True,
) -> FitpruneBackend:
    """A Dynamo backend that prunes visual tokens per `recipe` and compiles with Inductor.

    `recipe` is a Recipe, a dict, a path to a recipe JSON, or a shipped recipe name such as
    "llava-1.5-7b/60.json". `scorer` overrides the recipe's scorer: a registered name or a
    function `f(inputs: ScoringInputs) -> [B, S] scores` (lower is deleted first). `mode` is
    Inductor's mode, e.g. "reduce-overhead" (CUDA graphs); `torch.compile(..., mode=...)` with
    this backend passes it too. `progress` prints one line before each decoder graph's Inductor
    compile (the long wait of a first call). `symbolic_token_counts` (default) gives each pruning
    layer's kept token count a symbol, so Inductor compiles one set of kernels for layers of one
    shape structure; False bakes every count into its own kernels (the compile takes longer).
    `compile_by_layer` (default; with symbolic counts and without CUDA graphs) compiles a pruned
    decoder graph per layer, each distinct layer once (`fitprune_fx.layer_compile`); False hands
    Inductor the whole graph. `onednn_linears` (default) runs the fp32 CPU linears of the decoder
    graphs it understands through oneDNN in a prefill (`fitprune_fx.passes.onednn_linear`; decode
    steps keep Inductor's): MKL's sgemm, which Inductor calls, slows down on the fewer rows a
    pruned layer keeps; False keeps Inductor's.
    """
    if compiler not in ("inductor", "eager"):
        raise ValueError(f"compiler must be 'inductor' or 'eager', not {compiler!r}")
    loaded = Recipe.load(recipe)
    scorer_fn = None
    if callable(scorer):
        scorer_fn = scorer  # held by this backend only: a later registration cannot swap it
        scorer = f"user:{getattr(scorer, '__qualname__', 'scorer')}"
    if scorer is not None:
        loaded = dataclasses.replace(loaded, scorer=scorer)
    if scorer_fn is None:
        if loaded.scorer not in SCORERS:
            raise RecipeError(
                f"recipe names scorer {loaded.scorer!r}, which is not registered (known: "
                f"{sorted(SCORERS)}); register it with fitprune_fx.register_scorer or pass scorer=..."
            )
        scorer_fn = SCORERS[loaded.scorer]  # resolved now: re-registering the name later changes nothing
    warn_if_untested()  # a transformers release CI has not proven (installed around the bound)
    pruned_cache.install()  # before any graph is traced: decode steps read pruned caches exactly
    install_families()  # e.g. Qwen2-VL's visual-token marks
    _configure_dynamo()
    return FitpruneBackend(
        loaded,
        compiler=compiler,
        scorer_fn=scorer_fn,
        mode=mode,
        progress=progress,
        symbolic_token_counts=symbolic_token_counts,
        compile_by_layer=compile_by_layer,
        onednn_linears=onednn_linears,
    )


RECOMPILE_LIMIT = 64
"""Floor for `torch._dynamo.config.recompile_limit` once a FitPrune backend exists.

Every generate configuration (greedy, beams, a new batch size) passes the model other kwargs and
shapes, and each pruned graph is specialised to its batch size and visual count; Dynamo's default
of 8 is reached within a few calls, after which it silently runs the model eagerly, unpruned.
"""


class PlaceholderCheckGraphBreak(logging.Filter):
    """Drops Dynamo's 31-line warning about two known graph breaks: transformers' image-placeholder
    check (`get_placeholder_mask`) calls `.item()` under Dynamo, and so does the visual-token mark
    (`families/visual_marks.py`), which reads the visual counts on the host there. Both are expected
    and harmless (the image merge and the decoder stay in one graph, as the pass needs);
    `TORCH_LOGS=graph_breaks` still lists them. Other graph-break warnings pass through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Graph break from `Tensor.item()`")
            and ("get_placeholder_mask" in message or "visual_marks.py" in message)
        )


def _configure_dynamo() -> None:
    """Raise the recompile limit (see RECOMPILE_LIMIT), keep float attributes static, and quiet
    the placeholder-check graph-break warning (`PlaceholderCheckGraphBreak`).

    After a frame is compiled with two values of a float attribute (attention `scaling` of two
    models with different head sizes in one process), Dynamo makes the float a graph input; the
    scorer needs its value at compile time. Static floats only mean a recompile per value.
    """
    import torch._dynamo

    if not torch._dynamo.config.specialize_float:
        log.info("fitprune: setting torch._dynamo.config.specialize_float = True")
        torch._dynamo.config.specialize_float = True
    tensor_log = logging.getLogger("torch._dynamo.variables.tensor")
    if not any(isinstance(f, PlaceholderCheckGraphBreak) for f in tensor_log.filters):
        tensor_log.addFilter(PlaceholderCheckGraphBreak())
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        log.info(
            "fitprune: raising torch._dynamo.config.recompile_limit from %d to %d",
            torch._dynamo.config.recompile_limit,
            RECOMPILE_LIMIT,
        )
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT


def _inductor_config(mode: str | None, options: dict | None) -> dict:
    """Inductor config patches for `mode` (as torch.compile(mode=...) sets them) plus `options`."""
    from torch._inductor import list_mode_options

    config = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    return {**config, **(options or {})}


def _checked(compiled: Callable, messages: list[str]) -> Callable:
    """`compiled` whose last output (the run-time checks' flags) is read and dropped."""

    def run_checked(*args):
        *outputs, flags = compiled(*args)
        raise_failed_checks(flags, messages)
        return outputs

    return run_checked


def _fake_mode(gm: fx.GraphModule):
    """The fake mode that made the nodes' example values: new fake values must live in it too."""
    for node in gm.graph.nodes:
        mode = getattr(node.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            return mode
    raise UnsupportedGraph("no fake tensor values on the graph (not captured by Dynamo?)")
