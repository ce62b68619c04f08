"""Soak: producers at full speed against a slow learner through the real buffer (bounded staleness, bounded
capacity) for SOAK_SECONDS (default 600). Every SOAK_SAMPLE_S it samples Redis `INFO memory` used_memory, the
RSS of every process and the buffer's counters into test-artifacts/soak.jsonl, then plots test-artifacts/soak.png.

It fails if memory grows (last-quarter median > 1.2 x first-quarter median + slack, for Redis and for each
process), if a process dies, or if any group is unaccounted for: every entry that reached the stream is
consumed, counted as a drop or dead letter by reason, or still in the stream at the end.

One producer is messy on purpose: it pushes groups made with old weights (too_stale drops), pushes some groups
twice (duplicate drops) and writes malformed entries (dead letters), so every counting path runs for the whole
soak. Run: `make soak`, or `SOAK_SECONDS=120 .venv/bin/python -m pytest -m soak tests/soak`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from buffer.config import BufferConfig
from buffer.redis_buffer import StalenessBuffer
from buffer.server import EmbeddedRedis, connect
from tests.buffer_helpers import make_group

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_S", "2"))
LEARNER_SLEEP_S = float(os.environ.get("SOAK_LEARNER_SLEEP_S", "0.25"))  # the "training step" per batch
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REDIS_SLACK = 4 * 2**20  # bytes: allocator noise and the dedupe markers' steady state (see dedupe_window_s)
RSS_SLACK = 24 * 2**20
MALFORMED_KEY = "soak-test:malformed"  # how many malformed entries the messy producer wrote


def _buffer(url: str, cfg_json: str) -> StalenessBuffer:
    return StalenessBuffer(connect(url, os.environ["SOAK_REDIS_PASSWORD"]), BufferConfig.model_validate_json(cfg_json))


def producer(url: str, cfg_json: str, worker: str, messy: bool, stop) -> None:  # noqa: ANN001
    buf = _buffer(url, cfg_json)
    rng = np.random.default_rng(abs(hash(worker)) % 2**32)
    i = 0
    while not stop.is_set():
        adm = buf.admit(worker, 4, timeout_s=1.0)
        if not adm.granted:
            continue
        version = adm.learner_version
        if messy:  # a worker with old weights: those 3 versions behind arrive too stale (s = 2)
            version = max(0, version - int(rng.integers(0, 4)))
        groups = [make_group(version, n=4, tokens=128, seed=i + k) for k in range(adm.granted)]
        i += adm.granted
        buf.push_many(groups, worker, timeout_s=60)
        if messy and i % 40 < adm.granted:
            buf.push(groups[0], worker)  # a replay: the learner must train on it once
            buf.r.xadd(buf.k_stream, {"d": b"\xc1 not msgpack", "w": worker, "s": "-"})
            buf.r.incr(MALFORMED_KEY)


def learner(url: str, cfg_json: str, sleep_s: float, stop) -> None:  # noqa: ANN001
    buf = _buffer(url, cfg_json)
    version = buf.version()
    while not stop.is_set():
        entries = buf.pull(buf.cfg.batch_groups, consumer="learner-0", block_ms=500)
        if not entries:
            continue
        time.sleep(sleep_s)  # the update
        buf.ack([e.id for e in entries])
        version += 1
        buf.set_version(version)


def _quarters(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return statistics.median(values[:q]), statistics.median(values[-q:])


def _plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["redis_used_memory"] / 2**20 for s in samples], label="redis used_memory")
    axes[0].plot(t, [s["redis_dataset"] / 2**20 for s in samples], label="of which dataset")
    axes[0].plot(t, [s["redis_clients"] / 2**20 for s in samples], label="of which client buffers")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    for name in samples[0]["rss"]:
        axes[1].plot(t, [s["rss"][name] / 2**20 for s in samples], label=f"{name} RSS")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize="small", ncol=3)
    axes[2].plot(t, [s["consumed"] for s in samples], label="consumed")
    axes[2].plot(t, [sum(s["drops"].values()) for s in samples], label="dropped")
    axes[2].plot(t, [sum(s["dead_letters"].values()) for s in samples], label="dead letters")
    axes[2].plot(t, [s["depth"] for s in samples], label="stream depth")
    axes[2].set_ylabel("groups")
    axes[2].set_xlabel("seconds")
    axes[2].legend(fontsize="small")
    fig.suptitle(f"staleflow buffer soak ({samples[-1]['t']:.0f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@pytest.mark.soak
@pytest.mark.timeout(int(SOAK_SECONDS) + 300)
def test_soak_memory_stays_flat_and_every_group_is_accounted_for(tmp_path, monkeypatch):
    ARTIFACTS.mkdir(exist_ok=True)
    # dedupe_window_s: 30 (its floor, reconnect_s) instead of 600, so that the dedupe markers reach their
    # steady state (rate x window) early in the soak; memory is compared after that warm-up
    cfg = BufferConfig(prefix="soak", policy="bounded", max_staleness=2, batch_groups=8, capacity_groups=64,
                       dedupe_window_s=30, reconnect_s=30)
    with EmbeddedRedis(data_dir=tmp_path / "redis", aof=True, maxmemory_mb=1024) as server:
        monkeypatch.setenv("SOAK_REDIS_PASSWORD", server.password)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        procs = {f"w{i}": ctx.Process(target=producer, args=(server.url, cfg.model_dump_json(), f"w{i}", i == 2, stop))
                 for i in range(3)}
        procs["learner"] = ctx.Process(target=learner, args=(server.url, cfg.model_dump_json(), LEARNER_SLEEP_S, stop))
        for p in procs.values():
            p.start()
        buf = StalenessBuffer(connect(server.url, server.password), cfg)
        watched = {"redis": psutil.Process(server.proc.pid), **{n: psutil.Process(p.pid) for n, p in procs.items()}}
        samples: list[dict] = []
        start = time.monotonic()
        try:
            with open(ARTIFACTS / "soak.jsonl", "w") as out:
                while (elapsed := time.monotonic() - start) < SOAK_SECONDS:
                    dead = [n for n, p in procs.items() if not p.is_alive()]
                    assert not dead, f"{dead} died during the soak"
                    stats = buf.stats()
                    mem = buf.r.info("memory")
                    sample = {
                        "t": round(elapsed, 2),
                        "redis_used_memory": int(mem["used_memory"]),
                        # where it goes: data vs client buffers vs the AOF buffer; and how many keys
                        "redis_dataset": int(mem["used_memory_dataset"]),
                        "redis_clients": int(mem.get("mem_clients_normal", 0)),
                        "redis_aof_buffer": int(mem.get("mem_aof_buffer", 0)),
                        "redis_keys": int(buf.r.dbsize()),
                        "rss": {n: proc.memory_info().rss for n, proc in watched.items()},
                        "depth": stats.depth, "consumed": stats.consumed, "version": stats.learner_version,
                        "drops": stats.drops, "dead_letters": stats.dead_letters,
                    }
                    samples.append(sample)
                    out.write(json.dumps(sample) + "\n")
                    out.flush()
                    time.sleep(SAMPLE_S)
        finally:
            stop.set()
            for p in procs.values():
                p.join(60)
                if p.is_alive():
                    p.kill()
        assert [p.exitcode for p in procs.values()] == [0] * len(procs)
        _plot(samples, ARTIFACTS / "soak.png")

        # every entry that reached the stream is accounted for (read after everyone stopped)
        stats = buf.stats()
        pushed = sum(p.pushed for p in stats.producers.values())  # push() and push_many(), replays included
        malformed = int(buf.r.get(MALFORMED_KEY) or 0)  # some may still be in the stream (depth)
        assert pushed + malformed == stats.consumed + sum(stats.drops.values()) + sum(stats.dead_letters.values()) \
            + stats.depth
        assert stats.consumed > 0 and stats.drops.get("too_stale", 0) > 0 and stats.drops.get("duplicate", 0) > 0
        assert malformed > 0 and set(stats.dead_letters) == {"bad_msgpack"}
        assert set(stats.drops) <= {"too_stale", "duplicate"}

        # memory is flat: after the warm-up (the dedupe window, or a tenth of the soak), no series' last quarter
        # is much above its first quarter
        warm = max(cfg.dedupe_window_s, SOAK_SECONDS / 10)
        steady = [s for s in samples if s["t"] >= warm]
        series = {"redis used_memory": [s["redis_used_memory"] for s in steady]}
        series |= {f"{n} RSS": [s["rss"][n] for s in steady] for n in watched}
        grew = {}
        for name, values in series.items():
            first, last = _quarters(values)
            slack = REDIS_SLACK if name == "redis used_memory" else RSS_SLACK
            if last > 1.2 * first + slack:
                grew[name] = (first, last)
        assert len(steady) >= 8 and grew == {}
