"""The learner loop: pull groups from the staleness buffer, step, publish weights, checkpoint, then ack.

Exactly-once rule: after a crash and a restart from the last checkpoint, every trajectory used by an update the
checkpoint does not contain is trained on again, and none it contains is trained twice. How:
  1. entries are acked only after the checkpoint holding their update is durable (learner/checkpoint.py);
  2. the checkpoint records the ids it covers that are not acked yet; on resume they are acked first;
  3. unacked entries stay pending for this consumer name, and the buffer re-delivers them first, in order.
The ledger (`<run_dir>/ledger.jsonl`, one JSON line per update, written before the checkpoint that covers it)
is the audit trail: a redone version appends a new line, and the last line of a version is the one in force.

`Learner` holds no global state, so services can wrap it in a Ray actor (setup / train / state).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from buffer.adaptive import BoundController, Signals
from buffer.trajectory import TrajectoryGroup, decode_group, encode_group
from learner.checkpoint import CheckpointManager
from learner.config import LearnerConfig

log = logging.getLogger(__name__)

Publish = Callable[[int, Iterable[tuple[str, torch.Tensor]]], Any]
Report = Callable[[int, dict[str, Any]], None]  # report(step, values), like services.metrics_logger


class LearnerStopped(Exception):
    """stop() was called while the learner waited for data: the update in progress is abandoned (its groups stay
    unacknowledged in the buffer and are delivered again to the next run)."""


class LearnerStarved(TimeoutError):
    """The buffer delivered no group for `starve_timeout_s`: no rollout worker is producing."""


@dataclass(frozen=True)
class Pulled:
    id: str  # buffer entry id
    group: TrajectoryGroup


def _broadcast_bytes(payload: bytes, device) -> bytes:
    """Rank 0's bytes on every rank (msgpack of ids and wire-format groups: nothing is pickled)."""
    n = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes()


class Ledger:
    """Append-only JSON lines {version, entry_ids, trajectory_ids, ...}; the last line of a version wins.

    `append` hands each line to the OS (a crash of the learner process loses nothing); `sync` makes them durable
    and runs before every checkpoint, the point from which a resume trusts them. An fsync per update would put a
    disk flush on the learner's step for lines that a machine crash makes moot anyway: the updates after the last
    checkpoint are redone, and their lines written again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dirty = False

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._dirty = True

    def sync(self) -> None:
        if self._dirty and self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._dirty = False

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write: its update is redone anyway
                log.warning("ledger %s: skipping a torn line", self.path)
        return out

    def history(self, up_to: int | None = None) -> dict[int, dict[str, Any]]:
        """version -> the record in force (last written), optionally only versions <= up_to."""
        hist = {}
        for rec in self.records():
            if up_to is None or rec["version"] <= up_to:
                hist[rec["version"]] = rec
        return dict(sorted(hist.items()))


class Learner:
    """One data-parallel learner rank. Rank 0 alone talks to the buffer (pull, set_version, ack) and writes
    the ledger; it broadcasts each batch to the other ranks, which may pass buffer=None. Checkpoints and
    `publish` run on every rank (both are collective under ZeRO-3)."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_dir: str | Path,
        buffer,  # buffer.redis_buffer.StalenessBuffer (duck-typed: pull / ack / set_version / stats)
        run_dir: str | Path,
        *,
        batch_groups: int = 8,
        publish: Publish | None = None,
        publish_every: int = 1,
        report: Report | None = None,
        consumer: str = "learner-0",
        pull_block_ms: int = 1000,
        starve_timeout_s: float | None = None,
        temperature: float = 1.0,
    ):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.buffer = buffer
        self.run_dir = Path(run_dir)
        self.batch_groups = batch_groups
        self.publish = publish
        self.publish_every = publish_every
        self.report = report
        self.consumer = consumer
        self.pull_block_ms = pull_block_ms
        self.starve_timeout_s = starve_timeout_s
        self.temperature = temperature
        self.trainer = None
        self.lead = True
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.keep_checkpoints)
        self.ledger = Ledger(self.run_dir / "ledger.jsonl")
        self._unacked: list[str] = []  # entries used by updates not covered by a checkpoint yet
        self.resumed_from: int | None = None
        self.last_checkpoint: int | None = None
        self.last_stats: dict[str, Any] = {}
        self._stop = threading.Event()  # set from another thread (a threaded Ray actor) to end train() early
        self.controller: BoundController | None = None  # rank 0, policy=adaptive

    def setup(self) -> int:
        """Build the engine, resume from the newest checkpoint if any. Returns the policy version."""
        from learner.trainer import Trainer  # deepspeed/transformers imports: only in the process that trains

        self.trainer = Trainer(self.cfg, self.model_dir, temperature=self.temperature)
        self.lead = self.trainer.rank == 0
        state = self.checkpoints.load(self.trainer)
        if state is not None:
            # The process may have died between writing this checkpoint and acking what it covers.
            if self.lead:
                self.buffer.ack(state.unacked_ids)
            self.resumed_from = self.last_checkpoint = state.version
            log.info("resumed from checkpoint v%d (%d entries acked)", state.version, len(state.unacked_ids))
        if self.lead:
            self.buffer.set_version(self.trainer.version)
            if getattr(getattr(self.buffer, "cfg", None), "policy", None) == "adaptive":
                # the adaptive policy's bound follows what this learner measures (buffer/adaptive.py)
                self.controller = BoundController(self.buffer.cfg.adaptive, self.buffer.bound())
        return self.trainer.version

    @property
    def version(self) -> int:
        return self.trainer.version if self.trainer is not None else 0

    def _pull_batch(self) -> list[Pulled]:
        if self.trainer.world_size == 1:
            return [Pulled(e.id, e.group) for e in self._pull_local()]
        # Every other rank waits in the broadcast: rank 0 must send something even when it stops (Ctrl-C, the
        # end of the run) or starves, or they would hang there. It sends the reason, and every rank raises.
        ended: LearnerStopped | LearnerStarved | None = None
        entries = []
        if self.lead:
            try:
                entries = self._pull_local()
            except (LearnerStopped, LearnerStarved) as exc:
                ended = exc
        payload = b""
        if self.lead and ended is None:
            payload = msgpack.packb({"groups": [[e.id, encode_group(e.group)] for e in entries]})
        elif self.lead:
            payload = msgpack.packb({"starved" if isinstance(ended, LearnerStarved) else "stopped": str(ended)})
        message = msgpack.unpackb(_broadcast_bytes(payload, self.trainer.device))
        if ended is not None:
            raise ended
        if "stopped" in message:
            raise LearnerStopped(message["stopped"])
        if "starved" in message:
            raise LearnerStarved(message["starved"])
        return [Pulled(i, decode_group(g)) for i, g in message["groups"]]

    def _pull_local(self) -> list:
        entries: list = []
        waited_since = time.monotonic()
        while len(entries) < self.batch_groups:
            if self._stop.is_set():
                raise LearnerStopped(f"stopped while waiting for data ({len(entries)}/{self.batch_groups} groups)")
            got = self.buffer.pull(self.batch_groups - len(entries), consumer=self.consumer, block_ms=self.pull_block_ms)
            entries += got
            if got:
                waited_since = time.monotonic()
            elif self.starve_timeout_s is not None and time.monotonic() - waited_since > self.starve_timeout_s:
                raise LearnerStarved(
                    f"no group arrived for {self.starve_timeout_s:g}s ({len(entries)}/{self.batch_groups} "
                    "of this update's groups so far): are the rollout workers running?"
                )
        return entries

    def train(self, n_steps: int) -> dict[str, Any]:
        """Make `n_steps` updates. Returns the last update's metrics."""
        if self.trainer is None:
            raise RuntimeError("call setup() first")
        for _ in range(n_steps):
            t_wait = time.perf_counter()
            try:
                entries = self._pull_batch()
            except LearnerStopped as stopped:
                log.info("learner: %s", stopped)
                break
            idle_s = time.perf_counter() - t_wait  # waiting for data: the rollout side is the bottleneck
            stats = self.trainer.step([e.group for e in entries])
            stats["learner/idle_s"] = idle_s
            version = self.trainer.version
            ids = [e.id for e in entries]
            self._unacked += ids
            if self.lead:
                self.buffer.set_version(version)
                self.ledger.append(
                    {
                        "version": version,
                        "entry_ids": ids,
                        "trajectory_ids": [t.id for e in entries for t in e.group.trajectories],
                        "loss": stats["loss/value"],
                        "resumed_from": self.resumed_from,
                    }
                )
            if self.controller is not None:
                self._steer(version, stats)
            if self.publish is not None and version % self.publish_every == 0:
                t0 = time.perf_counter()
                published = self.publish(version, self.trainer.named_tensors())
                stats["weights/publish_s"] = time.perf_counter() - t0
                if isinstance(published, dict):  # the publisher's own figures (bytes, buckets, ...)
                    stats.update({f"weights/{k}": v for k, v in published.items() if isinstance(v, (int, float))})
            if version % self.cfg.checkpoint_every == 0:
                stats["time/checkpoint_s"] = self.checkpoint()
            self.last_stats = stats
            if self.report is not None and self.lead:
                self.report(version, stats)
        return self.last_stats

    def _steer(self, version: int, stats: dict[str, Any]) -> None:
        """adaptive: feed the update's measurements to the controller; apply and log a change of the bound."""
        signals = Signals(idle_s=float(stats.get("learner/idle_s") or 0.0), step_s=float(stats.get("time/step_s") or 0.0),
                          masked_fraction=float(stats.get("loss/masked_fraction") or 0.0),
                          m2_before=float(stats.get("m2po/m2_before") or 0.0))
        change = self.controller.observe(version, signals)
        if change is not None:
            self.buffer.set_bound(change.new)
            log.info("adaptive staleness: bound %d -> %d at v%d (%s: learner idle %.2f, masked %.4f, M2 %.3g)",
                     change.old, change.new, version, change.reason, change.idle, change.masked, change.m2)
            with open(self.run_dir / "adaptive.jsonl", "a") as f:
                f.write(json.dumps(asdict(change), separators=(",", ":")) + "\n")
        stats["staleness/bound"] = self.controller.bound

    def stop(self) -> None:
        """End a train() that waits for data (its current update is abandoned, nothing is lost). Thread-safe."""
        self._stop.set()

    def checkpoint(self) -> float:
        """Write a checkpoint of the current version, then ack what it covers. Returns the seconds it took."""
        t0 = time.perf_counter()
        if self.lead:
            self.ledger.sync()  # the lines of the updates this checkpoint covers are on disk before it is
        self.checkpoints.save(self.trainer, self._unacked)
        self.last_checkpoint = self.trainer.version
        if self.lead:
            self.buffer.ack(self._unacked)
        self._unacked = []
        return time.perf_counter() - t0

    def state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "resumed_from": self.resumed_from,
            "last_checkpoint": self.last_checkpoint,
            "unacked_entries": len(self._unacked),
            "run_dir": str(self.run_dir),
        }


def run_learner(
    cfg: LearnerConfig,
    model_dir: str | Path,
    buffer,
    publish: Publish | None,
    report: Report | None,
    total_steps: int,
    *,
    run_dir: str | Path,
    batch_groups: int = 8,
    publish_every: int = 1,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train until policy version `total_steps` (resuming if `run_dir` has a checkpoint), checkpoint, ack."""
    learner = Learner(
        cfg, model_dir, buffer, run_dir, batch_groups=batch_groups, publish=publish,
        publish_every=publish_every, report=report, **kwargs,
    )  # fmt: skip
    learner.setup()
    learner.train(max(0, total_steps - learner.version))
    if learner.last_checkpoint != learner.version:
        learner.checkpoint()
    return learner.state()
