"""Adaptive staleness against fixed bounds (the adaptive-staleness issue), on an uneven rollout side.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/adaptive.py [--config configs/tiny-long.yaml]
        [--bounds 1,2,4,8] [--seeds 0,1] [--updates 160] [--eval-every 20] [--delays 0,1.5] [--target 0.8]
        [--controller target_m2=0.04,...] [-o runs/bench-adaptive] [k=v overrides]

Every cell is one real `staleflow train`: `buffer.policy=bounded buffer.max_staleness=s` for each s of
--bounds, and `buffer.policy=adaptive` (starting at the lowest bound, free within [min, max] of --bounds),
each with two rollout workers of different speed (`rollout.delay_s` = --delays: the second worker waits after
each batch) and the seed on every random stream. Same config, updates and evals everywhere. A cell whose run
finished with the same arguments is reused (an interrupted comparison continues).

Figures per cell: samples/s between the first and the last update (start-up excluded); the wall time from the
first update until the sampled held-out avg@k (task.eval_samples at the rollout temperature) first reaches
--target; the final avg@k. Per policy: the mean over seeds. The baseline, measured in the same run, is the
best fixed bound (the lowest mean time to the target): `time_to_target_ratio` = adaptive / best fixed (< 1:
adaptive faster), without being told which bound that is. Writes <out>/table.md, <out>/bound.png (the bound
over updates of every adaptive run, and avg@k against wall time for every policy) and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def run_cell(name: str, args: list[str], runs_dir: Path) -> Path:
    """One `staleflow train`, reused when a finished run of the same arguments is there."""
    run = runs_dir / name
    meta = run / "bench.json"
    if (run / "eval.json").is_file() and meta.is_file() and json.loads(meta.read_text())["args"] == args:
        return run
    cmd = [sys.executable, "-m", "services.cli", "train", *args, f"runs_dir={runs_dir}", f"name={name}",
           "metrics.dashboard=false"]
    for _ in range(2):  # a loaded machine can time out Ray's start-up: one more try
        shutil.rmtree(run, ignore_errors=True)
        out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "STALEFLOW_QUIET": "1"}, capture_output=True, text=True)
        if out.returncode == 0 and (run / "eval.json").is_file():
            break
    else:
        raise RuntimeError(f"{name}: staleflow train exited {out.returncode}:\n{out.stderr[-3000:]}")
    meta.write_text(json.dumps({"args": args}))
    return run


def summarise(run: Path, target: float) -> dict:
    updates = [r for r in _jsonl(run / "metrics.jsonl") if "train/sequences" in r]
    t_first = updates[0]["time"]
    curve = [(e["step"], e["time"] - t_first, e["eval/avg_at_k"]) for e in _jsonl(run / "eval.jsonl")
             if "eval/avg_at_k" in e]
    final = json.loads((run / "eval.json").read_text())
    reached = [t for step, t, acc in curve if step > 0 and acc >= target]
    return {
        "samples_per_s": sum(r["train/sequences"] for r in updates[1:]) / (updates[-1]["time"] - t_first),
        "time_to_target_s": reached[0] if reached else math.nan,
        "final_avg_at_k": final.get("avg_at_k", math.nan),
        "curve": curve,
        "bound": [(r["step"], r["staleness/bound"]) for r in updates if "staleness/bound" in r],
        "changes": len(_jsonl(run / "adaptive.jsonl")),
        "mean_staleness": statistics.fmean(r.get("staleness/mean", 0.0) for r in updates),
    }


def _mean(xs: list[float]) -> float:
    """Mean; nan when a seed never reached the target (the policy did not reach it in the run)."""
    return statistics.fmean(xs) if xs and not any(math.isnan(x) for x in xs) else math.nan


def plot(cells: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.plots import COLORS

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8))
    for p, (policy, runs) in enumerate(cells.items()):
        for i, r in enumerate(runs):  # one colour per policy, one line per seed
            bottom.plot([t for _, t, _ in r["curve"]], [a for _, _, a in r["curve"]], marker=".", color=COLORS[p],
                        label=policy if i == 0 else None, linestyle="-" if policy == "adaptive" else ":",
                        linewidth=2 if policy == "adaptive" else 1)
            if policy == "adaptive":
                top.step([s for s, _ in r["bound"]], [b for _, b in r["bound"]], where="post", label=f"seed run {i}")
    top.set_xlabel("update")
    top.set_ylabel("staleness bound (adaptive)")
    top.legend(fontsize=8)
    bottom.set_xlabel("seconds since the first update")
    bottom.set_ylabel("held-out avg@k (sampled)")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-long.yaml")
    p.add_argument("--bounds", default="1,2,4,8")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--updates", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--delays", default="0,1.5", help="rollout.delay_s per worker (seconds after each batch)")
    p.add_argument("--target", type=float, default=0.8, help="sampled held-out avg@k to reach")
    p.add_argument("--controller", default="", help="buffer.adaptive settings for the adaptive runs only, e.g. "
                   "target_m2=0.04,window=5 (the fixed runs refuse them)")
    p.add_argument("-o", "--out", type=Path, default=REPO / "runs/bench-adaptive")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    bounds = [int(x) for x in a.bounds.split(",")]
    delays = [float(x) for x in a.delays.split(",")]
    from services.config import load_config
    from services.placement import learner_bundles, rollout_bundles

    cfg = load_config([a.config], [*a.overrides, f"rollout.num_workers={len(delays)}"])
    # The learner and every worker take their threads' CPUs; a 2-core machine declares 3 (the second worker sleeps
    # between batches, so the three share the cores), else the local Ray refuses the run.
    cpus = int(sum(b.get("CPU", 0) for b in [*learner_bundles(cfg), *rollout_bundles(cfg)]))
    common = [a.config, f"learner.total_steps={a.updates}", f"learner.eval_every={a.eval_every}",
              f"rollout.num_workers={len(delays)}", f"rollout.delay_s=[{','.join(map(str, delays))}]",
              "buffer.updates_per_batch=1", f"cluster.num_cpus={max(cpus, os.cpu_count() or 1)}", *a.overrides]
    policies = {f"bounded-s{s}": ["buffer.policy=bounded", f"buffer.max_staleness={s}"] for s in bounds}
    policies["adaptive"] = ["buffer.policy=adaptive", f"buffer.max_staleness={min(bounds)}",
                            f"buffer.adaptive.min_staleness={min(bounds)}", f"buffer.adaptive.max_staleness={max(bounds)}",
                            *(f"buffer.adaptive.{kv}" for kv in a.controller.split(",") if kv)]
    cells: dict[str, list[dict]] = {}
    for policy, extra in policies.items():
        for seed in (int(x) for x in a.seeds.split(",")):
            args = [*common, *extra, f"seed={seed}", f"rollout.seed={seed}", f"task.seed={seed}", f"learner.seed={seed}"]
            print(f"{policy} seed {seed}", file=sys.stderr, flush=True)
            cells.setdefault(policy, []).append(summarise(run_cell(f"{policy}-seed{seed}", args, a.out / "runs"), a.target))
    rows = {policy: {"samples_per_s": _mean([r["samples_per_s"] for r in runs]),
                     "time_to_target_s": _mean([r["time_to_target_s"] for r in runs]),
                     "final_avg_at_k": _mean([r["final_avg_at_k"] for r in runs]),
                     "final_avg_at_k_std": statistics.stdev([r["final_avg_at_k"] for r in runs]) if len(runs) > 1 else 0.0,
                     "mean_staleness": _mean([r["mean_staleness"] for r in runs]),
                     "bound_changes": _mean([r["changes"] for r in runs])} for policy, runs in cells.items()}
    fixed = {k: v for k, v in rows.items() if k != "adaptive" and not math.isnan(v["time_to_target_s"])}
    best = min(fixed, key=lambda k: fixed[k]["time_to_target_s"]) if fixed else None
    ratio = rows["adaptive"]["time_to_target_s"] / fixed[best]["time_to_target_s"] if best else math.nan
    a.out.mkdir(parents=True, exist_ok=True)
    lines = [f"`benchmarks/adaptive.py {' '.join(sys.argv[1:])}`: target avg@k {a.target}", "",
             "| policy | seeds | samples/s | time to target (s) | final avg@k | mean staleness | bound changes |",
             "|---|---|---|---|---|---|---|"]
    for policy, r in rows.items():
        lines.append(f"| {policy} | {len(cells[policy])} | {r['samples_per_s']:.1f} | {r['time_to_target_s']:.0f} | "
                     f"{r['final_avg_at_k']:.3f} ± {r['final_avg_at_k_std']:.3f} | {r['mean_staleness']:.2f} | "
                     f"{r['bound_changes']:.1f} |")
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    plot(cells, a.out / "bound.png")
    print(json.dumps({"target": a.target, "best_fixed": best, "time_to_target_ratio": ratio,
                      "samples_per_s_ratio": rows["adaptive"]["samples_per_s"] / fixed[best]["samples_per_s"] if best else math.nan,
                      "policies": rows, "table": str(a.out / "table.md"), "plot": str(a.out / "bound.png")}, indent=1))


if __name__ == "__main__":
    main()
