"""The `buffer` config section: where the Redis staleness buffer lives and which staleness rule it enforces."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BufferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # None: the launcher starts an embedded redis-server on a free loopback port with a generated password.
    # Otherwise e.g. "redis://10.0.0.5:6379/0"; the password never goes here, it comes from `password_env`.
    redis_url: str | None = None
    password_env: str = "STALEFLOW_REDIS_PASSWORD"
    prefix: str = Field("staleflow", description="Key prefix; one run = one prefix.")

    policy: Literal["bounded", "fixed", "unbounded"] = "bounded"
    max_staleness: int = Field(2, ge=0, description="bounded: drop samples staler than this; fixed: the lag s.")
    batch_groups: int = Field(16, ge=1, description="Groups (prompts) per learner update.")
    capacity_groups: int = Field(128, ge=1, description="Most groups waiting for the learner (not yet delivered); producers wait beyond. Delivered "
        "groups stay until the checkpoint covering them (at most learner.checkpoint_every x batch_groups more).")
    dead_letter_maxlen: int = Field(10_000, ge=1)
    aof: bool = Field(True, description="Embedded Redis: append-only file on (runs) or off (tests).")
    appendfsync: Literal["always", "everysec", "no"] = Field(
        "everysec",
        description="Embedded Redis AOF fsync policy. always: an acknowledged push survives a crash of Redis or "
        "the machine (one fsync per write); everysec: a machine crash may lose the last ~1 s of pushes (a crash "
        "of redis-server alone loses nothing: the OS still holds the written AOF); no: the OS decides.",
    )
    reconnect_s: float = Field(
        30.0, gt=0, description="After a lost connection, clients retry with exponential backoff this long."
    )
    dedupe_window_s: int = Field(
        600, ge=1, description="A group_id pushed again within this window is not added twice (a retried push)."
    )
    push_timeout_s: float = Field(60.0, gt=0, description="A push waits this long for room, then BufferFull.")
    claim_idle_s: float = Field(
        60.0, gt=0, description="Unacked entries idle this long in another consumer are claimed (XAUTOCLAIM)."
    )
    max_deliveries: int = Field(
        5, ge=1, description="An entry delivered this often and never acked (it keeps killing the learner?) is dead-lettered."
    )

    @model_validator(mode="after")
    def _no_password_in_the_url(self) -> BufferConfig:
        # The config is printed and saved with the run: a password in it would leak. (Checked on the whole
        # section, not the field, so that the error does not echo the URL.)
        if self.redis_url and urlsplit(self.redis_url).password:
            raise ValueError(
                f"buffer.redis_url must not hold a password: put it in the environment variable {self.password_env} "
                "(buffer.password_env)"
            )
        return self

    @model_validator(mode="after")
    def _dedupe_outlives_retries(self) -> BufferConfig:
        # a push retried after a lost reply arrives at most reconnect_s later: it must still find its marker
        if self.dedupe_window_s < self.reconnect_s:
            raise ValueError(f"dedupe_window_s={self.dedupe_window_s} must be >= reconnect_s={self.reconnect_s:g}")
        return self

    @model_validator(mode="after")
    def _room_for_the_window(self) -> BufferConfig:
        # bounded/fixed admit up to (max_staleness + 1) batches ahead of the learner: they must fit in the stream
        need = (self.max_staleness + 1) * self.batch_groups
        if self.policy != "unbounded" and self.capacity_groups < need:
            raise ValueError(
                f"capacity_groups={self.capacity_groups} is below (max_staleness + 1) * batch_groups = {need}: "
                "admitted producers would block forever"
            )
        return self
