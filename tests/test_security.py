"""Security properties of the running services, checked on the real thing: nothing from Redis is ever
unpickled, the embedded Redis wants a password and listens on loopback only, the HTTP endpoints listen on
loopback by default, and no secret reaches the printed or saved config."""

from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import redis

from buffer.server import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SERVICE_PACKAGES = ("buffer", "learner", "rollout_worker", "services")


class _CreatesAFile:
    """Unpickling this creates `path`: the proof that someone unpickled it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_of_any_protocol_is_dead_lettered_and_never_loaded(buffer_factory, tmp_path, protocol):
    # protocols 0 and 1 carry no 0x80 header: they must be refused for not being msgpack, never loaded
    buf = buffer_factory(policy="unbounded", capacity_groups=8)
    marker = tmp_path / f"pwned-{protocol}"
    raw = pickle.dumps(_CreatesAFile(str(marker)), protocol=protocol)
    buf.r.xadd(buf.k_stream, {"d": raw, "w": "attacker", "s": "-"})
    assert buf.pull(4, block_ms=200) == []
    assert not marker.exists()
    [letter] = buf.dead_letters()
    assert letter["raw"] == raw and letter["worker"] == b"attacker"
    assert letter["reason"].decode() in {"pickle", "bad_msgpack", "bad_schema"}
    assert buf.stats().depth == 0


def _loads_pickles(tree: ast.AST) -> list[str]:
    """Calls/imports that deserialize pickles (pickle/cloudpickle/dill/marshal loads, torch.load without
    weights_only=True, numpy allow_pickle=True)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in ("cloudpickle", "dill", "marshal")]
            if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                found += [f"from pickle import {a.name}" for a in node.names if a.name in ("load", "loads", "Unpickler")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in (
            "pickle", "cloudpickle", "dill", "marshal", "_pickle"
        ):
            found.append(name)
        elif name == "torch.load" and kw.get("weights_only") != "True":
            found.append("torch.load without weights_only=True")
        elif kw.get("allow_pickle") == "True":
            found.append(f"{name}(allow_pickle=True)")
    return found


def test_no_service_code_unpickles_anything():
    offenders = {}
    files = [p for pkg in SERVICE_PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 10  # the scan really looked at the packages
    for path in files:
        hits = _loads_pickles(ast.parse(path.read_text(), filename=str(path)))
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}


def test_the_scan_catches_what_it_is_meant_to_catch():
    code = "import cloudpickle\nimport pickle\npickle.loads(b'')\ntorch.load('x')\nnp.load('x', allow_pickle=True)\n"
    assert len(_loads_pickles(ast.parse(code))) == 4
    assert _loads_pickles(ast.parse("torch.load('x', weights_only=True)\npickle.dumps(1)\n")) == []


def test_embedded_redis_needs_the_password_and_listens_on_loopback_only(redis_server):
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as anonymous:  # plain RESP
        anonymous.sendall(b"GET x\r\n")
        assert anonymous.recv(256).startswith(b"-NOAUTH")
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password, decode_responses=True)
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("protected-mode")["protected-mode"] == "yes"
    client.close()
    listening = _listen_addresses(redis_server.proc.pid, redis_server.port)
    assert listening == {"127.0.0.1"}


def _listen_addresses(pid: int, port: int) -> set[str]:
    return {
        c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_metrics_and_dashboard_listen_on_loopback_by_default(tmp_path):
    from services.dashboard.server import start_dashboard
    from services.metrics import MetricsHub

    hub = MetricsHub(tmp_path / "run")
    try:
        port = int(hub.prometheus_url().rsplit(":", 1)[1].split("/")[0])
        assert _listen_addresses(os.getpid(), port) == {"127.0.0.1"}
    finally:
        hub.close()
    url, stop = start_dashboard([tmp_path], port=0)
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert _listen_addresses(os.getpid(), port) == {"127.0.0.1"}
    finally:
        stop()


def _staleflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def test_no_secret_in_the_printed_or_saved_config():
    secret = "s3cret-Hunter2-never-print"
    out = _staleflow("config", "show", "buffer.redis_url=redis://127.0.0.1:6390/0",
                     env={"STALEFLOW_REDIS_PASSWORD": secret, "WANDB_API_KEY": secret})
    assert out.returncode == 0, out.stderr
    assert "redis_url: redis://127.0.0.1:6390/0" in out.stdout  # the override is there, its secret is not
    assert secret not in out.stdout + out.stderr


def test_a_password_inside_the_redis_url_is_refused_without_echoing_it():
    secret = "pw-in-url-Hunter2"
    out = _staleflow("config", "show", f"buffer.redis_url=redis://:{secret}@127.0.0.1:6390/0", env={})
    assert out.returncode != 0
    assert "password_env" in out.stderr or "STALEFLOW_REDIS_PASSWORD" in out.stderr
    assert secret not in out.stdout + out.stderr


def test_the_embedded_password_never_reaches_the_command_line_or_its_log(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, aof=True) as server:
        assert server.password.encode() not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert server.password not in server.url
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and server.password.encode() in p.read_bytes()]
    assert leaked == []
