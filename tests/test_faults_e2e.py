"""Faults in a running `staleflow train`, with real processes: a rollout worker SIGKILLed mid-run
(Ray restarts it and the run goes on), the learner SIGKILLed (the driver stops with a clear error;
`--resume` redoes the updates after the last checkpoint, exactly once), and the weight registry gone under
a real worker (it keeps generating with the weights it has; the staleness policy still holds). Redis
unreachable at start is in tests/test_reliability.py. Each fault checks that nothing was lost or trained on
twice (runs/<name>/ledger.jsonl: the last line of a version is the one in force).

Figures (entries before/after, seconds to recover) are printed on one `FAULT {...}` JSON line per scenario
(`pytest -s` shows them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.ray_actors import kill_actor_and_wait
from tests.test_train_e2e import REPO, read_jsonl, staleflow

pytestmark = pytest.mark.slow

# Small batches so that each run is a few updates of ~one rollout batch each.
FAST = [
    "configs/tiny-cpu.yaml",
    "learner.eval_every=0",
    "buffer.batch_groups=4",
    "rollout.groups_per_batch=4",
    "rollout.n=4",
    "task.eval_size=16",
    "metrics.dashboard=false",
]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """`staleflow <args>` in the background, stdout+stderr to `log`."""
    env = {**os.environ, "STALEFLOW_QUIET": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def actor_pid(driver: subprocess.Popen, cls: str) -> int | None:
    """The pid of our run's `ray::<cls>` process (a descendant of the driver: its local Ray; other runs on
    this machine have their own)."""
    try:
        kids = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in kids:
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{cls}"):
                return p.pid
        except psutil.Error:
            continue
    return None


SERVICES = ("redis-server", "raylet", "gcs_server")


def own_services(driver: subprocess.Popen) -> set[psutil.Process]:
    """Redis and Ray processes this run started (other runs on a shared machine come and go on their own)."""
    try:
        kids = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    return {p for p in kids if p.name().startswith(SERVICES)}


def assert_gone(procs: set[psutil.Process], timeout_s: float = 120) -> None:
    """Every process exits (a zombie waiting for its reaper counts as gone); a loaded machine may take a while."""
    def alive() -> list[psutil.Process]:
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"left running: {alive()}"


def wait_for(pred, timeout_s: float, what: str, driver: subprocess.Popen, log: Path):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert driver.poll() is None, f"the run ended while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {what} within {timeout_s}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def lines(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def finish(driver: subprocess.Popen, timeout_s: float) -> int:
    try:
        return driver.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGINT)
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            driver.kill()
        raise


def batches(run_dir: Path, since: float = 0.0) -> list[dict]:
    """The rollout batches in rollout.jsonl (the weight fetcher's records there are not batches)."""
    return [r for r in lines(run_dir / "rollout.jsonl") if "rollout/groups" in r and r["time"] > since]


def kill_and_finish(driver: subprocess.Popen, log: Path, pid: int) -> tuple[int, str]:
    """SIGKILL `pid` (a process of the run) and let the driver end; returns (its exit code, its output)."""
    try:
        os.kill(pid, signal.SIGKILL)
        code = finish(driver, 900)
    finally:
        if driver.poll() is None:
            driver.kill()
    return code, log.read_text()


def ledger_in_force(run_dir: Path) -> dict[int, dict]:
    hist: dict[int, dict] = {}
    for rec in lines(run_dir / "ledger.jsonl"):
        hist[rec["version"]] = rec
    return dict(sorted(hist.items()))


def check_exactly_once(run_dir: Path, updates: int) -> dict[int, dict]:
    """Versions 1..updates in force, each entry and each trajectory in exactly one of them."""
    hist = ledger_in_force(run_dir)
    assert list(hist) == list(range(1, updates + 1))
    entries = [e for r in hist.values() for e in r["entry_ids"]]
    trajs = [t for r in hist.values() for t in r["trajectory_ids"]]
    assert len(entries) == len(set(entries)), "an entry was trained on twice"
    assert len(trajs) == len(set(trajs)), "a trajectory was trained on twice"
    assert all(len(r["entry_ids"]) == 4 for r in hist.values())  # buffer.batch_groups: full batches only
    return hist


def report(name: str, **figures) -> None:  # noqa: ANN003
    print("FAULT " + json.dumps({"scenario": name, **figures}))


# ---------------------------------------------------------------- 1. a rollout worker SIGKILLed


def test_a_rollout_worker_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path):
    # Enough updates that the run cannot end on what was buffered before the kill: bounded admission lets the
    # worker get at most (max_staleness 2 + V + 1) batches ahead of the learner's version V, and the kill comes
    # at V ~ 2, so updates 6+ need the restarted worker's data (with 6 updates a fast machine finished without it).
    run_dir, log, updates = tmp_path / "wkill", tmp_path / "wkill.log", 20
    driver = spawn(["train", *FAST, f"learner.total_steps={updates}", "learner.checkpoint_every=3",
                    "rollout.max_restarts=2", f"runs_dir={tmp_path}", "name=wkill"], log)
    try:
        wait_for(lambda: len(lines(run_dir / "metrics.jsonl")) >= 2, 900, "2 updates", driver, log)
        pid = wait_for(lambda: actor_pid(driver, "RolloutActor"), 120, "the worker's process", driver, log)
        services = own_services(driver)
        ledger_before = len(lines(run_dir / "ledger.jsonl"))
        batches_before = len(batches(run_dir))
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        # Recovered: a batch pushed by the restarted worker (a new process).
        wait_for(lambda: batches(run_dir, since=killed_at), 900, "a rollout batch after the kill", driver, log)
        recover_s = time.time() - killed_at
        code = finish(driver, 900)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert code == 0, out[-4000:]
    assert "worker-0 died" in out and "restart 1" in out  # the driver said so
    back = re.search(r"worker-0 is back \(pid (\d+), (\d+)s after it died\)", out)
    assert back and int(back.group(1)) != pid, out[-4000:]  # a new process
    assert "restart 2" not in out  # one death, one restart (calls made while Ray restarts it are no deaths)

    hist = check_exactly_once(run_dir, updates)
    after = batches(run_dir, since=killed_at)
    assert after and all(r["worker"] == "worker-0" for r in after)
    # The restarted worker loaded the newest weights before its first batch (its engine starts at v0).
    assert after[0]["weights/version"] >= ledger_before and after[0]["rollout/version"] >= ledger_before
    # No retried push happened here, so no duplicate either; the learner's view is within the staleness bound.
    final = lines(run_dir / "metrics.jsonl")[-1]
    assert final.get("buffer/drops/duplicate", 0) == 0
    assert final["staleness/max"] <= 2
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert_gone(services)
    report("rollout worker SIGKILL", updates=updates, ledger_lines_before_kill=ledger_before,
           ledger_lines_after=len(lines(run_dir / "ledger.jsonl")), entries_in_force=sum(
               len(r["entry_ids"]) for r in hist.values()), rollout_batches_before_kill=batches_before,
           rollout_batches_after_kill=len(after), recover_s=round(recover_s, 1),
           restart_s=int(back.group(2)),
           final_drops={k: v for k, v in final.items() if k.startswith("buffer/drops/")})


def test_a_worker_dying_past_its_restarts_stops_the_run_cleanly_with_a_checkpoint_to_resume(tmp_path):
    run_dir, log = tmp_path / "wgone", tmp_path / "wgone.log"
    driver = spawn(["train", *FAST, "learner.total_steps=50", "learner.checkpoint_every=1000",
                    "rollout.max_restarts=0", f"runs_dir={tmp_path}", "name=wgone"], log)
    try:
        wait_for(lambda: len(lines(run_dir / "metrics.jsonl")) >= 2, 900, "2 updates", driver, log)
        pid = wait_for(lambda: actor_pid(driver, "RolloutActor"), 120, "the worker's process", driver, log)
        services = own_services(driver)
    except BaseException:
        driver.kill()
        raise
    code, out = kill_and_finish(driver, log, pid)
    assert code == 1, out[-4000:]
    assert "worker-0 failed and its restarts are used up" in out and "the learner checkpointed" in out, out[-4000:]
    assert f"staleflow train --resume {run_dir}" in out and "Traceback" not in out, out[-4000:]
    # The learner was alive: it checkpointed where it stood (checkpoint_every alone would not have by now).
    trained = max(r["version"] for r in lines(run_dir / "ledger.jsonl"))
    assert int((run_dir / "checkpoints" / "latest").read_text().strip()[1:]) == trained
    assert_gone(services)


# ---------------------------------------------------------------- 2. the learner SIGKILLed, then --resume


def test_the_learner_killed_ends_the_run_and_resume_redoes_the_lost_updates_exactly_once(tmp_path):
    run_dir, log, updates = tmp_path / "lkill", tmp_path / "lkill.log", 12
    driver = spawn(["train", *FAST, f"learner.total_steps={updates}", "learner.checkpoint_every=3",
                    f"runs_dir={tmp_path}", "name=lkill"], log)
    try:
        wait_for(lambda: ledger_in_force(run_dir).get(1), 900, "update 1", driver, log)
        pid = actor_pid(driver, "LearnerActor")
        assert pid is not None
        services = own_services(driver)
        # Kill as soon as update 4 is in the ledger: the checkpoint is then v3, so v4 (at least) is redone. The
        # learner runs on without waiting for the driver: a test process descheduled for a few updates kills it
        # later, maybe just after a checkpoint (nothing to redo). Every assertion below holds either way; the
        # run is long enough (12 updates) that it cannot end before the kill.
        deadline = time.time() + 900
        while not ledger_in_force(run_dir).get(4):
            assert driver.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        code = finish(driver, 900)
        exit_s = time.time() - killed_at
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert code not in (0, 130), out[-4000:]
    assert "learner died" in out and f"staleflow train --resume {run_dir}" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert_gone(services)  # the dead run left nothing behind (Redis, Ray)

    killed = lines(run_dir / "ledger.jsonl")
    last_ckpt = int((run_dir / "checkpoints" / "latest").read_text().strip()[1:])  # what a resume loads
    lost = sorted({r["version"] for r in killed if r["version"] > last_ckpt})

    t0 = time.time()
    resumed = staleflow(["train", "--resume", str(run_dir)], timeout=900)
    resume_s = time.time() - t0
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]

    hist = check_exactly_once(run_dir, updates)
    for v in range(1, updates + 1):
        expected = None if v <= last_ckpt else last_ckpt
        assert hist[v]["resumed_from"] == expected, (v, hist[v])
    first_run = {r["version"]: r for r in killed}
    for v in range(1, last_ckpt + 1):  # covered by the checkpoint: kept, not redone
        assert hist[v] == first_run[v]
    # The lost updates' entries were not acked: the resumed learner trained on them again (exactly once).
    lost_entries = {e for v in lost for e in first_run[v]["entry_ids"]}
    redone_entries = {e for v in hist if v > last_ckpt for e in hist[v]["entry_ids"]}
    assert lost_entries <= redone_entries
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert json.loads((run_dir / "eval.json").read_text())["version"] == updates
    report("learner SIGKILL + --resume", updates=updates, killed_after_version=max(first_run),
           checkpoint=last_ckpt, redone_versions=[v for v in hist if v > last_ckpt], lost_versions=lost,
           ledger_lines_killed_run=len(killed),
           ledger_lines_after_resume=len(lines(run_dir / "ledger.jsonl")),
           entries_in_force=sum(len(r["entry_ids"]) for r in hist.values()),
           lost_entries_redone=len(lost_entries),
           driver_exit_s=round(exit_s, 1), resume_run_s=round(resume_s, 1))


# ---------------------------------------------------------------- 3. the weight registry gone under a worker


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, namespace="faults", logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    if started:
        ray.shutdown()


def bounded_run(worker, batches: int) -> int:  # noqa: ANN001
    """worker.run(max_batches), stopped after 120 s so that a worker that cannot go on fails the test, not
    hangs it."""
    import threading

    timer = threading.Timer(120, worker.stop)
    timer.start()
    try:
        return worker.run(max_batches=batches)
    finally:
        timer.cancel()


def test_a_worker_whose_registry_is_gone_keeps_generating_and_staleness_holds(ray_local, buffer_factory):
    from transformers import AutoModelForCausalLM

    from learner.publisher import WeightPublisher
    from rollout_worker.config import RolloutConfig, TaskConfig
    from rollout_worker.engine import VLLMEngine
    from rollout_worker.tasks.arithmetic import ArithmeticTask
    from rollout_worker.tiny_model import ensure_tiny_model
    from rollout_worker.weights import WeightsFetcher
    from rollout_worker.worker import RolloutWorker
    from services.registry import start_registry

    model_dir = ensure_tiny_model(REPO / ".cache/staleflow/tiny-model")
    cfg = RolloutConfig(n=3, max_tokens=6, temperature=1.0, groups_per_batch=2, max_model_len=256)
    registry = start_registry(3, namespace="faults", name="staleflow-weights-faults")
    # The real publisher, publishing the base model as version 1 (what the learner does after its 1st update).
    WeightPublisher(registry, bucket_mb=1).publish(AutoModelForCausalLM.from_pretrained(model_dir), 1)
    fetcher = WeightsFetcher(registry, timeout_s=10)
    buf = buffer_factory(policy="bounded", max_staleness=2, batch_groups=4)
    reports: list[dict] = []
    engine = VLLMEngine(str(model_dir), cfg)
    try:
        worker = RolloutWorker(engine, ArithmeticTask(), buf, cfg, TaskConfig(), worker_id="w0",
                               get_latest=fetcher.latest_version, fetch=lambda v: fetcher.fetch(v).tensors(),
                               report=lambda step, values: reports.append(dict(values)))
        assert bounded_run(worker, 1) == 1
        assert engine.version == 1 and reports[0]["weights/version"] == 1  # loaded through the live registry

        kill_actor_and_wait(registry)  # a call right after ray.kill can still be answered
        killed_at = time.time()
        buf.set_version(3)  # the learner went on (its versions 2, 3 went to a registry that is gone)
        assert bounded_run(worker, 2) == 2  # the worker goes on with the weights it has
        gone_s = time.time() - killed_at
        assert engine.version == 1
        after_kill = reports[1:]
        assert len(after_kill) == 2 and all(r.get("weights/fetch_errors", 0) >= 1 for r in after_kill)
        assert all(r["rollout/version"] == 1 for r in after_kill)

        # Learner at v3: groups of v1 are 2 behind, within max_staleness=2: all 6 are served.
        served = buf.pull(100, block_ms=0)
        assert len(served) == 6 and {e.group.version_min for e in served} == {1}
        buf.ack([e.id for e in served])
        # Learner at v4: the worker, still on v1, is now 3 behind. Its next groups are pushed, but the learner
        # never sees them: counted as too_stale drops, not trained on.
        buf.set_version(4)
        assert bounded_run(worker, 1) == 1
        assert buf.pull(100, block_ms=0) == []
        stats = buf.stats()
        assert stats.drops.get("too_stale") == 2 and stats.consumed == 6
        assert stats.drops.get("duplicate", 0) == 0
    finally:
        engine.close()
    report("weight registry killed", batches_after_kill=3, fetch_errors=sum(
        r.get("weights/fetch_errors", 0) for r in reports[1:]), served_within_bound=6, dropped_too_stale=2,
        two_batches_after_kill_s=round(gone_s, 1))
