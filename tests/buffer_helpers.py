"""Helpers for the buffer tests: small groups, and the functions that run in spawned processes (they must be
importable by module name)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from buffer.config import BufferConfig
from buffer.redis_buffer import StalenessBuffer
from buffer.server import connect
from buffer.trajectory import Trajectory, TrajectoryGroup


def wire_v1(group: TrajectoryGroup) -> dict:
    """The group as format 1's msgpack map (still read by decode_group): the easiest format to damage by hand."""
    return {"schema": 1, "group_id": group.group_id, "slot": group.slot,
            "trajectories": [t.to_wire() for t in group.trajectories]}


def make_group(version: int, *, n: int = 2, tokens: int = 8, slot: int | None = None, gid: str | None = None,
               seed: int = 0, versions: list[int] | None = None) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    group_id = gid or f"g-{os.getpid()}-{time.monotonic_ns()}-{seed}"
    trajs = [
        Trajectory.make(
            group_id=group_id,
            prompt_ids=rng.integers(0, 32_000, 5),
            response_ids=rng.integers(0, 32_000, tokens),
            behaviour_logp=-rng.random(tokens, dtype=np.float32) * 5,
            version=version,
            versions=versions,
            reward=float(rng.random()),
            worker_id="w",
        )
        for _ in range(n)
    ]
    return TrajectoryGroup(group_id=group_id, trajectories=trajs, slot=slot)


def _buffer(url: str, cfg_json: str) -> StalenessBuffer:
    client = connect(url, os.environ["TEST_REDIS_PASSWORD"])
    return StalenessBuffer(client, BufferConfig.model_validate_json(cfg_json))


def produce(url: str, cfg_json: str, worker: str, count: int) -> None:
    """A producer process: admit one group at a time, generate it at the learner's version, push it."""
    buf = _buffer(url, cfg_json)
    for i in range(count):
        while buf.admit(worker, 1, timeout_s=5).granted == 0:
            pass
        buf.push(make_group(buf.version(), gid=f"{worker}-{i}", seed=i), worker, timeout_s=600)


def grab_grants(url: str, cfg_json: str, worker: str, start, out) -> None:  # noqa: ANN001
    """Race for admission one group at a time until refused; report how many were granted."""
    buf = _buffer(url, cfg_json)
    start.wait()
    got = 0
    while buf.admit(worker, 1).granted:
        got += 1
    out.put(got)


def consume_and_hang(url: str, cfg_json: str, consumer: str, n: int, out) -> None:  # noqa: ANN001
    """A learner that pulls entries, reports their ids and then never acks (the test SIGKILLs it)."""
    buf = _buffer(url, cfg_json)
    entries = buf.pull(n, consumer=consumer, block_ms=5000)
    out.put([e.id for e in entries])
    time.sleep(600)


if __name__ == "__main__":  # `python tests/buffer_helpers.py DIR`: start an EmbeddedRedis, print its pid, wait
    from buffer.server import EmbeddedRedis

    with EmbeddedRedis() as server:
        print(server.proc.pid, flush=True)
        time.sleep(600)
    sys.exit(0)
