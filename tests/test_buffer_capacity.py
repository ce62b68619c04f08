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
