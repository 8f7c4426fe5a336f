"""The transformers version policy: the bound in pyproject, the tested range, the warning outside
it, and the canary's steps."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from fitprune_fx import stack, stack_check

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_bounds_transformers_to_the_tested_minor_releases():
    (low, high), *more = re.findall(
        r'"transformers>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert not more
    assert low == stack.TESTED_TRANSFORMERS[0]
    major, minor = stack.TESTED_TRANSFORMERS[1].split(".")
    assert high == f"{major}.{int(minor) + 1}"


@pytest.mark.parametrize("version", ["5.17.0", "5.21.1", "5.25.0", "5.25.3.dev0"])
def test_tested_versions_pass(version):
    assert stack.untested_transformers(version) is None


@pytest.mark.parametrize("version", ["5.16.1", "5.26.0", "6.0.0"])
def test_untested_versions_are_named_with_the_range_and_the_canary(version):
    message = stack.untested_transformers(version)
    assert f"transformers {version} is outside" in message
    assert "5.17 to 5.25.x" in message and "stack_check --newest" in message
    assert 'pip install "transformers>=5.17,<5.26"' in message


def test_the_installed_transformers_is_tested():
    assert stack.untested_transformers() is None  # pip keeps the bound; CI runs both ends


def test_a_backend_under_an_untested_version_warns_once(monkeypatch):
    import transformers

    from fitprune_fx import fitprune_backend

    monkeypatch.setattr(transformers, "__version__", "5.26.0")
    monkeypatch.setattr(stack, "_warned", False)
    recipe = {
        "format": "fitprune-recipe/1",
        "model": {
            "name": "m",
            "num_layers": 2,
            "num_visual_tokens": 4,
            "hidden_size": 8,
            "intermediate_size": 16,
        },
        "prune": {},
    }
    with pytest.warns(UserWarning, match="transformers 5.26.0 is outside"):
        fitprune_backend(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitprune_backend(recipe)  # once per process


def test_the_canary_installs_the_clone_then_the_release_over_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(stack_check.venv, "create", lambda *a, **k: None)
    monkeypatch.setattr(stack_check.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    monkeypatch.setattr(stack_check, "run", lambda cmd, **kw: calls.append(cmd) or 0)
    monkeypatch.setattr(stack_check.subprocess, "check_output", lambda cmd: b"5.26.0\n")
    assert stack_check.main(["--newest", "--tests", "tests/test_graph_contract.py"]) == 0
    install, upgrade, tests = calls
    assert install[-2:] == ["-e", f"{ROOT}[test]"]
    assert upgrade[-2:] == ["--upgrade", "transformers"]
    assert tests[-1] == "tests/test_graph_contract.py" and "pytest" in tests
    calls.clear()
    stack_check.main(["--version", "5.26.1"])
    assert calls[1][-1] == "transformers==5.26.1" and "tests/test_qwen_vl.py" in calls[2]
