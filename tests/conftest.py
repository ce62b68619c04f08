"""Shared fixtures: one real redis-server (buffer.server.EmbeddedRedis, AOF off) for the whole session; every
test gets its own key prefix so tests never see each other's data."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import settings

from buffer.config import BufferConfig
from buffer.server import EmbeddedRedis, connect

# Property tests: `make test` (and CI) draws the same examples on every run and machine, so a red run is a finding
# in the code that changed, not a new random draw; `HYPOTHESIS_PROFILE=explore make test` searches fresh examples
# (run it when you touch a loss or the wire format; a case it finds goes into the test as an @example).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(maxmemory_mb=512) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url, redis_server.password)
    yield client
    client.close()


@pytest.fixture
def buffer_factory(redis_client: redis.Redis) -> Iterator[Callable[..., object]]:
    """make(**config fields) -> a StalenessBuffer on a fresh prefix; its keys are deleted after the test."""
    from buffer.redis_buffer import StalenessBuffer

    made: list[StalenessBuffer] = []

    def make(prefix: str | None = None, **fields: object) -> StalenessBuffer:
        cfg = BufferConfig(prefix=prefix or f"test-{uuid.uuid4().hex[:12]}", aof=False, **fields)
        buf = StalenessBuffer(redis_client, cfg)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        keys = list(redis_client.scan_iter(match=f"{buf.cfg.prefix}:*"))
        if keys:
            redis_client.delete(*keys)
