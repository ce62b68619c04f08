"""The driver's held-out evals while a rollout worker is being restarted by Ray (it was killed): the final eval
goes to a worker that is up, or waits for the restarting one (never `ActorUnavailableError ... The actor is
restarting`); a periodic eval sent to a worker that Ray is restarting is a lost point, not a dead run. And the
eval at version 0 (the warm start) is made once per run: a resumed run does not redo it.

Real Ray actors with the rollout actors' restart options; a restarted process holds in its constructor until
the test opens a gate file, so "being restarted" lasts exactly as long as the test needs (no time window)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from learner.checkpoint import META, write_atomic
from services.train import Run, RunFailed, earlier_evals, evaluate_on_a_live_worker, needs_warm_start_eval

REPO = Path(__file__).resolve().parents[1]


class Evaluator:
    def __init__(self, gate: str, answer_gate: str | None = None):
        if ray.get_runtime_context().was_current_actor_reconstructed:
            while not os.path.exists(gate):  # the restart finishes when the test says so
                time.sleep(0.05)
        self.answer_gate = answer_gate

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, load_latest: bool = False) -> dict:
        while self.answer_gate is not None and not os.path.exists(self.answer_gate):  # an eval that never ends
            time.sleep(0.05)
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


def start(gate: Path, answer_gate: Path | None = None):
    # the rollout actors' options (services/train.py): restartable, no task retries, threaded
    return ray.remote(Evaluator).options(num_cpus=0, max_restarts=1, max_task_retries=0, max_concurrency=3).remote(
        str(gate), None if answer_gate is None else str(answer_gate))


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
    ray.kill(a, no_restart=True)  # returns before the actor is dead: wait for the death
    deadline = time.monotonic() + 120
    while True:
        try:
            ray.get(a.pid.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        except ray.exceptions.GetTimeoutError:
            pass
        assert time.monotonic() < deadline, "the killed actor still answers"
    with pytest.raises(RunFailed, match="no rollout worker is alive"):
        evaluate_on_a_live_worker([a], set(), timeout_s=120)


def test_an_eval_that_never_answers_is_one_clear_error(tmp_path):
    a = start(tmp_path / "gate", answer_gate=tmp_path / "answer")
    ray.get(a.pid.remote())
    with pytest.raises(RunFailed, match="no rollout worker evaluated within 3 s"):
        evaluate_on_a_live_worker([a], set(), timeout_s=3)  # up, but its eval does not end: the deadline's error
    (tmp_path / "answer").touch()


def driver_evals(workers: list, every: int = 1) -> Run:
    """A Run with only what its eval bookkeeping uses (no Redis, learner or metrics hub)."""
    run = Run.__new__(Run)
    run.cfg = SimpleNamespace(learner=SimpleNamespace(eval_every=every))
    run.workers, run.probes, run.evals = workers, {}, []
    run._eval_ref, run._eval_worker = None, 0
    return run


def test_a_periodic_eval_on_a_restarting_worker_is_a_lost_point_not_a_dead_run(tmp_path):
    a, b = start(tmp_path / "gate-a"), start(tmp_path / "gate-b")
    ray.get([a.pid.remote(), b.pid.remote()])
    kill_and_wait_until_restarting(a)
    run = driver_evals([a, b])
    # The driver has not noticed the death yet (no probe out): the eval goes to worker-0, which Ray is restarting.
    assert run.poll_eval(1) is None and run._eval_worker == 0
    assert run.poll_eval(-1, force=True) is None  # ActorUnavailableError: one line, no exception
    assert run.evals == [] and run._eval_ref is None
    # Once the driver knows (a probe is out for worker-0), the next eval goes to a worker that is up.
    run.probes = {0: None}
    assert run.poll_eval(2) is None and run._eval_worker == 1
    result = run.poll_eval(-1, force=True)
    assert result["worker"] == "worker-1" and result["accuracy"] == 0.5 and run.evals == [result]
    (tmp_path / "gate-a").touch()


def test_the_eval_at_version_0_is_made_once_per_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert needs_warm_start_eval(run_dir, keep_checkpoints=2)  # a fresh run
    # Resumed before its first checkpoint, its first start having made the eval at version 0: not again.
    (run_dir / "eval.jsonl").write_text('{"step":0,"time":1.0,"eval/accuracy":0.375,"eval/version":0}\n'
                                        '{"step":20,"time":2.0,"eval/accuracy":0.5,"eval/version":20}\n'
                                        '{"step":40,"time":3.0,"eval/acc')  # a line cut short by a crash
    assert not needs_warm_start_eval(run_dir, keep_checkpoints=2)
    assert earlier_evals(run_dir) == [{"version": 0, "accuracy": 0.375}, {"version": 20, "accuracy": 0.5}]
    # Resumed from a checkpoint: the learner starts past version 0, whatever eval.jsonl holds.
    (run_dir / "eval.jsonl").unlink()
    ckpt = run_dir / "checkpoints"
    (ckpt / "v00000003").mkdir(parents=True)
    (ckpt / "v00000003" / META).write_text("{}")
    write_atomic(ckpt / "latest", "v00000003")
    assert not needs_warm_start_eval(run_dir, keep_checkpoints=2)
