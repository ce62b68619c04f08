"""Tasks (a prompt source + a reward function), chosen by name in `task.name`; and `score`.

Built in: "arithmetic" (the CPU demo), "long_addition" (worked column by column: a long answer whose few carry
tokens decide it) and "math" (local JSONL/parquet + math-verify). Anything else is a plug-in
path "package.module:function": the function is called with the TaskConfig (or with no argument if it takes
none) and returns a Task.
"""

from __future__ import annotations

import importlib
import inspect

from rollout_worker.config import TaskConfig
from rollout_worker.tasks.base import Prompt, Task
from rollout_worker.tasks.scoring import score

__all__ = ["Prompt", "Task", "load_task", "score"]


def load_task(cfg: TaskConfig) -> Task:
    if cfg.name == "arithmetic":
        from rollout_worker.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(
            max_operand=cfg.arithmetic_max_operand,
            ops=cfg.arithmetic_ops,
            eval_size=cfg.eval_size,
            template=cfg.prompt_template or "plain",
        )
    if cfg.name == "long_addition":
        from rollout_worker.tasks.long_addition import LongAdditionTask

        return LongAdditionTask(digits=cfg.long_addition_digits, eval_size=cfg.eval_size,
                                template=cfg.prompt_template or "plain")
    if cfg.name == "math":
        from rollout_worker.tasks.math_task import MathTask

        if not cfg.data_path:
            raise ValueError("task.name=math needs task.data_path (a local .jsonl or .parquet file)")
        return MathTask(
            data_path=cfg.data_path,
            template=cfg.prompt_template or "boxed",
            eval_size=cfg.eval_size,
            eval_data_path=cfg.eval_data_path,
            question_key=cfg.question_key,
            answer_key=cfg.answer_key,
        )
    if ":" not in cfg.name:
        raise ValueError(f"unknown task {cfg.name!r}: use 'arithmetic', 'long_addition', 'math' or a plug-in "
                         "'package.module:function'")
    return _load_plugin(cfg)


def _load_plugin(cfg: TaskConfig) -> Task:
    module_name, _, attr = cfg.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load task plug-in {cfg.name!r}: {exc}") from exc
    takes_cfg = any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        for p in inspect.signature(factory).parameters.values()
    )
    task = factory(cfg) if takes_cfg else factory()
    if not isinstance(task, Task):
        raise TypeError(
            f"task plug-in {cfg.name!r} returned {type(task).__name__}, which lacks the Task interface "
            "(name, train_prompts, eval_prompts, reward)"
        )
    return task
