"""Errors the command line reports without a traceback (importable without torch)."""

from __future__ import annotations


class NotPruned(RuntimeError):
    """A run meant to prune ran unpruned, or the model cannot be pruned; the message says why.

    The CLI prints it without a traceback and exits with status 1."""
