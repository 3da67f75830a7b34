"""Layer 0: the product's one HTTP client (httpx), with the same rules for every call.

- **Timeouts, always.** Each wait (connect, send, every read) is bounded by
  ``timeout_s``, and a body still arriving ``timeout_s`` after the call began
  is abandoned, so a server that trickles bytes ends the call within about
  twice ``timeout_s``.
- **No redirects.** A 3xx is :class:`Redirected`, never followed: the
  controller and the instances answer directly, and following one would carry
  the call (and its token) somewhere the caller did not name.
- **Bounded bodies.** A body is read as a stream and cut past ``max_bytes``
  (:class:`TooLarge`) before it is held whole; a ``Content-Length`` over the
  bound is refused unread. The bound counts decoded bytes (a gzip bomb too).
- **Credentials from the caller only.** ``Authorization`` is built from the
  ``token`` argument; a user or password in the URL is dropped, and the
  environment (proxies, ``.netrc``) is not consulted (``trust_env=False``).
- **Errors name the URL without credentials or query** (:attr:`HttpError.url`).

Sync callers hold an :class:`HttpClient` (pooled keep-alive connections; the
httpx client is made on first use, which costs ~15 ms, and so after any fork);
async callers (the router) pass an ``httpx.AsyncClient`` to :func:`arequest`,
best one from :func:`async_client` (no environment proxies or redirects). Both
take the process's :class:`~kvtier.net.tls.TlsFiles`: https:// URLs are checked
against the cluster's CA, and its certificate is presented (mutual TLS).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from kvtier.net.tls import TlsFiles, client_context

MAX_BYTES = 1024**2
"""The default bound on an answer's body."""
ERROR_BODY_BYTES = 64 * 1024
"""How much of an error answer's body is kept (for its message; the rest is dropped)."""


class HttpError(Exception):
    """A call that got no usable answer. ``url`` has no credentials and no query."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class Unreachable(HttpError):
    """No answer: refused, reset, timed out, not HTTP, or an unusable URL."""


class TooLarge(HttpError):
    """The answer's body is over the caller's bound."""


class StatusError(HttpError):
    """The server answered with a status other than 2xx; ``body`` is its start."""

    def __init__(self, url: str, status: int, body: bytes, reason: str = "") -> None:
        super().__init__(url, reason or f"answered {status}")
        self.status = status
        self.body = body


class Redirected(StatusError):
    """The server answered 3xx; it is not followed (``location`` is where it pointed)."""

    def __init__(self, url: str, status: int, location: str) -> None:
        super().__init__(url, status, b"", f"answered {status}, a redirect to "
                         f"{shown_url(location) if location else '?'}, not followed")
        self.location = location


@dataclass(frozen=True)
class Response:
    """A 2xx answer, read whole (within the bound)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not)."""
        return json.loads(self.body)


def _split(url: str) -> tuple[str, str]:
    """(the URL to send, without user or password; the URL to show, without the query)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a bad port or IPv6 literal
        raise Unreachable("<unparsable URL>", "not a URL") from None
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.scheme not in ("http", "https") or not host:
        raise Unreachable(shown, "not an http(s) URL with a host")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), shown


def shown_url(url: str) -> str:
    """``url`` as it may be logged: no user, password or query."""
    try:
        return _split(url)[1]
    except HttpError as exc:
        return exc.url


def _prepare(token: str, json_body: object | None) -> tuple[bytes | None, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if json_body is None:
        return None, headers
    headers["Content-Type"] = "application/json"
    return json.dumps(json_body).encode(), headers


class _Body:
    """Collects one answer's body under the rules above (shared by sync and async)."""

    def __init__(self, resp: httpx.Response, url: str, max_bytes: int, timeout_s: float,
                 deadline: float) -> None:
        self.status, self.url, self.timeout_s, self.deadline = resp.status_code, url, \
            timeout_s, deadline
        self.headers = dict(resp.headers)
        if 300 <= self.status < 400:
            raise Redirected(url, self.status, resp.headers.get("location", ""))
        self.ok = 200 <= self.status < 300
        # An error's body only feeds a message: keep its start, do not fail on its size.
        self.limit = max_bytes if self.ok else min(max_bytes, ERROR_BODY_BYTES)
        length = resp.headers.get("content-length", "")
        if self.ok and length.isdigit() and int(length) > self.limit:
            raise TooLarge(url, f"answer of {int(length)} bytes is over the {self.limit}-byte "
                           "limit")
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> bool:
        """Take a piece; True once an error body has all we keep (stop reading)."""
        self.parts.append(chunk)
        self.size += len(chunk)
        if self.size > self.limit:
            if not self.ok:
                return True
            raise TooLarge(self.url, f"answer over the {self.limit}-byte limit; cut")
        if time.monotonic() > self.deadline:
            raise Unreachable(self.url, f"answer not received within {self.timeout_s:g} s")
        return False

    def result(self) -> Response:
        """The answer once the body is in; StatusError for a non-2xx one."""
        body = b"".join(self.parts)
        if not self.ok:
            raise StatusError(self.url, self.status, body[:self.limit])
        return Response(self.status, body, self.headers)


def _failure(url: str, exc: Exception, timeout_s: float) -> Unreachable:
    if isinstance(exc, httpx.TimeoutException):
        return Unreachable(url, f"no answer within {timeout_s:g} s ({type(exc).__name__})")
    return Unreachable(url, str(exc) or type(exc).__name__)


_TRANSPORT = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)


class HttpClient:
    """Pooled HTTP calls under the module's rules; thread-safe. ``timeout_s`` and
    ``max_bytes`` are the defaults of every call (each call may give its own)."""

    def __init__(self, timeout_s: float, max_bytes: int = MAX_BYTES,
                 tls: TlsFiles | None = None) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.tls = tls
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _httpx(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False,
                                            trust_env=False, verify=_verify(self.tls))
            return self._client

    def request(self, method: str, url: str, *, token: str = "",
                json_body: object | None = None, timeout_s: float | None = None,
                max_bytes: int | None = None, headers: dict[str, str] | None = None
                ) -> Response:
        """``method url`` (a JSON body if ``json_body`` is not None, more ``headers`` if
        given: the caller's own credentials, never from the environment); the 2xx answer.

        Raises :class:`StatusError` (:class:`Redirected` for 3xx), :class:`TooLarge`
        or :class:`Unreachable`, all :class:`HttpError`.
        """
        send, shown = _split(url)
        t = self.timeout_s if timeout_s is None else timeout_s
        content, sent = _prepare(token, json_body)
        sent.update(headers or {})
        deadline = time.monotonic() + t
        try:
            with self._httpx().stream(method, send, content=content, headers=sent,
                                      timeout=t, follow_redirects=False) as resp:
                body = _Body(resp, shown, max_bytes or self.max_bytes, t, deadline)
                for chunk in resp.iter_bytes():
                    if body.add(chunk):
                        break
                return body.result()
        except _TRANSPORT as exc:
            raise _failure(shown, exc, t) from None

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _verify(tls: TlsFiles | None) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for https:// URLs: the cluster's CA (and this process's
    certificate, for mutual TLS) when configured, else the system's CAs."""
    return client_context(tls) if tls is not None and tls.dialing else True


def async_client(max_connections: int = 100, tls: TlsFiles | None = None) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for :func:`arequest`: nothing taken from the environment
    (a proxy would see the token), redirects off, every call gives its own timeout;
    https:// checked against ``tls``'s CA (presenting its certificate) when given."""
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=_verify(tls),
                             limits=httpx.Limits(max_connections=max_connections))


async def arequest(client: httpx.AsyncClient, method: str, url: str, *, timeout_s: float,
                   token: str = "", json_body: object | None = None,
                   max_bytes: int = MAX_BYTES) -> Response:
    """:meth:`HttpClient.request` on the caller's ``httpx.AsyncClient`` (same rules,
    same errors); ``timeout_s`` has no default here."""
    send, shown = _split(url)
    content, headers = _prepare(token, json_body)
    deadline = time.monotonic() + timeout_s
    try:
        async with client.stream(method, send, content=content, headers=headers,
                                 timeout=timeout_s, follow_redirects=False) as resp:
            body = _Body(resp, shown, max_bytes, timeout_s, deadline)
            async for chunk in resp.aiter_bytes():
                if body.add(chunk):
                    break
            return body.result()
    except _TRANSPORT as exc:
        raise _failure(shown, exc, timeout_s) from None
