"""The Redis staleness buffer against a real redis-server: policies, admission, backpressure, dead letters,
redelivery after a learner dies, several producer processes, and the embedded server itself."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from buffer.redis_buffer import BufferFull
from buffer.server import EmbeddedRedis, RedisUnavailable, _free_port, connect
from buffer.staleness import required_version
from tests import buffer_helpers as helpers
from tests.buffer_helpers import make_group


def _drain(buf, n, consumer="learner-0", block_ms=200):  # noqa: ANN001
    entries = buf.pull(n, consumer=consumer, block_ms=block_ms)
    buf.ack([e.id for e in entries])
    return entries


def test_round_trip_is_bit_exact(buffer_factory):
    buf = buffer_factory(policy="unbounded")
    group = make_group(3, n=4, tokens=64, versions=[3] * 60 + [4] * 4)
    group.trajectories[0].behaviour_logp[:3] = [-0.0, np.float32(-1e-45), np.float32(-3.4e38)]
    entry_id = buf.push(group, "w0")
    buf.set_version(5)
    [entry] = buf.pull(1, block_ms=500)
    assert entry.id == entry_id and entry.staleness == 2
    for sent, got in zip(group.trajectories, entry.group.trajectories):
        for name in ("prompt_ids", "response_ids", "behaviour_logp", "versions"):
            assert getattr(sent, name).tobytes() == getattr(got, name).tobytes()
        assert sent.model_dump(exclude={"prompt_ids", "response_ids", "behaviour_logp", "versions"}) == got.model_dump(
            exclude={"prompt_ids", "response_ids", "behaviour_logp", "versions"}
        )
    assert buf.ack([entry.id]) == 1
    stats = buf.stats()
    assert stats.depth == 0 and stats.consumed == 1 and stats.staleness_hist == {2: 1}


def test_bounded_drops_too_stale_and_gives_the_place_back(buffer_factory):
    buf = buffer_factory(policy="bounded", max_staleness=1, batch_groups=2, capacity_groups=16)
    assert buf.admit("w", 10).granted == 4  # (s + V + 1) * B - 0 = (1 + 0 + 1) * 2
    for v in (0, 0, 1, 1):
        buf.push(make_group(v), "w")
    buf.set_version(2)
    taken = _drain(buf, 4)
    assert sorted(e.staleness for e in taken) == [1, 1]
    stats = buf.stats()
    assert stats.drops == {"too_stale": 2} and stats.depth == 0
    # capacity at V=2: (1 + 2 + 1) * 2 = 8, minus the 2 accepted-and-kept ones of the 4 granted
    assert buf.admit("w", 10).granted == 6


def test_bounded_admission_waits_until_the_learner_moves(buffer_factory):
    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=2, capacity_groups=16)
    assert buf.admit("w", 5).granted == 2
    refused = buf.admit("w", 1, timeout_s=0.2)
    assert refused.granted == 0 and refused.learner_version == 0
    threading.Timer(0.3, buf.set_version, args=(1,)).start()
    later = buf.admit("w", 5, timeout_s=300)  # returns once the learner moved: the timeout only bounds a hang
    assert later.granted == 2 and later.learner_version == 1


def test_release_returns_a_dead_workers_grants(buffer_factory):
    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=3, capacity_groups=16)
    assert buf.admit("dead", 3).granted == 3
    buf.push(make_group(0), "dead")
    assert buf.stats().producers["dead"].outstanding == 2
    assert buf.admit("alive", 3).granted == 0
    assert buf.release("dead") == 2
    assert buf.stats().outstanding == 0
    assert buf.admit("alive", 3).granted == 2


def test_fixed_s0_serves_exactly_what_synchronous_training_would(buffer_factory):
    batch = 3
    buf = buffer_factory(policy="fixed", max_staleness=0, batch_groups=batch, capacity_groups=32)
    for version in range(4):
        buf.set_version(version)
        made = []
        for worker in ("a", "b"):  # two producers share the slot; nothing beyond it is granted
            while (adm := buf.admit(worker, 2)).granted:
                assert adm.slot == version and adm.required_version == version
                made += [(worker, make_group(adm.required_version, slot=adm.slot, seed=len(made) + i))
                         for i in range(adm.granted)]
        # an unadmitted stray of this version (pushed during the previous update) already fills one place
        assert len(made) == batch - (version > 0)
        # a stray group of the next version (as if a worker ran ahead) must wait for its own update
        buf.push(make_group(version + 1, slot=version + 1, gid=f"stray-{version}"), "rogue")
        for worker, group in reversed(made):
            buf.push(group, worker)
        got = buf.pull(batch + 5, block_ms=300)
        assert [e.group.version_min for e in got] == [version] * batch
        expected = {g.group_id for _, g in made} | ({f"stray-{version - 1}"} if version else set())
        assert {e.group.group_id for e in got} == expected
        buf.ack([e.id for e in got])
    assert buf.stats().drops == {}


def test_the_papers_schedule_m_updates_per_rollout_batch_from_one_version():
    from buffer.staleness import grantable_slots

    # m = 2, s = 1: updates 0,1 train on v0; 2,3 on max(0, 2 - 1) = 1; 4,5 on 3: staleness 0..m - 1 + s.
    assert [required_version(k, 1, 2) for k in range(6)] == [0, 0, 1, 1, 3, 3]
    assert [required_version(k, 0, 4) for k in range(8)] == [0, 0, 0, 0, 4, 4, 4, 4]  # the paper's "s = 0"
    assert [required_version(k, 3, 1) for k in range(5)] == [0, 0, 0, 0, 1]  # m = 1: max(0, V - s)
    # grantable: the slots whose version is published, i.e. r(k) <= V
    for s, m in ((0, 1), (2, 1), (1, 2), (0, 4), (5, 3)):
        for v in range(12):
            window = grantable_slots(v, s, m)
            assert all(required_version(k, s, m) <= v for k in window)
            assert required_version(window.stop, s, m) > v, (s, m, v)


def test_fixed_with_two_updates_per_batch_through_redis(buffer_factory):
    """The Lua admission and the learner's take/hold rule agree with required_version(k, s, m): each update V
    trains on B groups of version max(0, 2 * floor(V / 2) - 1), exactly, and nothing is dropped."""
    s, m, batch = 1, 2, 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=batch, capacity_groups=32, updates_per_batch=m)
    for version in range(8):
        buf.set_version(version)
        while (adm := buf.admit("w", batch)).granted:
            assert adm.required_version == required_version(adm.slot, s, m) <= version
            for i in range(adm.granted):
                buf.push(make_group(adm.required_version, slot=adm.slot, seed=100 * adm.slot + i), "w")
        got = buf.pull(batch, block_ms=300)
        assert len(got) == batch
        assert {e.group.version_min for e in got} == {max(0, m * (version // m) - s)}
        buf.ack([e.id for e in got])
    assert buf.stats().drops == {}


def test_fixed_pins_the_versions_of_slots_not_filled_yet(buffer_factory, redis_client):
    """pinned(V) = {r(k) : k grantable at V, fewer than B distinct groups of r(k) pushed for k} (buffer/staleness.py):
    a push retried after a lost reply (the same group id twice) fills its slot once; a group of other weights not
    at all; the fill sets of slots the learner is past are deleted."""
    s, batch = 2, 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=batch, capacity_groups=32)
    assert buf.pinned_versions() == [0]  # slots 0..2, all generated by version 0, none filled
    for slot in range(s + 1):
        assert buf.admit("w", batch).slot == slot
        retried = make_group(0, slot=slot, gid=f"retried-{slot}")
        buf.push(retried, "w"), buf.push(retried, "w")
        assert buf.pinned_versions() == [0]
        buf.push(make_group(0, slot=slot, gid=f"other-{slot}"), "w")
    assert buf.pinned_versions() == []  # every slot filled: no older version needed, only the newest
    buf.set_version(1)
    assert buf.pinned_versions() == [1]  # slot 3 needs version 1
    adm = buf.admit("w", batch)
    assert (adm.slot, adm.required_version) == (3, 1)
    buf.push(make_group(0, slot=3, gid="old-weights"), "w")  # generated by the wrong version: fills nothing
    buf.push(make_group(1, slot=3, gid="right-1"), "w")
    assert buf.pinned_versions() == [1]
    buf.push(make_group(1, slot=3, gid="right-2"), "w")
    assert buf.pinned_versions() == []
    assert redis_client.exists(f"{buf.cfg.prefix}:filled:0") == 0 and redis_client.exists(f"{buf.cfg.prefix}:filled:1")
    other = buffer_factory(policy="bounded", max_staleness=s, batch_groups=batch, capacity_groups=32)
    assert other.pinned_versions() == []  # workers of the other rules only ever want the newest


def test_a_fixed_learner_resumed_from_an_older_checkpoint_is_not_kept_waiting_for_slots_it_consumed(
        buffer_factory, redis_client):
    """Fill sets are deleted once the learner is past their slot; a learner resumed from an older checkpoint
    sees those slots again (their groups redelivered). They were filled once: update V must not wait for them."""
    from buffer.redis_buffer import StalenessBuffer

    s = 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=1, capacity_groups=16)
    taken = {}
    for version in range(4):
        buf.set_version(version)
        buf.pinned_versions()  # the publish of `version`: deletes the sets of slots below it
        while (adm := buf.admit("w", 1)).granted:
            buf.push(make_group(adm.required_version, slot=adm.slot, gid=f"slot{adm.slot}"), "w")
        got = buf.pull(1, block_ms=300)
        assert [e.group.group_id for e in got] == [f"slot{version}"]
        taken[version] = got[0].id
        if version == 0:
            buf.ack([got[0].id])  # the checkpoint at version 1 covers update 0 only; then the learner dies
    assert redis_client.exists(f"{buf.cfg.prefix}:filled:1") == 0  # its set is gone
    resumed = StalenessBuffer(redis_client, buf.cfg)
    resumed.set_version(1)
    again = [e.group.group_id for e in resumed.pull(1, block_ms=300)]
    assert again == ["slot1"]  # redelivered, and served: slot 1 (and 2) count as filled


def test_fixed_s2_trains_each_update_on_version_v_minus_2(buffer_factory):
    s, batch = 2, 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=batch, capacity_groups=32)
    # V = 0: slots 0..2 are all generated by version 0; slot 3 needs version 1, not published yet
    grants = [buf.admit("w", batch) for _ in range(4)]
    assert [(g.granted, g.slot, g.required_version) for g in grants] == [(2, 0, 0), (2, 1, 0), (2, 2, 0), (0, None, None)]
    pushed: dict[int, list[str]] = {}
    for g in grants[:3]:
        for i in range(g.granted):
            grp = make_group(g.required_version, slot=g.slot, seed=i)
            pushed.setdefault(g.slot, []).append(grp.group_id)
            buf.push(grp, "w")
    buf.push(make_group(0, gid="too-old", slot=0), "late")  # an extra version-0 group, still in time (V=0)
    seen = []
    for version in range(6):
        buf.set_version(version)
        adm = buf.admit("w", batch)
        if adm.granted:  # slot version + 2 opens as soon as version max(0, version) is published
            assert adm.slot == version + s and adm.required_version == required_version(version + s, s)
            for i in range(adm.granted):
                buf.push(make_group(adm.required_version, slot=adm.slot, seed=10 * version + i), "w")
        got = buf.pull(batch, block_ms=300)
        assert len(got) == batch
        assert all(e.group.version_min == max(0, version - s) == e.group.version_max for e in got)
        assert all(e.staleness == version - max(0, version - s) for e in got)
        seen += [e.group.group_id for e in got]
        buf.ack([e.id for e in got])
    assert len(seen) == len(set(seen))
    # one of the seven version-0 groups was one too many: it was dropped once version 1 became the rule
    assert buf.stats().drops == {"too_old": 1}


def test_fixed_drops_groups_that_span_versions(buffer_factory):
    buf = buffer_factory(policy="fixed", max_staleness=0, batch_groups=1, capacity_groups=8)
    buf.push(make_group(0, tokens=4, versions=[0, 0, 1, 1]), "w")
    assert buf.pull(1, block_ms=100) == []
    assert buf.stats().drops == {"mixed_versions": 1}


def test_fixed_drops_a_group_generated_by_other_weights_than_its_slot_and_regrants_the_slot(buffer_factory):
    # A worker whose weights changed between admission and generation (an eval loaded newer ones) pushes slot 3
    # data made by version 2 instead of r(3) = 1. Held as "fresher", it would leave update 3 waiting forever.
    s, batch = 2, 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=batch, capacity_groups=32)
    buf.set_version(1)
    assert [(a.slot, a.required_version) for a in (buf.admit("w", batch), buf.admit("w", batch))] == [(1, 0), (2, 0)]
    adm = buf.admit("w", batch)
    assert (adm.granted, adm.slot, adm.required_version) == (2, 3, 1)
    buf.push(make_group(1, slot=3, gid="right"), "w")
    buf.push(make_group(2, slot=3, gid="wrong"), "w")
    buf.set_version(3)
    # update 3 waits for the FIFO (slots 3 and 4, of versions 1 and 2, filled) but drops the wrong group at once
    assert buf.pull(batch, block_ms=0) == [] and buf.stats().drops == {"wrong_slot_version": 1}
    again = buf.admit("w2", batch)  # the dropped group's place in slot 3 is open again, for version 1
    assert (again.granted, again.slot, again.required_version) == (1, 3, 1)
    buf.push(make_group(1, slot=3, gid="redo"), "w2")
    nxt = buf.admit("w2", batch)
    assert (nxt.granted, nxt.slot, nxt.required_version) == (2, 4, 2)
    assert buf.pull(batch, block_ms=0) == []  # slot 4 still owed
    for i in range(2):
        buf.push(make_group(2, slot=4, seed=i), "w2")
    assert sorted(e.group.group_id for e in _drain(buf, batch)) == ["redo", "right"]


def test_unbounded_takes_everything_and_measures_it(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    assert buf.admit("w", 100).granted == 100
    for v in (0, 3, 9):
        buf.push(make_group(v), "w")
    buf.set_version(10)
    assert sorted(e.staleness for e in _drain(buf, 3)) == [1, 7, 10]
    stats = buf.stats()
    assert stats.staleness_hist == {1: 1, 7: 1, 10: 1} and stats.drops == {}
    assert stats.producers["w"].pushed == 3 and stats.admitted == 100 and stats.outstanding == 97


def test_backpressure_waits_for_room_then_raises(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=2)
    buf.push(make_group(0), "w")
    buf.push(make_group(0), "w")
    with pytest.raises(BufferFull, match="stayed full"):
        buf.push(make_group(0), "w", timeout_s=0.2)
    assert buf.stats().depth == 2
    done: list[str] = []
    waiter = threading.Thread(target=lambda: done.append(buf.push(make_group(0, gid="late"), "w", timeout_s=300)))
    waiter.start()
    time.sleep(0.2)  # a chance to push wrongly; it must not (the stream is full), however long this lasts
    assert not done  # still waiting: the stream is full
    _drain(buf, 1)
    waiter.join(300)  # the timeouts only turn a hang into a failure
    assert done and buf.stats().depth == 2
    assert "late" in {e.group.group_id for e in _drain(buf, 2)}


def test_push_many_pipelines_and_still_respects_capacity(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=4)
    ids = buf.push_many([make_group(0, seed=i) for i in range(4)], "w")
    assert len(set(ids)) == 4
    with pytest.raises(BufferFull):
        buf.push_many([make_group(0)], "w", timeout_s=0.1)


def test_a_batch_that_half_fits_is_half_pushed_and_accounted_for_exactly(buffer_factory):
    """One accounting script for a whole batch: the groups that fit are in and counted (pushed, grants used), the
    others' XADDs undone and their grants kept, so nothing is lost or counted twice."""
    buf = buffer_factory(policy="bounded", max_staleness=1, batch_groups=2, capacity_groups=4)
    assert buf.admit("w", 4).granted == 4  # (s + V + 1) * B
    groups = [make_group(0, seed=i, gid=f"g{i}") for i in range(6)]
    with pytest.raises(BufferFull):
        buf.push_many(groups, "w", timeout_s=0.1)
    stats = buf.stats()
    assert (stats.depth, stats.producers["w"].pushed, stats.outstanding) == (4, 4, 0)
    assert buf.r.hget(buf.k_state, "inflight") == b"4"  # the refused two took no place
    assert [e.group.group_id for e in _drain(buf, 4)] == ["g0", "g1", "g2", "g3"]
    assert len(buf.push_many(groups[4:], "w")) == 2
    assert buf.r.hget(buf.k_state, "inflight") == b"6"  # pushed without a grant: they still occupy a place
    assert [e.group.group_id for e in _drain(buf, 2)] == ["g4", "g5"]


class _CreatesAFile:
    """Unpickling this creates a file: the buffer must never do it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _wire(**changes):
    payload = helpers.wire_v1(make_group(0, tokens=4, gid="bad"))
    t = payload["trajectories"][0]
    for key, value in changes.items():
        if key.startswith("t_"):
            t[key[2:]] = value
        else:
            payload[key] = value
    return msgpack.packb(payload, use_bin_type=True)


BAD = {
    "bad_msgpack": b"\xc1\xc1 not msgpack",
    "bad_schema": _wire(t_response_ids=None),
    "non_finite": _wire(t_behaviour_logp=np.array([0, np.nan, 0, 0], "<f4").tobytes()),
    "length_mismatch": _wire(t_behaviour_logp=np.zeros(3, "<f4").tobytes()),
    "unknown_schema": _wire(schema=99),
    "version_mismatch": _wire(t_version_min=7),
    "group_mismatch": _wire(group_id="other"),
}


def test_malformed_entries_are_dead_lettered_and_never_stop_the_learner(buffer_factory, tmp_path):
    buf = buffer_factory(policy="unbounded", capacity_groups=32)
    marker = tmp_path / "pwned"
    bad = dict(BAD)
    bad["pickle"] = pickle.dumps(_CreatesAFile(str(marker)), protocol=4)
    bad["bad_schema"] = msgpack.packb({"schema": 1, "group_id": "x", "trajectories": pickle.dumps(_CreatesAFile(str(marker)))})
    for reason, raw in bad.items():
        buf.r.xadd(buf.k_stream, {"d": raw, "w": f"writer-{reason}", "s": "-"})
    buf.r.xadd(buf.k_stream, {"payload": b"no d field"})
    good = make_group(0, gid="good")
    buf.push(good, "w")
    got = _drain(buf, 10, block_ms=300)
    assert [e.group.group_id for e in got] == ["good"]
    assert not marker.exists()
    stats = buf.stats()
    assert stats.dead_letters == {**{r: 1 for r in bad}, "missing_payload": 1}
    assert stats.depth == 0 and stats.pending == 0
    letters = {d["reason"].decode(): d for d in buf.dead_letters()}
    assert letters["pickle"]["raw"] == bad["pickle"] and letters["pickle"]["worker"] == b"writer-pickle"
    assert int(letters["non_finite"]["raw_len"]) == len(bad["non_finite"])


def test_dead_letters_of_pushed_groups_give_back_their_admission_place(buffer_factory):
    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=1, capacity_groups=4)
    assert buf.admit("w", 1).granted == 1
    # the worker's entry arrives corrupted: as if pushed (worker field set, grant consumed) but undecodable
    buf.push(make_group(0), "w")
    [entry] = buf.r.xrange(buf.k_stream)
    buf.r.xdel(buf.k_stream, entry[0])
    buf.r.xadd(buf.k_stream, {"d": BAD["non_finite"], "w": "w", "s": "-"})
    assert buf.pull(1, block_ms=100) == []
    assert buf.admit("w", 1).granted == 1


def test_learner_killed_before_ack_gets_its_entries_again(buffer_factory, redis_server, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_PASSWORD", redis_server.password)
    buf = buffer_factory(policy="unbounded", capacity_groups=16, claim_idle_s=0.5)
    for i in range(5):
        buf.push(make_group(0, gid=f"g{i}"), "w")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=helpers.consume_and_hang,
                       args=(redis_server.url, buf.cfg.model_dump_json(), "learner-0", 3, out))
    proc.start()
    try:
        taken = out.get(timeout=600)  # a spawned process starts slowly on a loaded machine
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    assert len(taken) == 3
    # another learner takes over what the dead one held, once it has been idle claim_idle_s
    time.sleep(0.6)
    other = buf.pull(5, consumer="learner-1", block_ms=300)
    assert len(other) == 5 and set(taken) <= {e.id for e in other}
    buf.ack([e.id for e in other])
    assert buf.stats().pending == 0


def test_restarted_learner_rereads_its_own_pending_entries(buffer_factory, redis_client):
    from buffer.redis_buffer import StalenessBuffer

    buf = buffer_factory(policy="unbounded", capacity_groups=16)
    for i in range(3):
        buf.push(make_group(0, gid=f"g{i}"), "w")
    first = buf.pull(2, consumer="learner-0", block_ms=200)  # then the learner "crashes": no ack
    restarted = StalenessBuffer(redis_client, buf.cfg)  # a new process: same consumer name, empty memory
    again = restarted.pull(3, consumer="learner-0", block_ms=200)
    assert [e.id for e in again][:2] == [e.id for e in first] and len(again) == 3
    restarted.ack([e.id for e in again])
    assert restarted.stats().depth == 0


def test_several_producer_processes_lose_nothing_and_duplicate_nothing(buffer_factory, redis_server, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_PASSWORD", redis_server.password)
    buf = buffer_factory(policy="unbounded", capacity_groups=8)  # small: producers hit backpressure
    ctx = mp.get_context("spawn")
    workers, per_worker = 3, 15
    procs = [ctx.Process(target=helpers.produce, args=(redis_server.url, buf.cfg.model_dump_json(), f"w{i}", per_worker))
             for i in range(workers)]
    for p in procs:
        p.start()
    seen: list[str] = []
    deadline = time.monotonic() + 900  # spawned producers start slowly on a loaded machine; a hang fails
    while len(seen) < workers * per_worker and time.monotonic() < deadline:
        seen += [e.group.group_id for e in _drain(buf, 4, block_ms=200)]
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    seen += [e.group.group_id for e in _drain(buf, 10, block_ms=100)]
    assert sorted(seen) == sorted(f"w{w}-{i}" for w in range(workers) for i in range(per_worker))
    stats = buf.stats()
    assert {w: p.pushed for w, p in stats.producers.items()} == {f"w{w}": per_worker for w in range(workers)}


def test_racing_admission_never_over_grants(buffer_factory, redis_server, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_PASSWORD", redis_server.password)
    buf = buffer_factory(policy="bounded", max_staleness=2, batch_groups=5, capacity_groups=64)
    buf.set_version(1)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=helpers.grab_grants, args=(redis_server.url, buf.cfg.model_dump_json(), f"w{i}", start, out))
             for i in range(3)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(120)
    assert sum(got) == (2 + 1 + 1) * 5  # exactly the bounded capacity at V=1, however the race went
    assert buf.stats().outstanding == sum(got)


def test_stats_report_depth_age_and_producers(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    assert buf.stats().oldest_age_s is None
    buf.push(make_group(0), "a")
    time.sleep(0.05)
    buf.push(make_group(0), "a")
    buf.push(make_group(0), "b")
    stats = buf.stats()
    assert stats.depth == 3 and stats.oldest_age_s is not None and stats.oldest_age_s >= 0.04
    assert stats.producers["a"].pushed == 2 and stats.producers["a"].groups_per_s > 0
    buf.pull(1, block_ms=100)
    assert buf.stats().pending == 1


def test_reset_deletes_only_this_runs_keys(buffer_factory):
    a = buffer_factory(prefix="run-a*", policy="unbounded", capacity_groups=8)
    b = buffer_factory(prefix="run-ab", policy="unbounded", capacity_groups=8)
    a.push(make_group(0), "w")
    b.push(make_group(0), "w")
    a.reset()
    assert a.stats().depth == 0 and b.stats().depth == 1
    assert a.stats().producers == {}


# ---------------- the embedded server ----------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_embedded_redis_stops_on_exit_and_keeps_the_password_out_of_the_url(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, aof=True) as server:
        pid = server.proc.pid
        assert server.password not in server.url and server.url.startswith("redis://127.0.0.1:")
        assert server.password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        connect(server.url, server.password).set("kept", b"1")
    assert not _alive(pid)
    with EmbeddedRedis(data_dir=tmp_path, aof=True) as again:  # AOF: a resumed run finds its data
        assert connect(again.url, again.password).get("kept") == b"1"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_embedded_redis_dies_with_its_parent(sig):
    parent = subprocess.Popen([sys.executable, "tests/buffer_helpers.py"], stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        redis_pid = int(parent.stdout.readline())
        assert _alive(redis_pid)
        parent.send_signal(sig)
        parent.wait(120)
        deadline = time.monotonic() + 120  # it goes at once; a loaded machine may take its time to notice
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(redis_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_unreachable_redis_is_one_clear_error_without_the_password(redis_server):
    port = _free_port()
    secret = "hunter2-do-not-print"
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:{secret}@127.0.0.1:{port}/0"):
        with pytest.raises(RedisUnavailable) as err:
            connect(url, secret, timeout_s=1)
        assert f"127.0.0.1:{port}" in str(err.value) and secret not in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(RedisUnavailable, match="rejected the password") as err:
        connect(redis_server.url, secret)
    assert secret not in str(err.value)
    with pytest.raises(RedisUnavailable, match="needs a password"):
        connect(redis_server.url, None)


def test_buffer_refuses_a_client_that_decodes_replies(redis_server):
    from buffer.config import BufferConfig
    from buffer.redis_buffer import StalenessBuffer

    client = redis.Redis.from_url(redis_server.url, password=redis_server.password, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        StalenessBuffer(client, BufferConfig(prefix="x"))


def test_pull_survives_its_stream_being_deleted(buffer_factory):
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    buf.push(make_group(0), "w")
    buf.r.delete(buf.k_stream)  # e.g. a Redis without AOF restarted under a running learner
    assert buf.pull(1, block_ms=50) == []
    buf.push(make_group(0, gid="after"), "w")
    assert [e.group.group_id for e in buf.pull(1, block_ms=200)] == ["after"]


def test_an_entry_that_keeps_killing_the_learner_is_dead_lettered(buffer_factory, redis_client):
    from buffer.redis_buffer import StalenessBuffer

    buf = buffer_factory(policy="unbounded", capacity_groups=8, max_deliveries=2)
    buf.push(make_group(0, gid="poison"), "w")
    assert len(buf.pull(1, block_ms=200)) == 1  # delivery 1; the learner "dies" before acking
    assert len(StalenessBuffer(redis_client, buf.cfg).pull(1, block_ms=50)) == 1  # delivery 2: restarted, dies
    third = StalenessBuffer(redis_client, buf.cfg)
    assert third.pull(1, block_ms=50) == []  # delivery 3 > max_deliveries
    stats = third.stats()
    assert stats.dead_letters == {"too_many_deliveries": 1} and stats.depth == 0 and stats.pending == 0
