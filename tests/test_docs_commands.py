"""Every command the README and the documentation quote exists, with every option it is quoted with.

The pages are parsed, not listed: fenced shell blocks and inline code spans that start with
`fitprune-fx`, `python -m fitprune_fx.<module>` or `python benchmarks/<script>.py` are commands.
Each program runs `--help` once (a subprocess, as a user would type it), and every `--option` the
pages pass it must appear in what `--help` prints. Python blocks must parse, and every name they
import from `fitprune_fx` (or read as `fitprune_fx.<name>`) must exist.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # a code span may wrap onto the next line
SHELL = {"", "bash", "sh", "shell", "console"}
CLI = str(Path(sys.executable).parent / "fitprune-fx")  # the installed console script, as users run it


def _program(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(how to run it, the words after it) for a command of ours, else None."""
    if words and words[0] == "fitprune-fx":
        rest = words[1:]
        sub = rest[0] if rest and not rest[0].startswith("-") else None
        if sub is not None and not re.fullmatch(r"[a-z][a-z-]*", sub):
            return None  # a message quoted in prose (`fitprune-fx <command>: error: ...`), not a command
        return (CLI, *([sub] if sub else [])), rest[1:] if sub else rest
    if len(words) >= 3 and words[0] == "python" and words[1] == "-m" and words[2].startswith("fitprune_fx"):
        return (sys.executable, "-m", words[2]), words[3:]
    if len(words) >= 2 and words[0] == "python" and words[1].startswith("benchmarks/"):
        return (sys.executable, words[1]), words[2:]
    return None


def _commands(text: str) -> list[str]:
    """Command lines of a page: shell blocks (continuations joined, comments cut) and code spans."""
    found = []
    for lang, block in FENCE.findall(text):
        if lang in SHELL:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip().removeprefix("$ ")
                if line and not line.startswith("#"):
                    found.append(line)
    prose = FENCE.sub("", text)
    found += [" ".join(span.split()) for span in INLINE.findall(prose)]
    return found


def quoted_commands() -> dict[tuple[str, ...], dict[str, set[str]]]:
    """Each program quoted anywhere -> each option it is quoted with -> the pages quoting it."""
    programs: dict[tuple[str, ...], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for line in _commands(page.read_text()):
            for part in re.split(r"&&|;|\|", line):
                try:
                    words = shlex.split(part)
                except ValueError:  # an unbalanced quote in prose, not a command
                    continue
                found = _program(words)
                if found is None:
                    continue
                program, args = found
                programs[program][""].add(name)
                for word in args:
                    if word.startswith("--") and len(word) > 2:
                        programs[program][word.split("=")[0]].add(name)
    return programs


PROGRAMS = quoted_commands()


def test_the_pages_quote_the_commands_a_user_starts_with():
    """The parse finds the README's main command and the commands of several pages (not nothing)."""
    runs = {" ".join(p[1:]) for p in PROGRAMS}
    assert {"demo", "fit", "eval", "inspect"} <= {p[1] for p in PROGRAMS if p[0] == CLI and len(p) > 1}
    assert "-m fitprune_fx.gpu_check" in runs and "benchmarks/speed.py" in runs
    assert len(PROGRAMS) >= 12


def _shown(program: tuple[str, ...]) -> str:
    return " ".join(["fitprune-fx" if program[0] == CLI else "python", *program[1:]])


@pytest.mark.parametrize("program", sorted(PROGRAMS), ids=_shown)
def test_every_quoted_command_runs_help_and_knows_its_options(program):
    if program[0] == CLI:
        assert Path(CLI).is_file(), "the fitprune-fx console script is not installed next to this Python"
    elif program[1].startswith("benchmarks/"):
        assert (ROOT / program[1]).is_file(), f"{program[1]} is quoted but does not exist"
    done = subprocess.run([*program, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(program[1:])} --help failed:\n{done.stderr[-2000:]}"
    help_words = set(re.findall(r"--[\w-]+", done.stdout))
    quoted = PROGRAMS[program].items()
    unknown = {option: sorted(pages) for option, pages in quoted if option and option not in help_words}
    assert not unknown, f"{' '.join(program[1:])}: options quoted but not accepted: {unknown}"


def _has(module, name: str) -> bool:
    """`from module import name` works: an attribute, or a submodule not imported yet."""
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")
    except ModuleNotFoundError:
        return False
    return True


def _python_blocks() -> list[tuple[str, str]]:
    return [
        (str(page.relative_to(ROOT)), block)
        for page in PAGES
        for lang, block in FENCE.findall(page.read_text())
        if lang == "python"
    ]


@pytest.mark.parametrize("page,block", _python_blocks(), ids=lambda x: x if x.endswith(".md") else "")
def test_python_blocks_parse_and_name_what_exists(page, block):
    tree = ast.parse(block)  # a syntax error names the page in the test id
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fitprune_fx"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not _has(module, a.name)]
        elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "fitprune_fx":
            if not hasattr(importlib.import_module("fitprune_fx"), node.attr):
                missing.append(f"fitprune_fx.{node.attr}")
    assert not missing, f"{page}: a code block uses names the package does not have: {missing}"


def test_every_module_of_the_package_has_a_row_in_how_it_works():
    """docs/how-it-works.md's module table names each module of passes/ and fitprune_fx/ (its own
    folders count for theirs), by path or, in a row that names several, by file name."""
    page = (ROOT / "docs" / "how-it-works.md").read_text()
    modules = [*ROOT.glob("passes/*.py"), *ROOT.glob("fitprune_fx/*.py")]
    missing = [
        str(m.relative_to(ROOT))
        for m in modules
        if m.name != "__init__.py" and f"`{m.relative_to(ROOT)}`" not in page and f"{m.name}`" not in page
    ]
    assert not missing, f"modules without a row in docs/how-it-works.md: {missing}"


def test_the_readme_links_to_files_that_exist():
    """The README is read on its own (outside the site's strict build): its relative links resolve."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://", t) and not t.startswith("#")]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_no_generated_table_is_pasted_into_a_page():
    """A table a benchmark (or a GPU run) wrote lives in its file only: the pages include it
    (`--8<--`), so no row of such a file appears in the README or in another page."""
    docs = ROOT / "docs"
    written = [*docs.glob("results/*.md"), *docs.glob("accuracy-*.md"), *docs.glob("methods-*.md")]
    written += [p for p in docs.glob("gpu/*.md") if p.name != "README.md"]
    rows = {
        line.strip(): p.name
        for p in written
        for line in p.read_text().splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    }
    assert len(rows) > 50
    pages = [ROOT / "README.md", *(p for p in docs.rglob("*.md") if p not in written)]
    pasted = [
        f"{page.relative_to(ROOT)}: {line.strip()[:60]} (from {rows[line.strip()]})"
        for page in pages
        for line in page.read_text().splitlines()
        if line.strip() in rows
    ]
    assert not pasted, "rows pasted from generated tables:\n" + "\n".join(pasted)
