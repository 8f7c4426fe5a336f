"""The compaction ops (`fitprune::gather_residual`, `fitprune::gather_token_pairs`, the decoder
entry's `fitprune::enter_tokens`) against per-example indexing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
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


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    broadcast=st.booleans(),
    heads=st.sampled_from([1, 2]),
    seq=st.integers(1, 10),
    dtype=st.sampled_from([torch.bool, torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_gather_token_pairs_keeps_kept_rows_and_columns(batch, broadcast, heads, seq, dtype, data):
    g = torch.Generator().manual_seed(seq * 7 + heads)
    x = torch.randn(1 if broadcast else batch, heads, seq, seq, generator=g)
    x = (x > 0) if dtype == torch.bool else x.to(dtype)
    count = data.draw(st.integers(0, seq), label="kept")
    kept = torch.stack([torch.sort(torch.randperm(seq, generator=g)[:count]).values for _ in range(batch)])
    out = torch.ops.fitprune.gather_token_pairs(x, kept)
    expected = torch.stack(
        [x[e if x.shape[0] > 1 else 0][:, kept[e]][:, :, kept[e]] for e in range(batch)]
    )  # example e: its mask at kept rows, then kept columns
    assert out.shape == (batch, heads, count, count) and out.dtype == x.dtype
    assert torch.equal(out, expected)


def test_gather_token_pairs_opcheck():
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    for kept in (torch.tensor([[0, 2, 6]]), torch.tensor([[0, 2, 6], [1, 3, 4]])):
        torch.library.opcheck(torch.ops.fitprune.gather_token_pairs.default, (mask, kept))


def test_mask_gathers_of_a_partition_input_become_row_copies():
    """Only the rows-then-columns gather of an input mask, read once, is replaced; same values."""
    from torch import fx

    from fitprune_fx.passes.insert_compaction import mask_gathers_as_row_copies
    from fitprune_fx.passes.token_ops import gather_tokens

    graph = fx.Graph()
    mask, kept = graph.placeholder("mask"), graph.placeholder("kept")
    pairs = graph.call_function(gather_tokens, (graph.call_function(gather_tokens, (mask, kept, 2)), kept, 3))
    computed = graph.call_function(torch.logical_not, (mask,))  # not an input: left to Inductor
    other = graph.call_function(
        gather_tokens, (graph.call_function(gather_tokens, (computed, kept, 2)), kept, 3)
    )
    rows = graph.call_function(gather_tokens, (mask, kept, 2))  # rows read twice: left alone
    shared = graph.call_function(gather_tokens, (rows, kept, 3))
    graph.output((pairs, other, shared, rows))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.rand(2, 1, 9, 9) > 0.5
    k = torch.tensor([[0, 3, 4, 8], [1, 2, 5, 7]])
    expected = gm(x, k)
    assert mask_gathers_as_row_copies(gm.graph) == 1
    gm.recompile()
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fitprune.gather_token_pairs.default) == 1 and ops.count(gather_tokens) == 4
    for a, b in zip(gm(x, k), expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("broadcast", [False, True])
def test_entering_the_decoder_is_a_gather_at_every_position(broadcast):
    """`enter_tokens` gives the rows kept at `entry_positions` (0..S-1): the tensor itself, its batch
    dim broadcast; `opcheck` covers the fake sizes; a count of the wrong length is refused by name."""
    batch, seq = 3, 7
    mask = torch.rand(1 if broadcast else batch, 1, seq, seq) > 0.5
    rows = torch.randn(1 if broadcast else batch, seq, 5)
    count = torch.empty(seq, dtype=torch.uint8)
    like = torch.empty(batch, seq, 2)
    positions = torch.ops.fitprune.entry_positions(count, like)
    assert torch.equal(positions, torch.arange(seq).expand(batch, seq))
    entered = torch.ops.fitprune.enter_tokens(mask, count, [2, 3], batch)
    expected = torch.stack([mask[e if mask.shape[0] > 1 else 0] for e in range(batch)])
    assert torch.equal(entered, expected) and entered.is_contiguous()
    assert torch.equal(torch.ops.fitprune.enter_tokens(rows, count, [1], batch), kept_rows(rows, positions))
    torch.library.opcheck(torch.ops.fitprune.enter_tokens.default, (mask, count, [2, 3], batch))
    torch.library.opcheck(torch.ops.fitprune.entry_positions.default, (count, like))
    with pytest.raises(RuntimeError, match="7 tokens enter the decoder, its entry count says 6"):
        torch.ops.fitprune.enter_tokens(rows, count[:6], [1], batch)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), length=st.integers(3, 24), voids=st.booleans())
@example(seed=7, batch=3, length=12, voids=True)  # rows with earlier void slots, different deletions
@example(seed=1, batch=1, length=5, voids=False)  # one example: no void slot at all
def test_padded_selection_keeps_each_examples_own_tokens(seed, batch, length, voids):
    """`select_kept_padded` on a batch whose rows delete different counts (some rows already holding
    void slots at the left): each row's real kept tokens are `select_kept_tokens` on that row alone
    with its own deletions, in original order and right-aligned; every slot before them is void."""
    import torch

    from fitprune_fx.passes.padded_compaction import select_kept_padded
    from fitprune_fx.passes.token_ops import select_kept_tokens

    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, length, generator=g).round(decimals=1)  # ties happen
    visual = torch.rand(batch, length, generator=g) < 0.6
    valid = torch.ones(batch, length, dtype=torch.bool)
    if voids:  # earlier void slots: a prefix of each row
        for e in range(batch):
            valid[e, : int(torch.randint(0, length // 3 + 1, (), generator=g))] = False
    visual &= valid
    deletions = [int(torch.randint(0, int(visual[e].sum()) + 1, (), generator=g)) for e in range(batch)]
    keep = torch.tensor([int(valid[e].sum()) - deletions[e] for e in range(batch)])
    k = int(keep.max())
    kept, real = select_kept_padded(scores, visual, valid, torch.empty(k, dtype=torch.uint8), keep)
    assert kept.shape == real.shape == (batch, k)
    for e in range(batch):
        row = valid[e].nonzero().squeeze(1)  # the row's real tokens, alone
        alone = select_kept_tokens(scores[e : e + 1, row], visual[e : e + 1, row], deletions[e])[0]
        assert torch.equal(kept[e, k - int(keep[e]) :], row[alone])
        assert torch.equal(real[e], torch.arange(k) >= k - int(keep[e]))
