"""`python -m fitprune_fx.gpu_check --smoke`: the GPU command's every section runs on CPU (tiny
sizes, the Triton interpreter), so the command a lent GPU runs is exercised in CI on both stacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_gpu_check_smoke_runs_every_section():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "fitprune_fx.gpu_check", "--smoke"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-3000:]
    table = out[out.index("| section | check | result | status |") :]
    rows = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| ")]
    sections = {r[0].strip("| ") for r in rows}
    assert sections == {"kernel", "pass", "generate", "capture", "speed"}, table
    status = {(r[0].strip("| "), r[1]): r[-1].strip(" |") for r in rows}
    assert all(s == "ok" for (sec, _), s in status.items() if sec in ("kernel", "pass", "generate")), table
    assert "max rel diff" in table and "FAIL" not in table
    assert sum("fused attention + mass" in line for line in table.splitlines()) == 3  # fp32, fp16, bf16
    speed = [line for line in table.splitlines() if line.startswith("| speed | ")]
    for mode in ("default", "reduce-overhead"):  # the prefill matrix ran both modes, the recipe pruned
        assert any(f"| speed | {mode}, batch 2, 642 tokens" in line and "70 " in line for line in speed), (
            table
        )
    assert any("decode tokens/s vs unpruned" in line for line in speed), table


def test_gpu_check_refuses_to_run_without_a_gpu_or_smoke():
    run = subprocess.run(
        [sys.executable, "-m", "fitprune_fx.gpu_check"], capture_output=True, text=True, timeout=300
    )
    if "no CUDA device" not in run.stderr:
        pytest.skip("a CUDA device is present")
    assert run.returncode == 2 and "--smoke" in run.stderr
