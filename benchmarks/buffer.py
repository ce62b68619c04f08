"""Staleness buffer throughput vs raw redis-py on the same payload bytes, in the same run.

    .venv/bin/python benchmarks/buffer.py [--groups 400] [--rounds 3]

Realistic groups: 8 responses x 1,024 tokens (int32 ids, float32 log-probs, int32 versions) + a 256-token
prompt. Push: buffer.push (encode + Lua admission-accounting + capacity check + XADD) one group per call, and
push_many (pipelined, 16 per round trip), against raw XADD of the already-encoded bytes (one per call, and
pipelined x16). Pull: buffer.pull(16) (XREADGROUP + decode + validation + staleness rule) + ack (XACK + XDEL +
stats), against raw XREADGROUP COUNT 16 + XACK; decode_only is decode_group alone, the part of pull that raw
does not do. Prints JSON: groups/s and MB/s of each, and buffer/raw ratios
(best round of each; every round runs all variants back to back so machine load hits them alike).
"""

from __future__ import annotations

import argparse
import json
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

        def raw_push() -> None:
            for p in payloads:
                r.xadd(raw_stream, {"d": p})

        def raw_push_pipelined() -> None:
            for i in range(0, n, BATCH):
                pipe = r.pipeline(transaction=False)
                for p in payloads[i : i + BATCH]:
                    pipe.xadd(raw_stream, {"d": p})
                pipe.execute()

        def raw_pull() -> None:
            got = 0
            while got < n:
                resp = r.xreadgroup("raw", "c", {raw_stream: ">"}, count=BATCH)
                ids = [i for i, _ in resp[0][1]]
                r.xack(raw_stream, "raw", *ids)
                got += len(ids)

        def buf_push() -> None:
            for g in groups:
                buf.push(g, "bench")

        def buf_push_many() -> None:
            for i in range(0, n, BATCH):
                buf.push_many(groups[i : i + BATCH], "bench")

        def buf_pull() -> None:
            got = 0
            while got < n:
                entries = buf.pull(BATCH, block_ms=0)
                buf.ack([e.id for e in entries])
                got += len(entries)

        def decode_only() -> None:  # where pull's extra time goes: msgpack + validation into pydantic models
            for p in payloads:
                decode_group(p)

        def reset_raw() -> None:
            r.delete(raw_stream)
            r.xgroup_create(raw_stream, "raw", id="0", mkstream=True)

        times: dict[str, list[float]] = {k: [] for k in
                                         ("raw_push", "raw_push_pipelined", "raw_pull", "push", "push_many", "pull", "decode_only")}
        for _ in range(args.rounds):
            reset_raw()
            times["raw_push"].append(timed(raw_push))
            times["raw_pull"].append(timed(raw_pull))
            reset_raw()
            times["raw_push_pipelined"].append(timed(raw_push_pipelined))
            buf.reset()
            times["push"].append(timed(buf_push))
            times["pull"].append(timed(buf_pull))
            buf.reset()
            times["push_many"].append(timed(buf_push_many))
            buf.reset()
            times["decode_only"].append(timed(decode_only))
        r.close()

    # the fastest round of each: on a shared machine, the one least disturbed by other processes
    med = {k: min(v) for k, v in times.items()}
    out = {
        "payload": {"groups": n, "bytes_per_group": round(mb * 1e6 / n), "responses": 8, "tokens_per_response": 1024},
        "rounds": args.rounds,
        **{k: {"groups_per_s": round(n / t, 1), "MB_per_s": round(mb / t, 1)} for k, t in med.items()},
        "ratio_push": round(med["raw_push"] / med["push"], 3),
        "ratio_push_many_vs_pipelined": round(med["raw_push_pipelined"] / med["push_many"], 3),
        "ratio_pull": round(med["raw_pull"] / med["pull"], 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
