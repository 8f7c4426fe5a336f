"""Shared pytest setup: deterministic hypothesis runs in CI, quiet Dynamo, bounded threads."""

import os

import pytest
import torch
import torch._inductor.config
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# xdist workers share the cores: one torch thread each, and Inductor compiles its kernels in the
# worker itself instead of a pool per worker (the CI's 2 cores, 2 workers: test_backend, test_qwen_vl
# and test_pass took 365 against 516 s with two threads per worker and pools).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), (os.cpu_count() or 1) // _WORKERS)))
if _WORKERS > 1:
    torch._inductor.config.compile_threads = 1


@pytest.fixture
def fresh_dynamo():
    """Dynamo state reset before and after a test (use with `pytest.mark.usefixtures`)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
