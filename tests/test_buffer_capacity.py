"""Capacity bounds the backlog the learner has not received yet, not what it holds until its next checkpoint.

Counting delivered-but-unacknowledged groups deadlocked the demo: with capacity 128, 16 groups per update and a
checkpoint every 25 updates, update 9 waited for groups that producers could not push."""

from __future__ import annotations

import pytest

from buffer.redis_buffer import BufferFull
from tests.buffer_helpers import make_group


def test_delivered_unacked_groups_do_not_block_producers(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=2)
    for i in range(2):
        buf.push(make_group(0, seed=i), "w")
    with pytest.raises(BufferFull):
        buf.push(make_group(0, seed=9), "w", timeout_s=0.1)
    delivered = buf.pull(2, block_ms=100)
    assert len(delivered) == 2  # delivered, NOT acknowledged: the learner has not checkpointed yet
    for i in range(2):  # room again for a full backlog
        buf.push(make_group(0, seed=10 + i), "w", timeout_s=1)
    with pytest.raises(BufferFull):
        buf.push(make_group(0, seed=20), "w", timeout_s=0.1)
    stats = buf.stats()
    assert stats.depth == 4 and stats.pending == 2
    buf.ack([e.id for e in delivered])
    assert buf.stats().depth == 2


def test_bounded_admission_counts_from_the_producers_older_weights(buffer_factory):
    """A producer whose weights are older than the learner's is held closer, so its groups do not arrive too
    stale (staleness = consuming version - generating version): (s + min(V, W) + 1) * B - inflight."""
    s, B, V = 1, 2, 5
    current = buffer_factory(policy="bounded", max_staleness=s, batch_groups=B)
    current.set_version(V)
    assert current.admit("w", 100, weights_version=V).granted == (s + V + 1) * B
    behind = buffer_factory(policy="bounded", max_staleness=s, batch_groups=B)
    behind.set_version(V)
    assert behind.admit("w", 100, weights_version=V - 2).granted == (s + V - 2 + 1) * B
    unknown = buffer_factory(policy="bounded", max_staleness=s, batch_groups=B)
    unknown.set_version(V)
    assert unknown.admit("w", 100).granted == (s + V + 1) * B  # no version given: the learner's
