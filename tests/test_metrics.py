"""MetricsHub: the run directory's JSONL, the Prometheus endpoint, TensorBoard, W&B offline, the Ray actor."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.config import MetricsConfig
from services.metrics import STALENESS_BUCKETS, MetricsHub, buffer_metrics, metrics_logger, prometheus_name
from tests.metrics_synth import BUFFER_NAMES, LEARNER_NAMES, ROLLOUT_NAMES, WORKERS, feed_run

NO_TB = MetricsConfig(tensorboard=False)


def read_jsonl(path: Path) -> list[dict]:
    def no_nan(token: str) -> float:
        raise AssertionError(f"{path.name} holds {token}: browsers' JSON.parse rejects it")

    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def scrape(hub: MetricsHub) -> dict[tuple[str, tuple], float]:
    """{(sample name, labels other than run): value}; every sample must carry run=<run dir name>."""
    text = urllib.request.urlopen(hub.prometheus_url(), timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            assert labels.pop("run") == hub.run_dir.name, s
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


@pytest.fixture
def hub(tmp_path: Path):
    h = MetricsHub(tmp_path / "run", NO_TB)
    # A step's record is written when the next step reports or at close, never because the test process was
    # descheduled past the quiet window between two calls of one step (the test of that window sets its own).
    h.merge_window_s = 3600
    yield h
    h.close()


def test_prometheus_names_follow_the_contract() -> None:
    assert prometheus_name("staleness/mean") == "staleflow_staleness_mean"
    assert prometheus_name("buffer/drops/too-stale") == "staleflow_buffer_drops_too_stale"


def test_learner_records_merge_latest_buffer_and_eval_values(hub: MetricsHub) -> None:
    hub.log("buffer", 7, {"buffer/depth": 3, "buffer/drops/too_stale": 1})
    hub.log("learner", 1, {"staleness/mean": 0.5, "staleness/hist": {0: 3, 1: 1}})
    hub.log("eval", 1, {"eval/accuracy": 0.25})
    hub.log("buffer", 8, {"buffer/depth": 5})
    hub.log("learner", 2, {"staleness/mean": 1.0})
    hub.log("rollout/w0", 11, {"rollout/version_lag": 2})
    hub.log("learner", 2, {"weights/publish_s": 0.1})  # another caller, same step: the same record
    hub.close()

    first, second = read_jsonl(hub.run_dir / "metrics.jsonl")
    assert second["weights/publish_s"] == 0.1 and second["staleness/mean"] == 1.0
    assert (first["step"], second["step"]) == (1, 2)
    assert first["buffer/depth"] == 3 and "eval/accuracy" not in first
    assert first["staleness/hist"] == {"0": 3, "1": 1}
    assert second["buffer/depth"] == 5 and second["buffer/drops/too_stale"] == 1
    assert second["eval/accuracy"] == 0.25 and second["time"] >= first["time"]
    assert read_jsonl(hub.run_dir / "eval.jsonl") == [
        {"step": 1, "time": pytest.approx(first["time"], abs=60), "eval/accuracy": 0.25}
    ]
    (rollout,) = read_jsonl(hub.run_dir / "rollout.jsonl")
    assert rollout["worker"] == "w0" and rollout["step"] == 11 and rollout["rollout/version_lag"] == 2


def test_a_step_is_written_once_it_is_quiet_without_waiting_for_the_next(hub: MetricsHub) -> None:
    hub.log("learner", 1, {"loss/value": 0.5})
    assert (hub.run_dir / "metrics.jsonl").read_text() == ""  # still open to merges (the window: an hour)
    hub.merge_window_s = 0.5  # now quiet for longer than the window: the flusher writes it
    deadline = time.monotonic() + 300
    while not (hub.run_dir / "metrics.jsonl").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r["loss/value"] for r in read_jsonl(hub.run_dir / "metrics.jsonl")] == [0.5]


def test_non_finite_values_become_null_and_numpy_scalars_numbers(hub: MetricsHub) -> None:
    np = pytest.importorskip("numpy")
    hub.log("learner", 1, {"loss/value": float("nan"), "ratio/max": float("inf"), "kl/k3": np.float32(0.5),
                           "advantage/zero_groups": np.int64(2)})
    exported = scrape(hub)
    hub.close()
    (rec,) = read_jsonl(hub.run_dir / "metrics.jsonl")
    assert rec["loss/value"] is None and rec["ratio/max"] is None
    assert rec["kl/k3"] == 0.5 and rec["advantage/zero_groups"] == 2
    assert exported[("staleflow_kl_k3", ())] == 0.5
    assert ("staleflow_loss_value", ()) not in exported  # no NaN gauge: the last good value or nothing


def test_bad_input_is_a_clear_error(hub: MetricsHub) -> None:
    with pytest.raises(ValueError, match="unknown metrics source"):
        hub.log("trainer", 1, {"loss/value": 1.0})
    with pytest.raises(ValueError, match="unknown metrics source"):
        metrics_logger(hub, "rollout/")
    with pytest.raises(TypeError, match="metrics from learner"):
        hub.log("learner", 1, {"loss/value": object()})
    assert (hub.run_dir / "metrics.jsonl").read_text() == ""


def test_prometheus_endpoint_exports_every_series(hub: MetricsHub) -> None:
    hists: list[dict[int, int]] = []
    original = hub.log

    def spy(source, step, values, wall_time=None):
        if "staleness/hist" in values:
            hists.append(values["staleness/hist"])
        original(source, step, values, wall_time)

    hub.log = spy  # type: ignore[method-assign]
    feed_run(hub, steps=12)
    exported = scrape(hub)
    names = {name for name, _ in exported}
    for n in LEARNER_NAMES + BUFFER_NAMES:
        if n != "staleness/hist":
            assert prometheus_name(n) in names, n
    for n in ROLLOUT_NAMES:
        for w in WORKERS:
            assert (prometheus_name(n), (("worker", w),)) in exported, (n, w)
    hub.close()  # writes the last step's record
    last = read_jsonl(hub.run_dir / "metrics.jsonl")[-1]
    assert exported[("staleflow_staleness_mean", ())] == pytest.approx(last["staleness/mean"])
    assert exported[("staleflow_learner_step", ())] == 12
    # The histogram accumulates every step's counts: bucket le=b holds all samples with staleness <= b.
    for b in STALENESS_BUCKETS:
        expected = sum(n for h in hists for s, n in h.items() if s <= b)
        assert exported[("staleflow_staleness_hist_bucket", (("le", f"{float(b)}"),))] == expected
    total = sum(n for h in hists for n in h.values())
    assert exported[("staleflow_staleness_hist_count", ())] == total
    assert exported[("staleflow_staleness_hist_sum", ())] == sum(s * n for h in hists for s, n in h.items())


def test_close_frees_the_port_and_is_idempotent(tmp_path: Path) -> None:
    h = MetricsHub(tmp_path / "run", NO_TB)
    port = int(h.prometheus_url().rsplit(":", 1)[1].split("/")[0])
    h.log("learner", 1, {"staleness/mean": 1.0})
    h.close()
    h.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError, match="closed"):
        h.log("learner", 2, {"staleness/mean": 1.0})
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_a_fixed_port_is_bound_and_reported(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = MetricsHub(tmp_path / "run", MetricsConfig(tensorboard=False, prometheus_port=port))
    try:
        assert h.prometheus_url() == f"http://127.0.0.1:{port}/metrics"
        assert scrape(h) == {}
    finally:
        h.close()


def test_tensorboard_events_hold_scalars_and_the_staleness_histogram(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = MetricsHub(tmp_path / "run", MetricsConfig())
    feed_run(h, steps=6)
    h.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("staleness/mean")] == list(range(1, 7))
    assert "rollout/version_lag/w1" in tags["scalars"] and "buffer/depth" in tags["scalars"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in records])
    hist = acc.Histograms("staleness/hist")
    assert [e.step for e in hist] == list(range(1, 7))
    assert hist[-1].histogram_value.num == sum(records[-1]["staleness/hist"].values())


def test_wandb_offline_writes_a_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb is the optional 'wandb' extra and is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    h = MetricsHub(tmp_path / "run", MetricsConfig(tensorboard=False, wandb=True, wandb_mode="offline"))
    feed_run(h, steps=3)
    h.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


@pytest.mark.slow
def test_hub_as_a_ray_actor_takes_metrics_from_a_logger(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()  # another module's Ray session is reused, never shut down here
    if started:
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo}})
    try:
        actor = ray.remote(MetricsHub).remote(str(tmp_path / "run"), NO_TB)
        learner = metrics_logger(actor, "learner")
        worker = metrics_logger(actor, "rollout/w3")
        for step in range(1, 4):
            worker(step, {"rollout/version_lag": step - 1})
            learner(step, {"staleness/mean": step / 2, "staleness/hist": {0: 2, 1: step}})
        url = ray.get(actor.prometheus_url.remote())  # actor calls run in order: all logs are in
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'staleflow_rollout_version_lag{run="run",worker="w3"} 2.0' in text
        ray.get(actor.close.remote())
    finally:
        if started:
            ray.shutdown()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["staleness/mean"] for r in records] == [0.5, 1.0, 1.5]
    assert not math.isnan(records[0]["time"])


def test_list_histograms_and_real_buffer_stats_reach_every_sink(hub: MetricsHub, buffer_factory) -> None:
    buf = buffer_factory()
    stats = buf.stats()
    values = buffer_metrics(stats)
    assert values["buffer/depth"] == stats.depth and values["buffer/dead_letters"] == stats.dead_letter_depth
    assert {k for k in values if k.startswith("buffer/drops/")} == {f"buffer/drops/{r}" for r in stats.drops}
    hub.log("buffer", 1, values)
    hub.log("learner", 1, {"staleness/hist": [3, 0, 2]})  # the learner's form: counts by staleness index
    exported = scrape(hub)
    hub.close()
    (rec,) = read_jsonl(hub.run_dir / "metrics.jsonl")
    assert rec["staleness/hist"] == {"0": 3, "2": 2} and rec["buffer/depth"] == stats.depth
    assert exported[("staleflow_staleness_hist_bucket", (("le", "1.0"),))] == 3
    assert exported[("staleflow_staleness_hist_count", ())] == 5
    assert exported[("staleflow_buffer_depth", ())] == stats.depth
