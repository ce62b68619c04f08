"""The dashboard: its JSON API over run directories written by MetricsHub, and the page in headless Chromium.

The browser test loads the page on two finished runs, checks that every panel drew data (the page sets
data-ready="true" per panel after drawing a non-empty series) and that runs are overlaid, and saves
test-artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from services.config import MetricsConfig
from services.dashboard import start_dashboard
from services.dashboard.panels import PANELS
from services.metrics import MetricsHub
from tests.metrics_synth import feed_run
from tests.system_tools import require_binary

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
RUNS = ("m2po-tiny", "grpo-tiny")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for seed, name in enumerate(RUNS):
        hub = MetricsHub(root / name, MetricsConfig(tensorboard=False))
        feed_run(hub, steps=40, seed=seed)
        hub.close()
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture(scope="module")
def dashboard(runs_root: Path):
    url, stop = start_dashboard([runs_root], host="127.0.0.1", port=0)
    yield url
    stop()


def get(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.loads(r.read())


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_runs_and_panels_are_listed(dashboard: str, runs_root: Path) -> None:
    runs = get(dashboard + "api/runs")["runs"]
    assert sorted(r["id"] for r in runs) == sorted(RUNS)
    assert all(Path(r["path"]).parent == runs_root for r in runs)
    assert [p["id"] for p in get(dashboard + "api/panels")] == [p.id for p in PANELS]


def test_metrics_are_served_incrementally(dashboard: str, runs_root: Path) -> None:
    lines = (runs_root / RUNS[0] / "rollout.jsonl").read_text().splitlines()
    first = get(f"{dashboard}api/metrics?run={RUNS[0]}&file=rollout&offset=0")
    assert first["records"] == [json.loads(line) for line in lines] and not first["more"]
    again = get(f"{dashboard}api/metrics?run={RUNS[0]}&file=rollout&offset={first['offset']}")
    assert again["records"] == [] and again["offset"] == first["offset"]


def test_a_live_run_is_followed_line_by_line(tmp_path: Path) -> None:
    dashboard, stop = start_dashboard([tmp_path], port=0)
    assert get(dashboard + "api/runs")["runs"] == []
    run = tmp_path / "live-run"
    hub = MetricsHub(run, MetricsConfig(tensorboard=False))
    hub.merge_window_s = 600  # records are written on the next step only, whatever this machine's speed
    try:
        hub.log("learner", 1, {"staleness/mean": 0.0})
        hub.log("learner", 2, {"staleness/mean": 0.5})  # step 2 reporting closes step 1's record
        assert "live-run" in [r["id"] for r in get(dashboard + "api/runs")["runs"]]  # found while running
        page = get(f"{dashboard}api/metrics?run=live-run&file=metrics&offset=0")
        assert [r["step"] for r in page["records"]] == [1]
        hub.close()  # writes step 2
        with open(run / "metrics.jsonl", "a") as f:  # a line still being written must wait for its newline
            f.write('{"step": 3, "staleness/me')
        page = get(f"{dashboard}api/metrics?run=live-run&file=metrics&offset={page['offset']}")
        assert [(r["step"], r["staleness/mean"]) for r in page["records"]] == [(2, 0.5)]
        with open(run / "metrics.jsonl", "a") as f:
            f.write('an": 1.0}\n')
        page = get(f"{dashboard}api/metrics?run=live-run&file=metrics&offset={page['offset']}")
        assert page["records"] == [{"step": 3, "staleness/mean": 1.0}]
        # A rewritten (shorter) file starts over instead of returning garbage from a stale offset.
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        page = get(f"{dashboard}api/metrics?run=live-run&file=metrics&offset={page['offset']}")
        assert page["reset"] and page["records"] == [{"step": 1}]
    finally:
        hub.close()
        stop()


def test_requests_outside_the_runs_are_refused(dashboard: str) -> None:
    assert status_of(f"{dashboard}api/metrics?run=nope&file=metrics") == 404
    assert status_of(f"{dashboard}api/metrics?run={RUNS[0]}&file=../../etc/passwd") == 400
    assert status_of(f"{dashboard}api/metrics?run={RUNS[0]}&file=metrics&offset=x") == 400
    assert status_of(f"{dashboard}static/..%2F..%2Fmetrics.py") == 404
    assert status_of(f"{dashboard}static/uPlot.iife.min.js") == 200
    assert status_of(f"{dashboard}nowhere") == 404


def test_staleflow_dashboard_command_serves_until_stopped(runs_root: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "dashboard", str(runs_root), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in banner, banner
        assert sorted(r["id"] for r in get(f"http://127.0.0.1:{port}/api/runs")["runs"]) == sorted(RUNS)
        # It listens on that loopback port and nothing else (its children too, if it ever has any).
        served = psutil.Process(proc.pid)
        sockets = {(c.laddr.ip, c.laddr.port) for p in [served, *served.children(recursive=True)]
                   for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert sockets == {("127.0.0.1", port)}, sockets
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0  # a loaded machine exits slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(binary: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1500,2500",
        "--virtual-time-budget=15000", *args, url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a loaded machine starts it slowly


def test_every_panel_renders_in_headless_chromium(dashboard: str, tmp_path: Path) -> None:
    binary = require_binary("chromium", "chromium")
    dom = chromium(binary, tmp_path / "profile", dashboard, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    ready = dict(re.findall(r'<section[^>]*data-panel="([^"]+)"[^>]*data-ready="(\w+)"', dom.stdout))
    assert ready == {p.id: "true" for p in PANELS}, ready
    # Both runs are overlaid (the default selects up to four runs) and every panel drew something.
    for run in RUNS:
        assert f"{run} · staleness/mean" in dom.stdout
        assert f"{run} — 40 steps" in dom.stdout  # its staleness heatmap
    assert "error:" not in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    page = f"{dashboard}#runs={RUNS[0]},{RUNS[1]}"
    png = chromium(binary, tmp_path / "profile", page, f"--screenshot={shot}")
    assert png.returncode == 0, png.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_plot_overlays_runs_with_every_panel(runs_root: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread
    from typer.testing import CliRunner

    from services.cli import app
    from services.plots import load_run, panel_series, plot_runs

    for name in RUNS:
        run = load_run(runs_root / name)
        for panel in PANELS:
            if panel.kind == "line":
                assert panel_series(panel, run, time_axis=False), (name, panel.id)
    out = tmp_path / "compare.png"
    args = ["plot", str(runs_root / RUNS[0]), str(runs_root / RUNS[1]), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    height, width, _ = imread(out).shape
    assert width > 1500 and height > 1500
    with pytest.raises(ValueError, match="no metrics"):
        plot_runs([runs_root / "not-a-run"], tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError):
        plot_runs([tmp_path / "missing"], tmp_path / "missing.png")
