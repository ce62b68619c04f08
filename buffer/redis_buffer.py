"""The staleness buffer: rollout groups in a Redis stream, read by the learner through a consumer group.

    buf = StalenessBuffer(client, cfg)                  # client from buffer.server.connect (bytes replies)
    # producer (rollout worker)
    adm = buf.admit(worker_id, n_groups, timeout_s=30)  # Admission(granted, slot, required_version)
    ...generate adm.granted groups (fixed: with weights adm.required_version, group.slot = adm.slot)...
    buf.push(group, worker_id)                          # waits while the stream is full, then BufferFull
    buf.release(worker_id)                              # a restarted worker gives its unfinished grants back
    # learner
    buf.set_version(v)                                  # after every update: admission and staleness use it
    entries = buf.pull(n_groups, consumer="learner-0", block_ms=1000)   # list[Entry(id, group, staleness)]
    ...train, checkpoint...
    buf.ack([e.id for e in entries])                    # only once the checkpoint holding the update is safe
    buf.stats()                                         # BufferStats

Keys (P = cfg.prefix; one run = one prefix; `reset()` deletes them all):
    P:stream        the groups: fields d (msgpack group), w (worker id), s (slot or "-"). Never trimmed:
                    acknowledged and dropped entries are XACK'ed and XDEL'ed, so it holds only live data.
                    Consumer group "learner".
    P:dead          dead letters (MAXLEN ~ dead_letter_maxlen): reason, detail, raw (first 64 KiB), raw_len,
                    entry_id, worker.
    P:state         hash: version (the learner's), inflight (bounded: accepted + running).
    P:slots         hash (fixed): slot -> groups granted for it and not released or dropped.
    P:filled:<k>    set (fixed): ids of the groups pushed for slot k by its own version r(k); deleted once the
                    learner is past k. A version stays pinned in the registry until its slots are filled.
    P:grants:<w>    hash: slot (or "-") -> groups granted to worker w and not pushed yet.
    P:workers       set of worker ids seen.   P:producers  hash: <w>|pushed, <w>|first_ms, <w>|last_ms.
    P:counts        hash: admitted, consumed, stale:<k>, drop:<reason>, dead:<reason>, ahead_of_learner.
    P:admits        hash: worker -> its last admission (nonce and answer), so that a retried admit grants once.
    P:seen:<gid>    the entry id that owns group_id gid (EX dedupe_window_s): set when the learner takes it.

Delivery: an entry is acknowledged only by `ack()`, so a learner that dies loses nothing. A learner re-reads
the entries pending in its consumer name that it does not hold (a restarted learner's, or those of an XREADGROUP
whose reply was lost) on its next pull; entries pending in another
consumer for longer than `claim_idle_s` are taken over with XAUTOCLAIM. Entries this learner holds (fixed:
fresher than the current update wants) or has delivered and not acked yet are re-claimed by it regularly so
that no other consumer takes them while it is alive. The rules themselves are in buffer/staleness.py.

Retries (docs/reliability.md): clients from buffer.server.connect() re-send a command whose connection broke,
so any call may run twice. admit carries a nonce (a retry gets the first answer); ack and the drop/dead-letter
path are scripts that count only what they themselves acknowledged; a push that ran twice leaves two entries
of one group_id, and the learner trains on the first one to claim P:seen:<gid> and drops the other as
"duplicate" (which gives its admission place back). So: each group_id is trained on at most once within
dedupe_window_s, and every push that returned an id is trained on or counted as a drop / dead letter.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from buffer.config import BufferConfig
from buffer.staleness import (
    ACK_LUA,
    ADMIT_LUA,
    DISCARD_LUA,
    PUSH_LUA,
    RELEASE_LUA,
    Verdict,
    decide,
    fills_slot,
    grantable_slots,
    required_version,
    staleness,
)
from buffer.stats import BufferStats, ProducerStats
from buffer.trajectory import FrameArena, MalformedEntry, TrajectoryGroup, decode_group

log = logging.getLogger(__name__)

GROUP = "learner"
MAX_BLOCK_MS = 2000  # longest single XREADGROUP BLOCK; pull() loops for longer waits
DEAD_RAW_BYTES = 64 * 1024  # a dead letter keeps this much of the raw payload: enough to debug, bounded


class BufferFull(RuntimeError):
    """The stream stayed at `capacity_groups` for `push_timeout_s`: the learner is not consuming."""


@dataclass(frozen=True)
class Admission:
    granted: int  # groups the producer may generate now (0: wait and ask again)
    slot: int | None  # fixed: put this in group.slot
    required_version: int | None  # fixed: generate with exactly these weights
    learner_version: int


@dataclass(frozen=True)
class Entry:
    id: str
    group: TrajectoryGroup
    staleness: int  # learner version at consumption - group.version_min


@dataclass
class _Pooled:  # delivered to this learner, decoded, not handed out yet
    group: TrajectoryGroup
    worker: str | None
    slot: str | None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class StalenessBuffer:
    def __init__(self, client: redis.Redis, cfg: BufferConfig):
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("StalenessBuffer needs a client with decode_responses=False (payloads are bytes)")
        self.r = client
        self.cfg = cfg
        p = cfg.prefix
        self.k_stream, self.k_dead, self.k_state = f"{p}:stream", f"{p}:dead", f"{p}:state"
        self.k_slots, self.k_workers, self.k_producers = f"{p}:slots", f"{p}:workers", f"{p}:producers"
        self.k_counts, self.k_admits = f"{p}:counts", f"{p}:admits"
        self._admit = client.register_script(ADMIT_LUA)
        self._ack = client.register_script(ACK_LUA)
        self._discard_entry = client.register_script(DISCARD_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._arenas = threading.local()  # a FrameArena per pushing thread: its frames live until its next push
        self._pool: dict[str, _Pooled] = {}
        self._delivered: dict[str, int] = {}  # id -> staleness, handed out and not acked yet
        self._last_claim = 0.0
        self._filled_slots: set[int] = set()  # fixed: slots seen filled (they stay filled), not asked again
        self._filled_low = 0  # fixed: slots below it were consumed once (P:state filled_low, as of the last pull)
        # the accounting scripts see adaptive as what it is to them: bounded (only admission reads the bound)
        self._lua_policy = "bounded" if cfg.policy == "adaptive" else cfg.policy
        self._bound = cfg.max_staleness  # the bound in force (adaptive: as of the last pull)
        self._ensure_group()

    def _grants(self, worker_id: str) -> str:
        return f"{self.cfg.prefix}:grants:{worker_id}"

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.k_stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ---------------- producer side ----------------

    def admit(
        self, worker_id: str, n_groups: int, *, timeout_s: float | None = None, weights_version: int | None = None
    ) -> Admission:
        """Ask to generate `n_groups`. granted=0 means wait; with `timeout_s` this call waits (polling with
        backoff) up to that long for a grant. `weights_version`: the policy version the producer holds; with
        `bounded`, a producer behind the learner is held closer so its groups do not arrive too stale (load
        newer weights and ask again). See buffer/staleness.py for the rules."""
        if n_groups < 1:
            raise ValueError("n_groups must be >= 1")
        c = self.cfg
        keys = [self.k_state, self._grants(worker_id), self.k_slots, self.k_workers, self.k_counts, self.k_admits]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = 0.01
        while True:
            # a fresh nonce per request: redis-py re-sends the same one when it retries after a lost reply
            args = [c.policy, c.max_staleness, c.batch_groups, n_groups, worker_id, uuid.uuid4().hex,
                    -1 if weights_version is None else int(weights_version), c.updates_per_batch]
            granted, slot, req, version = (int(x) for x in self._admit(keys=keys, args=args))
            left = 0.0 if deadline is None else deadline - time.monotonic()
            if granted > 0 or left <= 0:
                return Admission(granted, slot if slot >= 0 else None, req if req >= 0 else None, version)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)

    def _queue_push(self, pipe, payloads: list[memoryview], groups: list[TrajectoryGroup], worker_id: str) -> None:  # noqa: ANN001
        """n XADDs + one accounting script for all of them, queued on a MULTI pipeline: together atomic (PUSH_LUA)."""
        c = self.cfg
        keys = [self.k_stream, self._grants(worker_id), self.k_state, self.k_slots, self.k_producers, self.k_workers]
        args: list = [worker_id, c.capacity_groups, self._lua_policy, len(groups)]
        for payload, group in zip(payloads, groups):
            slot = "-" if group.slot is None else str(group.slot)
            fills = c.policy == "fixed" and fills_slot(group.slot, group.version_min, group.version_max,
                                                       c.max_staleness, c.updates_per_batch)
            pipe.xadd(self.k_stream, {"d": payload, "w": worker_id, "s": slot})
            keys.append(self._filled(slot))
            args += [slot, group.group_id, "1" if fills else "0"]
        # EVAL, not EVALSHA: inside MULTI a NOSCRIPT error would leave the XADDs without their accounting
        pipe.eval(PUSH_LUA, len(keys), *keys, *args)

    def push(self, group: TrajectoryGroup, worker_id: str, *, timeout_s: float | None = None) -> str:
        """Append one group; while the stream holds `capacity_groups` entries, wait with backoff, and raise
        BufferFull after `timeout_s` (default cfg.push_timeout_s). Returns the entry id."""
        return self._push_with_backoff(self._encode([group])[0], group, worker_id, timeout_s)

    def push_many(self, groups: list[TrajectoryGroup], worker_id: str, *, timeout_s: float | None = None) -> list[str]:
        """Append several groups in one round trip and one accounting script; those refused for lack of room then
        wait as in push."""
        if not groups:
            return []
        payloads = self._encode(groups)
        pipe = self.r.pipeline(transaction=True)
        self._queue_push(pipe, payloads, groups, worker_id)
        *ids, accepted = pipe.execute()
        return [i.decode() for i in ids[: int(accepted)]] + [
            self._push_with_backoff(p, g, worker_id, timeout_s)
            for p, g in zip(payloads[int(accepted) :], groups[int(accepted) :])
        ]

    def _encode(self, groups: list[TrajectoryGroup]) -> list[memoryview]:
        arena = getattr(self._arenas, "arena", None)
        if arena is None:
            arena = self._arenas.arena = FrameArena()
        return arena.encode(groups)

    def _push_with_backoff(self, payload: memoryview, group: TrajectoryGroup, worker_id: str, timeout_s) -> str:  # noqa: ANN001
        timeout_s = self.cfg.push_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            pipe = self.r.pipeline(transaction=True)
            self._queue_push(pipe, [payload], [group], worker_id)
            entry_id, ok = pipe.execute()
            if ok:
                return entry_id.decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BufferFull(
                    f"buffer {self.cfg.prefix!r} stayed full ({self.cfg.capacity_groups} groups) for {timeout_s:g}s: "
                    "is the learner consuming and acknowledging?"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)

    def _filled(self, slot: int | str) -> str:
        return f"{self.cfg.prefix}:filled:{slot}"

    def release(self, worker_id: str) -> int:
        """Give back the grants `worker_id` has not pushed (call when that worker restarts). Returns how many."""
        return int(self._release(keys=[self._grants(worker_id), self.k_state, self.k_slots], args=[self._lua_policy]))

    # ---------------- learner side ----------------

    def set_version(self, version: int) -> None:
        """Publish the learner's version (number of updates made): admission and staleness are measured from it."""
        self.r.hset(self.k_state, "version", int(version))

    def version(self) -> int:
        return int(self.r.hget(self.k_state, "version") or 0)

    def bound(self) -> int:
        """The staleness bound in force: adaptive, the controller's last; otherwise max_staleness."""
        if self.cfg.policy != "adaptive":
            return self.cfg.max_staleness
        raw = self.r.hget(self.k_state, "bound")
        return int(raw) if raw is not None else self.cfg.max_staleness

    def set_bound(self, bound: int) -> None:
        """adaptive: the learner's controller moves the bound; admission and the learner's rule read it."""
        if self.cfg.policy != "adaptive":
            raise ValueError(f"set_bound is the adaptive policy's; this buffer's is {self.cfg.policy}")
        self.r.hset(self.k_state, "bound", int(bound))
        self._bound = int(bound)

    def pinned_versions(self) -> list[int]:
        """fixed: the published versions that must stay fetchable, because a grantable slot they generate is not
        filled yet (buffer/staleness.py); [] for the other policies, whose workers only ever want the newest.
        Also forgets the fill sets of the slots the learner is past (call it once per publish)."""
        c = self.cfg
        if c.policy != "fixed":
            return []
        version, low = (int(x or 0) for x in self.r.hmget(self.k_state, "version", "filled_low"))
        # slots below `low` were consumed by an update once (a learner resumed from an older checkpoint sees them
        # again): they were filled then, their sets are gone, and their groups are in the stream, not owed
        slots = range(max(version, low), grantable_slots(version, c.max_staleness, c.updates_per_batch).stop)
        pipe = self.r.pipeline(transaction=False)
        for k in slots:
            pipe.scard(self._filled(k))
        done = range(low, version)
        for i in range(0, len(done), 500):
            pipe.delete(*(self._filled(k) for k in done[i : i + 500]))
        if version > low:
            pipe.hset(self.k_state, "filled_low", version)
        counts = pipe.execute()[: len(slots)]
        return sorted({required_version(k, c.max_staleness, c.updates_per_batch)
                       for k, n in zip(slots, counts) if n < c.batch_groups})

    def pull(self, n_groups: int, *, consumer: str = "learner-0", block_ms: int = 1000) -> list[Entry]:
        """Up to `n_groups` entries the current policy lets the learner train on now, waiting up to `block_ms`
        for them (0: only what is there). Drops and dead letters along the way are acked and counted. The
        entries stay pending until `ack()`."""
        try:
            return self._pull(n_groups, consumer, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # the stream was deleted under us (reset elsewhere, or a Redis without AOF restarted): start afresh
            log.warning("buffer %r: stream or consumer group missing; recreating it", self.cfg.prefix)
            self._ensure_group()
            return self._pull(n_groups, consumer, block_ms)

    def _pull(self, n_groups: int, consumer: str, block_ms: int) -> list[Entry]:
        # One round trip for the version, this consumer's pending count and a first non-blocking read of what
        # the pool lacks (the count is taken before the read, so it does not include what the read delivers).
        held = len(self._pool) + len(self._delivered)
        want = n_groups - len(self._pool)
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.k_state, "version", "bound", "filled_low")
        pipe.xpending(self.k_stream, GROUP)
        if want > 0:
            pipe.xreadgroup(GROUP, consumer, {self.k_stream: ">"}, count=want)
        (version_raw, bound_raw, low_raw), pending, *first = pipe.execute()
        version = int(version_raw or 0)
        self._filled_low = int(low_raw or 0)
        self._bound = int(bound_raw) if bound_raw is not None else self.cfg.max_staleness
        # Entries pending in this consumer that this instance does not hold: a restarted learner's, or a
        # XREADGROUP whose reply was lost (redis-py retried it after a dropped connection). Read them again, oldest
        # first; that re-read includes what the first read just delivered (it is pending here now).
        mine = next((int(c["pending"]) for c in pending["consumers"] if c["name"].decode() == consumer), 0)
        if mine > held:
            self._read_own_pending(consumer)
        elif first and first[0]:
            self._ingest(first[0][0][1])
        if time.monotonic() - self._last_claim > self.cfg.claim_idle_s / 4:
            self._claim(consumer)
        # Not ready (fixed: the FIFO is not full yet): take nothing, but still drop what must be dropped, since a
        # drop gives its slot's place back and the FIFO may be waiting for exactly that place to be generated.
        ready = self._fifo_ready(version)
        out = self._serve(version, n_groups if ready else 0)
        deadline = time.monotonic() + block_ms / 1000
        while len(out) < n_groups:
            left_ms = int((deadline - time.monotonic()) * 1000)
            # one blocking read stays well under the client's socket timeout (5 s), which would otherwise cut
            # it and have it retried as a lost connection
            resp = self.r.xreadgroup(
                GROUP, consumer, {self.k_stream: ">"}, count=max(n_groups - len(out), 1),
                block=min(left_ms, MAX_BLOCK_MS) if left_ms > 0 else None,
            )
            got = resp[0][1] if resp else []
            self._ingest(got)
            ready = ready or self._fifo_ready(version)  # a push may have filled the slot it waited for
            out += self._serve(version, n_groups - len(out) if ready else 0)
            if left_ms <= 0 or (not got and left_ms <= MAX_BLOCK_MS):
                break
        return out

    def _fifo_ready(self, version: int) -> bool:
        """fixed: may update `version` run? Only once every grantable slot generated by an older version is
        filled (buffer/staleness.py, "the weights a fixed run keeps"). Other policies: always."""
        c = self.cfg
        if c.policy != "fixed":
            return True
        # slots below filled_low were consumed once (see pinned_versions): filled, whatever their sets say now
        owed = [k for k in grantable_slots(version, c.max_staleness, c.updates_per_batch)
                if k >= self._filled_low and k not in self._filled_slots
                and required_version(k, c.max_staleness, c.updates_per_batch) < version]
        if not owed:
            return True
        pipe = self.r.pipeline(transaction=False)
        for k in owed:
            pipe.scard(self._filled(k))
        filled = [k for k, n in zip(owed, pipe.execute()) if n >= c.batch_groups]
        self._filled_slots.update(filled)
        return len(filled) == len(owed)

    def ack(self, ids: list[str]) -> int:
        """Acknowledge and delete consumed entries (after the checkpoint that covers them); they count as
        consumed (stats). Returns how many were still pending. One round trip; idempotent (ACK_LUA)."""
        if not ids:
            return 0
        args: list = [GROUP]
        for i in ids:
            s = self._delivered.pop(i, None)
            args += [i, "" if s is None else s]
        return int(self._ack(keys=[self.k_stream, self.k_counts], args=args))

    def _read_own_pending(self, consumer: str) -> None:
        """A restarted learner: entries delivered to this consumer name before and never acked come again."""
        start = "0"
        while True:
            resp = self.r.xreadgroup(GROUP, consumer, {self.k_stream: start}, count=256)
            got = resp[0][1] if resp else []
            if not got:
                break
            start = got[-1][0]
            got = [(i, f) for i, f in got if i.decode() not in self._pool and i.decode() not in self._delivered]
            if got:
                self._ingest(got, self._deliveries(consumer, got))

    def _claim(self, consumer: str) -> None:
        self._last_claim = time.monotonic()
        mine = list(self._pool) + list(self._delivered)
        for i in range(0, len(mine), 512):  # keep our own entries fresh so that no other consumer takes them
            self.r.xclaim(self.k_stream, GROUP, consumer, 0, mine[i : i + 512], justid=True)
        start = "0-0"
        for _ in range(100):  # bounded: at most 100 x 256 entries per call
            nxt, got, _deleted = self.r.xautoclaim(
                self.k_stream, GROUP, consumer, int(self.cfg.claim_idle_s * 1000), start, count=256
            )
            got = [(i, f) for i, f in got if i.decode() not in self._pool and i.decode() not in self._delivered]
            if got:
                self._ingest(got, self._deliveries(consumer, got))
            start = nxt
            if nxt in (b"0-0", "0-0"):
                break

    def _deliveries(self, consumer: str, got: list) -> dict[str, int]:  # noqa: ANN001
        """How often each of these redelivered entries has been delivered (they are pending in `consumer`)."""
        rows = self.r.xpending_range(
            self.k_stream, GROUP, min=got[0][0], max=got[-1][0], count=len(got) + 10_000, consumername=consumer
        )
        return {r["message_id"].decode(): int(r["times_delivered"]) for r in rows}

    def _ingest(self, raw: list, deliveries: dict[str, int] | None = None) -> None:  # noqa: ANN001
        """Decode delivered entries into the pool; dead-letter the malformed ones, and (on redelivery) those
        delivered more than `max_deliveries` times: a group that keeps killing the learner must not loop."""
        gone = []
        for rid, fields in raw:
            eid = rid.decode()
            if not fields:  # deleted after delivery (pending list of a dead consumer): just clear it
                gone.append(eid)
                continue
            worker = fields.get(b"w")
            slot = fields.get(b"s")
            worker_s = worker.decode(errors="replace") if worker is not None else None
            slot_s = slot.decode(errors="replace") if slot is not None else None
            data = fields.get(b"d")
            try:
                if data is None:
                    raise MalformedEntry("missing_payload", "no 'd' field")
                if deliveries and deliveries.get(eid, 0) > self.cfg.max_deliveries:
                    raise MalformedEntry("too_many_deliveries", f"delivered {deliveries[eid]} times, never acked")
                group = decode_group(data)
            except MalformedEntry as bad:
                self._dead_letter(eid, bad, data or b"", worker_s, slot_s)
                continue
            self._pool[eid] = _Pooled(group, worker_s, slot_s)
        if gone:
            self.r.xack(self.k_stream, GROUP, *gone)

    def _serve(self, version: int, n: int) -> list[Entry]:
        c = self.cfg
        taken: list[tuple[str, _Pooled]] = []
        dropped: list[tuple[str, str, _Pooled]] = []
        for eid, item in list(self._pool.items()):
            g = item.group
            verdict, reason = decide(c.policy, version, self._bound, g.version_min, g.version_max, g.slot,
                                     c.updates_per_batch)
            if verdict is Verdict.DROP:
                dropped.append((eid, reason or "dropped", self._pool.pop(eid)))
            elif verdict is Verdict.TAKE and len(taken) < n:
                taken.append((eid, self._pool.pop(eid)))
        out: list[Entry] = []
        if taken:
            # Each group_id is trained on once: the first entry to claim its marker owns it; another entry with
            # the same group_id (a push retried after its reply was lost, a replay) is a counted drop.
            pipe = self.r.pipeline(transaction=False)
            for eid, item in taken:
                pipe.set(self._seen(item.group.group_id), eid, nx=True, get=True, ex=c.dedupe_window_s)
            ahead = sum(item.group.version_max > version for _, item in taken)
            if ahead:  # generated by a policy newer than the learner's (e.g. a learner resumed from an older
                # checkpoint): still a valid sample with its behaviour log-probs, trained on, counted, logged
                pipe.hincrby(self.k_counts, "ahead_of_learner", ahead)
                log.warning("learner v%d got %d groups generated by a newer policy version", version, ahead)
            owners = pipe.execute()[: len(taken)]
            for (eid, item), owner in zip(taken, owners):
                if owner is not None and owner.decode() != eid:
                    dropped.append((eid, "duplicate", item))
                    continue
                s = staleness(version, item.group.version_min)
                self._delivered[eid] = s
                out.append(Entry(eid, item.group, s))
        if dropped:
            self._pipelined(
                lambda pipe: [self._discard(pipe, eid, f"drop:{why}", it.worker, it.slot) for eid, why, it in dropped]
            )
            log.debug("learner v%d dropped %d groups", version, len(dropped))
        return out

    def _seen(self, group_id: str) -> str:
        return f"{self.cfg.prefix}:seen:{group_id}"

    def _pipelined(self, queue) -> list:  # noqa: ANN001
        """Run the script calls `queue(pipe)` makes in one round trip. A Redis that restarted between the
        pipeline's script check and its execution answers NOSCRIPT: run it again (the scripts are idempotent)."""
        for attempt in range(3):
            pipe = self.r.pipeline(transaction=False)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _discard(self, pipe, eid: str, counter: str, worker: str | None, slot: str | None, dead: list | None = None) -> None:  # noqa: ANN001
        """Ack + delete an entry that will not be trained on, count it, give its admission place back (only if
        it was pushed through push(), i.e. has a worker) and dead-letter it if `dead`; idempotent (DISCARD_LUA)."""
        keys = [self.k_stream, self.k_counts, self.k_state, self.k_slots, self.k_dead]
        args = [GROUP, eid, counter, self._lua_policy, worker or "", slot or "", *(dead or [])]
        self._discard_entry(keys=keys, args=args, client=pipe)

    def _dead_letter(self, eid: str, bad: MalformedEntry, raw: bytes, worker: str | None, slot: str | None) -> None:
        log.warning("dead-lettered buffer entry %s from %s: %s", eid, worker or "?", bad)
        dead = [self.cfg.dead_letter_maxlen, bad.reason, bad.detail[:500], raw[:DEAD_RAW_BYTES], len(raw)]
        self._discard(self.r, eid, f"dead:{bad.reason}", worker, slot, dead)

    # ---------------- both ----------------

    def stats(self) -> BufferStats:
        c = self.cfg
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(self.k_stream)
        pipe.xpending(self.k_stream, GROUP)
        pipe.xrange(self.k_stream, count=1)
        pipe.time()
        pipe.hgetall(self.k_counts)
        pipe.hgetall(self.k_state)
        pipe.xlen(self.k_dead)
        pipe.smembers(self.k_workers)
        pipe.hgetall(self.k_producers)
        depth, pending, oldest, (sec, usec), counts, state, dead_depth, workers, prod = pipe.execute()
        now_ms = sec * 1000 + usec / 1000
        counts = {k.decode(): int(v) for k, v in counts.items()}
        prod = {k.decode(): int(v) for k, v in prod.items()}
        workers = sorted(w.decode() for w in workers)
        pipe = self.r.pipeline(transaction=False)
        for w in workers:
            pipe.hvals(self._grants(w))
        grants = {w: sum(int(v) for v in vals) for w, vals in zip(workers, pipe.execute())}
        producers = {}
        for w in workers:
            n = prod.get(f"{w}|pushed", 0)
            first, last = prod.get(f"{w}|first_ms"), prod.get(f"{w}|last_ms")
            span_s = (last - first) / 1000 if first is not None and last is not None else 0.0
            producers[w] = ProducerStats(
                pushed=n,
                groups_per_s=(n - 1) / span_s if span_s > 0 else 0.0,
                last_push_age_s=(now_ms - last) / 1000 if last is not None else None,
                outstanding=grants[w],
            )

        def by(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: v for k, v in counts.items() if k.startswith(prefix) and v}

        oldest_age = (now_ms - int(oldest[0][0].split(b"-")[0])) / 1000 if oldest else None
        return BufferStats(
            policy=c.policy,
            max_staleness=int(state[b"bound"]) if c.policy == "adaptive" and b"bound" in state else c.max_staleness,
            learner_version=int(state.get(b"version", 0)),
            depth=depth,
            pending=pending["pending"],
            capacity=c.capacity_groups,
            oldest_age_s=oldest_age,
            consumed=counts.get("consumed", 0),
            staleness_hist={int(k): v for k, v in sorted(by("stale:").items(), key=lambda kv: int(kv[0]))},
            drops=by("drop:"),
            dead_letters=by("dead:"),
            dead_letter_depth=dead_depth,
            admitted=counts.get("admitted", 0),
            outstanding=sum(grants.values()),
            ahead_of_learner=counts.get("ahead_of_learner", 0),
            producers=producers,
        )

    def dead_letters(self, count: int = 100) -> list[dict[str, bytes]]:
        """The newest dead letters (fields as stored), newest first."""
        return [{k.decode(): v for k, v in f.items()} for _, f in self.r.xrevrange(self.k_dead, count=count)]

    def reset(self) -> None:
        """Delete every key of this run's prefix and forget this instance's in-memory state."""
        batch = []
        for key in self.r.scan_iter(match=f"{_glob_escape(self.cfg.prefix)}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self.r.delete(*batch)
                batch.clear()
        if batch:
            self.r.delete(*batch)
        self._pool.clear()
        self._delivered.clear()
        self._filled_slots.clear()
        self._ensure_group()
