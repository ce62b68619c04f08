"""Tasks and rewards: the arithmetic and math built-ins, plug-ins, and score()'s failure isolation."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import pytest

from rollout_worker.config import TaskConfig
from rollout_worker.data import MATH_SAMPLE
from rollout_worker.tasks import Prompt, Task, load_task, score
from rollout_worker.tasks.math_task import last_boxed


def test_arithmetic_reward_exact_match() -> None:
    task = load_task(TaskConfig(name="arithmetic"))
    p = Prompt(id="12+7", text="12+7=", answer="19")
    assert task.reward(p, "19") == 1.0
    assert task.reward(p, " 19\nanything after the answer line") == 1.0
    assert task.reward(p, "18") == 0.0
    assert task.reward(p, "19 ") == 1.0
    assert task.reward(p, "190") == 0.0
    assert task.reward(p, "19+1") == 0.0
    assert task.reward(p, "") == 0.0
    assert task.reward(p, "\x00garbage=?") == 0.0


def test_arithmetic_prompts_are_correct_and_heldout_is_disjoint() -> None:
    task = load_task(TaskConfig(name="arithmetic", eval_size=50, arithmetic_ops="+-"))
    held = task.eval_prompts()
    assert len(held) == 50 and len({p.id for p in held}) == 50
    assert held == task.eval_prompts()  # fixed
    held_ids = {p.id for p in held}
    for seed in (0, 1):
        train = list(itertools.islice(task.train_prompts(seed), 3000))
        assert not held_ids & {p.id for p in train}
        for p in train[:200]:
            assert p.text.endswith("=") and str(eval(p.text[:-1])) == p.answer  # noqa: S307 (our own digits)
    # Seeds give different, reproducible streams.
    first = lambda s: [p.id for p in itertools.islice(task.train_prompts(s), 20)]  # noqa: E731
    assert first(0) == first(0) and first(0) != first(1)


def test_math_task_reads_bundled_jsonl_and_holds_out() -> None:
    task = load_task(TaskConfig(name="math", data_path=str(MATH_SAMPLE), eval_size=4))
    held = task.eval_prompts()
    assert len(held) == 4
    train = list(itertools.islice(task.train_prompts(0), 8))
    assert not {p.id for p in held} & {p.id for p in train}
    assert len({p.id for p in held} | {p.id for p in train}) == 12  # one epoch covers all 8 training rows
    assert all("\\boxed{}" in p.text for p in held)  # the default "boxed" template


def test_math_reward_uses_math_verify_on_last_box() -> None:
    task = load_task(TaskConfig(name="math", data_path=str(MATH_SAMPLE), eval_size=2))
    half = Prompt(id="h", text="", answer="0.5")
    assert task.reward(half, "so x = \\boxed{1/2}") == 1.0
    assert task.reward(half, "maybe \\boxed{0.5}, no: \\boxed{\\frac{1}{3}}") == 0.0  # the LAST box counts
    assert task.reward(half, "the answer is 0.5") == 0.0  # no box
    assert task.reward(Prompt(id="f", text="", answer="\\frac{3}{4}"), "\\boxed{0.75}") == 1.0
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None


def test_unknown_task_and_template_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        load_task(TaskConfig(name="nope"))
    with pytest.raises(ValueError, match="cannot load task plug-in"):
        load_task(TaskConfig(name="tests.test_tasks:missing"))
    with pytest.raises(ValueError, match="unknown prompt template"):
        load_task(TaskConfig(name="arithmetic", prompt_template="nope"))
    with pytest.raises(ValueError, match="data_path"):
        load_task(TaskConfig(name="math"))


# --- plug-in tasks (module level: the reward pool's processes unpickle them by import) ---------------------


@dataclass(frozen=True)
class EchoTask:
    """A user task: reward 1 when the response repeats the answer; 'raise', 'hang', 'die', 'nan' misbehave."""

    name: str = "echo"

    def train_prompts(self, seed: int):
        return (Prompt(id=str(i), text=f"say {i}", answer=str(i)) for i in itertools.count(seed))

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(id="e", text="say e", answer="e")]

    def reward(self, prompt: Prompt, response: str) -> float:
        if response == "raise":
            raise RuntimeError("reward bug")
        if response == "hang":
            time.sleep(3600)
        if response == "die":
            os._exit(3)  # the reward process dies mid-call
        if response == "nan":
            return float("nan")
        return float(response == prompt.answer)


def make_echo_task(cfg: TaskConfig) -> EchoTask:
    return EchoTask(name=f"echo-{cfg.seed}")


def make_not_a_task() -> dict:
    return {"name": "not a task"}


def test_plugin_path_loads_user_task() -> None:
    task = load_task(TaskConfig(name="tests.test_tasks:make_echo_task", seed=3))
    assert isinstance(task, Task) and task.name == "echo-3"
    assert next(iter(task.train_prompts(3))).answer == "3"
    with pytest.raises(TypeError, match="Task interface"):
        load_task(TaskConfig(name="tests.test_tasks:make_not_a_task"))


def test_score_isolates_raising_and_hanging_rewards() -> None:
    task = EchoTask()
    p = Prompt(id="1", text="say 1", answer="1")
    responses = ["1", "raise", "hang", "2", "nan", "die", "1"]
    t0 = time.monotonic()
    # 10 s per call: ample for the calls that answer at once however loaded the machine (a 1 s limit could
    # score a slow "1" as a failure), and still far below the hang (3600 s).
    rewards, errors = score(task, [p] * len(responses), responses, timeout_s=10.0)
    elapsed = time.monotonic() - t0
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert errors == 4  # raise, hang, nan, die
    assert elapsed < 900  # bounded: the hung call was killed, not waited for (3600 s)
    # The pool recovered: the next batch scores normally.
    assert score(task, [p, p], ["1", "1"], timeout_s=120.0) == ([1.0, 1.0], 0)


def test_score_in_process_fast_path_counts_errors() -> None:
    task = load_task(TaskConfig(name="arithmetic"))
    p = Prompt(id="1+1", text="1+1=", answer="2")
    assert score(task, [p, p, p], ["2", "3", "junk"], timeout_s=1.0) == ([1.0, 0.0, 0.0], 0)

    @dataclass(frozen=True)
    class Broken(EchoTask):
        reward_in_process = True

    assert score(Broken(), [p, p], ["raise", "2"], timeout_s=1.0) == ([0.0, 1.0], 1)
    with pytest.raises(ValueError):
        score(task, [p], [], timeout_s=1.0)


def test_long_addition_works_each_column_and_rewards_the_sum_only():
    from rollout_worker.tasks.long_addition import LongAdditionTask, parse_sum, worked_sum
    from rollout_worker.tiny_model import build_tokenizer

    assert worked_sum(347, 589) == "7+9+0=16,4+8+1=13,3+5+1=9;936"
    assert worked_sum(999, 1) == "9+1+0=10,9+0+1=10,9+0+1=10;1000"  # the last carry makes a fourth digit
    task = LongAdditionTask()
    prompts = task.eval_prompts()
    assert len(prompts) == 200 and len({p.id for p in prompts}) == 200
    held = {p.id for p in prompts}
    assert not held & {p.id for p in itertools.islice(task.train_prompts(7), 2000)}
    assert load_task(TaskConfig(name="long_addition", long_addition_digits=4)).digits == 4
    tok = build_tokenizer()
    lengths = []
    for p in prompts:
        a, b = map(int, p.id.split("+"))
        good = worked_sum(a, b)
        lengths.append(len(tok(good, add_special_tokens=False)["input_ids"]))
        assert task.reward(p, good) == 1.0 and task.reward(p, good + "\nmore") == 1.0
        assert task.reward(p, good.rsplit(";", 1)[0] + ";" + str(a + b + 1)) == 0.0  # the sum decides
        assert task.reward(p, str(a + b)) == 0.0  # no work, no ';': not an answer
    assert 20 <= min(lengths) and max(lengths) <= 40  # a long answer (the 20-40 tokens)
    assert parse_sum("1+2+0=3;3") == "3" and parse_sum("no answer") is None


def test_the_flawed_teacher_forgets_carries_and_sums_its_own_columns():
    import random

    from rollout_worker.tasks.long_addition import worked_sum

    assert worked_sum(347, 589, carry_drop=1.0, rng=random.Random(0)) == "7+9+0=16,4+8+0=12,3+5+0=8;826"
    assert worked_sum(123, 456, carry_drop=1.0, rng=random.Random(0)) == worked_sum(123, 456)  # no carry to drop
    rng = random.Random(1)
    wrong = sum(worked_sum(a, 589, 0.5, rng).endswith(f";{a + 589}") is False for a in range(100, 1000))
    assert 200 < wrong < 800  # about half of the carry problems go wrong
