"""Shared pytest setup: deterministic hypothesis runs in CI, quiet Dynamo, bounded threads."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def fresh_dynamo():
    """Dynamo state reset before and after a test (use with `pytest.mark.usefixtures`)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
