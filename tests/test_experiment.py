"""`staleflow experiment staleness` on a tiny grid: one real fixed-staleness `staleflow train` run of a few
updates, then the table and the plot made from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.experiment import Cell, CellResult, seed_band, table

REPO = Path(__file__).resolve().parents[1]
UPDATES = 3
# Small batches, an eval every update: every column of the table and every point of the plot comes from the run.
SMALL = ["learner.eval_every=1", "buffer.batch_groups=4", "rollout.groups_per_batch=4", "rollout.n=4",
         "task.eval_size=32", "learner.checkpoint_every=100"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("exp")
    cmd = [sys.executable, "-m", "services.cli", "experiment", "staleness", "--s", "1", "--losses", "m2po",
           "--seeds", "0", "--updates", str(UPDATES), "-o", str(out), "configs/tiny-cpu.yaml", *SMALL]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_grid_runs_fixed_staleness_and_writes_table_and_plot(grid):
    out, proc = grid
    run_dir = out / "runs" / "m2po-s1-seed0"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    learner = [m for m in metrics if "policy/version" in m]
    assert [m["policy/version"] for m in learner] == list(range(1, UPDATES + 1))
    # fixed mode, s=1: update V trains on data from version max(0, V-1), so the staleness is 0 then 1, 1, ...
    assert [m["staleness/max"] for m in learner] == [0] + [1] * (UPDATES - 1)
    final = json.loads((run_dir / "eval.json").read_text())
    cfg = (run_dir / "config.yaml").read_text()
    assert "policy: fixed" in cfg and "loss: m2po" in cfg

    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1
    cols = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cols[1] == "m2po" and cols[2] == "1"
    # Each cell is the run's number under the table's own rounding rule (a tolerance of half a unit in the
    # last place fails on a value that rounds up, e.g. 0.4375 -> "0.438").
    assert cols[3] == f"{final['accuracy']:.3f}"
    assert final["k"] == 4 and cols[4] == f"{final['avg_at_k']:.3f}"  # sampled avg@4 at the rollout temperature
    results = json.loads((out / "results.json").read_text())
    trained = [acc for step, acc in results[0]["curve"] if step > 0]
    assert cols[5] == f"{sum(trained) / len(trained):.3f}"
    # Evals run beside training on the newest version: a busy machine skips some. The run's own records decide.
    sampled = {e["step"]: e["eval/avg_at_k"] for e in read_jsonl(run_dir / "eval.jsonl") if e["step"] > 0}
    sampled[UPDATES] = final["avg_at_k"]
    assert [[step, pytest.approx(acc)] for step, acc in sorted(sampled.items())] == [
        list(p) for p in results[0]["sampled_curve"] if p[0] > 0]
    assert cols[6] == f"{sum(sampled.values()) / len(sampled):.3f}"
    masked = sum(m["loss/masked_fraction"] for m in learner) / len(learner)
    assert cols[7] == f"{masked:.4f}"
    m2 = sum(m["m2po/m2_before"] for m in learner) / len(learner)
    assert cols[8] == f"{m2:.2e}"
    assert cols[10] == f"{max(m['ratio/max'] for m in learner):.3g}"  # the paper's instability signals
    ess = [m["ratio/ess_fraction"] for m in learner]
    assert cols[11] == f"{sum(ess) / len(ess):.3f} ({min(ess):.3f})"

    assert results[0]["curve"][-1] == [UPDATES, pytest.approx(final["accuracy"])]
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert {e["step"] for e in evals} <= {step for step, _ in results[0]["curve"]}
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "table:" in proc.stdout and "| s | loss |" in proc.stdout


@pytest.mark.slow
def test_finished_cells_are_reused(grid):
    """Running the same grid again trains nothing new: the finished run is summarised as it is."""
    out, _ = grid
    run_dir = out / "runs" / "m2po-s1-seed0"
    before = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    cmd = [sys.executable, "-m", "services.cli", "experiment", "staleness", "--s", "1", "--losses", "m2po",
           "--seeds", "0", "--updates", str(UPDATES), "-o", str(out), "configs/tiny-cpu.yaml", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == before
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["m2po-s1-seed0"]


def test_a_cell_gives_the_buffer_room_for_its_window():
    """fixed admits (s + updates_per_batch) x batch_groups groups ahead of the learner: each cell's config must
    hold them, or `staleflow train` refuses it (the paper's schedule, m = 4, at s = 32: 288 groups)."""
    from services.config import load_config

    base = load_config([str(REPO / "configs/tiny-long.yaml")], [])
    for s in (0, 8, 32, 64):
        cfg = load_config([str(REPO / "configs/tiny-long.yaml")], Cell(s, "ppo_clip", 0).overrides(400, base))  # validates
        assert cfg.buffer.capacity_groups >= (s + base.buffer.updates_per_batch) * base.buffer.batch_groups
    assert "buffer.capacity_groups=288" in Cell(32, "m2po", 0).overrides(400, base)


def test_table_mean_and_std_over_seeds():
    def result(seed: int, acc: float, m2: float | None) -> CellResult:
        curve = [(0, 0.1), (10, acc / 2), (20, acc)]  # the initial point is not part of the mean over training
        return CellResult(Cell(4, "ppo_clip" if m2 is None else "m2po", seed), acc, acc - 0.1, curve,
                          0.1 * (seed + 1), m2, 0.01, 60.0, sampled_curve=[(0, 0.1), (20, acc - 0.1)],
                          ratio_max=2.0 + seed, ess_mean=0.9 - seed / 10, ess_min=0.8 - seed / 10)

    md = table([result(0, 0.5, None), result(1, 0.7, None), result(0, 0.2, 0.3), result(1, 0.4, 0.5)])
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.strip("|").split("|")] for r in md.splitlines()[2:]}
    assert rows["ppo_clip"][3] == "0.600 ± 0.141"  # stdev of (0.5, 0.7)
    assert rows["ppo_clip"][4] == "0.500 ± 0.141"  # sampled avg@k: (0.4, 0.6)
    assert rows["ppo_clip"][5] == "0.450 ± 0.106"  # means over training (0.375, 0.525)
    assert rows["ppo_clip"][6] == "0.500 ± 0.141"  # sampled means over training: the same points after 0
    assert rows["ppo_clip"][8] == "—"  # M2 is M2PO's own statistic
    assert rows["m2po"][3] == "0.300 ± 0.141"
    assert rows["m2po"][7] == "0.1500" and rows["m2po"][8] == "4.00e-01"
    assert rows["m2po"][10] == "3" and rows["m2po"][11] == "0.850 (0.700)"  # max over seeds; mean (lowest)


def test_the_plot_averages_seeds_whose_evals_landed_on_different_updates():
    """Evals run on the newest version when due: one seed is evaluated at 40, another at 41. Every point of
    both stays in the plot (interpolated within each seed's range), not only the updates both share."""
    a = [(0, 0.3), (40, 0.5), (80, 0.9)]
    b = [(0, 0.3), (41, 0.7), (80, 1.0)]
    steps, mean, lo, hi = seed_band([a, b])
    assert steps == [0, 40, 41, 80]
    at = dict(zip(steps, zip(mean, lo, hi)))
    assert at[0] == (0.3, 0.3, 0.3)
    assert at[80] == (0.95, 0.9, 1.0)
    b40 = 0.3 + (0.7 - 0.3) * 40 / 41  # seed b between its own evals at 0 and 41
    assert at[40] == pytest.approx(((0.5 + b40) / 2, min(0.5, b40), max(0.5, b40)))
    # a curve that ends earlier (a cut run) covers only its own range
    steps, mean, _, _ = seed_band([a, [(0, 0.3), (41, 0.7)]])
    assert dict(zip(steps, mean))[80] == 0.9
