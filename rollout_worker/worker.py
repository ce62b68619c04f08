"""The rollout worker loop: newest weights in, admitted groups of samples out to the staleness buffer.

    worker = RolloutWorker(engine, task, buffer, cfg, task_cfg, worker_id="w0",
                           get_latest=lambda: registry_version(), fetch=lambda v: fetched_tensors(v),
                           report=log_metrics)
    worker.run()            # until stop() (from another thread) or max_batches

One batch: load newer weights if the registry has them (fixed policy: exactly the version the admission names),
ask the buffer for admission, draw that many prompts, generate n samples each, score them, push the groups.
A reward function that fails is counted (rollout/reward_errors) and the batch goes on with reward 0 for those
samples (what `score` returns for them); a weights fetch that fails is logged and retried at the next batch.
The worker imports nothing of services: the registry, the buffer and the metrics sink are handed in.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from buffer.redis_buffer import Admission, StalenessBuffer
from buffer.trajectory import Trajectory, TrajectoryGroup
from rollout_worker.config import RolloutConfig, TaskConfig
from rollout_worker.engine import UNKNOWN_VERSION, GenerationEngine, Sample, Weights
from rollout_worker.tasks import Prompt, Task, score

log = logging.getLogger(__name__)

GetLatest = Callable[[], int]
Fetch = Callable[[int], Weights]  # a version -> its weights (published ones, or pairs)
Report = Callable[[int, dict[str, float]], None]  # report(step, values), like services.metrics_logger


@dataclass
class _Batch:
    """A generated batch on its way to the buffer."""

    metrics: dict[str, float]
    adm: Admission
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    groups: list[list[Sample]]
    version: int  # the engine's version when generation began
    t0: float  # perf_counter at generation start
    t_start: float  # wall clock, for the trajectories
    t_end: float


class RolloutWorker:
    def __init__(
        self,
        engine: GenerationEngine,
        task: Task,
        buffer: StalenessBuffer,
        cfg: RolloutConfig,
        task_cfg: TaskConfig,
        *,
        worker_id: str,
        get_latest: GetLatest,
        fetch: Fetch,
        report: Report | None = None,
        admit_wait_s: float = 0.05,
        prompts: Iterator[Prompt] | None = None,
        delay_s: float = 0.0,
    ):
        self.engine = engine
        self.task = task
        self.buffer = buffer
        self.cfg = cfg
        self.task_cfg = task_cfg
        self.worker_id = worker_id
        self.get_latest = get_latest
        self.fetch = fetch
        self.report = report or (lambda step, values: None)
        self.admit_wait_s = admit_wait_s
        self.delay_s = delay_s  # rollout.delay_s: an experiment's slow worker
        self.step = 0
        self._stop = threading.Event()
        # Held from "these are the weights this batch needs" until its generation ends, and by anyone else who
        # changes or reads the engine's weights (an eval on another thread). Without it an eval could swap the
        # weights between the worker's version check and its generate: in fixed mode that tags a slot's groups
        # with the wrong version and the update that wants them waits forever. Reentrant: _load takes it too.
        self.engine_lock = threading.RLock()
        # Each worker its own prompt stream (a stable function of the run seed and its id), unless handed one.
        seed = task_cfg.seed * 1_000_003 + zlib.crc32(worker_id.encode())
        self._prompts: Iterator[Prompt] = prompts if prompts is not None else task.train_prompts(seed)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask run() to return after the batch in flight (safe from another thread). Final: a run() that starts
        afterwards returns at once (the driver's stop can reach a worker before its first run() does)."""
        self._stop.set()

    def run(self, max_batches: int | None = None) -> int:
        """Generate and push batches until stop() or `max_batches`. Returns the number of batches pushed.

        Two-stage pipeline: while batch k is scored, packed and pushed on a helper thread, batch k+1 is already
        being admitted and generated (at most one batch in flight behind the engine). An error in the push
        stage (BufferFull, Redis down) surfaces here at the next batch boundary."""
        returned = self.buffer.release(self.worker_id)  # grants a previous incarnation never used
        if returned:
            log.info("worker %s: released %d grants of a previous incarnation", self.worker_id, returned)
        started = done = 0
        pending: Future | None = None
        with ThreadPoolExecutor(1, thread_name_prefix=f"rollout-push-{self.worker_id}") as pool:
            try:
                while not self._stop.is_set() and (max_batches is None or started < max_batches):
                    batch = self._generate()
                    if pending is not None:
                        pending.result()
                        done, pending = done + 1, None
                    if batch is not None:
                        started += 1
                        pending = pool.submit(self._finish, batch)
                        if self.delay_s:
                            self._stop.wait(self.delay_s)
            finally:
                if pending is not None:
                    pending.result()
                    done += 1
        return done

    def run_batch(self) -> bool:
        """One admitted batch, generated, scored and pushed, synchronously. False if nothing was pushed."""
        batch = self._generate()
        if batch is None:
            return False
        self._finish(batch)
        return True

    # ------------------------------------------------------------------ one batch
    def _load(self, version: int, metrics: dict[str, float]) -> bool:
        t0 = time.perf_counter()
        try:
            with self.engine_lock:
                self.engine.update_weights(self.fetch(version), version)
        except Exception as exc:  # a registry hiccup must not kill the worker: keep the weights we have, retry later
            # One line, no traceback: a registry or learner that is gone is an expected fault, counted below.
            log.warning("worker %s: loading weights version %d failed: %s: %s", self.worker_id, version,
                        type(exc).__name__, str(exc)[:300])
            metrics["weights/fetch_errors"] = metrics.get("weights/fetch_errors", 0) + 1
            return False
        if "weights/version" in metrics:  # a second load for one batch (admission refused the first weights):
            # the first goes on record now, as its own record; the batch's metrics keep the newest
            self.report(self.step, {k: metrics.pop(k) for k in ("weights/version", "weights/fetch_s")})
        metrics["weights/fetch_s"] = time.perf_counter() - t0
        metrics["weights/version"] = version
        return True

    def _latest(self, metrics: dict[str, float] | None = None) -> int | None:
        """The registry's newest version; None (counted as a fetch error) if the registry cannot be asked."""
        try:
            return int(self.get_latest())
        except Exception as exc:
            log.warning("worker %s: asking the registry for its latest version failed: %s: %s", self.worker_id,
                        type(exc).__name__, str(exc)[:300])
            if metrics is not None:
                metrics["weights/fetch_errors"] = metrics.get("weights/fetch_errors", 0) + 1
            return None

    def _registered(self, version: int, latest: int | None) -> bool:
        """Is `version` in the registry yet? The learner moves its version before its background publish has
        registered the weights: a worker admitted for them in between waits quietly (no fetch error)."""
        if latest is not None and latest >= version:
            return True
        latest = self._latest()
        return latest is not None and latest >= version

    def _admit(self, metrics: dict[str, float]) -> Admission | None:
        """Wait for a grant; None if stop() came first. Time spent here is rollout/idle_s."""
        t0 = time.perf_counter()
        try:
            delay = 0.0
            while not self._stop.is_set():
                adm = self.buffer.admit(self.worker_id, self.cfg.groups_per_batch, weights_version=self.engine.version)
                if adm.granted > 0:
                    return adm
                # Refused: the learner is behind, or our weights are. Bounded admission counts from the older of
                # the two, so a worker ahead of a learner that has just updated is only let in with the new
                # weights: look for them on every retry (waiting in admit() with the old ones cannot succeed,
                # and cost a whole wait per learner update: half the throughput of a learner-bound pipeline).
                if self.buffer.cfg.policy != "fixed":
                    latest = self._latest(metrics)
                    if latest is not None and latest > self.engine.version and self._load(latest, metrics):
                        delay = 0.0
                        continue
                delay = min(max(2 * delay, 0.005), self.admit_wait_s)  # 5 ms doubling to admit_wait_s
                self._stop.wait(delay)
            return None
        finally:
            metrics["rollout/idle_s"] = time.perf_counter() - t0

    def _generate(self) -> _Batch | None:
        """Weights, admission, prompts, generation. None if nothing was generated (stopped, or no prompts)."""
        metrics: dict[str, float] = {}
        fixed = self.buffer.cfg.policy == "fixed"
        latest = self._latest(metrics)
        if not fixed and latest is not None and latest > self.engine.version:
            self._load(latest, metrics)

        adm = self._admit(metrics)
        if adm is None:
            if "weights/version" in metrics:  # stopped while waiting, after a load: every load is on record
                self.report(self.step, metrics)
            return None
        with self.engine_lock:  # the weights checked here are the weights that generate (see __init__)
            req = adm.required_version
            failed = req not in (None, self.engine.version) and (
                not self._registered(req, latest) or not self._load(req, metrics))
            # UNKNOWN_VERSION: a load (ours or an eval's) failed half way; mixed weights are no policy
            if not failed and self.engine.version != UNKNOWN_VERSION:
                return self._generate_admitted(adm, latest, metrics)
            self.buffer.release(self.worker_id)  # these weights cannot honour the grant: give it back
            self.report(self.step, metrics)
        self._stop.wait(self.admit_wait_s)  # the next batch loads again; no spinning on admission, nor the lock
        return None

    def _generate_admitted(self, adm: Admission, latest: int | None, metrics: dict[str, float]) -> _Batch | None:
        """Prompts and generation for a grant, with the engine lock held and the right weights loaded."""
        t0 = time.perf_counter()
        prompts = list(itertools.islice(self._prompts, adm.granted))
        if len(prompts) < adm.granted:  # a finite prompt stream ran out: this is the last batch
            log.info("worker %s: prompt stream exhausted", self.worker_id)
            self._stop.set()
            if not prompts:
                self.buffer.release(self.worker_id)
                return None
        prompt_ids = self.engine.tokenize([p.text for p in prompts])
        fits = [len(ids) < self.cfg.max_model_len for ids in prompt_ids]
        if not all(fits):  # vLLM refuses a prompt that fills the context: drop it, count it, return its grant
            metrics["rollout/prompts_too_long"] = fits.count(False)
            log.warning("worker %s: dropped %d prompts of >= %d tokens", self.worker_id, fits.count(False),
                        self.cfg.max_model_len)
            prompts = [p for p, ok in zip(prompts, fits) if ok]
            prompt_ids = [ids for ids, ok in zip(prompt_ids, fits) if ok]
            if not prompts:
                self.buffer.release(self.worker_id)
                self.report(self.step, metrics)
                return None
        version = self.engine.version
        # Partial rollouts make no sense when the admission pins the version (fixed policy).
        poll = self._poll_weights if (self.cfg.partial and adm.required_version is None) else None
        t_start = time.time()
        groups = self.engine.generate(prompt_ids, self.cfg.n, temperature=self.cfg.temperature,
                                      max_tokens=self.cfg.max_tokens, poll_weights=poll,
                                      poll_every_s=self.cfg.partial_poll_s)
        metrics["rollout/generate_s"] = time.perf_counter() - t0
        if latest is not None:
            metrics["rollout/version_lag"] = max(0, latest - version)
        return _Batch(metrics, adm, prompts, prompt_ids, groups, version, t0, t_start, time.time())

    def _finish(self, b: _Batch) -> None:
        """Score, pack and push one generated batch, then report its metrics."""
        flat_prompts = [p for p, g in zip(b.prompts, b.groups) for _ in g]
        flat_samples = [s for g in b.groups for s in g]
        rewards, errors = self._score(flat_prompts, flat_samples)
        out: list[TrajectoryGroup] = []
        k = 0
        for prompt, ids, samples in zip(b.prompts, b.prompt_ids, b.groups):
            out.append(self._group(prompt, ids, samples, rewards[k : k + len(samples)], b))
            k += len(samples)
        self.buffer.push_many(out, self.worker_id)
        if len(b.prompts) < b.adm.granted:
            self.buffer.release(self.worker_id)  # the grants we had no prompts for

        n_tokens = sum(len(s.token_ids) for s in flat_samples)
        gen_s = b.metrics["rollout/generate_s"]
        b.metrics.update({
            "rollout/tokens": n_tokens,
            "rollout/tokens_per_s": n_tokens / gen_s if gen_s > 0 else 0.0,  # generation rate of this batch
            "rollout/batch_s": time.perf_counter() - b.t0,  # this batch's latency: generation to pushed
            "rollout/groups": len(out),
            "rollout/version": b.version,
            "rollout/reward_errors": errors,
            "reward/mean": float(np.mean(rewards)) if rewards else 0.0,
        })
        self.report(self.step, b.metrics)
        self.step += 1

    def _poll_weights(self):
        """Partial rollouts: the newest weights if they are newer than the engine's, else None."""
        latest = self._latest()
        if latest is None or latest <= self.engine.version:
            return None
        return self.fetch(latest), latest

    def _score(self, prompts: list[Prompt], samples: list[Sample]) -> tuple[list[float], int]:
        responses = [s.text for s in samples]
        try:
            rewards, errors = score(self.task, prompts, responses, timeout_s=self.task_cfg.reward_timeout_s)
        except Exception:  # score isolates per-sample failures; this is the net under score itself
            log.exception("worker %s: scoring a batch failed; rewards set to 0", self.worker_id)
            return [0.0] * len(samples), len(samples)
        return [float(r) for r in rewards], int(errors)

    def _group(self, prompt: Prompt, prompt_ids: list[int], samples: list[Sample], rewards: list[float],
               b: _Batch) -> TrajectoryGroup:
        group_id = uuid.uuid4().hex
        trajs = [
            Trajectory.make(
                group_id=group_id,
                prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                response_ids=np.asarray(s.token_ids, dtype=np.int32),
                behaviour_logp=np.asarray(s.logprobs, dtype=np.float32),
                versions=np.asarray(s.versions, dtype=np.int32) if s.token_ids else None,
                version=b.version,
                reward=r,
                finish_reason=s.finish_reason,
                worker_id=self.worker_id,
                t_start=b.t_start,
                t_end=b.t_end,
                meta={"prompt_id": prompt.id},
            )
            for s, r in zip(samples, rewards)
        ]
        return TrajectoryGroup(group_id=group_id, trajectories=trajs, slot=b.adm.slot)
