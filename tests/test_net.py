"""kvtier.net: the one backoff (doubling, cap, jitter, reset, one probe) and the one
HTTP client against a real HTTP server on 127.0.0.1 (no redirect followed, bodies
bounded, timeouts bounded, credentials only from the caller)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from kvtier.net.backoff import JITTER, Backoff
from kvtier.net.http import (HttpClient, HttpError, Redirected, StatusError, TooLarge,
                             Unreachable, arequest, async_client, shown_url)


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- backoff ----------------------------------------------------------------------

def test_backoff_doubles_up_to_its_cap_and_a_success_resets_it() -> None:
    clock = Clock()
    b = Backoff(0.5, 3.0, jitter=0.0, clock=clock)
    assert b.ready() and b.delay_s == 0
    assert [b.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert not b.ready()
    clock.now += 2.9
    assert not b.ready()
    clock.now += 0.2
    assert b.ready()
    b.succeeded()
    assert b.delay_s == 0 and b.ready() and b.failed() == 0.5  # from the start again


def test_backoff_jitter_stays_within_its_bounds() -> None:
    lo = Backoff(1.0, 1.0, jitter=0.2, draw=lambda a, b: a)
    hi = Backoff(1.0, 1.0, jitter=0.2, draw=lambda a, b: b)
    assert lo.failed() == pytest.approx(0.8) and hi.failed() == pytest.approx(1.2)
    b = Backoff(0.1, 0.4)  # the real draw
    waits = set()
    for _ in range(50):
        for nominal in (0.1, 0.2, 0.4, 0.4):
            wait = b.failed()
            waits.add(wait)
            assert nominal * (1 - JITTER) <= wait <= nominal * (1 + JITTER)
        b.succeeded()
    assert len(waits) > 100  # jittered, not in step


def test_backoff_lets_one_probe_through_at_a_time() -> None:
    clock = Clock()
    b = Backoff(1.0, 8.0, jitter=0.0, clock=clock)
    assert b.claim() and b.claim()  # healthy: everyone asks
    b.failed()
    assert not b.claim()
    clock.now += 1.0
    assert b.claim() and not b.claim() and not b.ready()  # the probe is out
    b.succeeded()
    assert b.claim() and b.claim()


def test_a_fixed_backoff_and_a_zero_one() -> None:
    clock = Clock()
    fixed = Backoff(5.0, 5.0, jitter=0.0, clock=clock)
    assert [fixed.failed() for _ in range(3)] == [5.0, 5.0, 5.0]
    zero = Backoff(0.0, 0.0, clock=clock)
    zero.failed()
    assert zero.ready()  # a zero backoff never skips
    with pytest.raises(ValueError):
        Backoff(-1.0, 1.0)


# -- HTTP -------------------------------------------------------------------------

class Server:
    """A tiny HTTP server on 127.0.0.1 whose paths misbehave in the ways under test."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's API)
                outer.seen.append((self.path, self.headers.get("Authorization")))
                getattr(self, "_" + self.path.strip("/").split("?")[0].replace("-", "_"))()

            do_POST = do_GET  # noqa: N815

            def _send(self, status: int, body: bytes, length: bool = True,
                      **headers: str) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _ok(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self._send(200, json.dumps({"got": json.loads(self.rfile.read(n) or b"null"),
                                            "auth": self.headers.get("Authorization")}).encode())

            def _redirect(self) -> None:
                self._send(302, b"", Location="http://user:pw@127.0.0.1:1/target?token=x")

            def _target(self) -> None:
                self._send(200, b"followed")

            def _big(self) -> None:
                self._send(200, b"x" * 5000)

            def _big_unsized(self) -> None:  # no Content-Length: the body ends at close
                self.close_connection = True
                self._send(200, b"y" * 5000, length=False)

            def _missing(self) -> None:
                self._send(404, b'{"error": "no such thing"}' + b" " * 100_000)

            def _slow(self) -> None:
                time.sleep(3)
                self._send(200, b"late")

            def _trickle(self) -> None:
                self.close_connection = True
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.1)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def test_an_answer_and_the_token_only_from_the_caller(server: Server) -> None:
    http = HttpClient(timeout_s=5.0)
    out = http.request("POST", server.url + "/ok", token="tok", json_body={"a": 1}).json()
    assert out == {"got": {"a": 1}, "auth": "Bearer tok"}
    # A user and password in the URL are neither sent nor shown.
    with_creds = server.url.replace("http://", "http://alice:secret@")
    assert http.request("GET", with_creds + "/ok").json()["auth"] is None
    assert shown_url(with_creds + "/ok?token=t") == server.url + "/ok"
    http.close()


def test_a_redirect_is_refused_not_followed(server: Server) -> None:
    http = HttpClient(timeout_s=5.0)
    server.seen.clear()
    with pytest.raises(Redirected) as err:
        http.request("GET", server.url.replace("http://", "http://u:pw@") + "/redirect",
                     token="tok")
    assert err.value.status == 302 and "not followed" in str(err.value)
    assert isinstance(err.value, StatusError)
    assert "pw" not in str(err.value) and "token=x" not in str(err.value)
    assert [p for p, _ in server.seen] == ["/redirect"]  # the target was never asked


def test_an_oversized_body_is_cut_with_a_clear_error(server: Server) -> None:
    http = HttpClient(timeout_s=5.0, max_bytes=1000)
    creds = server.url.replace("http://", "http://u:secret@")
    for path in ("/big", "/big-unsized"):
        with pytest.raises(TooLarge) as err:
            http.request("GET", creds + path + "?k=secret")
        assert str(err.value).startswith(f"{server.url}{path}: ")
        assert "1000-byte limit" in str(err.value) and "secret" not in str(err.value)
    assert len(http.request("GET", server.url + "/big", max_bytes=5000).body) == 5000


def test_an_error_answer_keeps_its_status_and_the_start_of_its_body(server: Server) -> None:
    with pytest.raises(StatusError) as err:
        HttpClient(timeout_s=5.0).request("GET", server.url + "/missing")
    assert err.value.status == 404 and err.value.body.startswith(b'{"error": "no such thing"}')
    assert len(err.value.body) <= 64 * 1024  # kept for a message, not whole


def test_timeouts_are_bounded(server: Server) -> None:
    http = HttpClient(timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match="no answer within 0.5 s"):
        http.request("GET", server.url + "/slow")
    assert time.monotonic() - t0 < 1.5
    t0 = time.monotonic()  # bytes keep coming, each in time: the call still ends
    with pytest.raises(Unreachable, match="not received within 0.5 s"):
        http.request("GET", server.url + "/trickle")
    assert time.monotonic() - t0 < 1.5


def test_unreachable_and_unusable_urls() -> None:
    http = HttpClient(timeout_s=2.0)
    with pytest.raises(Unreachable) as err:
        http.request("GET", "http://127.0.0.1:1/x")
    assert err.value.url == "http://127.0.0.1:1/x"
    for bad in ("ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1:99999/"):
        with pytest.raises(HttpError):
            http.request("GET", bad)


def test_the_async_call_follows_the_same_rules(server: Server) -> None:
    async def go() -> None:
        async with async_client() as client:
            got = await arequest(client, "POST", server.url + "/ok", timeout_s=5.0, token="t",
                                 json_body=[1])
            assert got.json() == {"got": [1], "auth": "Bearer t"}
            with pytest.raises(Redirected):
                await arequest(client, "GET", server.url + "/redirect", timeout_s=5.0)
            with pytest.raises(TooLarge):
                await arequest(client, "GET", server.url + "/big", timeout_s=5.0,
                               max_bytes=100)
            with pytest.raises(Unreachable):
                await arequest(client, "GET", server.url + "/slow", timeout_s=0.3)

    server.seen.clear()
    asyncio.run(go())
    assert "/target" not in [p for p, _ in server.seen]
