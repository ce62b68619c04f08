"""The Ray actors of a run: thin shells that build a side's object from the run config and the shared handles
that services hands over (the buffer's address and password, the weight registry, the metrics hub).

They live here, not in learner/ or rollout_worker/, because composing the sides is services' job: the sides
take plain arguments and callables and never import services.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import timedelta
from typing import Any

from buffer.redis_buffer import StalenessBuffer
from buffer.server import connect
from services.config import Config
from services.launcher import RedisEndpoint
from services.metrics import metrics_logger

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 600  # every rank joins within this (a loaded machine builds engines slowly)


def _where() -> dict[str, Any]:
    """This process and its node (runs/<name>/placement.json)."""
    import ray

    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def _normal_priority(role: str) -> None:
    """Run at nice 0. Ray starts its workers at nice 15 (its `worker_niceness`, for idle pooled workers), and our
    learner and engines are those workers: on a node with any other busy process (a data loader, another job, a
    test's load) they got a few percent of a core (measured: two nice-0 busy loops slowed the suite's multi-process
    tests ~20x). A local Ray is started with worker_niceness 0 (services/launcher.py); on a cluster started
    without it the actor lowers its own niceness, which needs CAP_SYS_NICE (root has it; a container may not)."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        log.warning("%s runs at nice %d (Ray's worker_niceness) and may not lower it: any other busy process on "
                    "this node takes the CPU first; start Ray with RAY_worker_niceness=0", role,
                    os.getpriority(os.PRIO_PROCESS, 0))


def _buffer(cfg: Config, redis: RedisEndpoint) -> StalenessBuffer:
    return StalenessBuffer(connect(redis.url, redis.password), cfg.buffer)


def _delay(delays: list[float], worker_id: str) -> float:
    """rollout.delay_s[i % len] for worker "worker-<i>"."""
    if not delays:
        return 0.0
    return delays[int(worker_id.rsplit("-", 1)[1]) % len(delays)]


class LearnerActor:
    """One learner rank (DeepSpeed) as an actor: rendezvous / setup / train(n) / checkpoint / save_final.

    With N ranks, services starts N of these in a placement group, asks rank 0 to open the rendezvous (a TCPStore
    on its node, on a port the OS picks: no probed port to lose to another process), and calls every method on
    every rank: train, checkpoint, publish and save_final are collectives. Rank 0 alone reads the buffer (and
    broadcasts each batch), writes the ledger, acks and reports; the other ranks get no buffer."""

    def __init__(self, cfg: Config, model_dir: str, run_dir: str, redis: RedisEndpoint, registry: Any, hub: Any,
                 rank: int = 0):
        from learner.loop import Learner
        from learner.publisher import WeightPublisher

        _normal_priority(f"learner rank {rank}")
        self.cfg = cfg
        self.model_dir = model_dir
        self.rank = rank
        self._store = None
        lead = rank == 0
        buffer = _buffer(cfg, redis) if lead else None
        self.publisher = WeightPublisher(
            registry,
            publish_every=cfg.weights.publish_every,
            bucket_mb=cfg.weights.bucket_mb,
            dtype=cfg.weights.dtype,
            timeout_s=cfg.weights.timeout_s,
            metrics=metrics_logger(hub, "learner") if hub is not None and lead else None,
            pins=buffer.pinned_versions if buffer is not None else None,
            background=cfg.weights.background,
        )
        self.learner = Learner(
            cfg.learner,
            model_dir,
            buffer,
            run_dir,
            batch_groups=cfg.buffer.batch_groups,
            publish=lambda version, _tensors: self.publisher.publish(self.learner.trainer.engine, version),
            publish_every=cfg.weights.publish_every,
            report=metrics_logger(hub, "learner") if hub is not None and lead else None,
            temperature=cfg.rollout.temperature,
        )

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        return _where()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the process group's store on this node; returns (address, port) for the other ranks."""
        import ray
        import torch.distributed as dist

        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, self.cfg.learner.num_processes, is_master=True,
                                    timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S), wait_for_workers=False)
        return host, self._store.port

    def setup(self, rendezvous: tuple[str, int] | None = None) -> int:
        """Join the process group (N > 1), build the engine (resuming from the newest checkpoint) and publish the
        starting weights, so that a worker asked for this version (fixed staleness, a resume) can load it."""
        from learner.memory import check_learner_memory, count_parameters, rank_memory

        # Before the engine: a learner that cannot fit is one line, not an out-of-memory minutes later.
        check_learner_memory(count_parameters(self.model_dir), self.cfg.learner, *rank_memory(self.cfg.learner))
        world = self.cfg.learner.num_processes
        if world > 1:
            import torch.distributed as dist

            from learner.trainer import init_distributed

            store = self._store or dist.TCPStore(rendezvous[0], rendezvous[1], world, is_master=False,
                                                 timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
            init_distributed(store, self.rank, world)
            print(f"learner rank {self.rank} of {world}: pid {os.getpid()}", flush=True)  # which process is which
        version = self.learner.setup()
        self.publisher.publish(self.learner.trainer.engine, version)
        self.publisher.flush()  # workers start by fetching this version
        return version

    def train(self, n_steps: int) -> dict[str, Any]:
        try:
            out = self.learner.train(n_steps)
        except BaseException:
            with contextlib.suppress(Exception):  # the training error is the one to see
                self.publisher.flush()
            raise
        self.publisher.flush()  # the newest version is registered before the driver evaluates it
        return out

    def stop(self) -> None:
        """Ends a train() waiting for data (called on a second thread: the actor runs with max_concurrency=2)."""
        self.learner.stop()

    def checkpoint(self) -> int:
        if self.learner.last_checkpoint != self.learner.version:
            self.learner.checkpoint()
        return self.learner.version

    def save_final(self, out_dir: str) -> str:
        """The trained policy as an HF folder (weights + the tokenizer files of the starting model)."""
        from learner.checkpoint import save_final

        return str(save_final(self.learner.trainer, out_dir, self.model_dir))

    def state(self) -> dict[str, Any]:
        return self.learner.state()


class RolloutActor:
    """A rollout worker (vLLM) as a threaded actor: run() loops in one thread; stop() and evaluate() come in on
    another (max_concurrency=3)."""

    def __init__(self, cfg: Config, model_dir: str, worker_id: str, redis: RedisEndpoint, registry_name: str,
                 hub_name: str | None):
        import ray

        from rollout_worker.engine import build_engine
        from rollout_worker.tasks import load_task
        from rollout_worker.weights import WeightsFetcher
        from rollout_worker.worker import RolloutWorker

        _normal_priority(worker_id)  # before the engine: its processes inherit it
        self.cfg = cfg
        self.worker_id = worker_id
        self.engine = build_engine(model_dir, cfg.rollout)
        self.task = load_task(cfg.task)
        # The registry and the hub come by name, not as handles: Ray keeps handle arguments of a restartable
        # actor in the object store and warns on every run that a restart would need them.
        registry = ray.get_actor(registry_name, namespace=cfg.cluster.namespace)
        hub = ray.get_actor(hub_name, namespace=cfg.cluster.namespace) if hub_name else None
        logger = metrics_logger(hub, f"rollout/{worker_id}") if hub is not None else None
        self.fetcher = WeightsFetcher(registry, timeout_s=cfg.weights.timeout_s, metrics=logger)
        self.hub = hub
        self.worker = RolloutWorker(
            self.engine,
            self.task,
            _buffer(cfg, redis),
            cfg.rollout,
            cfg.task,
            worker_id=worker_id,
            get_latest=self.fetcher.latest_version,
            fetch=self.fetcher.fetch,  # its refs go to the engine's processes, which pull the buckets themselves
            report=logger,
            delay_s=_delay(cfg.rollout.delay_s, worker_id),
        )

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        return _where()

    def run(self) -> int:
        return self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def evaluate(self, load_latest: bool = False) -> dict[str, Any]:
        """Held-out greedy accuracy of the weights this worker holds (optionally the newest first), and avg@k at
        the rollout temperature (task.eval_samples)."""
        from rollout_worker.evaluate import evaluate

        # The worker's engine lock: the rollout loop must not generate while the eval swaps weights (it would
        # tag a batch with weights it was not admitted for), and the eval must score the version it reports.
        records = []  # (source, step, values), in the hub before this returns: the final eval's come just before
        with self.worker.engine_lock:  # the driver closes the hub, and a fire-and-forget record could come after
            if load_latest:
                latest = self.fetcher.latest_version()
                if latest > self.engine.version:
                    t0 = time.perf_counter()
                    self.engine.update_weights(self.fetcher.fetch(latest), latest)
                    # A load like the loop's: every version a worker pulled is on record.
                    records.append((f"rollout/{self.worker_id}", self.worker.step,
                                    {"weights/version": latest, "weights/fetch_s": time.perf_counter() - t0}))
            version = self.engine.version
            result = evaluate(self.engine, self.task, n=1, timeout_s=self.cfg.task.reward_timeout_s)
            values = {"eval/accuracy": result["accuracy"], "eval/version": version}
            k = self.cfg.task.eval_samples
            if k:  # what the policy samples, as trained: greedy hides the entropy and tail damage (M2PO paper)
                # Seeded: reproducible for the run's seed, and the same random numbers at every version (the
                # curve's differences are the policy's, not the sampler's).
                sampled = evaluate(self.engine, self.task, n=k, temperature=self.cfg.rollout.temperature,
                                   timeout_s=self.cfg.task.reward_timeout_s, seed=self.cfg.task.seed)
                result.update(avg_at_k=sampled["accuracy"], k=k, sampled_temperature=sampled["temperature"])
                values["eval/avg_at_k"] = sampled["accuracy"]
        result["version"] = version
        records.append(("eval", version, values))
        if self.hub is not None:
            import ray

            ray.get([self.hub.log.remote(*r) for r in records], timeout=60)
        return result
