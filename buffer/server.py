"""Redis for the buffer: an embedded `redis-server` child for laptops, CI and tests, and `connect()` for all.

    with EmbeddedRedis(data_dir=run_dir, aof=True) as server:      # free loopback port, generated password
        client = connect(server.url, server.password)                # server.url never contains the password

The server is a child process we own (`--daemonize no`): its config, password included, goes in on stdin so
the password never shows in `ps`. It is stopped with SHUTDOWN NOSAVE, then killed if it lingers, on
`__exit__`, at interpreter exit, and on SIGTERM of the parent; on Linux it also receives SIGTERM if the parent
dies abruptly (PR_SET_PDEATHSIG). AOF is on for runs (a resumed run finds its buffer) and off for tests.

Production: `connect(cfg.redis_url, os.environ[cfg.password_env])`, or `connect_config(cfg)`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from buffer.config import BufferConfig


class RedisUnavailable(ConnectionError):
    """Redis cannot be reached or refused us. The message names the address, never the password."""


def _address(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"  # hostname/port drop any user:password@


def connect(url: str, password: str | None, *, timeout_s: float = 3.0) -> redis.Redis:
    """A checked client (bytes replies, short connect timeout). Raises RedisUnavailable naming the address."""
    client = redis.Redis.from_url(
        url,
        password=password,
        socket_connect_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=30,
        decode_responses=False,
    )
    try:
        client.ping()
    except redis.AuthenticationError:
        client.close()
        why = "needs a password and none was given" if password is None else "rejected the password"
        raise RedisUnavailable(f"Redis at {_address(url)} {why}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        why = type(exc).__name__
        raise RedisUnavailable(f"cannot reach Redis at {_address(url)} ({why}); is it running?") from None
    return client


def connect_config(cfg: BufferConfig) -> redis.Redis:
    """Production: `cfg.redis_url` with the password from the environment variable `cfg.password_env`."""
    if not cfg.redis_url:
        raise ValueError("buffer.redis_url is not set (None means: start an EmbeddedRedis)")
    return connect(cfg.redis_url, os.environ.get(cfg.password_env))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_live: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()
_hooks_installed = False


def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def _on_sigterm(signum, frame, previous=None):  # noqa: ANN001
    _stop_all()
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda n, f: _on_sigterm(n, f, previous))


class EmbeddedRedis:
    """`redis-server` as a child process on a free 127.0.0.1 port with a generated password."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        aof: bool = False,
        maxmemory_mb: int | None = None,
        executable: str = "redis-server",
        start_timeout_s: float = 10.0,
    ):
        if aof and data_dir is None:
            raise ValueError("aof=True needs a data_dir to write the append-only file to")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.aof = aof
        self.maxmemory_mb = maxmemory_mb
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self.password = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def _config(self, port: int) -> str:
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            f"requirepass {self.password}",
            'save ""',
            f"appendonly {'yes' if self.aof else 'no'}",
            "loglevel warning",
            'logfile ""',
        ]
        if self.data_dir is not None:
            lines.append(f'dir "{self.data_dir.resolve()}"')
        if self.maxmemory_mb:
            lines += [f"maxmemory {self.maxmemory_mb}mb", "maxmemory-policy noeviction"]
        return "\n".join(lines) + "\n"

    def start(self) -> EmbeddedRedis:
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(
                f"{self.executable} not found: install it (apt-get install redis-server / brew install redis) "
                "or set buffer.redis_url"
            )
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        _install_hooks()
        last_error = ""
        for _ in range(5):
            # redis logs to a temporary file, not a pipe: nobody reads a pipe, and a full one would block it
            log = tempfile.TemporaryFile()  # the free port can be taken between probing and binding: retry on another one
            port = _free_port()
            proc = subprocess.Popen(
                [exe, "-"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            assert proc.stdin is not None
            proc.stdin.write(self._config(port).encode())
            proc.stdin.close()
            self.proc, self.port, self._log = proc, port, log
            _live.add(self)
            if self._wait_ready():
                return self
            last_error = self._output()
            self.stop()
        raise RuntimeError(f"redis-server did not start on 127.0.0.1: {last_error.strip()[-500:]}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                client = redis.Redis(
                    host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5,
                    socket_timeout=2.0, retry=Retry(NoBackoff(), 0),  # SHUTDOWN drops the line: don't redial
                )
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass  # SHUTDOWN closes the connection under us: that is the normal outcome
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
