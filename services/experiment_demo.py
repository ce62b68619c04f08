"""`staleflow experiment demo`: does `make demo` learn on every CPU? The demo run over tiny-model seeds x CPU
dispatch settings.

CPUs round floats differently (Intel vs AMD, AVX-512 vs AVX2 kernels), so the same recipe builds a different
warm start on each, and the RL that follows starts elsewhere. PyTorch lets one machine imitate the others:
`ATEN_CPU_CAPABILITY=default|avx2|avx512` picks the kernels it dispatches to. Each cell is one real
`staleflow train` (the demo's config plus any overrides) in a subprocess with that variable set, building its
own tiny model (`model.tiny_seed`) first, so the cell's wall time is what `make demo` costs on a fresh machine
of that kind. The table: the warm start (held-out greedy accuracy of the built model), the final accuracy
(mean of the last 3 evals, the demo's target being >= 0.8), the first version that reached 0.8, and wall time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.metrics import FILES
from services.plots import _read_jsonl

REPO = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")
TARGET = 0.8
LAST_EVALS = 3  # the final accuracy is the mean of this many last evals (one eval is noisy)


@dataclass
class DemoCell:
    seed: int
    capability: str
    warm_start: float
    final: float  # mean of the last LAST_EVALS evals
    first_at_target: int | None  # first version whose eval reached TARGET
    build_s: float  # building the tiny model (its supervised warm start), part of wall_s
    wall_s: float  # model build + `staleflow train` (what `make demo` takes on a fresh machine)

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.capability}"


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(version, held-out accuracy) of every eval of a run, version 0 (the warm start) included."""
    evals = {int(e["step"]): float(e["eval/accuracy"]) for e in _read_jsonl(run_dir / FILES["eval"])
             if "eval/accuracy" in e}
    final = run_dir / "eval.json"
    if final.is_file():
        result = json.loads(final.read_text())
        if "version" in result:
            evals[int(result["version"])] = float(result["accuracy"])
    return sorted(evals.items())


def _run(cmd: list[str], env: dict[str, str], log_path: Path, what: str) -> float:
    t0 = time.time()
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{what} exited {code}; see {log_path}")
    return time.time() - t0


def run_demo_cell(seed: int, capability: str, base_args: list[str], out: Path) -> DemoCell:
    """Build the cell's tiny model, evaluate it (the warm start), train on it: what `make demo` does on a fresh
    machine of that kind, in three timed steps (the eval is a separate process here, so it is not in wall_s)."""
    name = f"seed{seed}-{capability}"
    run_dir, model_dir = out / "runs" / name, out / "models" / name
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    meta = run_dir / "experiment.json"
    if not meta.is_file():  # a finished cell is reused: an interrupted table continues where it stopped
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "STALEFLOW_QUIET": "1"}
        cli = [sys.executable, "-m", "services.cli"]
        log_path.write_text("")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        build_s = _run([*cli, "model", "build-tiny", "--seed", str(seed), "--out", str(model_dir)], env, log_path,
                       f"cell {name}: the model build")
        warm = out / "warm_start" / f"{name}.json"
        _run([*cli, "eval", "--model", str(model_dir), "--out", str(warm), *base_args], env, log_path,
             f"cell {name}: the warm start's eval")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train_s = _run([*cli, "train", *base_args, f"model.tiny_seed={seed}", f"model.tiny_dir={model_dir}",
                        f"runs_dir={out / 'runs'}", f"name={name}", "metrics.dashboard=false"], env, log_path,
                       f"cell {name}: staleflow train")
        meta.write_text(json.dumps({"build_s": build_s, "train_s": train_s,
                                    "warm_start": json.loads(warm.read_text())["accuracy"]}))
    info = json.loads(meta.read_text())
    points = [(v, acc) for v, acc in curve(run_dir) if v > 0]
    last = [acc for _, acc in points][-LAST_EVALS:]
    return DemoCell(
        seed=seed,
        capability=capability,
        warm_start=float(info["warm_start"]),
        final=sum(last) / len(last) if last else math.nan,
        first_at_target=next((v for v, acc in points if acc >= TARGET), None),
        build_s=float(info["build_s"]),
        wall_s=float(info["build_s"] + info["train_s"]),
    )


def table(cells: list[DemoCell]) -> str:
    rows = [
        f"| seed | ATEN_CPU_CAPABILITY | warm start (v0) | final (mean of last {LAST_EVALS} evals) "
        f"| first version >= {TARGET} | model build s | wall min (build + train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        rows.append(f"| {c.seed} | {c.capability} | {c.warm_start:.3f} | {c.final:.3f} | "
                    f"{c.first_at_target if c.first_at_target is not None else 'never'} | {c.build_s:.0f} "
                    f"| {c.wall_s / 60:.1f} |")
    ok = [c for c in cells if c.final >= TARGET]
    rows.append("")
    rows.append(f"{len(ok)}/{len(cells)} cells reach >= {TARGET}; slowest {max(c.wall_s for c in cells) / 60:.1f} min; "
                f"warm starts {min(c.warm_start for c in cells):.3f}-{max(c.warm_start for c in cells):.3f}")
    return "\n".join(rows) + "\n"


def run_demo_table(seeds: list[int], capabilities: list[str], base_args: list[str], out: Path,
                   echo=print) -> Path:
    out = out.resolve()
    cells = []
    for i, (seed, cap) in enumerate([(s, c) for s in seeds for c in capabilities], 1):
        echo(f"[{i}/{len(seeds) * len(capabilities)}] seed {seed}, ATEN_CPU_CAPABILITY={cap}")
        cell = run_demo_cell(seed, cap, base_args, out)
        echo(f"    warm start {cell.warm_start:.3f} -> final {cell.final:.3f} in {cell.wall_s / 60:.1f} min")
        cells.append(cell)
    text = table(cells)
    command = "staleflow experiment demo " + " ".join(
        [f"--seeds {','.join(map(str, seeds))}", f"--capabilities {','.join(capabilities)}", *base_args])
    path = out / "table.md"
    path.write_text(f"`{command}`\n\n{text}")
    (out / "results.json").write_text(json.dumps([asdict(c) for c in cells], indent=1))
    echo(text)
    return path
