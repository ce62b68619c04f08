"""The task contract: a prompt source plus a reward function.

Workers draw `train_prompts`, score responses with `reward` (through `score`, which isolates failures), and
evaluation uses the fixed `eval_prompts` set, which never overlaps the training stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable


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


class DrawnPrompts:
    """For tasks whose problems come from a seeded generator, `_draw(rng)`: the held-out set is the first
    `eval_size` distinct problems drawn with the task's own `eval_seed` (the same for every run, whatever the
    training seed), and every training stream skips them, so the two never overlap."""

    eval_seed: ClassVar[int]
    eval_size: int

    def _draw(self, rng: random.Random) -> Prompt:
        raise NotImplementedError

    def _eval_by_id(self) -> dict[str, Prompt]:
        rng = random.Random(self.eval_seed)
        held: dict[str, Prompt] = {}
        while len(held) < self.eval_size:
            p = self._draw(rng)
            held.setdefault(p.id, p)
        return held

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval_by_id().values())

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        held = self._eval_by_id()
        rng = random.Random(seed)
        while True:
            p = self._draw(rng)
            if p.id not in held:
                yield p
