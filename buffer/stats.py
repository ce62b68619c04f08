"""What `StalenessBuffer.stats()` returns: a snapshot computed on demand from the run's Redis keys."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProducerStats(BaseModel):
    pushed: int = 0
    groups_per_s: float = 0.0  # pushed / (last push - first push); 0 until two pushes
    last_push_age_s: float | None = None
    outstanding: int = 0  # admitted groups not pushed yet


class BufferStats(BaseModel):
    policy: str
    max_staleness: int
    learner_version: int
    depth: int = Field(description="Entries in the stream: waiting, held or delivered but not acknowledged.")
    pending: int = Field(description="Delivered to a learner and not acknowledged yet.")
    capacity: int
    oldest_age_s: float | None = Field(description="Age of the oldest entry still in the stream.")
    consumed: int = Field(description="Acknowledged groups the learner trained on.")
    staleness_hist: dict[int, int] = Field(description="staleness -> consumed groups")
    drops: dict[str, int]
    dead_letters: dict[str, int]
    dead_letter_depth: int
    admitted: int = Field(description="Groups ever granted to producers.")
    outstanding: int = Field(description="Granted and not pushed yet (being generated).")
    ahead_of_learner: int = Field(0, description="Groups trained on that a newer policy than the learner's made.")
    producers: dict[str, ProducerStats]
