"""Layer 7: the management API over HTTP (JSON), stdlib only.

    POST /v1/<op>            JSON body -> JSON result; op in CacheAPI.routes
    POST /v1/admit?key=HEX[&tier=NAME]   body: an encoded chunk (header + payload)
    GET  /v1/status          usage and counters of every tier
    GET  /metrics            Prometheus text format

Bad input answers 400 with ``{"error": "<field>: <problem>"}``. The server
binds the configured host (127.0.0.1 by default) and runs on daemon threads.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kvtier.control.api import CacheAPI

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024**2  # one encoded chunk, or a long prompt's token list


class _Handler(BaseHTTPRequestHandler):
    api: CacheAPI  # set on the subclass made by serve()

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the engine logs enough
        log.debug("control: " + fmt, *args)

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ValueError(f"body: {n} bytes is over the {MAX_BODY}-byte limit")
        return self.rfile.read(n)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlparse(self.path).path
        if path == "/metrics":
            self._send(200, self.api.metrics(), "text/plain; version=0.0.4")
        elif path == "/v1/status":
            self._send(200, self.api.status({}))
        else:
            self._send(404, {"error": f"no such endpoint: GET {path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        op = url.path.removeprefix("/v1/")
        try:
            body = self._body()
            if op == "admit":
                q = parse_qs(url.query)
                if "key" not in q:
                    raise ValueError("key: missing query parameter")
                self._send(200, self.api.admit(q["key"][0], body, q.get("tier", [None])[0]))
                return
            handler = self.api.routes.get(op) if url.path.startswith("/v1/") else None
            if handler is None:
                self._send(404, {"error": f"no such endpoint: POST {url.path}"})
                return
            try:
                req = json.loads(body or b"{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"body: not JSON ({exc.msg})") from None
            if not isinstance(req, dict):
                raise ValueError("body: expected a JSON object")
            self._send(200, handler(req))
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # a bug must not kill the server thread
            log.exception("control: %s failed", op)
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})


class ControlServer:
    """A running management API server; :meth:`close` stops it."""

    def __init__(self, api: CacheAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = type("Handler", (_Handler,), {"api": api})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,),
                                        name="kvtier-control",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host = self.httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
