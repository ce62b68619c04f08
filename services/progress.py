"""The live terminal display of a training run (rich): a progress bar over updates and one line of the numbers
a user of asynchronous RL watches: reward, held-out accuracy, staleness, the trust region and both sides'
throughput."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# (label, metric name, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("version", "policy/version", "{:.0f}"),
    ("reward", "reward/mean", "{:.3f}"),
    ("held-out acc", "eval/accuracy", "{:.3f}"),
    ("avg@k", "eval/avg_at_k", "{:.3f}"),
    ("stale mean", "staleness/mean", "{:.2f}"),
    ("stale max", "staleness/max", "{:.0f}"),
    ("masked", "loss/masked_fraction", "{:.4f}"),
    ("M2 before", "m2po/m2_before", "{:.4f}"),
    ("ratio max", "ratio/max", "{:.2f}"),
    ("learner tok/s", "throughput/train_tokens_per_s", "{:.0f}"),
    ("rollout tok/s", "rollout/tokens_per_s", "{:.0f}"),
    ("buffer", "buffer/depth", "{:.0f}"),
]


def _fmt(values: dict[str, Any], name: str, fmt: str) -> str:
    v = values.get(name)
    return "–" if not isinstance(v, (int, float)) else fmt.format(v)


class TrainDisplay:
    """`with TrainDisplay(total) as d: d.update(step, latest_values)`; quiet=True prints nothing (tests, CI)."""

    def __init__(self, total_steps: int, start_step: int = 0, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("updates", total=total_steps, completed=start_step)
        self.values: dict[str, Any] = {}
        self.live = Live(self._render(), refresh_per_second=2, transient=False) if not quiet else None

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False)
        for label, _, _ in COLUMNS:
            table.add_column(label, justify="right")
        table.add_row(*(_fmt(self.values, name, fmt) for _, name, fmt in COLUMNS))
        return Group(self.progress, table)

    def update(self, step: int, values: dict[str, Any]) -> None:
        self.values.update({k: v for k, v in values.items() if v is not None})
        self.progress.update(self.task, completed=step)
        if self.live is not None:
            self.live.update(self._render())

    def __enter__(self) -> TrainDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
