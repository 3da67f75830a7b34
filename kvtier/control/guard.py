"""Layer 7: what every request passes before FastAPI sees it (a plain ASGI wrapper).

- **Access**: with a token configured, every path but ``/health`` needs
  ``Authorization: Bearer <token>``, compared in constant time; a request
  without it is answered 401 before its body is read. With ``keys`` (a set
  of keys, each naming who holds it: the router's API keys) any one of them
  will do: the presented key's SHA-256 is compared in constant time with
  every key's (no early exit, so the time says nothing about which key or
  how much of one matched), and what the matched key names is left for the
  app in ``scope["state"]["kvtier_caller"]`` (``request.state.kvtier_caller``).
- **Body size**: a ``Content-Length`` that is not a plain non-negative number
  is a 400, one over ``max_body_bytes`` a 413, before anything is read; a
  body without a length (chunked) is counted as it arrives and cut off with
  a 413 at the limit.
- **Slow bodies**: each read of the body waits at most ``timeout_s`` (408);
  with ``body_deadline_s`` the whole body must also have arrived that long
  after the request began (a client trickling a byte at a time: 408).
- **Metrics**: each answered request is counted by operation and status.

Nothing here logs or echoes a header's value.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any, Awaitable, Callable, Mapping

from fastapi import HTTPException

from kvtier.control.metrics import ControlMetrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
CALLER = "kvtier_caller"
"""The ``scope["state"]`` entry naming who the matched key belongs to (with ``keys``)."""
KNOWN_OPS = frozenset({"lookup", "admit", "evict", "move", "clear", "pin", "unpin", "compress",
                       "decompress", "status", "health", "metrics", "docs", "openapi.json"})


def op_of(path: str) -> str:
    """A bounded label for a path (unknown paths are all ``other``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if name in KNOWN_OPS else "other"


class Guard:
    """Wraps the ASGI app with access control, body limits and request metrics."""

    def __init__(self, app: ASGIApp, token: str, max_body_bytes: int, timeout_s: float,
                 metrics: ControlMetrics, label: Callable[[str], str] | None = None,
                 keys: Mapping[str, Any] | None = None,
                 body_deadline_s: float | None = None) -> None:
        self.app = app
        self.label = label or op_of  # path -> the bounded ``op`` label of the metrics
        self._token = token.encode()
        if keys and token:
            raise ValueError("Guard: give a token or keys, not both")
        self._keys = [(hashlib.sha256(k.encode()).digest(), who) for k, who in
                      (keys or {}).items()]
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.body_deadline_s = body_deadline_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _answer(send_counted, *refusal)
                return
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            self.metrics.observe(self.label(scope.get("path", "")), status[0],
                                 time.perf_counter() - t0)

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        """(status, error, headers) to answer at once, or None to go on."""
        headers = scope.get("headers") or []
        if (self._token or self._keys) and scope.get("path") not in OPEN_PATHS:
            given = [v for k, v in headers if k == b"authorization"]
            scheme, _, presented = given[0].partition(b" ") if len(given) == 1 else (b"", b"", b"")
            if self._keys:
                who = self._match(presented.strip())
                ok = who is not None and scheme.lower() == b"bearer"
                if ok:
                    scope.setdefault("state", {})[CALLER] = who
            else:
                # compare_digest takes as long whatever the presented token is (no timing
                # oracle)
                ok = hmac.compare_digest(presented.strip(), self._token) and \
                    scheme.lower() == b"bearer"
            if not ok:
                return 401, "authorization: a valid bearer token is required", \
                    {"www-authenticate": "Bearer"}
        lengths = [v for k, v in headers if k == b"content-length"]
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 19:
                return 400, "content-length: not a non-negative integer", {}
            if int(lengths[0]) > self.max_body_bytes:
                return 413, f"body: over the {self.max_body_bytes}-byte limit", {}
        return None

    def _match(self, presented: bytes) -> Any:
        """Who ``presented`` belongs to (None: no key), in the same time for any key."""
        digest = hashlib.sha256(presented).digest()
        who = None
        for key, owner in self._keys:  # all of them, whatever matched
            if hmac.compare_digest(digest, key):
                who = owner
        return who

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that bounds the body's size and each wait for it."""
        seen = 0
        deadline = None if self.body_deadline_s is None else \
            time.monotonic() + self.body_deadline_s

        done = False

        async def limited() -> dict[str, Any]:
            nonlocal seen, done
            if done:  # the body is in: later reads wait for a disconnect, unbounded
                return await receive()
            wait = self.timeout_s
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise HTTPException(408, "body: not received in time")
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                raise HTTPException(408, "body: not received in time") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, f"body: over the {self.max_body_bytes}-byte limit")
                done = not message.get("more_body", False)
            return message

        return limited


async def _answer(send: Send, status: int, error: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
