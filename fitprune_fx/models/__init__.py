"""Models that transformers does not ship, ported to its conventions (one folder per model)."""
