"""docs/troubleshooting.md names every exception the package defines, every warning it issues and
every reason a decoder graph is left unpruned, read off the sources (not a list kept here).

A message is found by its fixed words: the longest run of literal text in the f-string (cut at
quotes and backticks, at most 8 words). A new warning or refusal without a line on the page fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("fitprune_fx/**/*.py"), *ROOT.glob("passes/*.py")])
PAGE = " ".join((ROOT / "docs" / "troubleshooting.md").read_text().split())
REASONS = {"UnsupportedGraph", "CacheContinuation", "NoVisualTokens", "UnknownModel"}  # why unpruned
WARNERS = {"warn", "warn_once", "_warn_once", "_warn"}
BASES = {"Exception", "ValueError", "TypeError", "RuntimeError"}


def _literal_runs(node: ast.expr) -> list[str]:
    """The literal text of a message expression, split where a formatted value sits."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        runs, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += value.value
            else:
                runs, current = [*runs, current], ""
        return [*runs, current]
    if isinstance(node, ast.BinOp):
        return _literal_runs(node.left) + _literal_runs(node.right)
    return []


def fixed_words(node: ast.expr) -> str:
    pieces = [p for run in _literal_runs(node) for p in re.split(r"[`\"']", run)]
    words = max((p.split() for p in pieces), key=len, default=[])[:8]
    return " ".join(words).strip(" ,.;:()")


def _name(call: ast.Call) -> str:
    return getattr(call.func, "id", getattr(call.func, "attr", ""))


def messages() -> dict[str, list[str]]:
    """kind ("warning", "reason") -> the fixed words of each message of that kind, with its place."""
    found: dict[str, list[str]] = {"warning": [], "reason": []}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and _name(node.exc) in REASONS:
                call, kind = node.exc, "reason"
            elif isinstance(node, ast.Call) and _name(node) in WARNERS and node.args:
                call, kind = node, "warning"
            else:
                continue
            words = fixed_words(call.args[-1] if kind == "warning" else call.args[0]) if call.args else ""
            if len(words.split()) >= 2:  # a message built elsewhere (a variable) has its own site
                found[kind].append(f"{words}\t{path.relative_to(ROOT)}:{node.lineno}")
    return found


def exception_classes() -> list[str]:
    """Every exception class the package defines (private ones aside)."""
    classes: dict[str, list[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
    errors = set()
    while True:
        more = {n for n, bases in classes.items() if set(bases) & (BASES | errors)} - errors
        if not more:
            return sorted(n for n in errors if not n.startswith("_"))
        errors |= more


def test_the_sources_are_read():
    """The scan finds what is known to be there (so an empty scan cannot pass the tests below)."""
    found = messages()
    assert len(found["reason"]) >= 30 and len(found["warning"]) >= 8
    assert any(m.startswith("no scaled_dot_product_attention") for m in found["reason"])
    assert {"NotPruned", "RecipeError", "UnsupportedGraph", "RunTimeCheckFailed"} <= set(exception_classes())


def test_every_exception_class_is_on_the_page():
    missing = [name for name in exception_classes() if f"`{name}`" not in PAGE]
    assert not missing, f"docs/troubleshooting.md does not name: {missing}"


def test_every_warning_and_unpruned_reason_is_on_the_page():
    found = messages()
    missing = [m for kind in found for m in found[kind] if m.split("\t")[0] not in PAGE]
    listed = "\n".join(missing)
    assert not missing, f"docs/troubleshooting.md lacks these messages (fixed words, where):\n{listed}"
