"""`staleflow experiment demo`: how a finished cell's run directory becomes a table row (the runs themselves are
real `staleflow train` runs, exercised by the e2e tests; a whole cell takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.experiment_demo import TARGET, run_demo_cell, table


def _finished_cell(out: Path, name: str, evals: dict[int, float], final: tuple[int, float]) -> None:
    run = out / "runs" / name
    run.mkdir(parents=True)
    (run / "eval.jsonl").write_text("".join(json.dumps({"step": v, "eval/accuracy": a}) + "\n" for v, a in evals.items()))
    (run / "eval.json").write_text(json.dumps({"version": final[0], "accuracy": final[1]}))
    (run / "experiment.json").write_text(json.dumps({"build_s": 100.0, "train_s": 140.0, "warm_start": 0.505}))


def test_a_finished_cell_is_read_not_rerun(tmp_path: Path) -> None:
    # v0 is the warm start (not a trained eval); the final eval.json is the last point of the curve
    _finished_cell(tmp_path, "seed3-avx2", {0: 0.5, 20: 0.75, 40: 0.81, 60: 0.79, 80: 0.86}, (100, 0.9))
    cell = run_demo_cell(3, "avx2", [], tmp_path)  # would need minutes (and fail here) if it ran anything
    assert cell.warm_start == 0.505
    assert cell.final == pytest.approx((0.79 + 0.86 + 0.9) / 3)
    assert cell.first_at_target == 40
    assert cell.build_s == 100.0 and cell.wall_s == 240.0


def test_a_cell_that_never_reaches_the_target_says_so(tmp_path: Path) -> None:
    _finished_cell(tmp_path, "seed0-default", {0: 0.3, 20: 0.5, 40: 0.6}, (60, 0.65))
    cell = run_demo_cell(0, "default", [], tmp_path)
    assert cell.first_at_target is None and cell.final < TARGET
    text = table([cell])
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["0", "default", "0.505", f"{cell.final:.3f}", "never",
                                                               "100", "4.0"]
    assert f"0/1 cells reach >= {TARGET}" in text
