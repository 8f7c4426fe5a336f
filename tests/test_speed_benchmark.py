"""Smoke test of benchmarks/speed.py: it runs, prints the tables, and the pruned variants pruned.

No timing is asserted: the CI machine is shared and the quick model is tiny.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "speed.py"),
        "--quick",
        "--compiler", "eager",  # Inductor's C++ compile would take minutes here
        "--recipes", "50", "70",
        "--repeats", "1",
        "--vision-repeats", "0",
        "--decode-recipes", "70",
        "--decode-repeats", "1",
        "--decode-warmup", "0",
        "--new-tokens", "2",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout

    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")}
    assert {"unpruned", "score-only", "50", "70"} <= rows
    assert any(line.startswith("| scoring (score-only vs unpruned prefill, ") for line in table.splitlines())
    decode = [line for line in table.splitlines() if line.startswith("| 70 | ") and " (642 -> " in line]
    assert len(decode) == 2  # batch 1, batch 2
    assert "Machine:" in table and "576 visual" in table

    results = json.loads(out.read_text())
    for name in ("unpruned", "score-only", "50", "70"):
        assert results["pruned_graphs"][name] == 1, results["reports"][name]
    # The recipes really deleted tokens; the empty recipe kept every token, scoring alone one per layer.
    prompt = results["sizes"]["prompt_tokens"]
    for name in ("50", "70"):
        kept = results["kept_tokens"][name]
        assert kept[0] == prompt and kept[-1] < prompt, results["reports"][name]
    assert results["kept_tokens"]["70"][-1] < results["kept_tokens"]["50"][-1]
    assert set(results["kept_tokens"]["unpruned"]) == {prompt}
    scored = results["kept_tokens"]["score-only"]
    steps = [a - b for a, b in zip(scored[:-1], scored[1:], strict=True)]
    assert scored[0] == prompt and set(steps) <= {0, 1} and sum(steps) >= 1, scored
    assert results["decode"]["70"]["pruned_graphs"] >= 1
    # Compiled for any prompt length (symbolic S), the last recipe keeps the same tokens, and its
    # compile time is compared with unpruned compiled the same way.
    assert results["kept_tokens"]["70-any-length"] == results["kept_tokens"]["70"]
    assert sum("tokens per layer S -> S-" in r for r in results["reports"]["70-any-length"]) == 1
    assert "| compile time, 70-any-length vs unpruned-any-length (" in table
    # The cache the pruned prefill really left (layer l holds what entered it) is what the pass reported.
    assert results["cache_lengths"]["70"] == results["kept_tokens"]["70"][:-1]
    assert results["cache_lengths"]["unpruned"] == [prompt] * results["sizes"]["layers"]
    # Speed-ups are against the faster unpruned run: oneDNN's linears (the default) or Inductor's.
    ms = results["prefill_ms"]
    base = min(ms["unpruned"], ms["unpruned-inductor-linears"])
    assert abs(results["flops"]["70"]["speedup"] - base / ms["70"]) < 1e-9
    # The decoder graph timed alone: part of each call, and the same baseline rule.
    dec = results["decoder_ms"]
    assert all(0 < dec[n] < ms[n] for n in ("unpruned", "70"))
    alone = min(dec["unpruned"], dec["unpruned-inductor-linears"]) / dec["70"]
    assert abs(results["flops"]["70"]["decoder_speedup"] - alone) < 1e-9
    assert "| unpruned prefill, oneDNN linears vs Inductor's | " in table
    step = {n: d["step_ms"] for n, d in results["decode"].items()}
    assert {"unpruned", "unpruned-inductor-linears", "70"} == set(step)

    # The side-by-side summary of two widths (here the same run twice) puts each ratio in its column.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_report import Results, side_by_side

    run = Results(**results)
    summary = side_by_side({"a": run, "b": run})
    row = next(line for line in summary.splitlines() if line.startswith("| 70 |"))
    f = results["flops"]["70"]
    ideal, forward, speedup = f["ideal_full"], f["ideal_forward"], f["speedup"]
    alone = f["decoder_speedup"] / ideal
    ratios = f"{speedup / ideal:.2f} / {speedup / forward:.2f} | {alone:.2f}"
    cell = f"{ideal:.2f}x / {forward:.2f}x | {speedup:.2f}x | {ratios}"
    assert row == f"| 70 | {cell} | {cell} |"

    # The forward ideal adds what pruning leaves alone, counted by hand here: the CLIP tower's
    # patch convolution, its one layer's projections, MLP and attention (CLS token included), the
    # projector, and lm_head at one position.
    s = results["sizes"]
    grid, width, mlp, hidden = (s["image_size"] // s["patch_size"]) ** 2, 64, 128, s["hidden"]
    tokens = grid + 1
    by_hand = (
        grid * 3 * s["patch_size"] ** 2 * width
        + tokens * (4 * width * width + 2 * width * mlp)
        + 2 * tokens * tokens * width
        + grid * (width * hidden + hidden * hidden)
        + hidden * 32064
    )
    assert s["unprunable_macs"] == by_hand
    # Both recipes imply the same unpruned decoder FLOPs U: forward = (U + F) / (U (1 - r) + F).
    implied = []
    for name in ("50", "70"):
        f = results["flops"][name]
        fwd, kept = f["ideal_forward"], 1 - f["full_reduction"]
        assert 1 < fwd < f["ideal_full"]
        implied.append(by_hand * (fwd - 1) / (1 - fwd * kept))
    assert abs(implied[0] - implied[1]) < 1e-6 * implied[0], implied
    assert "| decode throughput 70 / unpruned, batch 1 (ideal: bytes read) |" in summary
    # The ceiling the unprunable rest sets: the decoder graph at its ideal, the rest of the call as
    # in the faster unpruned run.
    fast = min(("unpruned", "unpruned-inductor-linears"), key=ms.__getitem__)
    ideal = results["flops"]["70"]["ideal_full"]
    ceiling = ms[fast] / (dec[fast] / ideal + ms[fast] - dec[fast]) / ideal
    assert 0 < ceiling <= 1
    label = "measured / decoder ideal, 70: ceiling (decoder graph at its ideal, rest as unpruned)"
    assert f"| {label} | {ceiling:.2f} | {ceiling:.2f} |" in summary
    # Decode at the width's decode batch too (quick: 2 prompts per call), in a table of its own.
    assert results["sizes"]["decode_batch"] == 2
    assert set(results["decode_batched"]) == set(step)
    assert results["decode_batched"]["70"]["pruned_graphs"] >= 1
    batched = [line for line in table.splitlines() if line.startswith("| variant, batch 2 |")]
    assert len(batched) == 1
    assert "| decode throughput 70 / unpruned, batch 2 (ideal: bytes read) |" in summary

    # The decode bound: bytes a step reads, counted by hand (fp32): the decoder layers' projections,
    # MLP and two norms, the final norm and lm_head once; keys and values of every cached token
    # once per example, at the mean length over the generated tokens.
    layer = 4 * hidden * hidden + 3 * hidden * s["intermediate"] + 2 * hidden
    weights = 4 * (s["layers"] * layer + hidden + hidden * 32064)
    assert s["decode_weight_bytes"] == weights
    # the timed steps are generate's forwards after the prefill; the i-th reads i new tokens' keys
    forwards = range(1, s["new_tokens"])
    mean_extra = sum(forwards) / len(forwards)
    for batch, key, line in zip((1, 2), ("decode", "decode_batched"), decode, strict=True):
        cache = {
            n: sum(t + mean_extra for t in results["cache_lengths"][n]) * 2 * hidden * 4
            for n in ("unpruned", "70")
        }
        ideal = (weights + batch * cache["unpruned"]) / (weights + batch * cache["70"])
        steps = {n: d["step_ms"] for n, d in results[key].items()}
        speedup = min(steps["unpruned"], steps["unpruned-inductor-linears"]) / steps["70"]
        cells = [c.strip() for c in line.split("|")]
        assert cells[-3] == f"{ideal:.3f}x" and cells[-2] == f"{speedup / ideal:.2f}", line

    # Where the time went: every variant profiled, the kinds adding up to the call's time; the pass's ops
    # only where it pruned; lm_head (one position, same weight) the same work in both; less
    # attention work once tokens are gone.
    bd = results["breakdown"]
    assert {"unpruned", "70"} <= set(bd)
    for row in bd.values():
        kinds = sum(row[k] for k in ("gemm", "attention", "pass", "compiled", "rest"))
        assert abs(kinds - row["total"]) <= 1e-6 * row["total"], row  # nothing counted twice
    assert bd["unpruned"]["pass"] == 0 and bd["70"]["pass"] > 0
    lm_head = f"{hidden}x32064"
    assert bd["70"]["by_gemm"][lm_head][0] == bd["unpruned"]["by_gemm"][lm_head][0] == hidden * 32064
    work = {n: sum(w for w, _ in bd[n]["by_attention"].values()) for n in ("unpruned", "70")}
    assert 0 < work["70"] < work["unpruned"]
    from speed_breakdown import expected

    lines = proc.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| variant | profiled call ms")))
    row = next(line for line in lines[start:] if line.startswith("| 70 | "))
    lengths = results["cache_lengths"]
    exp = expected(bd["unpruned"], lengths["unpruned"], bd["70"], lengths["70"])
    assert row.endswith(f" | {sum(exp.values()) / bd['70']['total']:.2f} |"), row


def test_breakdown_charges_each_shape_at_the_base_rate() -> None:
    """A GEMM weight shape in both runs costs its work at the base's rate; one the base lacks, or
    without counted work, costs what it took; pass ops are all excess; rest is the base's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_breakdown import expected

    base = {
        "by_gemm": {"512x1376": [100.0, 10.0], "512x32064": [7.0, 6.0]},
        "by_attention": {"8x64": [40.0, 4.0]},
        "compiled": 8.0,
        "rest": 3.0,
    }
    row = {
        "by_gemm": {"512x1376": [50.0, 6.0], "512x32064": [7.0, 6.5], "64x64": [9.0, 1.0], "other": [0, 2.0]},
        "by_attention": {"8x64": [10.0, 1.5]},
    }
    exp = expected(base, [4, 4], row, [4, 2])
    assert exp == {"gemm": 5.0 + 6.0 + 1.0 + 2.0, "attention": 1.0, "pass": 0.0, "compiled": 6.0, "rest": 3.0}


def test_breakdown_keys_a_linear_by_weight_shape_whichever_library_ran_it() -> None:
    """oneDNN's linear (x [B, S, K], weight [N, K]) and MKL's mm (x [M, K], weight.T [K, N]) of
    the same projection land on one weight shape with the same work, so either is charged at
    the other's rate."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_breakdown import _gemm_key, _kind

    macs = 2 * 321 * 512 * 1376
    assert _gemm_key("fitprune::onednn_linear", [[2, 321, 512], [1376, 512], []]) == ("512x1376", macs)
    assert _gemm_key("mkldnn::_linear_pointwise", [[2, 321, 512], [1376, 512], []]) == ("512x1376", macs)
    assert _gemm_key("aten::mm", [[642, 512], [512, 1376]]) == ("512x1376", macs)
    assert _kind("fitprune::onednn_linear") == "gemm" and _kind("fitprune::gather_residual") == "pass"
