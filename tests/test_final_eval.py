"""The run's final eval while a rollout worker is being restarted by Ray (it was killed near the end): it goes to
a worker that is up, or waits for the restarting one; never `ActorUnavailableError ... The actor is restarting`.

Real Ray actors with the rollout actors' restart options; a restarted process holds in its constructor until
the test opens a gate file, so "being restarted" lasts exactly as long as the test needs (no time window)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from services.train import RunFailed, evaluate_on_a_live_worker
from tests.ray_actors import kill_actor_and_wait

REPO = Path(__file__).resolve().parents[1]


class Evaluator:
    def __init__(self, gate: str):
        if ray.get_runtime_context().was_current_actor_reconstructed:
            while not os.path.exists(gate):  # the restart finishes when the test says so
                time.sleep(0.05)

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, load_latest: bool = False) -> dict:
        return {"accuracy": 0.5, "version": 7, "pid": os.getpid()}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, namespace="final-eval", logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    if started:
        ray.shutdown()


def start(gate: Path):
    # the rollout actors' options (services/train.py): restartable, no task retries
    return ray.remote(Evaluator).options(num_cpus=0, max_restarts=1, max_task_retries=0).remote(str(gate))


def kill_and_wait_until_restarting(actor) -> int:
    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # until Ray reports it restarting (the death has been noticed)
        try:
            ray.get(actor.pid.remote(), timeout=30)
        except ray.exceptions.ActorUnavailableError:
            return pid
        except ray.exceptions.GetTimeoutError:
            pass
        assert time.monotonic() < deadline, "the killed actor was never reported restarting"


def test_a_restarting_worker_is_skipped_for_one_that_is_up(tmp_path):
    a, b = start(tmp_path / "gate-a"), start(tmp_path / "gate-b")
    ray.get([a.pid.remote(), b.pid.remote()])
    kill_and_wait_until_restarting(a)
    # the driver may not know yet (restarting = {}): worker-0 answers ActorUnavailableError, worker-1 evaluates
    for known in (set(), {0}):
        result = evaluate_on_a_live_worker([a, b], known, timeout_s=120)
        assert result["worker"] == "worker-1" and result["accuracy"] == 0.5
    (tmp_path / "gate-a").touch()


def test_the_only_worker_restarting_is_waited_for(tmp_path):
    gate = tmp_path / "gate"
    a = start(gate)
    killed = kill_and_wait_until_restarting(a)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(evaluate_on_a_live_worker([a], {0}, timeout_s=300)))
    t.start()
    gate.touch()  # the restart may now finish; the eval must wait for it, not fail
    t.join(timeout=300)
    assert out["worker"] == "worker-0" and out["pid"] != killed


def test_no_live_worker_is_one_clear_error(tmp_path):
    a = start(tmp_path / "gate")
    ray.get(a.pid.remote())
    kill_actor_and_wait(a)
    with pytest.raises(RunFailed, match="no rollout worker is alive"):
        evaluate_on_a_live_worker([a], set(), timeout_s=120)
