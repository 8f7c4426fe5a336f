"""Canary: run the family tests against a transformers release in a fresh environment.

    python -m fitprune_fx.stack_check --newest          # the newest release on the index
    python -m fitprune_fx.stack_check --version 5.26.0  # a given one

Run it from a clone (it needs `tests/`) when transformers publishes a release, before widening the
bound in `pyproject.toml` (`fitprune_fx/stack.py` says why the bound exists). It makes a virtual
environment in a temporary folder, installs this clone with its test extra, then the release asked
for over it (ignoring the bound), and runs the graph-contract and family tests there. It needs the
package index; its exit status is pytest's (`--tests tests/test_graph_contract.py tests/test_stack.py`
alone took 77 s on 2 cores, install included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

FAMILY_TESTS = (
    "tests/test_graph_contract.py",
    "tests/test_demo.py",
    "tests/test_backend.py",
    "tests/test_generate.py",
    "tests/test_qwen_vl.py",
    "tests/test_gemma3.py",
    "tests/test_onevision.py",
    "tests/test_next.py",
    "tests/test_llava_hr.py",
)


def clone_root() -> Path:
    """The clone this package runs from; SystemExit when installed without its tests."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests" / "test_graph_contract.py").is_file() or not (root / "pyproject.toml").is_file():
        raise SystemExit(
            "stack_check runs the project's tests: install fitprune-fx from a clone (pip install -e .) and "
            "run it there"
        )
    return root


def run(cmd: list[str], **kwargs) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fitprune_fx.stack_check", description=__doc__.split("\n\n")[0]
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--newest", action="store_true", help="the newest transformers release on the index")
    which.add_argument("--version", help="a transformers version, e.g. 5.26.0")
    parser.add_argument(
        "--tests", nargs="*", default=list(FAMILY_TESTS), help="test files (default: families)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the environment (its path is printed)")
    args = parser.parse_args(argv)
    root = clone_root()
    folder = Path(tempfile.mkdtemp(prefix="fitprune-stack-"))
    env = folder / "venv"
    print(f"stack_check: fresh environment in {env}", flush=True)
    venv.create(env, with_pip=True)
    python = str(env / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    wanted = "transformers" if args.newest else f"transformers=={args.version}"
    steps = [
        [python, "-m", "pip", "install", "-q", "-e", f"{root}[test]"],
        [python, "-m", "pip", "install", "-q", "--upgrade", wanted],  # over the bound, on purpose
    ]
    for step in steps:
        if run(step) != 0:
            print(f"stack_check: installing failed ({' '.join(step[3:])})", file=sys.stderr)
            return 2
    version = subprocess.check_output([python, "-c", "import transformers; print(transformers.__version__)"])
    version = version.decode().strip()
    print(f"stack_check: transformers {version}", flush=True)
    code = run([python, "-m", "pytest", "-q", "-n", "auto", "--dist", "worksteal", *args.tests], cwd=root)
    verdict = "passes" if code == 0 else f"FAILS (pytest exit {code})"
    print(f"stack_check: transformers {version} {verdict} the graph-contract and family tests")
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
