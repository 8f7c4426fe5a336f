"""`fitprune-fx demo` end to end at reduced size (eager compiler): the README's main command."""

import re

from fitprune_fx.cli import main


def test_demo_runs_end_to_end_and_prints_the_table(capsys):
    status = main(["demo", "--calibration", "8", "--eval", "32", "--batch-size", "16", "--compiler", "eager"])
    out = capsys.readouterr().out
    assert status == 0
    err = float(re.search(r"max \|dlogits\| = ([0-9.e+-]+)", out).group(1))
    assert err < 1e-4  # the compiled pruned model agrees with the eager reference
    tokens = re.search(r"tokens per layer ([0-9 ->]+);", out).group(1).split(" -> ")
    assert int(tokens[-1]) < int(tokens[0])  # it really pruned
    rows = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^(unpruned|fitprune 50%)\s+([0-9.]+)", out, re.M)
    }
    assert set(rows) == {"unpruned", "fitprune 50%"}
    assert all(0.0 <= a <= 1.0 for a in rows.values())
    reduction = float(re.search(r"^fitprune 50%.*?([0-9.]+)%$", out, re.M).group(1))
    assert reduction >= 49.0  # the fitted recipe meets the budget (within the fit's tolerance)


def test_demo_exits_1_without_a_traceback_when_the_pass_does_not_prune(monkeypatch, capsys):
    """A decoder the pass refuses (a hub-style RMSNorm kernel that bakes the row count): the demo says
    it ran unpruned and why, exits 1, and prints no traceback."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kernel_wrappers import use_row_count_kernel

    use_row_count_kernel(monkeypatch, LlamaRMSNorm)
    status = main(["demo", "--calibration", "4", "--eval", "8", "--batch-size", "4", "--compiler", "eager"])
    captured = capsys.readouterr()
    assert status == 1
    assert "fitprune-fx demo: not pruned: not understood:" in captured.err
    assert "fitprune_test.rows_rms_norm" in captured.err and "use_kernels=False" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "accuracy" not in captured.out  # no table of a comparison that did not happen
