"""`cudagraph_outputs.outputs_kept`: outputs of a replayed graph survive the next replay.

A CUDA-graph replay returns tensors in memory the next replay writes again. Simulated here on
CPU by a function that returns views of one buffer it overwrites on every call, as a replay does.
"""

from __future__ import annotations

import torch

from fitprune_fx.cudagraph_outputs import outputs_kept


def test_outputs_survive_later_calls_and_in_place_outputs_stay_the_callers():
    pool = torch.zeros(10)
    cache = torch.zeros(4)

    def replay(x, cache):
        pool.copy_(torch.arange(10.0) * x)  # the graph's pool, written by every replay
        cache.add_(x)  # a buffer updated in place and returned (shares the input's storage)
        return (pool[:6].view(2, 3), pool[6:], cache, 7)

    kept = outputs_kept(replay, device_type="cpu")
    first = kept(torch.tensor(1.0), cache)
    second = kept(torch.tensor(2.0), cache)
    assert torch.equal(first[0], torch.arange(6.0).view(2, 3))  # not overwritten by the second call
    assert torch.equal(first[1], torch.arange(6.0, 10.0))
    assert torch.equal(second[1], 2 * torch.arange(6.0, 10.0))
    assert first[2] is cache and second[2] is cache  # in-place outputs pass through, not copied
    assert torch.equal(cache, torch.full((4,), 3.0))
    assert first[3] == 7 and isinstance(first, tuple)
    assert first[0].untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()


def test_other_devices_pass_through():
    pool = torch.arange(4.0)
    out = outputs_kept(lambda: [pool], device_type="cuda")()
    assert out[0] is pool
