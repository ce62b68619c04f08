"""The dashboard's small stdlib HTTP server: the page, its bundled assets, incremental JSON over run dirs.

Endpoints:
    GET /                                   the page
    GET /static/<file>                      bundled assets (uPlot; no CDN: the page works offline)
    GET /api/panels                         panel definitions (services.dashboard.panels)
    GET /api/runs                           runs under the given paths (re-scanned: new runs appear live)
    GET /api/metrics?run=ID&file=F&offset=N records of F (metrics|rollout|eval) from byte N to the last
                                            full line; the page polls with the returned offset, so each
                                            poll reads only what was appended since the last one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from services.dashboard.panels import panels_json
from services.metrics import FILES

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
RUN_FILES = {"metrics": FILES["learner"], "rollout": FILES["rollout"], "eval": FILES["eval"]}  # ?file= names
MAX_CHUNK = 4 << 20  # bytes per response; the page asks again while "more" is true
LIVE_WITHIN_S = 60.0


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES.values())


class RunIndex:
    """Maps stable run ids to run directories found under the given paths (a run dir or a folder of runs)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._by_id: dict[str, Path] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[dict[str, Any]]:
        found: list[Path] = []
        for root in self.paths:
            if _is_run(root):
                found.append(root)
            elif root.is_dir():
                found += sorted(p for p in root.iterdir() if p.is_dir() and _is_run(p))
        with self._lock:
            known = {p.resolve(): i for i, p in self._by_id.items()}
            for path in found:
                if path.resolve() in known:
                    continue
                run_id, n = path.name, 2
                while run_id in self._by_id:  # same name under two roots: keep both, distinguishable
                    run_id, n = f"{path.name} ({n})", n + 1
                self._by_id[run_id] = path
                known[path.resolve()] = run_id
            now = time.time()
            runs = []
            for run_id, path in self._by_id.items():
                mtimes = [(path / f).stat().st_mtime for f in RUN_FILES.values() if (path / f).is_file()]
                if not mtimes:
                    continue
                updated = max(mtimes)
                runs.append({"id": run_id, "name": path.name, "path": str(path), "updated": updated,
                             "live": now - updated < LIVE_WITHIN_S})
        return sorted(runs, key=lambda r: r["updated"])

    def path(self, run_id: str) -> Path | None:
        with self._lock:
            return self._by_id.get(run_id)


def read_records(path: Path, offset: int) -> dict[str, Any]:
    """Complete JSONL lines of `path` from byte `offset`; a file that shrank (rewritten) restarts from 0."""
    size = path.stat().st_size if path.is_file() else 0
    reset = offset > size
    if reset:
        offset = 0
    if size == offset:
        return {"records": [], "offset": offset, "more": False, "reset": reset}
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(MAX_CHUNK)
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
    records, bad = [], 0
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return {"records": records, "offset": offset + end, "more": offset + end < size and end > 0,
            "reset": reset, "skipped": bad}


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer

    def log_message(self, fmt: str, *args: Any) -> None:  # the console is for the URL, not per-request noise
        log.debug("dashboard: " + fmt, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if url.path in ("/", "/index.html"):
                self._file(STATIC / "index.html")
            elif url.path.startswith("/static/"):
                name = url.path[len("/static/"):]
                assets = {p.name for p in STATIC.iterdir() if p.is_file()}
                if name not in assets:  # only the bundled files: no paths, no traversal
                    return self._error(HTTPStatus.NOT_FOUND, "no such asset")
                self._file(STATIC / name)
            elif url.path == "/api/panels":
                self._json(panels_json())
            elif url.path == "/api/runs":
                self._json({"runs": self.server.index.scan()})
            elif url.path == "/api/metrics":
                self._metrics(query)
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _metrics(self, query: dict[str, str]) -> None:
        run_dir = self.server.index.path(query.get("run", ""))
        if run_dir is None:
            return self._error(HTTPStatus.NOT_FOUND, "unknown run")
        fname = RUN_FILES.get(query.get("file", "metrics"))
        if fname is None:
            return self._error(HTTPStatus.BAD_REQUEST, f"file must be one of {sorted(RUN_FILES)}")
        try:
            offset = max(0, int(query.get("offset", "0")))
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "offset must be an integer")
        self._json(read_records(run_dir / fname, offset))

    def _file(self, path: Path) -> None:
        body = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message}, status)


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, paths: list[Path], host: str, port: int) -> None:
        self.index = RunIndex(paths)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


def start_dashboard(
    paths: list[Path], host: str = "127.0.0.1", port: int = 9266
) -> tuple[str, Callable[[], None]]:
    """Serve in a background thread; returns (url, stop). port 0 = a free port."""
    server = DashboardServer(paths, host, port)
    thread = threading.Thread(target=server.serve_forever, name="staleflow-dashboard", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server.url, stop


def serve(paths: list[Path], host: str = "127.0.0.1", port: int = 9266) -> None:
    """Serve in the foreground until Ctrl-C (the `staleflow dashboard` command)."""
    import signal

    # Ctrl-C and SIGTERM (docker stop, kill) stop it cleanly, also when started from a script's background job,
    # where the shell leaves SIGINT ignored and Python would never raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = DashboardServer(paths, host, port)
    roots = ", ".join(map(str, paths))
    print(f"staleflow dashboard: {server.url}  (runs from {roots}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
