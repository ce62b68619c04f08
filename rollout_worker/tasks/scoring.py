"""`score`: rewards for a batch of responses that never raises and never hangs.

Why a pool of our own processes: a reward function that hangs (sympy on an adversarial "\\boxed{9^{9^{9^9}}}",
a plug-in's infinite loop) cannot be stopped inside the worker: a thread is not killable, and signal.alarm
only works in the main thread and cannot interrupt C code holding the GIL. A child process can always be
killed. `concurrent.futures.ProcessPoolExecutor` cannot kill one stuck call (only the whole pool, and a call's
clock would start when it was queued, not when it ran), so we keep a few persistent processes, give each one
call at a time, time each call from when it was handed over, and kill + respawn the process of a call that runs
past its limit. Other calls keep going on the other processes.

The fast path: a task with `reward_in_process = True` (the built-in arithmetic exact match: pure, linear time)
is called directly, paying no process overhead; its exceptions are still caught and counted.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from rollout_worker.tasks.base import Prompt, Task

log = logging.getLogger(__name__)

# A reward process has this long to start and import the task's modules (a loaded CI machine is slow).
STARTUP_TIMEOUT_S = 120.0


def score(task: Task, prompts: Sequence[Prompt], responses: Sequence[str], timeout_s: float) -> tuple[list[float], int]:
    """Rewards for (prompt, response) pairs, and how many reward calls failed (raised, hung, or non-finite).

    A failed call scores 0. `timeout_s` bounds each call from when it starts running. Only a caller's bug
    (lists of different lengths) raises.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if getattr(task, "reward_in_process", False):
        results = [_call(task, p, r) for p, r in zip(prompts, responses)]
    else:
        try:
            results = _pool_for(task).run(list(zip(prompts, responses)), timeout_s)
        except Exception:  # the pool itself failed (e.g. cannot start processes): count every call, go on
            log.exception("reward pool failed for task %r", getattr(task, "name", task))
            _discard_pool(task)
            results = [None] * len(prompts)
    rewards = [0.0 if v is None else v for v in results]
    return rewards, sum(v is None for v in results)


def _call(task: Task, prompt: Prompt, response: str) -> float | None:
    """One reward call: a finite float, or None when it raised or returned something that is not one."""
    try:
        value = float(task.reward(prompt, response))
    except Exception as exc:  # a reward function's bug must not take the worker down: count it
        log.debug("reward raised on %s: %r", prompt.id, exc)
        return None
    return value if math.isfinite(value) else None


def _serve(task: Task, conn: Connection) -> None:
    """A pool process: score (prompt, response) pairs sent on `conn` until it closes."""
    conn.send("ready")  # the task is unpickled (its modules imported): calls are timed from here on
    while True:
        try:
            prompt, response = conn.recv()
        except EOFError:
            return
        conn.send(_call(task, prompt, response))


class _Proc:
    def __init__(self, ctx, task: Task):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(task, child), daemon=True, name="staleflow-reward")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Start-up (forkserver fork + importing the task's modules) is not charged to any call's time limit."""
        try:
            self.ready = self.conn.poll(timeout_s) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            self.ready = False
        return self.ready

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardPool:
    """A few persistent processes running one task's reward; each call gets its own hard time limit."""

    def __init__(self, task: Task, size: int | None = None):
        # forkserver: forking a process that runs vLLM/Ray threads is unsafe; spawn would re-import per process.
        self._ctx = mp.get_context("forkserver")
        self._task = task
        self._size = size or max(1, min(4, os.cpu_count() or 1))
        self._procs: list[_Proc] = []

    def run(self, items: list[tuple[Prompt, str]], timeout_s: float) -> list[float | None]:
        results: list[float | None] = [None] * len(items)
        todo = deque(range(len(items)))
        while len(self._procs) < min(self._size, len(items)):
            self._procs.append(_Proc(self._ctx, self._task))
        if not all(p.ready or p.wait_ready(STARTUP_TIMEOUT_S) for p in self._procs):
            # The task cannot be loaded in a fresh process (unpicklable, import error): every call fails.
            log.error("reward processes for task %r failed to start: %d calls scored 0", self._task.name, len(items))
            self.close()
            return results
        idle = list(self._procs)
        busy: dict[Connection, tuple[_Proc, int, float]] = {}
        while todo or busy:
            while todo and idle:
                proc, i = idle.pop(), todo.popleft()
                try:
                    proc.conn.send(items[i])
                except Exception:  # a dead process, or an item that cannot be pickled: count it, replace
                    idle.append(self._replace(proc))
                    continue
                busy[proc.conn] = (proc, i, time.monotonic() + timeout_s)
            if not busy:
                continue
            next_deadline = min(d for _, _, d in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                proc, i, _ = busy.pop(conn)
                try:
                    results[i] = conn.recv()
                    idle.append(proc)
                except (EOFError, OSError):  # the process died mid-call (segfault, os._exit): count, replace
                    idle.append(self._replace(proc))
            now = time.monotonic()
            for conn, (proc, i, deadline) in list(busy.items()):
                if now >= deadline:
                    log.warning("reward call on %s exceeded %.1fs: killing its process", items[i][0].id, timeout_s)
                    del busy[conn]
                    idle.append(self._replace(proc))
        return results

    def _replace(self, proc: _Proc) -> _Proc:
        proc.kill()
        new = _Proc(self._ctx, self._task)
        new.wait_ready(STARTUP_TIMEOUT_S)
        self._procs[self._procs.index(proc)] = new
        return new

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()
        self._procs.clear()


# One pool per task object for the life of the process (a worker scores one task); closed at exit.
_POOLS: dict[int, tuple[Task, RewardPool]] = {}


def _pool_for(task: Task) -> RewardPool:
    entry = _POOLS.get(id(task))
    if entry is None or entry[0] is not task:
        entry = _POOLS[id(task)] = (task, RewardPool(task))
    return entry[1]


def _discard_pool(task: Task) -> None:
    entry = _POOLS.pop(id(task), None)
    if entry is not None:
        entry[1].close()


@atexit.register
def close_pools() -> None:
    for _, pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
