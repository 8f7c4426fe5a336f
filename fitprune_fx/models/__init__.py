"""Models that transformers does not ship, ported to its conventions (one folder per model).

Importing a model's package registers it with transformers' Auto classes. The library does not do
that at import time (it costs seconds); `register_ported_models()` is for tools that load any
folder with the Auto classes (the CLI).
"""


def register_ported_models() -> None:
    """Register every ported model with transformers' Auto classes (idempotent)."""
    import fitprune_fx.models.llava_hr  # noqa: F401
