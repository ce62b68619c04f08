"""The `staleflow` command line. Each command is a thin shell over one function elsewhere, imported lazily
so that `staleflow --help` stays fast and a command's heavy deps (vLLM, DeepSpeed) load only when used."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from services.config import ConfigError, dump_config, load_config

app = typer.Typer(
    help="staleflow: asynchronous RL for LLMs that keeps learning on stale data (M2PO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
buffer_app = typer.Typer(help="Inspect a running staleness buffer.", no_args_is_help=True)
experiment_app = typer.Typer(help="Reproducible experiments.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(buffer_app, name="buffer")
app.add_typer(experiment_app, name="experiment")

err = Console(stderr=True, soft_wrap=True)
ARGS = typer.Argument(None, help="Config files (*.yaml) and dotted overrides (key=value), in order.")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are config files (*.yaml) or dotted overrides (k=v)."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def resolve(args: list[str] | None):
    files, overrides = split_args(args or [])
    try:
        return load_config(files, overrides)
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis unreachable or refusing the password: one line naming the address (never the password), exit 1."""
    from buffer.server import RedisUnavailable

    try:
        yield
    except RedisUnavailable as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


@config_app.command("show")
def config_show(args: Optional[list[str]] = ARGS) -> None:
    """Print the resolved config (files merged left to right, then overrides)."""
    sys.stdout.write(dump_config(resolve(args)))


@app.command()
def train(
    args: Optional[list[str]] = ARGS,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this run directory."),
) -> None:
    """Train: with no arguments, the CPU demo (tiny model, M2PO, arithmetic, bounded staleness)."""
    from services.train import run_train

    if resume is not None:  # the run's saved config, then any overrides (e.g. learner.total_steps=500)
        args = [str(resume / "config.yaml"), *(args or [])]
    with redis_errors():
        code = run_train(resolve(args), resume=resume)
    raise typer.Exit(code)


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., "--model", help="A local HF model folder."),
    task: str = typer.Option("arithmetic", "--task", help="Task name or package.module:function."),
    n: int = typer.Option(1, "--n", help="Samples per prompt; prints avg@n (greedy when n=1)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON result here."),
    args: Optional[list[str]] = ARGS,
) -> None:
    """Held-out accuracy of a model on a task (pass@1 averaged over n samples)."""
    from rollout_worker.evaluate import run_eval

    cfg = resolve([*(args or []), f"task.name={task}"])
    result = run_eval(model, cfg.task, cfg.rollout, n=n, out=out)
    typer.echo(result)


@model_app.command("build-tiny")
def build_tiny(
    out: Path = typer.Option(Path(".cache/staleflow/tiny-model"), "--out"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching build is cached."),
    task: str = typer.Option("arithmetic", "--task", help="The task its warm start teaches: arithmetic or "
                             "long_addition."),
    digits: int = typer.Option(3, "--digits", help="long_addition: digits of each operand."),
    hidden: int = typer.Option(128, "--hidden", help="The model's width: 128 (the demo's) or 256."),
) -> None:
    """Build (or reuse) the deterministic tiny Qwen2 model for CPU runs."""
    from rollout_worker.tiny_model import ensure_tiny_model, warm_start_for

    if hidden not in (128, 256):
        raise typer.BadParameter("128 or 256", param_hint="--hidden")
    typer.echo(ensure_tiny_model(out, seed=seed, force=force, warm_start=warm_start_for(task, digits, hidden)))


@app.command()
def dashboard(
    runs: Optional[list[Path]] = typer.Argument(None, help="Run directories (or a folder of runs)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(9266, "--port"),
) -> None:
    """Serve the staleness dashboard for live and finished runs."""
    from services.dashboard import serve

    serve(runs or [Path("runs")], host=host, port=port)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories to overlay."),
    out: Path = typer.Option(Path("staleflow.png"), "-o", "--out"),
) -> None:
    """The dashboard's panels as one static figure."""
    from services.plots import plot_runs

    typer.echo(plot_runs(runs, out))


@buffer_app.command("stats")
def buffer_stats(args: Optional[list[str]] = ARGS) -> None:
    """Depth, oldest age, staleness histogram, drops and producer rates of the configured buffer."""
    from services.launcher import buffer_stats_json

    with redis_errors():
        typer.echo(buffer_stats_json(resolve(args)))


@experiment_app.command("demo")
def experiment_demo(
    seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Tiny-model seeds (model.tiny_seed)."),
    capabilities: str = typer.Option("default,avx2,avx512", "--capabilities",
                                     help="ATEN_CPU_CAPABILITY values: the CPU kernels to imitate."),
    out: Path = typer.Option(Path("runs/experiment-demo"), "-o", "--out"),
    args: Optional[list[str]] = ARGS,
) -> None:
    """The demo over tiny-model seeds x CPU dispatch settings: warm start, final accuracy, wall time."""
    from services.experiment_demo import run_demo_table

    resolve(args)  # a bad override fails here, once, not in every cell
    run_demo_table([int(v) for v in seeds.split(",")], capabilities.split(","), list(args or []), out,
                   echo=typer.echo)


@experiment_app.command("staleness")
def experiment_staleness(
    s: str = typer.Option("0,4,16,64", "--s", help="Fixed staleness values (comma-separated)."),
    losses: str = typer.Option("ppo_clip,no_trust_region,m2po", "--losses"),
    seeds: str = typer.Option("0,1,2", "--seeds"),
    updates: int = typer.Option(200, "--updates", help="Updates per run (same for every cell)."),
    out: Path = typer.Option(Path("runs/experiment-staleness"), "-o", "--out"),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: table and plot of finished cells."),
    cell_timeout: float = typer.Option(1800, "--cell-timeout",
                                       help="Stop a run after this many seconds (it is left out; the grid goes on)."),
    args: Optional[list[str]] = ARGS,
) -> None:
    """Train one run per (s, loss, seed) in fixed-staleness mode; write table.md and accuracy.png."""
    from services.experiment import run_staleness

    files, overrides = split_args(args or [])
    base = [*(files or ["configs/tiny-cpu.yaml"]), *overrides]
    resolve(base)  # a bad override fails here, once, not in every cell
    table, png = run_staleness([int(v) for v in s.split(",")], losses.split(","),
                               [int(v) for v in seeds.split(",")], updates, base, out, echo=typer.echo,
                               train=not report_only, cell_timeout_s=cell_timeout)
    typer.echo(table.read_text())
    typer.echo(f"table: {table}\nplot: {png}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
