"""The CPU demo's task: integer arithmetic with generated prompts and an exact-match reward.

A prompt is "a+b=" (or "a-b="); the policy must answer with the number and stop. The held-out set is a fixed
sample of the problem space, drawn with its own seed; training streams skip those problems, so the two never
overlap whatever the training seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout_worker.tasks.base import DrawnPrompts, Prompt
from rollout_worker.tasks.templates import render

# The eval set is drawn with this seed, independent of training seeds, so it is the same for every run.
EVAL_SEED = 1_000_003


@dataclass(frozen=True)
class ArithmeticTask(DrawnPrompts):
    name: str = "arithmetic"
    max_operand: int = 29  # operands are drawn uniformly from [0, max_operand]
    ops: str = "+"  # any of "+-"; "-" keeps a >= b so answers stay non-negative
    eval_size: int = 200
    template: str = "plain"  # a bundled template name or a format string with {question}
    eval_seed = EVAL_SEED
    reward_in_process = True  # exact string match: pure and O(len(response)), see tasks.base

    def __post_init__(self) -> None:
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"arithmetic ops must be a non-empty subset of '+-', got {self.ops!r}")
        render(self.template, "")  # fail at construction on an unknown template
        if self.max_operand < 1:
            raise ValueError("arithmetic max_operand must be >= 1")
        space = len(self.ops) * (self.max_operand + 1) ** 2
        if self.eval_size > space // 2:
            raise ValueError(f"eval_size {self.eval_size} leaves too few training problems (space {space})")

    def _draw(self, rng: random.Random) -> Prompt:
        op = rng.choice(self.ops)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        if op == "-" and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b
        return Prompt(id=f"{a}{op}{b}", text=render(self.template, f"{a}{op}{b}="), answer=str(value))

    def reward(self, prompt: Prompt, response: str) -> float:
        return 1.0 if parse_answer(response) == prompt.answer else 0.0


def parse_answer(response: str) -> str | None:
    """The answer a response gives: its first line, stripped. Extra text on that line makes it wrong."""
    line = response.split("\n", 1)[0].strip()
    return line or None
