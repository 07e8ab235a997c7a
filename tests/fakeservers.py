"""Local stand-ins (127.0.0.1, started by the tests) for the GDC API and Kaggle's data endpoint, with faults.

A FakeFile is served at /data/{file_id} (GDC) or /competitions/data/download/{competition}/{path}
(Kaggle). Faults, each consumed as it fires:
    drop_after: close the connection after this many bytes of the body (once per list entry)
    fail_503:   answer 503 this many times first
    corrupt:    flip one byte of the body this many times (a wrong md5)
    ignore_range: answer 200 with the whole file whatever Range asks
    delay_s:    sleep this long per 64 KiB sent (for kill-mid-file tests)
Every request is recorded (path, Range header, Authorization) for the asserts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


@dataclass
class FakeFile:
    data: bytes
    drop_after: list[int] = field(default_factory=list)
    fail_503: int = 0
    corrupt: int = 0
    ignore_range: bool = False
    delay_s: float = 0.0


class FakeServer:
    def __init__(self):
        self.files: dict[str, FakeFile] = {}  # URL path -> file
        self.json_routes: dict[str, object] = {}  # URL path -> callable(query) -> (status, obj)
        self.requests: list[dict] = []
        self.auth_required: str | None = None  # "Basic ..." expected on Kaggle paths
        self.forbidden: bool = False  # Kaggle: rules not accepted
        # files whose bodies are being sent now, and the most at once. Counted per file: a client's
        # retry of the same file may reach the server before the previous handler has returned.
        self.active: dict[str, int] = {}
        self.max_active = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                server.requests.append(
                    {
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "range": self.headers.get("Range"),
                        "auth": self.headers.get("Authorization"),
                    }
                )
                if url.path.startswith("/competitions/"):
                    if server.auth_required and self.headers.get("Authorization") != server.auth_required:
                        return self._send(401, b'{"code":401,"message":"Unauthenticated"}')
                    if server.forbidden:
                        return self._send(403, b'{"code":403,"message":"You must accept this competition\'s rules"}')
                if url.path in server.json_routes:
                    status, obj = server.json_routes[url.path](parse_qs(url.query))
                    return self._send(status, json.dumps(obj).encode(), "application/json")
                f = server.files.get(url.path)
                if f is None:
                    return self._send(404, b"not found")
                if f.fail_503 > 0:
                    f.fail_503 -= 1
                    return self._send(503, b"busy")
                body, start = f.data, 0
                rng = self.headers.get("Range")
                if rng and not f.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(f.data):
                        return self._send(416, b"", extra={"Content-Range": f"bytes */{len(f.data)}"})
                    body = f.data[start:]
                if f.corrupt > 0:
                    f.corrupt -= 1
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(f.data) - 1}/{len(f.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "none" if f.ignore_range else "bytes")
                self.end_headers()
                limit = f.drop_after.pop(0) if f.drop_after else None
                with server._lock:
                    server.active[url.path] = server.active.get(url.path, 0) + 1
                    server.max_active = max(server.max_active, len(server.active))
                try:
                    self._send_body(f, body, limit)
                finally:
                    with server._lock:
                        server.active[url.path] -= 1
                        if not server.active[url.path]:
                            del server.active[url.path]

            def _send_body(self, f, body, limit):
                sent = 0
                step = 1 << 16
                while sent < len(body):
                    if sent and f.delay_s:
                        # between chunks only: a pause after the last one would keep a body the client
                        # already has counted as active while the next download starts
                        time.sleep(f.delay_s)
                    n = step if limit is None else min(step, limit - sent)
                    if n <= 0:
                        self.close_connection = True  # drop mid-file: fewer bytes than Content-Length
                        self.wfile.flush()
                        return
                    try:
                        self.wfile.write(body[sent : sent + n])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    sent += n

            def _send(self, status, body, ctype="text/plain", extra=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, path: str) -> list[str | None]:
        return [r["range"] for r in self.requests if r["path"] == path]
