"""Where the services run: an embedded redis-server + a local Ray for a laptop or CI box, or an existing
cluster (`ray job submit`, `cluster.address`, `buffer.redis_url`).

Ray: inside `ray job submit` (RAY_ADDRESS is set) or with `cluster.address` we join that cluster and never shut
it down; otherwise we start a local one on 127.0.0.1 and stop it on exit. Redis: with `buffer.redis_url` we
connect with the password from the environment variable named by `buffer.password_env`; otherwise an embedded
redis-server child on a free loopback port with a generated password (AOF in the run directory, so a resumed
run finds its buffer again). The password is handed to the services as an argument, never logged or saved.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import ray
import ray._private.ray_constants as ray_constants

from buffer.server import EmbeddedRedis, connect
from services.config import Config
from services.errors import NotStarted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisEndpoint:
    url: str  # never contains the password
    password: str | None


def start_redis(cfg: Config, stack: ExitStack, data_dir: Path | None) -> RedisEndpoint:
    """Connect to the configured Redis, or start an embedded one that `stack` stops."""
    if cfg.buffer.redis_url:
        password = os.environ.get(cfg.buffer.password_env)
        connect(cfg.buffer.redis_url, password).close()  # fail now, with one clear line, if unreachable
        return RedisEndpoint(cfg.buffer.redis_url, password)
    server = stack.enter_context(EmbeddedRedis(
        data_dir=data_dir, aof=cfg.buffer.aof and data_dir is not None, appendfsync=cfg.buffer.appendfsync
    ))
    return RedisEndpoint(server.url, server.password)


def start_ray(cfg: Config, stack: ExitStack) -> bool:
    """Join the cluster we run in, or start a local one (stopped by `stack`). Returns True if local."""
    c = cfg.cluster
    address = c.address or os.environ.get("RAY_ADDRESS")
    if (ray.is_initialized() or address) and (c.object_store_gb is not None or c.prefault_object_store):
        # Ray fixes both when a node starts: a Ray that is already there cannot take them
        raise NotStarted("cluster.object_store_gb and cluster.prefault_object_store set up a local Ray; this run "
                         f"joins {address or 'the Ray already running'}: give them to its nodes' `ray start` "
                         "(--object-store-memory, RAY_preallocate_plasma_memory=1)")
    if ray.is_initialized():
        return False
    common = dict(namespace=c.namespace, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **common)
        return False
    # Loopback only. With _node_ip_address="127.0.0.1" alone, Ray's GCS, raylet and every worker's gRPC server
    # still listened on all interfaces and its agents on the machine's address (measured); they bind 127.0.0.1 once
    # Ray's cluster switch is off. Ray reads that switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) when `ray` is
    # imported, so the constant itself is set here. tests/test_security.py lists the sockets of a whole run.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=c.num_cpus,
        object_store_memory=None if c.object_store_gb is None else int(c.object_store_gb * 1e9),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        # Ray starts workers at nice 15; ours are the learner and the engines (see services/actors.py)
        _system_config={"worker_niceness": 0, "preallocate_plasma_memory": c.prefault_object_store},
        **common,
    )
    stack.callback(ray.shutdown)
    return True


def actor_env(cfg: Config, threads: int, gpu: bool) -> dict[str, str]:
    """Environment of a service actor. Threads are pinned per actor so vLLM and the learner share the cores
    deliberately instead of both grabbing all of them (see docs/architecture.md, 'Sharing the cores'). `gpu`: the
    actor runs on GPUs (DeepSpeed's accelerator is named either way: an actor inherits its raylet's environment,
    which may say otherwise; make sets cpu)."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "RAY_DEDUP_LOGS": "0",
        # vLLM logs every in-place weight reload (each update) at INFO/WARNING: it would bury the live display.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        "DS_ACCELERATOR": "cuda" if gpu else "cpu",
    }
    if not gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.cpu_kvcache_gib)
    return env


def buffer_stats_json(cfg: Config) -> str:
    """`staleflow buffer stats`: the statistics of a running buffer named by the config."""
    from buffer.redis_buffer import StalenessBuffer

    if not cfg.buffer.redis_url:
        raise SystemExit("buffer stats needs buffer.redis_url (an embedded buffer lives only inside its run)")
    client = connect(cfg.buffer.redis_url, os.environ.get(cfg.buffer.password_env))
    return json.dumps(StalenessBuffer(client, cfg.buffer).stats().model_dump(mode="json"), indent=2)
