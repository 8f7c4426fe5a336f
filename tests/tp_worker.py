"""One rank of `test_tensor_parallel.py`, run under `torchrun --nproc_per_node 2` (CPU, gloo).

Loads the saved tiny model twice, whole and with transformers' tensor parallelism
(`DistributedConfig(tp_plan="auto")`), prunes both with the same recipe, and writes what the test compares to
`<out>/<family>-rank<r>.json` (logits in `.pt` files beside): kept sets, cache lengths, generated tokens, and
the collectives of the tensor-parallel pruned graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText, DistributedConfig

import fitprune_fx
from fitprune_fx import ModelInfo, Recipe, fitprune_backend
from fitprune_fx.testbed.tiny import PromptSpec, make_inputs
from fitprune_fx.testbed.tiny_gemma3 import make_gemma3_inputs
from fitprune_fx.testbed.tiny_qwen import make_qwen_inputs

sys.path.insert(0, str(Path(__file__).parent))
from graph_harness import KeptRecorder  # noqa: E402

FRACTIONS = {1: 0.3, 2: 0.3}


def inputs_for(family: str, model) -> dict:
    if family == "llava":
        return make_inputs(model, [PromptSpec(3, 5), PromptSpec(6, 9)], seed=1)
    if family == "qwen2_5_vl":
        return make_qwen_inputs(model, [2, 5], [4, 3], grid=(8, 8), seed=1)
    return make_gemma3_inputs(model, [2, 5], [4, 3], images=2, seed=1)  # gemma3, gemma3_released


def collectives(graph_modules) -> dict[str, int]:
    """Collectives of the transformed graphs by kind; head reductions are the scorer's own."""
    counts: dict[str, int] = {}
    for node in (n for gm in graph_modules for n in gm.graph.nodes):
        target = str(node.target)
        if target.startswith("_c10d_functional.") and "wait" not in target:
            kind = target.split(".")[1]
            counts[kind] = counts.get(kind, 0) + 1
        if node.op == "call_function" and node.kwargs.get("shards"):  # a scorer reducing across ranks
            counts["head_reductions"] = counts.get("head_reductions", 0) + 1
    return counts


class AllGraphs(KeptRecorder):
    """A `KeptRecorder` that keeps every graph it transformed, not only the last."""

    def __init__(self, backend):
        super().__init__(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        fn = super().__call__(gm, example_inputs)
        self.graphs.append(self.graph_module)
        return fn


def main(out: str, *families_and_paths: str) -> None:
    """Each `family=path` in turn, one process group for all (process start-up paid once)."""
    dist.init_process_group("gloo")
    for item in families_and_paths:
        family, path = item.split("=", 1)
        run_family(family, path, out, dist.get_rank())
    dist.destroy_process_group()


def run_family(family: str, path: str, out: str, rank: int) -> None:
    """The tensor-parallel model on every rank; the whole model (the reference) on rank 0 only."""
    tp = DistributedConfig(tp_plan="auto")  # transformers' tensor parallelism over all ranks
    models = {"tp": AutoModelForImageTextToText.from_pretrained(path, distributed_config=tp)}
    if rank == 0:
        models["single"] = AutoModelForImageTextToText.from_pretrained(path)
    inputs = inputs_for(family, models["tp"])
    recipe = Recipe.from_fractions(ModelInfo.from_config(models["tp"].config), FRACTIONS)
    result: dict = {"rank": rank}
    from fitprune_fx.passes import scorers

    reductions, reduce_heads = [], scorers.reduce_heads

    def recording(x, shards, op):  # what crosses ranks at each pruning layer, and the local value
        if not isinstance(x, torch._subclasses.FakeTensor):  # not the pass's shape propagation
            reductions.append({"shape": list(x.shape), "bytes": x.numel() * x.element_size(), "op": op,
                               "local_sum": float(x.double().sum())})  # fmt: skip
        return reduce_heads(x, shards, op)

    scorers.reduce_heads = recording
    for name, model in models.items():
        torch._dynamo.reset()
        recorder = AllGraphs(fitprune_backend(recipe, compiler="eager", progress=False))
        with torch.no_grad():
            out_ = torch.compile(model, backend=recorder)(**inputs)
        result[name] = {
            "logits": out_.logits,
            "kept": [k.tolist() for k in recorder.kept],
            "cache_lengths": [layer.keys.shape[-2] for layer in out_.past_key_values.layers],
            "pruned": len(recorder.backend.pruned_graphs),
            "collectives": collectives(recorder.graphs),
            "local_heads": [layer.keys.shape[1] for layer in out_.past_key_values.layers][:1],
        }
    scorers.reduce_heads = reduce_heads
    result["reductions"] = reductions
    result["prompt"] = list(inputs["input_ids"].shape)
    for name in models:  # logits beside the JSON: the test compares each rank's with rank 0's whole model
        torch.save(result[name].pop("logits"), Path(out, f"{family}-rank{rank}-{name}.pt"))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = {}
    for name, model in models.items():
        torch._dynamo.reset()
        fitprune_fx.compile(model, recipe, compiler="eager", progress=False)
        with torch.no_grad():
            tokens[name] = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :].tolist()
        result[name]["pruned_runs"] = model.fitprune_backend.pruned_runs
    result["tokens"] = tokens
    Path(out, f"{family}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
