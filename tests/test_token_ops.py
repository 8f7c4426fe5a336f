"""`fitprune::gather_residual` (the residual stream's compaction) against per-example indexing."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fitprune_fx.passes.token_ops  # noqa: F401  (registers torch.ops.fitprune.*)


def kept_rows(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Example e's rows kept[e] of x (x's batch of 1 serves every example), one example at a time."""
    return torch.stack([x[e if x.shape[0] > 1 else 0][kept[e]] for e in range(kept.shape[0])])


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    broadcast=st.booleans(),
    seq=st.integers(1, 12),
    width=st.integers(1, 5),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_gather_residual_keeps_each_examples_rows(batch, broadcast, seq, width, transposed, dtype, data):
    g = torch.Generator().manual_seed(seq * 31 + width)
    stream = 1 if broadcast else batch
    x = torch.randn(stream, width, seq, generator=g).to(dtype).transpose(1, 2)  # [B, S, D], strided
    if not transposed:
        x = x.contiguous()
    count = data.draw(st.integers(0, seq), label="kept")
    kept = torch.stack([torch.sort(torch.randperm(seq, generator=g)[:count]).values for _ in range(batch)])
    out = torch.ops.fitprune.gather_residual(x, kept)
    assert out.shape == (batch, count, width) and out.dtype == dtype
    assert torch.equal(out, kept_rows(x, kept))


def test_gather_residual_opcheck():
    x = torch.randn(2, 7, 3)
    kept = torch.tensor([[0, 2, 6], [1, 3, 4]])
    torch.library.opcheck(torch.ops.fitprune.gather_residual.default, (x, kept))
    torch.library.opcheck(torch.ops.fitprune.gather_residual.default, (x[:1], kept))
