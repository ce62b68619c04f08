"""The buffer path under failure, with real processes and a real redis-server: Redis killed and restarted under
load (nothing acknowledged is lost, nothing is trained on twice), replies lost on the wire (every buffer call is
safe to retry), Redis unreachable at start (one clear line), and bad input at each boundary (a counted,
logged drop or dead letter; the consumer stays up). See docs/reliability.md for the guarantees."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from buffer.config import BufferConfig
from buffer.redis_buffer import StalenessBuffer
from buffer.server import EmbeddedRedis, _free_port, connect
from buffer.staleness import ACK_LUA
from buffer.trajectory import Trajectory, TrajectoryGroup, encode_group
from tests.buffer_helpers import make_group, wire_v1

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- processes (spawned: importable by name)


def _buffer(url: str, cfg_json: str) -> StalenessBuffer:
    cfg = BufferConfig.model_validate_json(cfg_json)
    return StalenessBuffer(connect(url, os.environ["TEST_REDIS_PASSWORD"], reconnect_s=cfg.reconnect_s), cfg)


def produce_logged(url: str, cfg_json: str, worker: str, count: int, log_path: str) -> None:
    """Admit, push, and log every group Redis acknowledged (push returned an entry id), one line each."""
    buf = _buffer(url, cfg_json)
    with open(log_path, "a") as log:
        for i in range(count):
            while buf.admit(worker, 1, timeout_s=5).granted == 0:
                pass
            group = make_group(0, gid=f"{worker}-{i}", seed=i)
            entry_id = buf.push(group, worker, timeout_s=60)
            log.write(f"{group.group_id} {entry_id}\n")
            log.flush()
            time.sleep(0.01)  # a steady stream rather than one burst: the restarts land mid-flight


def consume_logged(url: str, cfg_json: str, expected: int, log_path: str, limit_s: float) -> None:
    """The learner side: pull, log what it would train on, ack; until `expected` groups or `limit_s`."""
    buf = _buffer(url, cfg_json)
    got, end = 0, time.monotonic() + limit_s
    with open(log_path, "a") as log:
        while got < expected and time.monotonic() < end:
            entries = buf.pull(8, consumer="learner-0", block_ms=200)
            log.writelines(f"{e.group.group_id} {e.id}\n" for e in entries)
            log.flush()
            buf.ack([e.id for e in entries])
            got += len(entries)


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(pred, timeout_s: float, what: str) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------- 1. Redis restarted under load


def test_redis_killed_and_restarted_under_load_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    producers, per_producer = 3, 80
    total = producers * per_producer
    with EmbeddedRedis(data_dir=tmp_path / "redis", aof=True, appendfsync="always") as server:
        monkeypatch.setenv("TEST_REDIS_PASSWORD", server.password)
        # bounded admission runs for every group (its idempotency is checked below); s is wide enough that no
        # group can go stale however the restarts delay it, so "nothing lost" can be exact
        cfg = BufferConfig(prefix="restart", policy="bounded", max_staleness=63, batch_groups=4,
                           capacity_groups=256, aof=True, appendfsync="always", reconnect_s=30, claim_idle_s=5)
        ctx = mp.get_context("spawn")
        logs = [tmp_path / f"w{i}.log" for i in range(producers)]
        consumed_log = tmp_path / "learner.log"
        procs = [ctx.Process(target=produce_logged, args=(server.url, cfg.model_dump_json(), f"w{i}", per_producer,
                                                          str(logs[i]))) for i in range(producers)]
        procs.append(ctx.Process(target=consume_logged, args=(server.url, cfg.model_dump_json(), total,
                                                              str(consumed_log), 240)))
        for p in procs:
            p.start()
        try:
            acked = lambda: sum(len(_lines(p)) for p in logs)  # noqa: E731
            # every process connected and working first: one that *starts* while Redis is down fails fast by
            # design (connect() does not retry a first contact), which is not what this test is about
            _wait_for(lambda: acked() >= 40 and all(_lines(p) for p in logs) and _lines(consumed_log), 180,
                      "every producer and the learner at work")
            server.proc.kill()  # a crash: no SHUTDOWN, no final fsync beyond appendfsync always
            server.proc.wait(5)
            before_crash = {gid for p in logs for gid, _ in _lines(p)}  # Redis is down: this cannot grow now
            time.sleep(0.5)  # clients are retrying against a closed port
            server.restart()
            _wait_for(lambda: acked() >= len(before_crash) + 40, 120, "pushes after the first restart")
            mid_flight = acked()
            server.restart()  # graceful this time (SHUTDOWN NOSAVE)
            for p in procs:
                p.join(240)
            progress = {"acked": acked(), "consumed": len(_lines(consumed_log)),
                        "stats": StalenessBuffer(connect(server.url, server.password), cfg).stats().model_dump()}
            assert [p.exitcode for p in procs] == [0] * len(procs), progress
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
        assert len(before_crash) < total and mid_flight < total  # the restarts really happened under load

        produced = [gid for p in logs for gid, _ in _lines(p)]
        consumed = [gid for gid, _ in _lines(consumed_log)]
        assert len(produced) == total == len(set(produced))
        assert before_crash <= set(consumed)  # acknowledged before the crash: still there after it
        assert sorted(consumed) == sorted(produced), progress  # nothing lost, nothing trained on twice

        buf = StalenessBuffer(connect(server.url, server.password), cfg)
        stats = buf.stats()
        assert stats.depth == 0 and stats.pending == 0 and stats.dead_letters == {}
        assert set(stats.drops) <= {"duplicate"}  # a push retried after a lost reply: dropped, counted
        assert stats.consumed == total
        # admission counted each group once: retried admits did not grant twice, retried pushes gave back
        assert stats.outstanding == 0 and int(buf.r.hget(buf.k_state, "inflight")) == total


# ---------------------------------------------------------------- 2. replies lost on the wire


class LossyProxy:
    """A TCP proxy in front of Redis that can lose one reply: the request containing `marker` is delivered and
    runs, then the connection is cut before its reply gets through (what a network failure or a Redis crash
    right after a write does). redis-py then reconnects and retries the call."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, marker: bytes) -> None:
        self.marker, self.lost = marker, 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            cut = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._replies, args=(client, upstream, cut), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    cut.set()  # set before forwarding: the reply cannot overtake it
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, upstream)

    def _replies(self, client: socket.socket, upstream: socket.socket, cut: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if cut.is_set():
                    self.lost += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, upstream)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def lossy(redis_server, buffer_factory):  # noqa: ANN001, ANN201
    """(buffer through a LossyProxy, proxy, same buffer direct to Redis)."""
    proxy = LossyProxy(redis_server.port)
    direct = buffer_factory(policy="bounded", max_staleness=3, batch_groups=2, capacity_groups=32)
    client = connect(f"redis://127.0.0.1:{proxy.port}/0", redis_server.password, reconnect_s=10)
    yield StalenessBuffer(client, direct.cfg), proxy, direct
    client.close()
    proxy.close()


def test_an_admit_whose_reply_is_lost_grants_once(lossy):
    buf, proxy, direct = lossy
    buf.admit("w", 1)  # loads the script: the lost call below is the script itself
    proxy.lose_reply_to(buf._admit.sha.encode())
    adm = buf.admit("w", 3)
    assert proxy.lost == 1 and adm.granted == 3
    stats = direct.stats()
    assert stats.outstanding == 4 and stats.admitted == 4  # a retried grant would make these 7


def test_a_push_whose_reply_is_lost_is_trained_on_once(lossy):
    buf, proxy, direct = lossy
    assert buf.admit("w", 2).granted == 2
    buf.push(make_group(0, gid="warm"), "w")
    proxy.lose_reply_to(b"EXEC")  # push is MULTI / XADD / accounting / EXEC
    buf.push(make_group(0, gid="once"), "w")
    assert proxy.lost == 1
    assert direct.stats().depth == 3  # the retried transaction ran twice: two entries for "once"
    got = direct.pull(8, block_ms=200)
    direct.ack([e.id for e in got])
    assert sorted(e.group.group_id for e in got) == ["once", "warm"]
    stats = direct.stats()
    assert stats.drops == {"duplicate": 1} and stats.consumed == 2 and stats.depth == 0
    # the duplicate gave back the place it took: exactly the two real groups are in flight
    assert stats.outstanding == 0 and int(direct.r.hget(direct.k_state, "inflight")) == 2


def test_a_pull_whose_reply_is_lost_delivers_those_entries_on_the_next_pull(lossy):
    buf, proxy, direct = lossy
    for i in range(3):
        direct.push(make_group(0, gid=f"g{i}"), "w")
    proxy.lose_reply_to(b"XREADGROUP")
    # The pull's first round trip (version, pending count, first read) is retried after the lost reply: the
    # entries are delivered to learner-0 in Redis but unseen by it, and the pending count says so; it reads them
    # again in the same pull.
    again = buf.pull(3, consumer="learner-0", block_ms=100)
    assert proxy.lost == 1
    assert sorted(e.group.group_id for e in again) == ["g0", "g1", "g2"]
    assert buf.pull(3, consumer="learner-0", block_ms=50) == []  # and not a second time
    buf.ack([e.id for e in again])
    assert direct.stats().consumed == 3


def test_an_ack_whose_reply_is_lost_counts_once(lossy):
    buf, proxy, direct = lossy
    for i in range(2):
        direct.push(make_group(0, gid=f"g{i}"), "w")
    got = buf.pull(2, block_ms=200)
    buf.r.script_load(ACK_LUA)  # loaded: the call whose reply is lost is the script itself, which runs
    proxy.lose_reply_to(buf._ack.sha.encode())
    assert buf.ack([e.id for e in got]) == 0  # the retry found them already acknowledged...
    assert proxy.lost == 1
    stats = direct.stats()
    assert stats.consumed == 2 and stats.staleness_hist == {0: 2} and stats.depth == 0  # ...and counted once


# ---------------------------------------------------------------- 3. Redis unreachable at start


@pytest.mark.parametrize("command", [["buffer", "stats"], ["train"]])
def test_unreachable_redis_at_start_is_one_clear_line_from_the_cli(command, tmp_path):
    port, secret = _free_port(), "hunter2-Secret-do-not-print"
    proc = subprocess.run(  # in tmp_path: `train` makes its run directory under the working directory
        [sys.executable, "-m", "services.cli", *command, f"buffer.redis_url=redis://127.0.0.1:{port}/0"],
        cwd=tmp_path, env={**os.environ, "STALEFLOW_REDIS_PASSWORD": secret, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert 1 <= len(err.splitlines()) <= 2, err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err
    assert secret not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- 4. bad input at the buffer's boundary


def _wire(trajectory: dict | None = None, **top) -> bytes:  # noqa: ANN003
    payload = wire_v1(make_group(0, tokens=4, gid="bad"))
    payload["trajectories"][0].update(trajectory or {})
    payload.update(top)
    return msgpack.packb(payload, use_bin_type=True)


def _f32(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


# Gaps the dead-letter test of tests/test_buffer.py leaves: each must be a named dead letter.
BAD = {
    "inf_logp": ("non_finite", _wire({"behaviour_logp": _f32(0, -np.inf, 0, 0)})),
    "pos_inf_logp": ("non_finite", _wire({"behaviour_logp": _f32(0, np.inf, 0, 0)})),
    "nan_reward": ("non_finite", _wire({"reward": float("nan")})),
    "inf_reward": ("non_finite", _wire({"reward": float("inf")})),
    "schema_0": ("unknown_schema", _wire(schema=0)),
    "schema_as_text": ("unknown_schema", _wire(schema="1")),
    "schema_missing": ("unknown_schema", msgpack.packb({"group_id": "x", "trajectories": []})),
    "negative_version": ("version_mismatch", _wire({"version_min": -1, "versions": np.full(4, -1, "<i4").tobytes(),
                                                    "version_max": -1})),
    "empty_group": ("empty_group", _wire(trajectories=[])),
    "empty_prompt": ("empty_prompt", _wire({"prompt_ids": b""})),
    "odd_byte_count": ("bad_schema", _wire({"response_ids": b"\x00" * 7})),
    "not_a_map": ("bad_schema", msgpack.packb([1, 2, 3])),
    "unknown_field": ("bad_schema", _wire({"extra": 1})),
    "huge_length_header": ("bad_msgpack", b"\xdd\xff\xff\xff\xff"),  # claims 4 billion items, has none
    "truncated": ("bad_msgpack", _wire()[:-3]),
    "bad_utf8": ("bad_msgpack", b"\x81\xa3\xff\xfe\xfd\x01"),
    "empty_payload": ("bad_msgpack", b""),
    # format 2 (the frame encode_group writes), damaged
    "frame_truncated": ("bad_frame", bytes(encode_group(make_group(0, tokens=4)))[:-4]),
    "frame_too_long": ("bad_frame", bytes(encode_group(make_group(0, tokens=4))) + b"\0\0\0\0"),
    "frame_header_past_end": ("bad_frame", b"SFG\x02\xff\xff\x00\x00" + b"\x90" * 8),
    "frame_short": ("bad_frame", b"SFG\x02\x01"),
    "frame_format_3": ("unknown_schema", b"SFG\x03" + bytes(encode_group(make_group(0, tokens=4)))[4:]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_named_dead_letter_and_the_consumer_goes_on(buffer_factory, case):
    reason, raw = BAD[case]
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    buf.r.xadd(buf.k_stream, {"d": raw, "w": "w-bad", "s": "-"})
    buf.push(make_group(0, gid="good"), "w")
    got = buf.pull(4, block_ms=300)
    assert [e.group.group_id for e in got] == ["good"]
    buf.ack([e.id for e in got])
    stats = buf.stats()
    assert stats.dead_letters == {reason: 1} and stats.depth == 0 and stats.pending == 0
    [letter] = buf.dead_letters()
    assert letter["raw"] == raw[:65536] and letter["worker"] == b"w-bad"


def _empty_response_group(version: int) -> TrajectoryGroup:
    trajs = [
        Trajectory.make(group_id="empty", prompt_ids=[1, 2, 3], response_ids=np.zeros(0, np.int32),
                        behaviour_logp=np.zeros(0, np.float32), version=version, reward=r, finish_reason="stop")
        for r in (0.0, 1.0)
    ]
    return TrajectoryGroup(group_id="empty", trajectories=trajs)


def test_empty_responses_are_accepted_and_the_learner_batches_them(buffer_factory):
    # A response of 0 tokens is a real sample (the model stopped at once) and its reward counts in the group's
    # advantage baseline: accepted, never dead-lettered. The learner must batch it without crashing.
    from learner.advantages import grpo_advantages
    from learner.batching import build_rows, collate

    buf = buffer_factory(policy="bounded", max_staleness=2, batch_groups=1, capacity_groups=8)
    buf.push(_empty_response_group(0), "w")
    [entry] = buf.pull(1, block_ms=300)
    assert [len(t.response_ids) for t in entry.group.trajectories] == [0, 0]
    assert [t.version_min for t in entry.group.trajectories] == [0, 0]
    rows, _ = build_rows([entry.group], 0, grpo_advantages)
    batch = collate(rows, 0)
    assert batch.mask.sum().item() == 0 and batch.response_ids.shape[0] == 2
    buf.ack([entry.id])
    assert buf.stats().consumed == 1


def test_a_group_from_a_newer_policy_than_the_learner_is_trained_on_and_counted(buffer_factory, caplog):
    # e.g. the learner resumed from a checkpoint older than the weights the workers already had: the group is
    # still a valid sample of the policy it names (its behaviour log-probs correct for it); counted, logged
    buf = buffer_factory(policy="bounded", max_staleness=2, batch_groups=1, capacity_groups=8)
    buf.set_version(3)
    buf.push(make_group(5, gid="future"), "w")
    buf.push(make_group(3, gid="now"), "w")
    with caplog.at_level("WARNING", logger="buffer.redis_buffer"):
        got = buf.pull(2, block_ms=300)
    assert sorted(e.group.group_id for e in got) == ["future", "now"]
    assert {e.group.group_id: e.staleness for e in got} == {"future": -2, "now": 0}
    buf.ack([e.id for e in got])
    stats = buf.stats()
    assert stats.ahead_of_learner == 1 and stats.drops == {} and stats.consumed == 2
    assert any("newer policy" in r.getMessage() for r in caplog.records)


def test_the_same_group_pushed_twice_is_trained_on_once(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    group = make_group(0, gid="twice")
    buf.push(group, "w")
    buf.push(group, "w")  # e.g. a worker that restarted and replayed its last batch
    got = buf.pull(4, block_ms=300)
    assert [e.group.group_id for e in got] == ["twice"]
    buf.ack([e.id for e in got])
    # the learner dies before acking its next pull; the restarted one still gets the entry (not a duplicate)
    buf.push(make_group(0, gid="redelivered"), "w")
    [first] = buf.pull(1, block_ms=300)
    [again] = StalenessBuffer(buf.r, buf.cfg).pull(1, block_ms=300)
    assert again.id == first.id
    stats = buf.stats()
    assert stats.drops == {"duplicate": 1} and Counter(stats.staleness_hist) == Counter({0: 1})


def test_a_pull_waiting_longer_than_the_socket_timeout_neither_fails_nor_misses_a_group(buffer_factory):
    # redis-py's socket timeout is 5 s: one XREADGROUP BLOCK longer than that would be cut and retried as a
    # lost connection until reconnect_s, then raise. pull() blocks in shorter reads instead.
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    assert buf.pull(1, block_ms=5500) == []
    threading.Timer(3.0, buf.push, args=(make_group(0, gid="late"), "w")).start()
    assert [e.group.group_id for e in buf.pull(1, block_ms=8000)] == ["late"]


@pytest.mark.parametrize("hard", [False, True])
def test_embedded_redis_restarts_on_its_port_with_its_password_and_data(tmp_path, hard):
    with EmbeddedRedis(data_dir=tmp_path, aof=True, appendfsync="always") as server:
        url, password, pid = server.url, server.password, server.proc.pid
        client = connect(url, password, reconnect_s=15)
        client.set("kept", b"1")
        server.restart(hard=hard)
        assert (server.url, server.password) == (url, password) and server.proc.pid != pid
        assert client.get("kept") == b"1"  # the same client object: it reconnected by itself
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
