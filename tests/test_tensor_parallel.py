"""transformers' tensor parallelism (`tp_plan="auto"`, 2 ranks on CPU with gloo, as transformers'
own tensor-parallel tests run): pruned like the whole model, scoring reduced across ranks.

Each rank holds half the heads; FitPrune's max over heads must be taken over all of them, so the
pass all-reduces the head-max map once per pruning layer (`passes/sharded_heads.py`). The worker
(`tp_worker.py`) compares each rank's run with the single-process pruned run of the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # transformers' tp_plan loading path needs it

WORKER = Path(__file__).with_name("tp_worker.py")


def tiny(family: str):
    if family == "llava":
        from fitprune_fx.testbed.tiny import tiny_llava

        return tiny_llava(num_layers=4, seed=3)
    if family == "qwen2_5_vl":
        from fitprune_fx.testbed.tiny_qwen import tiny_qwen_vl

        return tiny_qwen_vl("qwen2_5_vl", num_layers=4, seed=3)
    from fitprune_fx.testbed.tiny_gemma3 import tiny_gemma3

    if family == "gemma3_released":  # the released pattern: 5 sliding layers (window 8), 1 full
        return tiny_gemma3(num_layers=6, full_attention_only=False, window=8, seed=3)
    return tiny_gemma3(num_layers=4, seed=3)


FAMILIES = ("llava", "qwen2_5_vl", "gemma3", "gemma3_released")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """One `torchrun` of 2 ranks over the three families (start-up paid once): family -> per-rank results."""
    tmp = tmp_path_factory.mktemp("tp")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    saved = []
    for family in FAMILIES:
        tiny(family).save_pretrained(tmp / family)
        saved.append(f"{family}={tmp / family}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 500),
           str(WORKER), str(tmp), *saved]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = {f: [json.loads((tmp / f"{f}-rank{r}.json").read_text()) for r in (0, 1)] for f in FAMILIES}
    for family, ranks in results.items():  # the whole model ran on rank 0: its results are the reference
        whole = torch.load(tmp / f"{family}-rank0-single.pt")
        for r in ranks:
            tp_logits = torch.load(tmp / f"{family}-rank{r['rank']}-tp.pt")
            r["logits_max_diff"] = (tp_logits - whole).abs().max().item()
            r["single"], r["tokens"]["single"] = ranks[0]["single"], ranks[0]["tokens"]["single"]
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_prune_like_one_process(family, two_ranks):
    """On both ranks: prefill logits equal the single-process pruned run (1e-5), the kept sets are
    the same, each layer's cache holds the recipe's token count (and half the kv heads; Gemma 3's
    released pattern too: 5 sliding layers of window 8, then a full one), generate
    is token-identical; the pruned graph adds one head reduction per pruning layer and gathers
    nothing (no query, key, value or probabilities moved between ranks)."""
    kv_heads = tiny(family).config.text_config.num_key_value_heads
    ranks = two_ranks[family]
    for r in ranks:
        single, tp = r["single"], r["tp"]
        assert single["pruned"] == tp["pruned"] == 1
        assert r["logits_max_diff"] <= 1e-5, r["logits_max_diff"]
        assert tp["kept"] == single["kept"] and len(tp["kept"]) == 2
        assert tp["cache_lengths"] == single["cache_lengths"]
        assert len(tp["kept"][-1][0]) < len(tp["kept"][0][0]) < r["prompt"][1]  # the recipe deleted tokens
        assert tp["local_heads"] == [kv_heads // 2] and single["local_heads"] == [kv_heads]
        assert r["tokens"]["tp"] == r["tokens"]["single"]
        assert tp["pruned_runs"] >= 1
        assert tp["collectives"].get("head_reductions") == 2  # one per pruning layer
        assert not any("gather" in kind for kind in tp["collectives"]), tp["collectives"]
        assert "head_reductions" not in single["collectives"]
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    # What crosses ranks per pruning layer: the [B, S, S] fp32 head-max map of that layer's tokens
    # (one max all-reduce), and the ranks' own maps differ (each saw other heads), yet they keep
    # the same tokens (above).
    b, s = ranks[0]["prompt"]
    scored = [s, len(ranks[0]["tp"]["kept"][0][0])]  # tokens at the two pruning layers (1 and 2)
    for r in ranks:
        assert [x["op"] for x in r["reductions"]] == ["max", "max"]
        assert [x["shape"] for x in r["reductions"]] == [[b, n, n] for n in scored]
        assert [x["bytes"] for x in r["reductions"]] == [4 * b * n * n for n in scored]
    local = [[x["local_sum"] for x in r["reductions"]] for r in ranks]
    assert all(abs(a - c) > 1e-6 for a, c in zip(*local, strict=True)), local  # equal maps: equal sums


def test_device_map_across_devices_is_refused_before_compiling(tmp_path):
    """accelerate's device_map hooks break the graph at every placed module (no graph holds the
    decoder): fitprune_fx.compile refuses such a model before compiling, naming tensor parallelism;
    a bare backend compiles the pieces unchanged with a warning that says the same; a model on
    one device is accepted."""
    import warnings

    import torch
    from accelerate import dispatch_model

    import fitprune_fx
    from fitprune_fx import ModelInfo, Recipe, UnsupportedPlacement, fitprune_backend
    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

    model = tiny_llava(num_layers=4, seed=3)
    recipe = Recipe(model=ModelInfo.from_config(model.config), prune={1: 4})
    inputs = make_inputs(model, [PromptSpec(3, 5)], seed=1)
    placed = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector", "lm_head")}
    text = "model.language_model"
    placed |= {
        f"{text}.{part}": "cpu" for part in ("embed_tokens", "norm", "rotary_emb", "layers.0", "layers.1")
    }
    placed |= {f"{text}.layers.2": "disk", f"{text}.layers.3": "disk"}
    dispatched = dispatch_model(model, device_map=placed, offload_dir=str(tmp_path))
    with pytest.raises(UnsupportedPlacement, match=r"tensor parallelism.*tp_plan=\"auto\""):
        fitprune_fx.compile(dispatched, recipe, compiler="eager")
    backend = fitprune_backend(recipe, compiler="eager", progress=False)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(dispatched, backend=backend)(**inputs)
    assert not backend.pruned_graphs
    assert any("device_map hooks" in str(w.message) and "tp_plan" in str(w.message) for w in caught)
    one_device = tiny_llava(num_layers=4, seed=3)
    one_device.hf_device_map = {"": "cpu"}  # what from_pretrained(device_map="cpu") records
    fitprune_fx.compile(one_device, recipe, compiler="eager")


def test_scorers_unchecked_across_ranks_are_refused(monkeypatch):
    """With heads split across ranks (faked here: the pass is told 2 ranks hold them), FastV is
    refused: the graph compiles unpruned with a warning that names tensor parallelism; FitPrune is
    not refused (its cross-rank run is the torchrun test above)."""
    import warnings

    import torch

    from fitprune_fx import ModelInfo, Recipe, fitprune_backend
    from fitprune_fx.passes import prune_visual_tokens
    from fitprune_fx.passes.sharded_heads import HeadShards
    from fitprune_fx.testbed.tiny import PromptSpec, make_inputs, tiny_llava

    monkeypatch.setattr(prune_visual_tokens, "head_sharding", lambda sites, heads: HeadShards("0", 2, 4))
    model = tiny_llava(num_layers=4, seed=3)
    inputs = make_inputs(model, [PromptSpec(3, 5)], seed=1)
    for scorer, pruned in (("fastv", False), ("fitprune", True)):
        torch._dynamo.reset()
        recipe = Recipe(model=ModelInfo.from_config(model.config), prune={1: 4}, scorer=scorer)
        backend = fitprune_backend(recipe, compiler="eager", progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if pruned:  # the reduction itself needs a process group: only the pass's acceptance is checked
                with pytest.raises(Exception):  # noqa: B017
                    torch.compile(model, backend=backend)(**inputs)
            else:
                with torch.no_grad():
                    torch.compile(model, backend=backend)(**inputs)
        refused = any("tensor-parallel ranks" in str(w.message) for w in caught)
        assert refused == (not pruned), [str(w.message)[:200] for w in caught]
        assert bool(backend.pruned_graphs) == pruned
