"""The long-answer task: multi-digit addition worked column by column, then the sum.

Prompt "347+589=". The response works right to left, one column per step, then gives the sum after ';':

    7+9+0=16,4+8+1=13,3+5+1=9;936

Each step is "x+y+c=s": the column's digits, the carry in (the tens digit of the previous step's sum, 0 for the
first column) and their sum. Three digits give 27-31 response tokens with our character tokenizer, nearly all of
them copied from the prompt or forced by the ones before; the few that decide the answer are the carries. That is
the M2PO paper's setting in miniature: long traces of near-deterministic tokens where a few pivotal ones carry the
update. The reward is the final sum alone, exact; the work is not graded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout_worker.tasks.base import DrawnPrompts, Prompt
from rollout_worker.tasks.templates import render

EVAL_SEED = 1_000_033  # the held-out set's own seed: the same for every run, whatever the training seed


def worked_sum(a: int, b: int, carry_drop: float = 0.0, rng: random.Random | None = None) -> str:
    """The scratchpad and the sum for a + b. `carry_drop`: a flawed teacher forgets a carry (writes 0 for the
    next column's carry in) with this probability, and its sum follows its own columns (a warm start's data)."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        digits.append(s % 10)
        carry = s // 10
        if carry and carry_drop and rng is not None and rng.random() < carry_drop:
            carry = 0
    total = int("".join(map(str, reversed(digits)))) + (carry * 10 ** len(digits))
    return ",".join(steps) + f";{total}"


def parse_sum(response: str) -> str | None:
    """The sum a response gives: what follows its last ';' on that line, stripped."""
    line = response.split("\n", 1)[0]
    if ";" not in line:
        return None
    return line.rsplit(";", 1)[1].strip() or None


@dataclass(frozen=True)
class LongAdditionTask(DrawnPrompts):
    name: str = "long_addition"
    digits: int = 3  # both operands have this many digits
    eval_size: int = 200
    template: str = "plain"
    eval_seed = EVAL_SEED
    reward_in_process = True  # exact string match: pure and O(len(response)), see tasks.base

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 9:
            raise ValueError(f"long_addition digits must be in [1, 9], got {self.digits}")
        render(self.template, "")
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        if self.eval_size > (10**self.digits - low) ** 2 // 2:
            raise ValueError(f"eval_size {self.eval_size} leaves too few training problems")

    def _draw(self, rng: random.Random) -> Prompt:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        a, b = rng.randint(low, 10**self.digits - 1), rng.randint(low, 10**self.digits - 1)
        return Prompt(id=f"{a}+{b}", text=render(self.template, f"{a}+{b}="), answer=str(a + b))

    def reward(self, prompt: Prompt, response: str) -> float:
        return 1.0 if parse_sum(response) == prompt.answer else 0.0
