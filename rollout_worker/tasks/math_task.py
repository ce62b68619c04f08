"""The `math` task: problems with reference answers from a local JSONL or parquet file, scored by math-verify.

The reward is 1 when the LAST \\boxed{...} in the response is mathematically equal to the reference answer
(math-verify: "\\boxed{1/2}" equals "0.5"), else 0: the DeepScaleR / Qwen2.5-Math convention. Data is read with
HF `datasets` from local files only (`Dataset.from_json` / `from_parquet` never touch the network).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rollout_worker.tasks.base import Prompt
from rollout_worker.tasks.templates import render

# Held-out rows are drawn with this seed, independent of training seeds.
EVAL_SEED = 1_000_003
QUESTION_KEYS = ("problem", "question", "prompt", "query")
ANSWER_KEYS = ("answer", "final_answer", "ground_truth", "solution")


def load_rows(path: str | Path, question_key: str | None = None, answer_key: str | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs from a local .jsonl/.json or .parquet file."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math task data file not found: {path}")
    if path.suffix == ".parquet":
        ds = Dataset.from_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        ds = Dataset.from_json(str(path))
    else:
        raise ValueError(f"math task data must be .jsonl, .json or .parquet, got {path.name}")
    qk = question_key or _pick(ds.column_names, QUESTION_KEYS, path, "question")
    ak = answer_key or _pick(ds.column_names, ANSWER_KEYS, path, "answer")
    rows = []
    for q, a in zip(ds[qk], ds[ak]):
        a = str(a)
        # A full worked solution as the reference: its last boxed expression is the answer.
        a = last_boxed(a) or a
        rows.append((str(q), a))
    if not rows:
        raise ValueError(f"math task data file {path} has no rows")
    return rows


def _pick(columns: list[str], candidates: tuple[str, ...], path: Path, what: str) -> str:
    for key in candidates:
        if key in columns:
            return key
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(candidates)}; columns: {columns})")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the response was cut off inside the box


def math_reward(answer: str, response: str) -> float:
    from math_verify import parse, verify

    pred = last_boxed(response)
    if not pred:
        return 0.0
    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    return 1.0 if verify(gold, parse(f"${pred}$")) else 0.0


@dataclass(frozen=True)
class MathTask:
    """Prompts from `data_path`; the eval set is `eval_data_path`, or else `eval_size` rows held out of it."""

    data_path: str
    template: str = "boxed"
    eval_size: int = 200
    eval_data_path: str | None = None
    question_key: str | None = None
    answer_key: str | None = None
    name: str = "math"
    # math-verify runs sympy on model output, which can take unbounded time: score() runs it in its pool.
    reward_in_process = False
    _rows: list = field(default_factory=list, compare=False, repr=False)
    _eval: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        rows = [
            Prompt(id=f"math-{i}", text=render(self.template, q), answer=a)
            for i, (q, a) in enumerate(load_rows(self.data_path, self.question_key, self.answer_key))
        ]
        if self.eval_data_path:
            held = [
                Prompt(id=f"math-eval-{i}", text=render(self.template, q), answer=a)
                for i, (q, a) in enumerate(load_rows(self.eval_data_path, self.question_key, self.answer_key))
            ]
            train = rows
        else:
            if len(rows) < 2:
                raise ValueError(f"{self.data_path}: need at least 2 rows to hold out an eval set")
            order = list(range(len(rows)))
            random.Random(EVAL_SEED).shuffle(order)
            # Never hold out more than half, so a small file still leaves training prompts.
            n_eval = min(self.eval_size, len(rows) // 2)
            held_idx = set(order[:n_eval])
            held = [rows[i] for i in sorted(held_idx)]
            train = [r for i, r in enumerate(rows) if i not in held_idx]
        object.__setattr__(self, "_rows", train)
        object.__setattr__(self, "_eval", held)

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        rng = random.Random(seed)
        order = list(range(len(self._rows)))
        while True:  # epochs, each in a fresh seeded order
            rng.shuffle(order)
            for i in order:
                yield self._rows[i]

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, response: str) -> float:
        return math_reward(prompt.answer, response)
