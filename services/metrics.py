"""The metrics hub: every service's numbers go through here into the run directory and to Prometheus.

Services never write metrics themselves: they get a callable (see `metrics_logger`) that ends in
`MetricsHub.log(source, step, values)`. The hub runs as one Ray actor (`ray.remote(MetricsHub)`) or
in-process.

Run directory (read back by the dashboard and `staleflow plot`):
    metrics.jsonl   one object per learner step:
                    {"step", "time", <learner names>, <latest buffer and eval names>}
    rollout.jsonl   one object per rollout batch: {"step", "time", "worker", <rollout names>}
    eval.jsonl      one object per evaluation: {"step", "time", <eval names>}
    tb/             TensorBoard events (always)
    wandb/          Weights & Biases files when metrics.wandb (offline mode needs no network)

Prometheus: "staleflow_" + name with every non [a-zA-Z0-9_] character as "_" (staleness/mean ->
staleflow_staleness_mean); every series carries `run` (the run dir's name), rollout series also `worker`;
staleness/hist ({staleness: count} per step) accumulates into the histogram staleflow_staleness_hist
(buckets le=0,1,2,...), which Grafana draws as a heatmap. Lines are flushed as they are written so a live
dashboard sees them at once (a learner step's record once the step is complete); NaN/inf become null (JSON
has no NaN).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from buffer.stats import BufferStats
from services.config import MetricsConfig

log = logging.getLogger(__name__)

PREFIX = "staleflow_"
# Upper bounds of the staleness histogram buckets (in policy versions); +Inf is added by Prometheus.
STALENESS_BUCKETS: tuple[int, ...] = (*range(0, 17), 24, 32, 48, 64, 128, 256)
HIST_SUFFIX = "/hist"
FILES = {"learner": "metrics.jsonl", "rollout": "rollout.jsonl", "eval": "eval.jsonl"}
# Several callers log the same learner step (the learner's report, the weight publisher): they are merged into
# one record, written when the next step arrives or when the step has been quiet this long.
MERGE_WINDOW_S = 2.0

Value = float | int | list | dict
MetricsLogger = Callable[[int, Mapping[str, Value]], None]


def prometheus_name(name: str) -> str:
    """staleness/mean -> staleflow_staleness_mean (Prometheus allows [a-zA-Z0-9_:] only)."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _source_kind(source: str) -> tuple[str, str | None]:
    if source in ("learner", "buffer", "eval"):
        return source, None
    if source.startswith("rollout/") and len(source) > len("rollout/"):
        return "rollout", source[len("rollout/") :]
    raise ValueError(f"unknown metrics source {source!r}: expected learner, buffer, eval or rollout/<worker>")


def _scalar(value: Any) -> float | int | None:
    """A JSON-safe number from a Python/numpy/torch scalar; None for NaN/inf (JSON has no NaN)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    f = float(value)  # numpy and 0-d torch values implement __float__
    return f if math.isfinite(f) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    return _scalar(value)


def _flatten(values: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Split values into scalars and histograms; any other dict becomes scalars name/<key>; lists stay in
    the JSONL only."""
    scalars: dict[str, float] = {}
    hists: dict[str, dict[float, float]] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            if name.endswith(HIST_SUFFIX):
                hists[name] = {float(k): float(v) for k, v in value.items()}
            else:
                for key, sub in value.items():
                    if (x := _scalar(sub)) is not None:
                        scalars[f"{name}/{key}"] = float(x)
        elif isinstance(value, (list, tuple, str)) or value is None:
            continue
        elif (x := _scalar(value)) is not None:
            scalars[name] = float(x)
    return scalars, hists


class _Collector:
    """Serves the latest value of every series at scrape time (one family per name, any label set)."""

    def __init__(self, const_labels: dict[str, str]) -> None:
        self.const_labels = const_labels  # run=<name> on every series: Grafana tells runs apart
        self.lock = threading.Lock()
        self.gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.hist_counts: dict[str, dict[float, float]] = {}  # name -> staleness -> total count so far
        self.hist_sums: dict[str, float] = {}

    def set(self, name: str, labels: dict[str, str], value: float) -> None:
        labels = {**self.const_labels, **labels}
        self.gauges.setdefault(prometheus_name(name), {})[tuple(sorted(labels.items()))] = value

    def observe(self, name: str, counts: dict[float, float]) -> None:
        acc = self.hist_counts.setdefault(prometheus_name(name), {})
        for staleness, n in counts.items():
            acc[staleness] = acc.get(staleness, 0.0) + n
        key = prometheus_name(name)
        self.hist_sums[key] = self.hist_sums.get(key, 0.0) + sum(s * n for s, n in counts.items())

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            for pname, series in sorted(self.gauges.items()):
                family = Metric(pname, f"staleflow metric {pname[len(PREFIX):]}", "gauge")
                for labels, value in series.items():
                    family.add_sample(pname, dict(labels), value)
                yield family
            for pname, acc in sorted(self.hist_counts.items()):
                buckets = [
                    (floatToGoString(b), sum(n for s, n in acc.items() if s <= b)) for b in STALENESS_BUCKETS
                ]
                buckets.append(("+Inf", sum(acc.values())))
                family = HistogramMetricFamily(
                    pname, "samples per staleness (policy versions behind) consumed by the learner",
                    labels=list(self.const_labels),
                )
                family.add_metric(list(self.const_labels.values()), buckets, self.hist_sums[pname])
                yield family


class MetricsHub:
    """Receives every service's metrics; writes the run directory, TensorBoard, W&B and serves Prometheus."""

    merge_window_s = MERGE_WINDOW_S

    def __init__(self, run_dir: Path | str, cfg: MetricsConfig | None = None) -> None:
        self.cfg = cfg or MetricsConfig()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # log() may be called from several threads when used in-process
        self._files: dict[str, TextIO] = {
            kind: open(self.run_dir / fname, "a", encoding="utf-8") for kind, fname in FILES.items()
        }
        self._latest_side: dict[str, Any] = {}  # latest buffer + eval values, merged into learner records
        self._pending: dict[str, Any] | None = None  # the current learner step's record, still open to merges
        self._pending_since = 0.0  # monotonic time of its last update
        self._closed = False
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_quiet_steps, name="metrics-flush", daemon=True)
        self._flusher.start()

        self._collector = _Collector({"run": self.run_dir.name})
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)
        self._server, self._server_thread = start_http_server(
            self.cfg.prometheus_port, addr=self.cfg.host, registry=self._registry
        )
        self._port = int(self._server.server_port)

        self._tb = self._open_tensorboard() if self.cfg.tensorboard else None
        self._wandb = self._open_wandb() if self.cfg.wandb else None

    # -- the API services call -------------------------------------------------------------------------------

    def log(
        self, source: str, step: int, values: Mapping[str, Value], wall_time: float | None = None
    ) -> None:
        """Record `values` of `source` at `step`. `wall_time` (epoch s): when the values were measured, if the
        caller knows better than the hub's clock at arrival (a Ray call may wait in the actor's queue)."""
        kind, worker = _source_kind(source)
        step = int(step)
        now = time.time() if wall_time is None else float(wall_time)
        try:
            clean = {str(k): _jsonable(v) for k, v in values.items()}
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"metrics from {source}: values must be numbers, lists or dicts of numbers ({e})"
            ) from e
        for name, value in clean.items():
            if name.endswith(HIST_SUFFIX) and isinstance(value, list):  # [n0, n1, ...]: counts by index
                clean[name] = {str(i): n for i, n in enumerate(value) if n}
        scalars, hists = _flatten(clean)
        with self._lock:
            if self._closed:
                raise RuntimeError("MetricsHub is closed")
            if kind == "learner":
                if self._pending is not None and self._pending["step"] != step:
                    self._flush_pending()
                if self._pending is None:  # buffer/eval values as they are when the step starts reporting
                    self._pending = {"step": step, "time": now, **self._latest_side}
                self._pending.update(clean)
                self._pending["time"] = max(self._pending["time"], now)
                self._pending_since = time.monotonic()
            elif kind == "rollout":
                self._write("rollout", {"step": step, "time": now, "worker": worker, **clean})
            elif kind == "eval":
                self._write("eval", {"step": step, "time": now, **clean})
            if kind in ("buffer", "eval"):
                self._latest_side.update(clean)
            self._export(kind, worker, step, scalars, hists)
            self._tensorboard(worker, step, scalars, hists)
            self._to_wandb(kind, worker, step, scalars, hists)

    def prometheus_url(self) -> str:
        host = self.cfg.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._port}/metrics"

    def run_directory(self) -> str:
        return str(self.run_dir)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._flush_pending()
            self._closed = True
            for f in self._files.values():
                f.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
            self._server.shutdown()
            self._server.server_close()

    # -- sinks -----------------------------------------------------------------------------------------------

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._write("learner", self._pending)
            self._pending = None

    def _flush_quiet_steps(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self._pending is not None and time.monotonic() - self._pending_since > self.merge_window_s:
                    self._flush_pending()

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        f = self._files[kind]
        f.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        f.flush()

    def _export(
        self, kind: str, worker: str | None, step: int, scalars: dict[str, float], hists: dict[str, dict]
    ) -> None:
        labels = {"worker": worker} if worker is not None else {}
        with self._collector.lock:
            if kind == "learner":
                self._collector.set("learner/step", {}, step)
            if kind == "rollout":
                self._collector.set("rollout/batches", labels, step)
            for name, value in scalars.items():
                self._collector.set(name, labels, value)
            for name, counts in hists.items():
                self._collector.observe(name, counts)

    def _open_tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # lazy: torch is slow to import

        return SummaryWriter(log_dir=str(self.run_dir / "tb"), flush_secs=5)

    def _tensorboard(self, worker: str | None, step: int, scalars: dict[str, float], hists: dict) -> None:
        if self._tb is None:
            return
        suffix = f"/{worker}" if worker is not None else ""
        for name, value in scalars.items():
            self._tb.add_scalar(name + suffix, value, step)
        for name, counts in hists.items():
            if counts and sum(counts.values()) > 0:
                self._tb.add_histogram_raw(name + suffix, **_raw_histogram(counts), global_step=step)

    def _open_wandb(self) -> Any:
        try:
            import wandb  # optional extra: pip install 'staleflow[wandb]'
        except ImportError as e:
            raise RuntimeError(
                "metrics.wandb=true needs the wandb extra: pip install 'staleflow[wandb]'"
            ) from e
        return wandb.init(
            project=self.cfg.wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
            mode=self.cfg.wandb_mode, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )

    def _to_wandb(
        self, kind: str, worker: str | None, step: int, scalars: dict[str, float], hists: dict
    ) -> None:
        if self._wandb is None:
            return
        import wandb

        suffix = f"/{worker}" if worker is not None else ""
        data: dict[str, Any] = {f"{k}{suffix}": v for k, v in scalars.items()}
        for name, counts in hists.items():
            if counts:
                data[name] = wandb.Histogram(np_histogram=_np_histogram(counts))
        # Sources count steps differently (learner steps vs worker batches): keep each step as a value.
        data[f"{kind}{suffix}/step"] = step
        self._wandb.log(data)


def _raw_histogram(counts: dict[float, float]) -> dict[str, Any]:
    keys = sorted(k for k, n in counts.items() if n > 0)
    num = sum(counts[k] for k in keys)
    return {
        "min": keys[0], "max": keys[-1], "num": num,
        "sum": sum(k * counts[k] for k in keys), "sum_squares": sum(k * k * counts[k] for k in keys),
        "bucket_limits": keys, "bucket_counts": [counts[k] for k in keys],
    }


def _np_histogram(counts: dict[float, float]) -> tuple[list[float], list[float]]:
    """One bin per integer staleness: edges k-0.5 .. k+0.5."""
    lo, hi = int(min(counts)), int(max(counts))
    return [counts.get(float(k), 0.0) for k in range(lo, hi + 1)], [k - 0.5 for k in range(lo, hi + 2)]


def buffer_metrics(stats: BufferStats) -> dict[str, float]:
    """The buffer's snapshot (StalenessBuffer.stats()) as the "buffer" source's metrics."""
    out = {
        "buffer/depth": stats.depth, "buffer/pending": stats.pending, "buffer/capacity": stats.capacity,
        "buffer/consumed": stats.consumed, "buffer/admitted": stats.admitted,
        "buffer/outstanding": stats.outstanding, "buffer/dead_letters": stats.dead_letter_depth,
        "buffer/learner_version": stats.learner_version,
    }
    if stats.oldest_age_s is not None:
        out["buffer/oldest_age_s"] = stats.oldest_age_s
    out.update({f"buffer/drops/{reason}": n for reason, n in stats.drops.items()})
    return {k: float(v) for k, v in out.items()}


def metrics_logger(hub: Any, source: str) -> MetricsLogger:
    """The callable a service gets: `logger(step, values)`. Works with a MetricsHub or its Ray actor handle;
    through Ray it does not wait for the hub (metrics must never slow the learner or a worker down)."""
    _source_kind(source)  # fail early on a bad source name
    remote = getattr(getattr(hub, "log", None), "remote", None)
    if remote is not None:

        def send(step: int, values: Mapping[str, Value]) -> None:
            remote(source, step, dict(values))  # fire and forget: the ObjectRef is dropped on purpose

        return send
    return lambda step, values: hub.log(source, step, values)
