"""The Ray actors of a run: thin shells that build a side's object from the run config and the shared handles
that services hands over (the buffer's address and password, the weight registry, the metrics hub).

They live here, not in learner/ or rollout_worker/, because composing the sides is services' job: the sides
take plain arguments and callables and never import services.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from buffer.redis_buffer import StalenessBuffer
from buffer.server import connect
from services.config import Config
from services.launcher import RedisEndpoint
from services.metrics import metrics_logger

log = logging.getLogger(__name__)


def _buffer(cfg: Config, redis: RedisEndpoint) -> StalenessBuffer:
    return StalenessBuffer(connect(redis.url, redis.password), cfg.buffer)


class LearnerActor:
    """The learner (DeepSpeed) as an actor: setup / train(n) / checkpoint / save_final."""

    def __init__(self, cfg: Config, model_dir: str, run_dir: str, redis: RedisEndpoint, registry: Any, hub: Any):
        from learner.loop import Learner
        from learner.publisher import WeightPublisher

        self.cfg = cfg
        self.model_dir = model_dir
        self.publisher = WeightPublisher(
            registry,
            publish_every=cfg.weights.publish_every,
            bucket_mb=cfg.weights.bucket_mb,
            dtype=cfg.weights.dtype,
            timeout_s=cfg.weights.timeout_s,
            metrics=metrics_logger(hub, "learner") if hub is not None else None,
        )
        self.learner = Learner(
            cfg.learner,
            model_dir,
            _buffer(cfg, redis),
            run_dir,
            batch_groups=cfg.buffer.batch_groups,
            publish=lambda version, _tensors: self.publisher.publish(self.learner.trainer.engine, version),
            publish_every=cfg.weights.publish_every,
            report=metrics_logger(hub, "learner") if hub is not None else None,
            temperature=cfg.rollout.temperature,
        )

    def setup(self) -> int:
        """Build the engine (resuming from the newest checkpoint) and publish the starting weights, so that a
        worker asked for this version (fixed staleness, or after a resume) can load it."""
        version = self.learner.setup()
        self.publisher.publish(self.learner.trainer.engine, version)
        return version

    def train(self, n_steps: int) -> dict[str, Any]:
        return self.learner.train(n_steps)

    def stop(self) -> None:
        """Ends a train() waiting for data (called on a second thread: the actor runs with max_concurrency=2)."""
        self.learner.stop()

    def checkpoint(self) -> int:
        if self.learner.last_checkpoint != self.learner.version:
            self.learner.checkpoint()
        return self.learner.version

    def save_final(self, out_dir: str) -> str:
        """The trained policy as an HF folder (weights + the tokenizer files of the starting model)."""
        out = Path(out_dir)
        self.learner.trainer.engine.module.save_pretrained(out, safe_serialization=True)
        for f in Path(self.model_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and f.is_file():
                shutil.copy2(f, out / f.name)
        return str(out)

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
            fetch=lambda version: self.fetcher.fetch(version).tensors(),
            report=logger,
        )

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> int:
        return self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def evaluate(self, load_latest: bool = False) -> dict[str, Any]:
        """Held-out greedy accuracy of the weights this worker holds (optionally the newest first)."""
        from rollout_worker.evaluate import evaluate

        # The worker's engine lock: the rollout loop must not generate while the eval swaps weights (it would
        # tag a batch with weights it was not admitted for), and the eval must score the version it reports.
        with self.worker.engine_lock:
            if load_latest:
                latest = self.fetcher.latest_version()
                if latest > self.engine.version:
                    self.engine.update_weights(self.fetcher.fetch(latest).tensors(), latest)
            version = self.engine.version
            result = evaluate(self.engine, self.task, n=1, timeout_s=self.cfg.task.reward_timeout_s)
        result["version"] = version
        if self.hub is not None:
            metrics_logger(self.hub, "eval")(version, {"eval/accuracy": result["accuracy"], "eval/version": version})
        return result
