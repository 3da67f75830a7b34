"""Attacks on the KV-aware router, each refused or bounded, the router still serving after.

A real router (``router_server``: the Guard, uvicorn, TLS, exactly what ``kvtier
router`` runs) on 127.0.0.1 in front of real HTTP servers. The instances and the
controller are stand-ins (``StandIn``: a small real HTTP server answering like vLLM's
``/v1/completions`` and the controller's ``/v1/lookup``), because what is under test is
what reaches them (which headers, which body, whether anything at all), which they
record (``tests/router_standin.py``); the real-vLLM cluster test (``tests/test_cluster_router.py``) covers the routing
itself with the keys on.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from kvtier.cli.main import main
from kvtier.cluster.router import Router
from kvtier.cluster.router_keys import Caller, load_keys, parse_keys, tenant_salt
from kvtier.cluster.router_serve import RouterServing
from kvtier.errors import ConfigError
from kvtier.net.tls import TlsFiles
from kvtier.testing.procs import HOST, free_port, wait_until
from kvtier.testing.tls import make_certs, non_loopback_address
from tests.router_standin import (BACKEND_KEY, KEYS_TEXT, OP, PROMPT, SHARED, TEN_A, TEN_B,
                                  RunningRouter, StandIn, kvtier_headers, post)


@pytest.fixture
def backend() -> Iterator[StandIn]:
    b = StandIn()
    yield b
    b.close()


@pytest.fixture
def keyed(backend: StandIn) -> Iterator[RunningRouter]:
    """A router with the keys above, a stand-in controller (the backend) for lookups,
    small bounds, and a backend key of its own."""
    r = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys"),
                                    max_body_bytes=64 * 1024, body_timeout_s=1.0,
                                    max_concurrency=4),
                      [backend.url], backend.url, backend_key=BACKEND_KEY,
                      request_timeout_s=2.0)
    yield r
    r.close()


def still_serves(r: RunningRouter, key: str = TEN_A) -> None:
    resp = post(r.url, key)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "ok"


def test_no_key_or_a_wrong_key_is_401_and_the_instance_sees_nothing(
        keyed: RunningRouter, backend: StandIn) -> None:
    for headers in ({}, {"Authorization": "Bearer " + "x" * 32},
                    {"Authorization": f"Basic {OP}"}, {"Authorization": OP},
                    {"Authorization": f"Bearer {OP[:-1]}"}):
        for path in ("/v1/completions", "/v1/chat/completions"):
            resp = httpx.post(f"{keyed.url}{path}", json=PROMPT, headers=headers)
            assert resp.status_code == 401 and not kvtier_headers(resp)
        assert httpx.get(f"{keyed.url}/v1/models", headers=headers).status_code == 401
        assert httpx.get(f"{keyed.url}/metrics", headers=headers).status_code == 401
    assert backend.completions() == [] and backend.lookups() == []
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    # /metrics: an operator's only
    assert httpx.get(f"{keyed.url}/metrics",
                     headers={"Authorization": f"Bearer {TEN_A}"}).status_code == 403
    resp = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": f"Bearer {OP}"})
    assert resp.status_code == 200
    assert 'kvtier_router_http_requests_total{code="401",op="/v1/completions"}' in resp.text
    still_serves(keyed)
    assert httpx.get(f"{keyed.url}/v1/models",
                     headers={"Authorization": f"Bearer {SHARED}"}).status_code == 200


def test_the_cache_headers_go_to_operators_only_and_never_with_an_error(
        keyed: RunningRouter, backend: StandIn) -> None:
    tenant = post(keyed.url, TEN_A)
    assert tenant.status_code == 200 and not kvtier_headers(tenant)
    assert not kvtier_headers(post(keyed.url, SHARED))
    op = post(keyed.url, OP)
    assert op.status_code == 200 and op.headers["x-kvtier-instance"] == "inst-x"
    assert op.headers["x-kvtier-cached-tokens"] == "4"  # the stand-in controller's answer
    # an instance that wants a key (vLLM's --api-key) gets the router's own
    backend.require_key = True
    assert post(keyed.url, OP).status_code == 200
    # a router without that key: the instance's 401 reaches the caller bare, even an operator
    bad = StandIn()
    bad.require_key = True
    r = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys")), [bad.url])
    # and one whose only instance is down: the router's own 503
    down = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys")),
                         [f"http://{HOST}:{free_port()}"])
    try:
        resp = post(r.url, OP)
        assert resp.status_code == 401 and not kvtier_headers(resp)
        resp = post(r.url, OP, body=[1])  # a 400 of the router's
        assert resp.status_code == 400 and not kvtier_headers(resp)
        resp = post(down.url, OP)
        assert resp.status_code == 503 and not kvtier_headers(resp)
        assert "no instance available" in resp.json()["error"]["message"]
    finally:
        r.close()
        down.close()
        bad.close()
    still_serves(keyed)


def test_debug_headers_show_every_caller_the_choice(backend: StandIn) -> None:
    r = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys"), debug_headers=True),
                      [backend.url])
    try:
        resp = post(r.url, TEN_A)
        assert resp.status_code == 200 and resp.headers["x-kvtier-reason"] == "least_loaded"
    finally:
        r.close()


def test_a_tenant_cannot_use_another_tenants_salt(keyed: RunningRouter,
                                                  backend: StandIn) -> None:
    b_salt = tenant_salt(Caller("tenant-b"), None)
    post(keyed.url, TEN_B)
    assert backend.completions()[-1][2]["cache_salt"] == b_salt == backend.lookups()[-1]["salt"]
    for given in (b_salt, None, "mine"):  # tenant-a naming b's salt lands in a's own space
        body = dict(PROMPT) if given is None else {**PROMPT, "cache_salt": given}
        assert post(keyed.url, TEN_A, body).status_code == 200
        sent = backend.completions()[-1][2]["cache_salt"]
        assert sent == tenant_salt(Caller("tenant-a"), given) == backend.lookups()[-1]["salt"]
        assert sent != b_salt
    # the shared cache: no salt stays none; a salt given cannot be a tenant's either
    post(keyed.url, SHARED)
    assert "cache_salt" not in backend.completions()[-1][2]
    assert post(keyed.url, SHARED, {**PROMPT, "cache_salt": b_salt}).status_code == 200
    assert backend.completions()[-1][2]["cache_salt"] != b_salt
    # an operator of the shared cache may name any salt (it may look at any cache)
    post(keyed.url, OP, {**PROMPT, "cache_salt": b_salt})
    assert backend.completions()[-1][2]["cache_salt"] == b_salt
    assert post(keyed.url, TEN_A, {**PROMPT, "cache_salt": 7}).status_code == 400
    still_serves(keyed)


def test_the_callers_authorization_never_reaches_an_instance(keyed: RunningRouter,
                                                             backend: StandIn) -> None:
    for key in (TEN_A, OP, SHARED):
        post(keyed.url, key)
        post(keyed.url, key, {"model": "m", "messages": []}, path="/v1/chat/completions")
        httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    to_instance = [s for s in backend.seen if s[0] not in ("/v1/lookup", "/v1/instances")]
    assert {s[0] for s in to_instance} == {"/v1/completions", "/v1/chat/completions",
                                           "/v1/models"}
    auths = {s[1].get("authorization") for s in to_instance}
    assert auths == {f"Bearer {BACKEND_KEY}"}
    assert not any(k in json.dumps(backend.seen) for k in (TEN_A, OP, SHARED))


def _raw(url: str, head: bytes, then: list[bytes] = (), pause: float = 0.0) -> bytes:
    """Send ``head`` (and ``then``, one piece each ``pause``) on a raw socket; the answer."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(head)
        try:
            for piece in then:
                time.sleep(pause)
                s.sendall(piece)
        except OSError:
            pass  # the router answered and closed: read what it said
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b'"}' in out:
                break
        return out


def _head(length: str, key: str = TEN_A) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\n{length}\r\n\r\n").encode()


def test_an_oversized_body_is_413_without_reading_it(keyed: RunningRouter,
                                                     backend: StandIn) -> None:
    # a 1 GiB Content-Length: answered at once, nothing read (only 10 bytes ever sent)
    out = _raw(keyed.url, _head("Content-Length: 1073741824") + b"0123456789")
    assert out.startswith(b"HTTP/1.1 413")
    # without a length (chunked): cut at the limit
    chunk = b"x" * 16384
    pieces = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 8
    out = _raw(keyed.url, _head("Transfer-Encoding: chunked"), pieces)
    assert out.startswith(b"HTTP/1.1 413")
    assert httpx.post(f"{keyed.url}/v1/completions", content=b"{" * 70_000,
                      headers={"Authorization": f"Bearer {TEN_A}"}).status_code == 413
    assert backend.completions() == []
    still_serves(keyed)


def test_a_slow_loris_body_is_408(keyed: RunningRouter, backend: StandIn) -> None:
    body = json.dumps(PROMPT).encode()
    # a byte at a time, each within the per-read wait, the whole past the body's deadline
    out = _raw(keyed.url, _head(f"Content-Length: {len(body)}"),
               [body[i:i + 1] for i in range(len(body))], pause=0.1)
    assert out.startswith(b"HTTP/1.1 408")
    out = _raw(keyed.url, _head(f"Content-Length: {len(body)}") + body[:5])  # then silence
    assert out.startswith(b"HTTP/1.1 408")
    assert backend.completions() == []
    still_serves(keyed)


def test_a_hung_instance_costs_a_bounded_time_and_requests_are_capped(
        keyed: RunningRouter, backend: StandIn) -> None:
    backend.hold = threading.Event()
    # max_concurrency 4 (connections included): three held requests, the next refused
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(keyed.url, TEN_A)
                                                              .status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(backend.completions()) == 3, 10, "three requests held")
    assert post(keyed.url, TEN_A).status_code == 503
    backend.hold.set()
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]
    backend.hold = threading.Event()
    wait_until(lambda: not keyed.server.server_state.connections, 10, "connections closed")
    resp = post(keyed.url, TEN_A)  # request_timeout_s 2: the instance never answers
    assert resp.status_code == 504 and not kvtier_headers(resp)
    backend.hold.set()
    backend.hold = None
    still_serves(keyed)


def test_a_stream_outlives_the_body_bound_but_not_the_request_bound(
        keyed: RunningRouter, backend: StandIn) -> None:
    # body_timeout_s 1 bounds the upload only: a 1.5 s pause in the answer is fine
    backend.stream_pause = 1.5
    resp = post(keyed.url, TEN_A, {**PROMPT, "stream": True})
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert resp.status_code == 200 and events[-1] == "[DONE]" and len(events) == 3
    assert "error" not in resp.text
    # request_timeout_s 2 bounds the whole answer: the stream ends with an error event
    backend.stream_pause = 5.0
    resp = post(keyed.url, TEN_A, {**PROMPT, "stream": True})
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert "did not finish within 2 s" in json.loads(events[1])["error"]["message"]
    assert events[-1] == "[DONE]"
    backend.stream_pause = 0.0
    still_serves(keyed)


def test_key_files_are_checked_at_start_up(tmp_path: Path) -> None:
    assert parse_keys(KEYS_TEXT, "k")[OP] == Caller("", True, 2)
    assert parse_keys(KEYS_TEXT, "k")[TEN_A].tenant == "tenant-a"
    for bad, why in (("short tenant-a", "16 characters"), (f"{OP} a b", "optional tenant"),
                     (f"{OP} bad/name", "optional tenant"), (f"{OP}\n{OP} x", "twice")):
        with pytest.raises(ConfigError, match=why) as e:
            parse_keys(bad, "keys.txt")
        assert OP not in str(e.value)  # never the key
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no key"):
        load_keys(str(empty))
    assert load_keys("", "e" * 20) == {"e" * 20: Caller("", False, 0)}


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as e:
        main(["router", "--instance", "http://127.0.0.1:1", *argv])
    return str(e.value)


def test_off_loopback_without_keys_or_tls_is_refused_at_start_up(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    addr = non_loopback_address() or "192.0.2.2"  # refused before any bind
    monkeypatch.delenv("KVTIER_ROUTER__API_KEY", raising=False)
    keys = tmp_path / "keys"
    keys.write_text(KEYS_TEXT)
    certs = make_certs(tmp_path / "pki", ["router"], [HOST, addr])["router"]
    msg = _refused(["--host", addr, "--api-key-file", str(keys)], capsys)
    assert "--host" in msg and "TLS is off" in msg and "--insecure-no-tls" in msg
    msg = _refused(["--host", addr, "--tls-cert", certs.cert_file, "--tls-key",
                    certs.key_file], capsys)
    assert "--api-key-file" in msg and "no API keys" in msg
    msg = _refused(["--host", addr, "--insecure-no-tls"], capsys)
    assert "no API keys" in msg
    msg = _refused(["--tls-cert", certs.cert_file], capsys)
    assert "--tls-key" in msg
    msg = _refused(["--tls-cert", certs.cert_file, "--tls-key", certs.cert_file], capsys)
    assert "--tls-cert" in msg


def test_tls_plain_http_and_a_wrong_ca_are_refused(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki", ["router", "client", "instance"], [HOST])
    rogue = make_certs(tmp_path / "rogue", ["client"], [HOST], ca_name="rogue CA")["client"]
    # the instance speaks https with mutual TLS: the router must present its certificate
    inst_files = certs["instance"]
    backend = StandIn(TlsFiles(inst_files.cert_file, inst_files.key_file, inst_files.ca_file))
    rf = certs["router"]
    tls = TlsFiles(rf.cert_file, rf.key_file, rf.ca_file)
    r = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys"), tls=tls),
                      [backend.url], tls=tls)
    good = httpx.Client(verify=_client_ctx(certs["client"].cert_file, certs["client"].key_file,
                                           certs["client"].ca_file), timeout=30)
    try:
        plain = r.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{plain}/v1/completions", json=PROMPT,
                       headers={"Authorization": f"Bearer {TEN_A}"}, timeout=10)
        for cert in (rogue, None):  # a client certificate of another CA, or none at all
            ctx = _client_ctx(cert.cert_file if cert else "", cert.key_file if cert else "",
                              certs["client"].ca_file)
            with pytest.raises(httpx.HTTPError):
                post(r.url, TEN_A, client=httpx.Client(verify=ctx, timeout=10))
        # a client that trusts another CA does not accept the router either
        with pytest.raises(httpx.HTTPError):
            post(r.url, TEN_A, client=httpx.Client(verify=_client_ctx(
                rogue.cert_file, rogue.key_file, rogue.ca_file), timeout=10))
        assert backend.completions() == []
        resp = post(r.url, TEN_A, client=good)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "ok"
        assert len(backend.completions()) == 1  # over https, with the router's certificate
    finally:
        good.close()
        r.close()
        backend.close()


def test_a_tls_router_serves_off_loopback(tmp_path: Path) -> None:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no address but loopback")
    certs = make_certs(tmp_path / "pki", ["router", "client"], [addr])
    backend = StandIn()
    rf = certs["router"]
    serving = RouterServing(host=addr, keys=parse_keys(KEYS_TEXT, "keys"),
                            tls=TlsFiles(rf.cert_file, rf.key_file, rf.ca_file))
    r = RunningRouter(serving, [backend.url])
    try:
        c = certs["client"]
        client = httpx.Client(verify=_client_ctx(c.cert_file, c.key_file, c.ca_file),
                              timeout=30)
        url = f"https://{addr}:{serving.port}"
        assert post(url, None, client=client).status_code == 401
        assert post(url, TEN_A, client=client).status_code == 200
        client.close()
    finally:
        r.close()
        backend.close()


def _client_ctx(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def test_with_the_cluster_ca_a_registered_plain_http_instance_gets_no_prompts(
        backend: StandIn, tmp_path: Path) -> None:
    """A controller-token holder may register an instance; with TLS configured the router
    sends users' prompts only to one that proves a certificate of the cluster CA (https)
    or is on loopback, never to a plain-http address it was told about."""
    host = non_loopback_address() or "192.0.2.2"
    rogue, fine, local = f"http://{host}:9", f"https://{host}:9", "http://127.0.0.1:9"
    backend.registered = [{"instance": n, "url": u} for n, u in
                          (("rogue", rogue), ("fine", fine), ("local", local))]
    certs = make_certs(tmp_path / "certs", ["router"], ["127.0.0.1"])["router"]
    tls = TlsFiles(certs.cert_file, certs.key_file, certs.ca_file)
    for waived, expect in ((False, {fine, local}), (True, {rogue, fine, local})):
        router = Router([], backend.url, tls=tls, discover_s=0.05,
                        plain_discovered=True if waived else None)

        async def discover() -> None:
            task = asyncio.create_task(router.discover_loop())
            await asyncio.sleep(0.3)
            task.cancel()
            await router.close()

        asyncio.run(discover())
        assert set(router.backends) == expect, waived


def test_slow_loris_headers_are_cut_and_the_router_keeps_serving(keyed: RunningRouter) -> None:
    from tests.test_security_control import closed_by_server, loris

    slow = loris(keyed.url, 6)  # more than the fixture's --max-concurrency 4
    assert all(closed_by_server(s, 10.0) for s in slow)
    still_serves(keyed)
