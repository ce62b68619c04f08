"""Killing a Ray actor in a test the way the product will see it dead."""

from __future__ import annotations

import time


def kill_actor_and_wait(actor, *, no_restart: bool = True, timeout_s: float = 120) -> None:  # noqa: ANN001
    """`ray.kill` returns before the actor is dead: a call made right after can still be answered. Wait until a
    call fails with RayActorError (the death every caller will then see), or fail the test after `timeout_s`."""
    import ray

    ray.kill(actor, no_restart=no_restart)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:  # dying: ask again
            pass
        assert time.monotonic() < deadline, f"the killed actor still answers after {timeout_s:.0f} s"
