"""Held-out accuracy: avg@n on a task's fixed eval prompts (greedy when n=1). `staleflow eval` calls run_eval."""

from __future__ import annotations

import json
from pathlib import Path

from rollout_worker.config import RolloutConfig, TaskConfig
from rollout_worker.engine import GenerationEngine, build_engine
from rollout_worker.tasks import Task, load_task, score


def evaluate(engine: GenerationEngine, task: Task, n: int = 1, temperature: float | None = None,
             timeout_s: float = 5.0, seed: int | None = None) -> dict:
    """accuracy = mean reward over every (prompt, sample): pass@1 averaged over n samples (avg@n).
    Without a temperature, n=1 decodes greedily and n>1 samples at the engine's rollout temperature (1.0 if that
    is 0, since n greedy samples would be n copies); a given temperature > 0 samples, whatever n. `seed`: the same
    samples, hence the same accuracy, for the same weights and seed."""
    if n < 1:
        raise ValueError("n must be >= 1")
    prompts = task.eval_prompts()
    if temperature is None:
        temperature = 0.0 if n == 1 else getattr(getattr(engine, "cfg", None), "temperature", 1.0) or 1.0
    groups = engine.generate(engine.tokenize([p.text for p in prompts]), n, temperature=temperature,
                             seed=seed if temperature > 0 else None)
    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    rewards, errors = score(task, flat_prompts, [s.text for g in groups for s in g], timeout_s=timeout_s)
    return {
        "accuracy": sum(rewards) / len(rewards) if rewards else 0.0,
        "n": n,
        "num_prompts": len(prompts),
        "temperature": temperature,
        "reward_errors": int(errors),
    }


def run_eval(model_dir: str | Path, task_cfg: TaskConfig, rollout_cfg: RolloutConfig, n: int = 1,
             out: str | Path | None = None) -> dict:
    """Build an engine on `model_dir`, evaluate on the task's eval prompts, write JSON to `out` if given."""
    task = load_task(task_cfg)
    engine = build_engine(str(model_dir), rollout_cfg)
    try:
        result = evaluate(engine, task, n=n, timeout_s=task_cfg.reward_timeout_s)
    finally:
        engine.close()
    result = {"model": str(model_dir), "task": task_cfg.name, **result}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
