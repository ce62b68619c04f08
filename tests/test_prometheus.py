"""Prometheus and Grafana over the metrics hub.

- The Grafana dashboard (deploy/grafana/dashboards/staleflow.json) only references series the hub exports.
- A REAL Prometheus server (Debian package `prometheus`) scrapes a MetricsHub fed a short synthetic run; its
  HTTP API then has the staleness, buffer and M2PO series with the logged values, and every query of the
  Grafana dashboard returns data.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.config import MetricsConfig
from services.metrics import MetricsHub
from tests.metrics_synth import feed_run
from tests.system_tools import require_binary

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy/grafana/dashboards/staleflow.json"
# Grafana's own variables, as Grafana would expand them for a short time range.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m", "$run": ".+"}
PROMQL_WORDS = {"sum", "by", "increase", "rate", "max", "min", "avg", "without", "le", "run", "worker"}


def grafana_exprs() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the Grafana dashboard has no queries"
    return exprs


def expand(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, __name__ regexes) a PromQL expression selects."""
    regexes = set(re.findall(r'__name__\s*=~\s*"([^"]+)"', expr))
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    names = {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges) if w not in PROMQL_WORDS}
    names.discard("__name__")
    return names, regexes


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsHub]:
    h = MetricsHub(tmp_path_factory.mktemp("prom") / "prom-run", MetricsConfig(tensorboard=False))
    feed_run(h, steps=10)
    yield h
    h.close()


def exported_names(hub: MetricsHub) -> set[str]:
    text = urllib.request.urlopen(hub.prometheus_url(), timeout=10).read().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_grafana_references_only_exported_series(hub: MetricsHub) -> None:
    exported = exported_names(hub)
    for expr in grafana_exprs():
        names, regexes = referenced(expand(expr))
        assert names or regexes, expr
        for name in names:
            assert name in exported, f"Grafana queries {name} ({expr}); the hub does not export it"
        for rx in regexes:
            assert any(re.fullmatch(rx, n) for n in exported), f"{rx} matches no exported series"


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/staleflow.yaml").read_text())
    dash = json.loads(GRAFANA.read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    used = {p["datasource"]["uid"] for p in dash["panels"]} | {
        t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert used <= uids
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_scrapes_the_runs_metrics_hub() -> None:
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "staleflow"
    assert job["static_configs"][0]["targets"] == ["staleflow:9400"]  # the compose service running the driver
    promtool = require_binary("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real prometheus server as a child process on a free loopback port, scraping `target` every second."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "staleflow", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("prometheus did not become ready")

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, ok, timeout: float = 600) -> list[dict]:  # a deadline, not a window
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql}: still {result}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def value(result: list[dict], **labels: str) -> float:
    for series in result:
        if all(series["metric"].get(k) == v for k, v in labels.items()):
            return float(series["value"][1])
    raise KeyError(f"no series with {labels} in {result}")


@pytest.mark.slow
def test_real_prometheus_scrapes_the_hub(tmp_path: Path) -> None:
    binary = require_binary("prometheus", "prometheus")
    hub = MetricsHub(tmp_path / "scraped-run", MetricsConfig(tensorboard=False))
    target = hub.prometheus_url().removeprefix("http://").removesuffix("/metrics")
    prom = Prometheus(binary, target, tmp_path)
    try:
        prom.wait_ready()
        feed_run(hub, steps=10, seed=1)
        first = prom.wait_for("staleflow_learner_step", lambda r: r and value(r) == 10)
        assert first[0]["metric"]["run"] == "scraped-run" and first[0]["metric"]["job"] == "staleflow"
        # A second stretch of the run, so counters grow between scrapes (Grafana's increase() needs two).
        feed_run(hub, steps=10, seed=2)
        deadline = time.monotonic() + 300  # the last step's record is written once the step is quiet
        while len(lines := (hub.run_dir / "metrics.jsonl").read_text().splitlines()) < 20:
            assert time.monotonic() < deadline, f"{len(lines)} learner records, expected 20"
            time.sleep(0.2)
        lines = [json.loads(line) for line in lines]
        total = sum(n for r in lines for n in r["staleness/hist"].values())
        prom.wait_for("staleflow_staleness_hist_count", lambda r: r and value(r) == total)
        last = lines[-1]

        # Staleness, buffer and M2PO series exist in Prometheus with the values the run logged.
        for name, prom_name in [("staleness/mean", "staleflow_staleness_mean"),
                                ("staleness/max", "staleflow_staleness_max"),
                                ("buffer/depth", "staleflow_buffer_depth"),
                                ("buffer/oldest_age_s", "staleflow_buffer_oldest_age_s"),
                                ("m2po/m2_before", "staleflow_m2po_m2_before"),
                                ("m2po/m2_after", "staleflow_m2po_m2_after"),
                                ("loss/masked_fraction", "staleflow_loss_masked_fraction")]:
            assert value(prom.query(prom_name)) == pytest.approx(last[name]), name
        lag = prom.query("staleflow_rollout_version_lag")
        assert {s["metric"]["worker"] for s in lag} == {"w0", "w1"}
        inf = value(prom.query('staleflow_staleness_hist_bucket{le="+Inf"}'))
        zero = value(prom.query('staleflow_staleness_hist_bucket{le="0.0"}'))
        assert inf == total and zero == sum(r["staleness/hist"].get("0", 0) for r in lines)

        # Every Grafana query has data to draw.
        for expr in grafana_exprs():
            result = prom.query(expand(expr))
            assert result, f"Grafana query returns nothing: {expr}"
            assert all(math.isfinite(float(s["value"][1])) for s in result), expr
    finally:
        prom.stop()
        hub.close()
