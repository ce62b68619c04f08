"""A Ray cluster of several nodes on this machine, for the multi-node tests: `ray start --block` once per node
(a head and workers, each its own raylet and object store, each with its own resources), stopped as a whole.

Nothing here touches another Ray on the machine (no `ray stop`, which kills every Ray process of the host)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")


def free_port(avoid: range = range(10000, 20000)) -> int:
    """A free TCP port outside `avoid` (Ray's worker ports)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class RayCluster:
    """`nodes[0]` is the head. Each node: {"num_cpus": int, "resources": {name: amount}}."""

    def __init__(self, nodes: list[dict], object_store_bytes: int = 200_000_000):
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Short: Ray's unix sockets live below it and AF_UNIX paths are limited to 107 bytes.
        self.tmp = tempfile.mkdtemp(prefix="sfc-", dir="/tmp")
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",  # a test cluster on this machine
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # several nodes (0 binds loopback but refuses a second node)
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{RAY.parent}:{os.environ['PATH']}",
        }
        self.procs: list[subprocess.Popen] = []
        try:
            for i, node in enumerate(nodes):
                self._start(i, node, object_store_bytes)
                self._wait_for_nodes(i + 1)
        except BaseException:
            self.stop()
            raise

    def _start(self, i: int, node: dict, store: int) -> None:
        lo = 11000 + 2000 * i  # each raylet its own worker ports: several raylets share this host
        args = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={node['num_cpus']}",
                f"--resources={json.dumps(node.get('resources', {}))}", f"--object-store-memory={store}",
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 1999}", "--disable-usage-stats",
                # Ray's fixed defaults (the agent's 52365...) are taken by any other Ray on the host (a training run,
                # another suite): the head's job agent then cannot bind and `ray job submit` finds no agent
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if i == 0:
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.tmp}"]
        else:
            args += [f"--address={self.address}"]
        log = open(Path(self.tmp) / f"node{i}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_for_nodes(self, n: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) < n:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise RuntimeError(f"ray node {i} exited: " + (Path(self.tmp) / f"node{i}.log").read_text()[-3000:])
            assert time.monotonic() < deadline, f"{n} Ray nodes did not come up in {timeout_s} s"
            time.sleep(0.5)

    def nodes(self) -> list[dict]:
        """Alive nodes: {"node_id", "resources", "manager": (address, port)}. [] until the head answers."""
        from ray._raylet import GcsClient

        try:
            infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        except Exception:  # the head is not up yet
            return []
        out = []
        for node_id, info in infos.items():
            if info.state != 0:  # ALIVE
                continue
            out.append({"node_id": node_id.hex(), "resources": dict(info.resources_total),
                        "manager": (info.node_manager_address, info.node_manager_port)})
        return out

    def created_bytes(self) -> dict[str, int]:
        """Each node's object store: bytes of all objects ever created there (put there, or pulled from another
        node). A pull creates the object once per node, however many processes there read it."""
        from ray._private.internal_api import node_stats

        return {n["node_id"]: node_stats(*n["manager"], include_memory_info=False).store_stats.cumulative_created_bytes
                for n in self.nodes()}

    def stop(self) -> None:
        for p in reversed(self.procs):  # `ray start --block` stops its node on SIGTERM
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
