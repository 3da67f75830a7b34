"""Stand-ins for the router's tests: a real router in this process and real HTTP servers
playing vLLM instances and the controller (what reaches them is recorded), with a set of
API keys (an operator, two tenants, a shared-cache user).

Used by ``tests/test_security_router.py`` (attacks) and ``tests/test_fuzz_cluster.py``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from kvtier.cluster.router import Router
from kvtier.cluster.router_serve import RouterServing, router_server
from kvtier.cluster.tokens import PromptTokens
from kvtier.net.tls import TlsFiles, server_context
from kvtier.testing.procs import HOST, free_port, wait_until

OP, TEN_A, TEN_B, SHARED = ("op-" + "0" * 29, "ta-" + "1" * 29, "tb-" + "2" * 29,
                            "sh-" + "3" * 29)
KEYS_TEXT = f"""# the test's keys
{OP} operator
{TEN_A} tenant-a
{TEN_B} tenant-b   # another tenant
{SHARED}
"""
BACKEND_KEY = "backend-" + "9" * 24
PROMPT = {"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 2}


class StandIn:
    """A stand-in vLLM instance and controller (real HTTP; records what reached it).

    ``require_key``: answer 401 without ``Bearer BACKEND_KEY`` (vLLM's ``--api-key``);
    ``hold``: a completion waits for this event; ``tls``: serve https (mutual)."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self.seen: list[tuple[str, dict[str, str], Any]] = []
        self.require_key = False
        self.hold: threading.Event | None = None
        self.stream_pause = 0.0  # a stream: one event, this pause, another, [DONE]
        self.registered: list[dict[str, str]] = []  # as a controller: /v1/instances
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, out: Any) -> None:
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append((self.path, outer.lower(self.headers), None))
                self._answer(200, {"instances": outer.registered, "data": [{"id": "m"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, outer.lower(self.headers), body))
                if self.path == "/v1/lookup":
                    self._answer(200, {"instances": [{"url": outer.url, "instance": "inst-x",
                                                      "cached_tokens": 4}]})
                    return
                if outer.require_key and self.headers.get("Authorization") != \
                        f"Bearer {BACKEND_KEY}":
                    self._answer(401, {"error": "Unauthorized"})
                    return
                if outer.hold is not None:
                    outer.hold.wait(30)
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()  # no length: the stream ends with the connection
                    self.close_connection = True
                    try:
                        self.wfile.write(b'data: {"choices": [{"text": "o"}]}\n\n')
                        self.wfile.flush()
                        time.sleep(outer.stream_pause)
                        self.wfile.write(b'data: {"choices": [{"text": "k"}]}\n\n'
                                         b'data: [DONE]\n\n')
                    except OSError:
                        pass  # the router hung up
                    return
                self._answer(200, {"choices": [{"text": "ok"}], "usage": {}})

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = server_context(tls).wrap_socket(self.server.socket,
                                                                 server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"{'https' if tls else 'http'}://{HOST}:{self.server.server_address[1]}"

    @staticmethod
    def lower(headers: Any) -> dict[str, str]:
        return {k.lower(): v for k, v in headers.items()}

    def completions(self) -> list[tuple[str, dict[str, str], Any]]:
        return [s for s in self.seen if s[0] == "/v1/completions"]

    def lookups(self) -> list[Any]:
        return [s[2] for s in self.seen if s[0] == "/v1/lookup"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RunningRouter:
    """``router_server`` in a thread of this process (uvicorn, as ``kvtier router`` runs)."""

    def __init__(self, serving: RouterServing, instances: list[str], controller: str = "",
                 **router_args: Any) -> None:
        serving.port = free_port()
        self.url = f"{serving.scheme}://{HOST}:{serving.port}"
        router = Router(instances, controller, **router_args)
        self.server = router_server(router, PromptTokens(None), serving)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the router")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def post(url: str, key: str | None, body: Any = PROMPT, client: httpx.Client | None = None,
         path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if client is not None:
        return client.post(f"{url}{path}", json=body, headers=headers)
    with httpx.Client(timeout=30) as c:
        return c.post(f"{url}{path}", json=body, headers=headers)


def kvtier_headers(resp: httpx.Response) -> set[str]:
    return {k for k in resp.headers if k.lower().startswith("x-kvtier")}
