"""The shape of the code: no import cycles, the test bed apart, model names only in family modules."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fitprune_fx": ROOT / "fitprune_fx", "fitprune_fx.passes": ROOT / "passes"}
MODEL_NAMES = ("language_model", "image_grid_pinpoints", "masked_scatter", "image_token_index", "LlavaFor")


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the library (installed layout)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "fitprune_fx" and parts[0] == "passes":
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Library modules `name` imports at run time (any depth of the file; not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from . import x` imports submodule x; `from .m import name` imports module m
            targets = ([base] if node.module else []) + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, dep) for dep in _imports(name, path, set(modules)))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_the_library_never_imports_the_test_bed():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("fitprune_fx.testbed") or name in (
            "fitprune_fx.cli",
            "fitprune_fx.gpu_check",
            "fitprune_fx.tiny",
        ):  # tools, and the re-export of the test bed's tiny models
            continue
        deps = _imports(name, path, set(modules))
        assert not [d for d in deps if d.startswith("fitprune_fx.testbed")], name


def _code_tokens(path: Path) -> list[str]:
    """Names and non-docstring string literals of a file (comments and docstrings are prose)."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(body[0].lineno)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start[0] not in docstrings):
            out.append(tok.string)
    return out


def test_model_specific_names_live_in_family_modules_only():
    offenders = {}
    for name, path in _modules().items():
        if name.startswith(("fitprune_fx.families", "fitprune_fx.models", "fitprune_fx.testbed")):
            continue
        hits = {n for tok in _code_tokens(path) for n in MODEL_NAMES if n in tok}
        if hits:
            offenders[name] = sorted(hits)
    assert not offenders, offenders


def test_no_public_name_is_shadowed_by_a_submodule():
    """Importing `fitprune_fx.<x>` sets the package attribute <x> to the module, which would hide a
    lazily exported function of the same name (`fitprune_fx.named_backend` was one)."""
    import fitprune_fx

    package = Path(fitprune_fx.__file__).parent
    clashes = [
        name for name in fitprune_fx.__all__ if (package / f"{name}.py").exists() or (package / name).is_dir()
    ]
    assert not clashes
