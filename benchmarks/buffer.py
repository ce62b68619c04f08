"""Staleness buffer throughput vs raw redis-py on the same payload bytes, in the same run.

    .venv/bin/python benchmarks/buffer.py [--groups 400] [--rounds 3]

Realistic groups: 8 responses x 1,024 tokens (int32 ids, float32 log-probs, int32 versions) + a 256-token
prompt. Push: buffer.push (encode + Lua admission-accounting + capacity check + XADD) one group per call, and
push_many (pipelined, 16 per round trip), against raw XADD of the already-encoded bytes (one per call, and
pipelined x16). Pull: buffer.pull(16) (XREADGROUP + decode + validation + staleness rule) + ack (XACK + XDEL +
stats), against raw XREADGROUP COUNT 16 + XACK; decode_only is decode_group alone, the part of pull that raw
does not do. Prints JSON: groups/s and MB/s of each (median over chunks of 50 groups) and buffer/raw ratios, each the
median over chunk pairs run back to back, so that both sides of a ratio saw the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer.config import BufferConfig  # noqa: E402
from buffer.redis_buffer import StalenessBuffer  # noqa: E402
from buffer.server import EmbeddedRedis, connect  # noqa: E402
from buffer.trajectory import Trajectory, TrajectoryGroup, decode_group, encode_group  # noqa: E402

BATCH = 16
CHUNK = 50


def make_group(i: int, rng: np.random.Generator) -> TrajectoryGroup:
    gid = f"bench-{i}"
    prompt = rng.integers(0, 150_000, 256)
    return TrajectoryGroup(
        group_id=gid,
        trajectories=[
            Trajectory.make(
                group_id=gid, prompt_ids=prompt, response_ids=rng.integers(0, 150_000, 1024),
                behaviour_logp=-rng.random(1024, dtype=np.float32) * 3, version=0, reward=float(rng.random()),
                worker_id="bench",
            )
            for _ in range(8)
        ],
    )


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    groups = [make_group(i, rng) for i in range(args.groups)]
    payloads = [encode_group(g) for g in groups]
    mb = sum(len(p) for p in payloads) / 1e6
    n = len(groups)

    with EmbeddedRedis(maxmemory_mb=2048) as server:
        r = connect(server.url, server.password)
        cfg = BufferConfig(prefix="bench", policy="unbounded", capacity_groups=n + 1, aof=False)
        buf = StalenessBuffer(r, cfg)
        raw_stream = "raw:stream"

        # Every variant works on chunks of CHUNK groups; a chunk of the buffer and the same chunk through raw
        # redis-py run back to back, so each ratio is taken over a pair that saw the same machine load (this
        # machine is shared: absolute rates swing several-fold between runs; the pair ratios much less).
        def raw_push(lo: int, hi: int) -> None:
            for p in payloads[lo:hi]:
                r.xadd(raw_stream, {"d": p})

        def raw_push_pipelined(lo: int, hi: int) -> None:
            for i in range(lo, hi, BATCH):
                pipe = r.pipeline(transaction=False)
                for p in payloads[i : min(i + BATCH, hi)]:
                    pipe.xadd(raw_stream, {"d": p})
                pipe.execute()

        def raw_pull(lo: int, hi: int) -> None:
            got = 0
            while got < hi - lo:
                resp = r.xreadgroup("raw", "c", {raw_stream: ">"}, count=min(BATCH, hi - lo - got))
                ids = [i for i, _ in resp[0][1]]
                r.xack(raw_stream, "raw", *ids)
                got += len(ids)

        def buf_push(lo: int, hi: int) -> None:
            for g in groups[lo:hi]:
                buf.push(g, "bench")

        def buf_push_many(lo: int, hi: int) -> None:
            for i in range(lo, hi, BATCH):
                buf.push_many(groups[i : min(i + BATCH, hi)], "bench")

        def buf_pull(lo: int, hi: int) -> None:
            got = 0
            while got < hi - lo:
                entries = buf.pull(min(BATCH, hi - lo - got), block_ms=0)
                buf.ack([e.id for e in entries])
                got += len(entries)

        def decode_only(lo: int, hi: int) -> None:  # the part of pull that raw does not do
            for p in payloads[lo:hi]:
                decode_group(p)

        def reset() -> None:
            r.delete(raw_stream)
            r.xgroup_create(raw_stream, "raw", id="0", mkstream=True)
            buf.reset()

        chunks = [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]
        pairs = {"push": (raw_push, buf_push), "pull": (raw_pull, buf_pull),
                 "push_many": (raw_push_pipelined, buf_push_many)}
        times: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {k: [] for k in pairs}
        for rnd in range(args.rounds):
            reset()
            for phase in ("push", "pull", "push_many"):
                raw_fn, buf_fn = pairs[phase]
                for k, (lo, hi) in enumerate(chunks):
                    order = [("raw_" + phase, raw_fn), (phase, buf_fn)]
                    if (k + rnd) % 2:
                        order.reverse()  # neither side always goes first
                    t = {name: timed(lambda fn=fn, lo=lo, hi=hi: fn(lo, hi)) for name, fn in order}
                    for name, dt in t.items():
                        times.setdefault(name, []).append((hi - lo) / dt)
                    ratios[phase].append(t["raw_" + phase] / t[phase])
                    if phase == "pull":
                        times.setdefault("decode_only", []).append((hi - lo) / timed(lambda lo=lo, hi=hi: decode_only(lo, hi)))
                if phase == "pull":
                    reset()
        r.close()
    times["raw_push_pipelined"] = times.pop("raw_push_many")

    bytes_per_group = mb * 1e6 / n
    out = {
        "payload": {"groups": n, "bytes_per_group": round(bytes_per_group), "responses": 8, "tokens_per_response": 1024},
        "rounds": args.rounds,
        "chunk_groups": CHUNK,
        "note": "medians over chunks; ratio = buffer rate / raw rate on the same chunk, run back to back",
        **{
            k: {"groups_per_s": round(statistics.median(v), 1), "MB_per_s": round(statistics.median(v) * bytes_per_group / 1e6, 1)}
            for k, v in sorted(times.items())
        },
        "ratio_push": round(statistics.median(ratios["push"]), 3),
        "ratio_push_many_vs_pipelined": round(statistics.median(ratios["push_many"]), 3),
        "ratio_pull": round(statistics.median(ratios["pull"]), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
