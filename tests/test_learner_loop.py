"""The learner loop against real Redis and real DeepSpeed: SIGKILL it, resume it, and prove exactly-once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from buffer.config import BufferConfig
from buffer.redis_buffer import StalenessBuffer
from learner.checkpoint import CheckpointManager, write_atomic
from learner.loop import Ledger
from tests.learner_helpers import make_groups, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_ledger_last_record_of_a_version_wins_and_torn_lines_are_skipped(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append({"version": 1, "entry_ids": ["a"]})
    ledger.append({"version": 2, "entry_ids": ["b"]})
    ledger.append({"version": 2, "entry_ids": ["c"]})
    with open(ledger.path, "a") as f:
        f.write('{"version": 3, "entry_')  # a crash mid-write
    assert {v: r["entry_ids"] for v, r in ledger.history().items()} == {1: ["a"], 2: ["c"]}
    assert list(ledger.history(up_to=1)) == [1]


def test_atomic_pointer_and_missing_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    write_atomic(tmp_path / "latest", "v00000002")
    assert manager.latest() is None  # the pointer names a checkpoint without its metadata: not complete
    (tmp_path / "v00000002").mkdir()
    (tmp_path / "v00000002" / "staleflow.json").write_text("{}")
    assert manager.latest() == tmp_path / "v00000002"
    assert not list(tmp_path.glob(".*.tmp"))


def _start(spec: dict, tmp_path: Path, name: str, password: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, DS_ACCELERATOR="cpu", TEST_REDIS_PASSWORD=password, PYTHONPATH=str(ROOT))
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.learner_helpers", "learn", str(path)], env=env, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen, marker: Path, log: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"learner exited ({proc.returncode}) before {marker.name}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {marker.name} after {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)


@pytest.mark.slow
def test_sigkill_and_resume_trains_every_entry_exactly_once(redis_server, redis_client, tmp_path):
    """Run 1 dies after update 3 (checkpoint 2 holds 1-2). Run 2 resumes at 2, redoes 3 and 4, checkpoints 4
    and dies before acking. Run 3 resumes at 4 (acking what checkpoint 4 covers) and finishes at 6."""
    total, batch = 6, 2
    bcfg = BufferConfig(prefix=f"learn-{uuid.uuid4().hex[:10]}", policy="unbounded", aof=False)
    buffer = StalenessBuffer(redis_client, bcfg)
    pushed = buffer.push_many(make_groups(total * batch, seed=5, n=2), "w0")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = {
        "redis_url": redis_server.url, "buffer": bcfg.model_dump(), "model_dir": str(tiny_model(tmp_path / "m")),
        "run_dir": str(run_dir), "total_steps": total, "batch_groups": batch, "checkpoint_every": 2, "budget": 64,
    }  # fmt: skip
    pw = redis_server.password

    first = _start(spec | {"pause_after_version": 3}, tmp_path, "run1", pw)
    _wait_for(first, run_dir / "paused", tmp_path / "run1.log")
    _kill(first)
    ledger = Ledger(run_dir / "ledger.jsonl")
    assert [r["version"] for r in ledger.records()] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "v00000002"

    second = _start(spec | {"hang_in_ack_version": 4}, tmp_path, "run2", pw)
    _wait_for(second, run_dir / "hung-in-ack", tmp_path / "run2.log")
    _kill(second)
    assert (run_dir / "checkpoints" / "latest").read_text() == "v00000004"
    assert buffer.stats().pending == 2 * batch  # updates 3 and 4: checkpointed, never acked

    third = _start(spec, tmp_path, "run3", pw)
    assert third.wait(timeout=900) == 0, (tmp_path / "run3.log").read_text()[-3000:]

    records = ledger.records()
    assert [r["version"] for r in records] == [1, 2, 3, 3, 4, 5, 6]
    assert [r["resumed_from"] for r in records] == [None, None, None, 2, 2, 4, 4]
    # The update after the lost checkpoint was redone on the same entries, from the same restored state
    # (model, optimizer): the same loss to float precision.
    pre, redo = records[2], records[3]
    assert pre["entry_ids"] == redo["entry_ids"] and pre["trajectory_ids"] == redo["trajectory_ids"]
    assert redo["loss"] == pytest.approx(pre["loss"], rel=1e-5, abs=1e-7)
    # Exactly once: the history in force uses every pushed entry once, and nothing else.
    history = ledger.history()
    used = [i for rec in history.values() for i in rec["entry_ids"]]
    assert sorted(used) == sorted(pushed)
    stats = buffer.stats()
    assert stats.pending == 0 and stats.depth == 0 and stats.learner_version == total
    assert (run_dir / "checkpoints" / "latest").read_text() == "v00000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("v*")) == ["v00000004", "v00000006"]
