"""`staleflow train` end to end through the real services (embedded redis-server, a local Ray, a vLLM CPU
rollout worker, a DeepSpeed learner, the weight registry, the metrics hub). Each run is a few updates; each test
checks what a user would look at afterwards. `ray job submit` against a cluster of three nodes:
tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A short run: few updates, small batches, every side exercised (publish, eval, checkpoint, final eval).
SHORT = [
    "configs/tiny-cpu.yaml",
    "learner.total_steps=4",
    "learner.checkpoint_every=2",
    "learner.eval_every=2",
    "buffer.batch_groups=4",
    "rollout.groups_per_batch=4",
    "rollout.n=4",
    "task.eval_size=32",
    "metrics.dashboard=false",
]


LOOPBACK = ("127.", "::1", "::ffff:127.")


def listening(proc: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of each socket `proc` listens on."""
    try:
        name = proc.name()
        return {(name, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}
    except psutil.Error:  # exited meanwhile
        return set()


def staleflow_tracked(args: list[str], timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str], set]:
    """Run the CLI; returns (completed process, the processes it started that are still alive afterwards,
    every (process name, address, port) that it or a process it started listened on).

    Its descendants are sampled while it runs (Redis, Ray's raylet/GCS/workers and agents, vLLM); whichever of
    them is still alive (same pid and start time) once it has exited was left behind."""
    env = {**os.environ, "STALEFLOW_QUIET": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    sockets: set[tuple[str, str, int]] = set()
    deadline = time.time() + timeout
    while True:
        try:
            driver = psutil.Process(proc.pid)
            sockets |= listening(driver)
            for child in driver.children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
                sockets |= listening(child)
        except psutil.Error:
            pass
        try:
            out, err = proc.communicate(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if time.time() > deadline:
                proc.kill()
                out, err = proc.communicate()
                break
    def still_alive() -> list[str]:
        left = []
        for pid, started in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                pass
        return left

    # The last ones may still be exiting (a loaded machine takes its time): left behind = alive after 120 s.
    settle = time.monotonic() + 120
    while (left := still_alive()) and time.monotonic() < settle:
        time.sleep(0.2)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), left, sockets


def staleflow(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "STALEFLOW_QUIET": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run_dir(run_dir: Path, updates: int) -> None:
    assert (run_dir / "config.yaml").is_file()
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "policy/version" in r]  # step 0: publish only
    versions = [r["policy/version"] for r in records]
    assert versions == list(range(1, updates + 1))
    for r in records:  # the names the dashboard and Grafana read
        for name in ("staleness/mean", "staleness/max", "loss/value", "loss/masked_fraction", "m2po/m2_before",
                     "reward/mean", "throughput/train_tokens_per_s", "time/step_s"):
            assert name in r, name
        assert 0 <= r["staleness/mean"] <= r["staleness/max"] <= 2  # bounded, max_staleness=2
    assert read_jsonl(run_dir / "rollout.jsonl"), "the worker reported no batch"
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    assert sorted({r["version"] for r in ledger}) == list(range(1, updates + 1))
    used = [e for r in ledger for e in r["entry_ids"]]
    assert len(used) == len(set(used)), "an entry was trained on twice"
    evals = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= evals["accuracy"] <= 1.0 and evals["version"] == updates
    # Beside greedy, avg@k sampled at the rollout temperature (task.eval_samples), in every eval record too.
    assert evals["k"] == 4 and 0.0 <= evals["avg_at_k"] <= 1.0 and evals["sampled_temperature"] == 1.0
    assert all("eval/avg_at_k" in e for e in read_jsonl(run_dir / "eval.jsonl"))
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"


def test_train_end_to_end(tmp_path):
    out, left_behind, sockets = staleflow_tracked(["train", *SHORT, f"runs_dir={tmp_path}", "name=e2e"])
    assert out.returncode == 0, out.stderr[-4000:]
    # A local run listens on loopback only: Redis, the metrics endpoint, and all of Ray (GCS, raylet, each
    # worker's gRPC server, the dashboard and runtime-env agents). The sampling saw them (so this can fail).
    names = {name for name, _, _ in sockets}
    assert {"redis-server", "gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), sockets
    assert not [s for s in sockets if not s[1].startswith(LOOPBACK)], sorted(sockets)
    run_dir = tmp_path / "e2e"
    check_run_dir(run_dir, updates=4)
    # The saved config names the password's environment variable, never holds a password.
    assert not re.search(r"^\s*\w*password\s*:", (run_dir / "config.yaml").read_text(), re.MULTILINE)
    assert not left_behind, left_behind  # every process it started (Redis, Ray, vLLM) is gone
    # No error-level noise on a healthy run (Ray logs one if a restartable actor's arguments are handles).
    assert "constructor arguments in the object store" not in out.stdout + out.stderr


def test_weight_versions_that_cannot_fit_the_object_store_are_refused_before_anything_starts(tmp_path):
    """100,001 versions of the tiny model (~2.4 MB each) cannot fit a local object store: one error line naming
    the setting, exit 1, no traceback, no update made, nothing left running."""
    out, left_behind, _ = staleflow_tracked(["train", *SHORT, "weights.keep_versions=100000",
                                             f"runs_dir={tmp_path}", "name=store"])
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights.keep_versions" in errors[0] and "object store" in errors[0], text[-4000:]
    assert "Traceback" not in text and not (tmp_path / "store" / "ledger.jsonl").exists()
    assert not left_behind, left_behind


def test_more_workers_than_a_local_ray_has_cpus_is_refused_at_once(tmp_path):
    """A local Ray never grows: a learner and 2 workers of one CPU each do not fit 2 declared CPUs. One error
    line saying what is needed and how to declare it, exit 1, before any actor is placed (not after the
    placement timeout); nothing left running."""
    out, left_behind, _ = staleflow_tracked(["train", *SHORT, "rollout.num_workers=2", "cluster.num_cpus=2",
                                             f"runs_dir={tmp_path}", "name=cpus"])
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-4000:]
    assert "has 2 CPU" in errors[0] and "need 3 CPU" in errors[0] and "cluster.num_cpus=3" in errors[0], errors
    assert "could not be placed" not in text and "Traceback" not in text
    assert not (tmp_path / "cpus" / "placement.json").exists()  # refused before placing anything
    assert not left_behind, left_behind


def test_local_shortfall_counts_every_bundle():
    from services.config import load_config
    from services.placement import local_shortfall

    cfg = load_config([str(REPO / "configs/tiny-cpu.yaml")], ["rollout.num_workers=2", "rollout.cpu_threads=2"])
    assert local_shortfall(cfg, {"CPU": 5.0}) is None  # 1 (learner) + 2 x 2 (workers)
    line = local_shortfall(cfg, {"CPU": 4.0})
    assert "need 5 CPU" in line and "cluster.num_cpus=5" in line
    gpu = load_config([str(REPO / "configs/tiny-cpu.yaml")], ["learner.gpus=1"])
    line = local_shortfall(gpu, {"CPU": 16.0})
    assert "0 GPU" in line and "cluster.num_cpus" not in line  # more CPUs would not help


def test_a_model_folder_missing_where_it_is_loaded_is_one_line_naming_the_node(tmp_path):
    """model.path is checked on the nodes that load it (here the one local node), before anything starts."""
    out, left_behind, _ = staleflow_tracked(["train", *SHORT, "model.path=/nonexistent/model",
                                             f"runs_dir={tmp_path}", "name=nomodel"])
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-4000:]
    assert "/nonexistent/model" in errors[0] and "on node" in errors[0] and "where the learner loads it" in errors[0]
    assert "Traceback" not in text and not (tmp_path / "nomodel" / "ledger.jsonl").exists()
    assert not left_behind, left_behind


def test_the_papers_schedule_end_to_end(tmp_path):
    """fixed, s = 1, two updates per rollout batch: update V (run at version V) trains on version
    max(0, 2 * floor(V / 2) - 1) only, so the staleness per update is exactly 0, 1, 1, 2. The registry keeps the
    newest version and those the learner pins (slots not filled yet): never more than two, and no worker is ever
    sent for an evicted one."""
    out = staleflow(["train", *SHORT, "buffer.policy=fixed", "buffer.max_staleness=1", "buffer.updates_per_batch=2",
                     "learner.eval_every=0", "weights.keep_versions=1", f"runs_dir={tmp_path}", "name=sched"],
                    timeout=1800)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    metrics = read_jsonl(tmp_path / "sched" / "metrics.jsonl")
    records = [r for r in metrics if "policy/version" in r]
    # one version per update: mean == max
    assert [(r["staleness/mean"], r["staleness/max"]) for r in records] == [(0, 0), (1, 1), (1, 1), (2, 2)]
    kept = [r["weights/kept"] for r in metrics if "weights/kept" in r]
    assert len(kept) == 5 and all(1 <= k <= 2 for k in kept), kept  # one per publish: versions 0..4
    assert "not available" not in text and "fetch_errors" not in json.dumps(metrics), text[-4000:]
