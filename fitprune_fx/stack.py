"""The transformers releases the pass is proven on, and one warning outside them.

The pass reads transformers' graphs (`fitprune_fx.passes.graph_contract`), so a release it was not
tested on may change what it reads. `pyproject.toml` bounds transformers to the minor releases
below; the bound is widened only by a change whose CI ran on the new release (CI's main leg
installs the newest release the bound allows into a fresh environment, its compatibility leg the
oldest). A user who installs around the bound (`pip install --no-deps`, a newer transformers by
hand) gets one warning naming the tested range; `python -m fitprune_fx.stack_check --newest` runs
the family tests against the newest release to find out whether it works.
"""

from __future__ import annotations

import warnings

TESTED_TRANSFORMERS = ("5.17", "5.25")  # oldest and newest minor release CI has proven
_warned = False


def _minor(version: str) -> tuple[int, int]:
    from packaging.version import Version

    release = Version(version).release
    return release[0], release[1] if len(release) > 1 else 0


def untested_transformers(version: str | None = None) -> str | None:
    """Why `version` (default: the installed one) is outside the tested range, or None."""
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = (_minor(v) for v in TESTED_TRANSFORMERS)
    if low <= _minor(version) <= high:
        return None
    return (
        f"fitprune: transformers {version} is outside the range this fitprune-fx release was tested on "
        f"({TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}.x). The pass refuses what it does not "
        "understand (the model then runs unpruned, with a warning), but check backend.summary(); "
        "`python -m fitprune_fx.stack_check --newest` runs the family tests against a release, or "
        f'install a tested one: pip install "transformers>={TESTED_TRANSFORMERS[0]},<{_next(high)}"'
    )


def _next(minor: tuple[int, int]) -> str:
    return f"{minor[0]}.{minor[1] + 1}"


def warn_if_untested() -> None:
    """One warning per process when the installed transformers is outside the tested range."""
    global _warned
    message = untested_transformers()
    if message and not _warned:
        _warned = True
        warnings.warn(message, stacklevel=3)
