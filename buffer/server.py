"""Redis for the buffer: an embedded `redis-server` child for laptops, CI and tests, and `connect()` for all.

    with EmbeddedRedis(data_dir=run_dir, aof=True) as server:      # free loopback port, generated password
        client = connect(server.url, server.password)                # server.url never contains the password

The server is a child process we own (`--daemonize no`): its config, password included, goes in on stdin so
the password never shows in `ps`. It is stopped with SHUTDOWN NOSAVE, then killed if it lingers, on
`__exit__`, at interpreter exit, and on SIGTERM of the parent (unless the program handles SIGTERM itself: then
its exit path does it); on Linux it also receives SIGTERM if the parent dies abruptly (PR_SET_PDEATHSIG; that
signal follows the thread that started it, so start it from a thread that lives as long as the server should,
normally the main thread). AOF is on for runs (a resumed run finds its buffer) and off for tests.

Production: `connect(cfg.redis_url, os.environ[cfg.password_env])`, or `connect_config(cfg)`.

Reconnection: a client from `connect()` survives Redis going away for up to `reconnect_s` (a restart, a
failover): every command that fails with ConnectionError/TimeoutError (LOADING included) is retried with
exponential backoff until `reconnect_s` have passed since the command began, then raises. A retried command
may have run once already (its reply was lost): the buffer's scripts are idempotent for that reason (see
buffer/redis_buffer.py, "Delivery"). The first contact is not retried: an address that is wrong at start-up is
one clear RedisUnavailable at once, not a wait.
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
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from buffer.config import BufferConfig


class RedisUnavailable(ConnectionError):
    """Redis cannot be reached or refused us. The message names the address, never the password."""


def _address(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"  # hostname/port drop any user:password@


class ReconnectRetry(Retry):
    """redis-py's Retry bounded by time, not by a count: retry with exponential backoff (50 ms doubling to
    1 s) until `deadline_s` have passed since the call began. redis-py nests retries (a command's retry wraps
    the socket connect's retry, both with this object); a count would multiply, a deadline per call does not."""

    def __init__(self, deadline_s: float):
        super().__init__(ExponentialBackoff(cap=1.0, base=0.025), -1)
        self.deadline_s = deadline_s

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # noqa: ANN001, ANN201
        start = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                left = self.deadline_s - (time.monotonic() - start)
                if left <= 0:
                    raise
                time.sleep(min(self._backoff.compute(failures), left))


def _client(url: str, password: str | None, timeout_s: float, retry: Retry) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        password=password,
        socket_connect_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=30,
        decode_responses=False,
        retry=retry,
    )


def connect(url: str, password: str | None, *, timeout_s: float = 3.0, reconnect_s: float = 30.0) -> redis.Redis:
    """A checked client (bytes replies, short connect timeout) that reconnects for `reconnect_s` when Redis goes
    away later. Raises RedisUnavailable naming the address (never the password) if Redis is not there now."""
    probe = _client(url, password, timeout_s, Retry(NoBackoff(), 0))  # first contact: fail fast, one clear line
    try:
        probe.ping()
    except redis.AuthenticationError:
        why = "needs a password and none was given" if password is None else "rejected the password"
        raise RedisUnavailable(f"Redis at {_address(url)} {why}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        why = type(exc).__name__
        raise RedisUnavailable(f"cannot reach Redis at {_address(url)} ({why}); is it running?") from None
    finally:
        probe.close()
    return _client(url, password, timeout_s, ReconnectRetry(reconnect_s))


def connect_config(cfg: BufferConfig) -> redis.Redis:
    """Production: `cfg.redis_url` with the password from the environment variable `cfg.password_env`."""
    if not cfg.redis_url:
        raise ValueError("buffer.redis_url is not set (None means: start an EmbeddedRedis)")
    return connect(cfg.redis_url, os.environ.get(cfg.password_env), reconnect_s=cfg.reconnect_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    # Its own session: a terminal's Ctrl-C goes to the foreground process group, and Redis must outlive it until
    # the run has checkpointed (the owner stops it afterwards; if the owner dies, PDEATHSIG stops it).
    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_live: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()
_hooks_installed = False


def _stop_all() -> None:
    for server in list(_live):
        server.stop()


def _on_sigterm(signum: int, frame: object) -> None:
    # Only installed where SIGTERM would otherwise kill us outright (SIG_DFL): stop the servers, then die the
    # same way. Where the program has its own handler we leave it alone: its graceful exit (which may still
    # need Redis) ends in atexit or the `with` block, which stop the servers.
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


class EmbeddedRedis:
    """`redis-server` as a child process on a free 127.0.0.1 port with a generated password."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        aof: bool = False,
        appendfsync: str = "everysec",
        port: int | None = None,
        maxmemory_mb: int | None = None,
        executable: str = "redis-server",
        start_timeout_s: float = 10.0,
    ):
        if aof and data_dir is None:
            raise ValueError("aof=True needs a data_dir to write the append-only file to")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.aof = aof
        self.appendfsync = appendfsync
        self._fixed_port = port  # None: a free port, chosen at start()
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
            f"appendfsync {self.appendfsync}",
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
        for _ in range(5 if self._fixed_port is None else 1):
            # redis logs to a temporary file, not a pipe: nobody reads a pipe, and a full one would block it
            log = tempfile.TemporaryFile()  # the free port can be taken between probing and binding: retry on another one
            port = self._fixed_port or _free_port()
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

    def restart(self, *, hard: bool = False) -> EmbeddedRedis:
        """Stop (hard: SIGKILL, as a crash) and start again on the same port, password and data dir: clients
        from `connect()` reconnect by themselves; with AOF on, the data is loaded back."""
        if self.port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        port, self._fixed_port = self._fixed_port, self.port
        try:
            if hard and self.proc is not None:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.stop()
            return self.start()
        finally:
            self._fixed_port = port

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
