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
    assert len(decode) == 1 and decode[0].rstrip().endswith("x |")  # decode step vs cache length
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
    # The cache the pruned prefill really left (layer l holds what entered it) is what the pass reported.
    assert results["cache_lengths"]["70"] == results["kept_tokens"]["70"][:-1]
    assert results["cache_lengths"]["unpruned"] == [prompt] * results["sizes"]["layers"]

    # The side-by-side summary of two widths (here the same run twice) puts each ratio in its column.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_report import Results, side_by_side

    run = Results(**results)
    summary = side_by_side({"a": run, "b": run})
    row = next(line for line in summary.splitlines() if line.startswith("| 70 |"))
    f = results["flops"]["70"]
    cell = f"{f['ideal_full']:.2f}x | {f['speedup']:.2f}x | {f['speedup'] / f['ideal_full']:.2f}"
    assert row == f"| 70 | {cell} | {cell} |"
    assert "| decode throughput 70 / unpruned |" in summary
