"""`staleflow plot RUN [RUN ...] -o out.png`: the dashboard's panels as one static figure, runs overlaid.

Panels and series follow services.dashboard.panels exactly (same lookup order, same x axis rule), so the
figure and the live page agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from services.dashboard.panels import PANELS, Panel  # noqa: E402
from services.metrics import FILES  # noqa: E402

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
STYLES = ["-", "--", ":", "-."]
SOURCES = ("eval", "metrics", "rollout")  # lookup order of a metric name


@dataclass
class Run:
    name: str
    records: dict[str, list[dict]] = field(default_factory=dict)  # eval|metrics|rollout -> records
    t0: float = 0.0

    def names(self, source: str) -> set[str]:
        return {k for r in self.records[source] for k in r}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash or still being written
    return out


def load_run(path: Path) -> Run:
    files = {"metrics": FILES["learner"], "rollout": FILES["rollout"], "eval": FILES["eval"]}
    run = Run(path.name, {src: _read_jsonl(path / fname) for src, fname in files.items()})
    times = [r["time"] for recs in run.records.values() for r in recs
             if isinstance(r.get("time"), (int, float))]
    run.t0 = min(times, default=0.0)
    return run


def _run_dirs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a folder whose sub-directories are runs."""
    def is_run(p: Path) -> bool:
        return any((p / f).is_file() for f in FILES.values())

    out: list[Path] = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
        elif p.is_dir():
            out += sorted(c for c in p.iterdir() if c.is_dir() and is_run(c))
        else:
            raise FileNotFoundError(f"{p}: no such run directory")
    return out


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]


def panel_series(panel: Panel, run: Run, time_axis: bool) -> list[Series]:
    names = {src: run.names(src) for src in SOURCES}
    out = []
    for key in panel.keys:
        every = names["eval"] | names["metrics"] | names["rollout"]
        for name in sorted(n for n in every if n.startswith(key)) if key.endswith("/") else [key]:
            src = next((s for s in ("eval", "metrics") if name in names[s]), None)
            if src is not None:
                out.append(_series(run, src, name, None, time_axis))
            elif name in names["rollout"]:
                workers = sorted({str(r["worker"]) for r in run.records["rollout"] if name in r})
                out += [_series(run, "rollout", name, w, time_axis) for w in workers]
    return [s for s in out if s.xs]


def _series(run: Run, src: str, name: str, worker: str | None, time_axis: bool) -> Series:
    xs, ys = [], []
    for r in run.records[src]:
        if worker is not None and str(r.get("worker")) != worker:
            continue
        v, x = r.get(name), (r.get("time", 0.0) - run.t0) if time_axis else r.get("step")
        if isinstance(v, (int, float)) and isinstance(x, (int, float)) and math.isfinite(v):
            xs.append(x)
            ys.append(v)
    return Series(name + (f" [{worker}]" if worker is not None else ""), xs, ys)


def _uses_rollout(panel: Panel, runs: list[Run]) -> bool:
    for run in runs:
        learner = run.names("eval") | run.names("metrics")
        rollout = run.names("rollout")
        if any(k in rollout and k not in learner for k in panel.keys if not k.endswith("/")):
            return True
    return False


def _draw_line(ax: plt.Axes, panel: Panel, runs: list[Run]) -> bool:
    time_axis = _uses_rollout(panel, runs)
    drawn = False
    ys_all: list[float] = []
    for i, run in enumerate(runs):
        for j, s in enumerate(panel_series(panel, run, time_axis)):
            color = COLORS[i % len(COLORS)] if len(runs) > 1 else COLORS[j % len(COLORS)]
            style = STYLES[j % len(STYLES)] if len(runs) > 1 else "-"
            label = f"{run.name} · {s.label}" if len(runs) > 1 else s.label
            marker = "o" if len(s.xs) <= 12 else None  # sparse series (eval) stay visible
            ax.plot(s.xs, s.ys, style, color=color, lw=1.2, label=label, marker=marker, ms=3)
            ys_all += s.ys
            drawn = True
    ax.set_xlabel("seconds since start" if time_axis else "learner step")
    if panel.unit:
        ax.set_ylabel(panel.unit)
    if drawn:
        # Log only when the values span decades (a ratio blowing up); tick labels stay plain numbers.
        if panel.log_y and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 20:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=6, loc="best", ncol=2 if len(ax.get_lines()) > 4 else 1)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    return drawn


def _draw_heatmap(ax: plt.Axes, panel: Panel, run: Run) -> bool:
    cols = [(r["step"], {int(float(k)): v for k, v in r[panel.keys[0]].items() if v})
            for r in run.records["metrics"] if isinstance(r.get(panel.keys[0]), dict)]
    cols = [(step, h) for step, h in cols if h]
    if not cols:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        return False
    top = max(max(h) for _, h in cols)
    share = [[h.get(s, 0) / sum(h.values()) for _, h in cols] for s in range(top + 1)]
    steps = [step for step, _ in cols]
    edges = [steps[0] - 0.5] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] + 0.5]
    mesh = ax.pcolormesh(edges, [s - 0.5 for s in range(top + 2)], share, cmap="viridis",
                         norm=PowerNorm(0.5, vmin=0, vmax=1), shading="flat")
    means = [sum(s * n for s, n in h.items()) / sum(h.values()) for _, h in cols]
    ax.plot(steps, means, color="white", lw=1.2, label="mean")
    ax.figure.colorbar(mesh, ax=ax, label="share of batch", pad=0.01)
    ax.set_xlabel("learner step")
    ax.set_ylabel("staleness (versions)")
    ax.legend(fontsize=6, loc="upper left")
    return True


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Draw every panel for `runs` (run dirs or folders of runs) into `out` (format from its suffix)."""
    loaded = [load_run(p) for p in _run_dirs(list(runs))]
    if not any(any(r.records.values()) for r in loaded):
        raise ValueError(f"no metrics found in {', '.join(map(str, runs))} (expected metrics.jsonl etc.)")
    cells: list[tuple[Panel, Run | None]] = []
    for panel in PANELS:
        if panel.kind == "heatmap":
            cells += [(panel, run) for run in loaded]
        else:
            cells.append((panel, None))
    ncols = 3
    nrows = math.ceil(len(cells) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, run) in zip(axes.flat, cells):
        if run is not None:
            ax.set_title(f"{panel.title} — {run.name}", fontsize=10)
            _draw_heatmap(ax, panel, run)
        else:
            ax.set_title(panel.title, fontsize=10)
            _draw_line(ax, panel, loaded)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(cells):]:
        ax.set_visible(False)
    fig.suptitle("staleflow: " + ", ".join(r.name for r in loaded), fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
