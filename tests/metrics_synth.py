"""A short synthetic-but-realistic run fed through MetricsHub with every metric name the services use.

Shared by the metrics, dashboard and Prometheus tests (the names below are the contract with the other
services).
"""

from __future__ import annotations

import math
import random
import time

from services.metrics import MetricsHub

LEARNER_NAMES = [
    "policy/version", "staleness/mean", "staleness/max", "staleness/hist", "loss/value",
    "loss/masked_fraction",
    "loss/clip_fraction", "m2po/m2_before", "m2po/m2_after", "m2po/tau", "ratio/max", "kl/k3", "reward/mean",
    "advantage/zero_groups", "throughput/train_tokens_per_s", "time/step_s", "weights/publish_s",
    "mismatch/abs_logp_diff", "learner/idle_s", "entropy", "entropy/removed", "ratio/ess_fraction",
    "weights/put_s", "weights/kept", "staleness/bound",
]
ROLLOUT_NAMES = [
    "rollout/tokens_per_s", "rollout/version_lag", "rollout/batch_s", "rollout/reward_errors",
    "rollout/idle_s",
    "weights/fetch_s",
]
BUFFER_NAMES = ["buffer/depth", "buffer/oldest_age_s", "buffer/drops/too_stale", "buffer/drops/bad_payload",
                "buffer/dead_letters"]
EVAL_NAMES = ["eval/accuracy"]
WORKERS = ("w0", "w1")


def feed_run(hub: MetricsHub, steps: int = 30, seed: int = 0, start: float | None = None) -> None:
    """Drive `hub` like a run with two workers: staleness drifts up as rollouts outpace the learner.
    Timestamps are simulated (a learner step every ~0.35 s from `start`, default: ending now)."""
    rng = random.Random(seed)
    t = time.time() - 0.35 * steps if start is None else start
    drops = 0
    for step in range(1, steps + 1):
        for w, worker in enumerate(WORKERS):
            for b in range(2):
                hub.log(f"rollout/{worker}", 2 * step + b, wall_time=t + 0.17 * b + 0.05 * w, values={
                    "rollout/tokens_per_s": 4000 + 300 * w + rng.gauss(0, 150),
                    "rollout/version_lag": min(step - 1, rng.randint(0, 2 + step // 6)),
                    "rollout/batch_s": 0.4 + 0.05 * rng.random(),
                    "rollout/reward_errors": int(rng.random() < 0.05),
                    "rollout/idle_s": 0.02 * rng.random(),
                    "weights/fetch_s": 0.05 + 0.02 * rng.random(),
                })
        drops += int(rng.random() < 0.3)
        t += 0.3 + 0.1 * rng.random()
        hub.log("buffer", step, wall_time=t, values={
            "buffer/depth": 20 + 10 * math.sin(step / 4) + rng.randint(0, 5),
            "buffer/oldest_age_s": 1.0 + 0.1 * step + rng.random(),
            "buffer/drops/too_stale": drops, "buffer/drops/bad_payload": 1 if step > 10 else 0,
            "buffer/dead_letters": 1 if step > 10 else 0,
        })
        hist: dict[int, int] = {}
        top = min(step - 1, 1 + step // 4)
        for _ in range(64):
            s = min(top, int(rng.expovariate(1 / (1 + step / 10))))
            hist[s] = hist.get(s, 0) + 1
        mean = sum(k * n for k, n in hist.items()) / 64
        m2 = 0.02 + 0.01 * mean + 0.005 * rng.random()
        hub.log("learner", step, wall_time=t, values={
            "policy/version": step, "staleness/mean": mean, "staleness/max": max(hist),
            "staleness/hist": hist, "loss/value": -0.01 * rng.random(),
            "loss/masked_fraction": 0.01 + 0.004 * mean, "loss/clip_fraction": 0.05 + 0.01 * mean,
            "m2po/m2_before": m2, "m2po/m2_after": min(m2, 0.04), "m2po/tau": 0.04,
            "ratio/max": 1.5 + 0.3 * mean + rng.random(), "kl/k3": 0.001 * step,
            "reward/mean": 0.2 + 0.5 * (1 - math.exp(-step / 12)) + 0.03 * rng.gauss(0, 1),
            "advantage/zero_groups": rng.randint(0, 3),
            "throughput/train_tokens_per_s": 9000 + rng.gauss(0, 300),
            "time/step_s": 0.3 + 0.05 * rng.random(), "weights/publish_s": 0.08 + 0.02 * rng.random(),
            "mismatch/abs_logp_diff": 0.002 + 0.0005 * rng.random(), "learner/idle_s": 0.03 * rng.random(),
            "entropy": 0.9 - 0.01 * step, "entropy/removed": 1.6 + 0.2 * rng.random(),
            "ratio/ess_fraction": 0.98 - 0.005 * mean,
            "weights/put_s": 0.05 + 0.02 * rng.random(), "weights/kept": 1 + rng.randint(0, 1),
            "staleness/bound": 2 + step // 20,
        })
        if step % 5 == 0:
            accuracy = 0.15 + 0.4 * (1 - math.exp(-step / 15))
            hub.log("eval", step, wall_time=t, values={"eval/accuracy": accuracy})
