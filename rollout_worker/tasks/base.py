"""The task contract: a prompt source plus a reward function.

Workers draw `train_prompts`, score responses with `reward` (through `score`, which isolates failures), and
evaluation uses the fixed `eval_prompts` set, which never overlaps the training stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    answer: str


@runtime_checkable
class Task(Protocol):
    name: str

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        """An endless stream of training prompts, deterministic for a seed."""
        ...

    def eval_prompts(self) -> list[Prompt]:
        """A fixed held-out set, disjoint from every training stream."""
        ...

    def reward(self, prompt: Prompt, response: str) -> float: ...


# A task may set `reward_in_process = True` to have `score` call its reward directly: only for reward functions
# that are pure, fast and cannot hang (the built-in arithmetic). Every other reward runs in a subprocess pool
# with a hard timeout. Read with getattr(task, "reward_in_process", False): plug-ins need not define it.
