"""Attacks on the cluster controller, each refused or bounded, the controller serving after.

Real ``kvtier controller`` processes on 127.0.0.1, real ZMQ publishers in vLLM's wire
format, real TLS (a throwaway CA from :mod:`kvtier.testing.tls`), a real
:class:`~kvtier.cluster.agent.Registrar` and :class:`~kvtier.cluster.relay.EventRelay`.
The attacker holds the controller token throughout: it only means "may join".
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import msgspec
import pytest

from kvtier.cluster.agent import Registrar
from kvtier.cluster.relay import EventRelay
from kvtier.net.tls import TlsFiles
from kvtier.testing.cluster import KvtierProcess, controller
from kvtier.testing.procs import HOST, free_port, wait_until
from kvtier.testing.tls import make_certs, non_loopback_address
from tests.test_cluster_controller import (CRED, NS, PROMPT, TOKEN, Publisher, batch, beat, body,
                                           cached, keys_of, register, stored, stored_batches)

INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvtierProcess]:
    with controller(tmp_path_factory.mktemp("sec") / "controller.log", TOKEN, ttl_s=5.0,
                    extra=["--resync-interval-s", str(INTERVAL_S)]) as c:
        yield c


def record(ctl: KvtierProcess, instance: str) -> dict[str, Any]:
    return next(i for i in ctl.call("/v1/instances")[1]["instances"] if i["instance"] == instance)


def counter(ctl: KvtierProcess, what: str, label: str) -> float:
    line = f'kvtier_controller_events_total{{label="{label}",what="{what}"}} '
    return sum(float(x[len(line):]) for x in ctl.call("/metrics")[1].splitlines()
               if x.startswith(line))


def snapshot_of(keys: list[bytes]) -> dict[str, Any]:
    return {"namespace": NS.layout, "chunk_size": 256,
            "tiers": {"memory": [k.hex() for k in keys]}}


def test_a_hijacked_registration_is_refused_and_the_record_unchanged(ctl: KvtierProcess) -> None:
    cred = register(ctl, "victim", control="http://127.0.0.1:7001",
                    url="http://127.0.0.1:7002/v1")
    before = record(ctl, "victim")
    evil = dict(control="http://203.0.113.9:80", transfer="203.0.113.9:9000",
                url="http://203.0.113.9/steal")
    for headers in ({}, {CRED: "guess" * 9}, {CRED: ""}):
        status, out, _ = ctl.call("/v1/register", body("victim", **evil), headers=headers)
        assert status == 403 and "another holder" in out["error"]
    # a topic that is the victim's: its events would feed the thief's record
    status, out, _ = ctl.call("/v1/register", body("thief", topic="victim"))
    assert status == 400 and out["error"].startswith("topic")
    after = record(ctl, "victim")
    assert {k: after[k] for k in ("url", "control", "transfer", "topic")} == \
        {k: before[k] for k in ("url", "control", "transfer", "topic")}
    # the owner still changes its own record, and heartbeats
    status, out, _ = ctl.call("/v1/register", body("victim", url="http://127.0.0.1:7003/v1"),
                              headers={CRED: cred})
    assert status == 200 and record(ctl, "victim")["url"] == "http://127.0.0.1:7003/v1"
    assert beat(ctl, "victim", cred)[0] == 200


def test_a_heartbeat_or_snapshot_with_a_wrong_credential_is_refused(ctl: KvtierProcess) -> None:
    cred = register(ctl, "hb")
    other = register(ctl, "hb-other")
    for wrong in ("", other, cred[:-1] + ("A" if cred[-1] != "A" else "B")):
        status, out, _ = beat(ctl, "hb", wrong)
        assert status == 403 and "X-Kvtier-Instance-Token" in out["error"]
        status, _, _ = ctl.call("/v1/snapshot", {"instance": "hb", **snapshot_of(keys_of())},
                                headers={CRED: wrong})
        assert status == 403
    assert cached(ctl, "hb") == 0  # no forged snapshot landed
    assert beat(ctl, "hb", cred)[0] == 200


class Listener:
    """A TCP port that counts whoever connects to it (what a dial-out would hit)."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_the_controller_dials_no_registered_address(ctl: KvtierProcess) -> None:
    listener = Listener()
    try:
        where = f"http://{HOST}:{listener.port}"
        cred = register(ctl, "nodial", control=where, url=where,
                        transfer=f"{HOST}:{listener.port}")
        pub = Publisher(ctl.events, "nodial")
        try:  # every reason for a resync: a first message, a gap, a clear
            before = stored_batches(ctl)
            wait_until(lambda: pub.send(batch(stored(keys_of()[:1]))) or
                       stored_batches(ctl) > before, 30, "the events connection")
            pub.send(batch(), pub.seq + 10)
            pub.send(batch({"type": "AllBlocksCleared"}))
        finally:
            pub.close()
        asked = []
        wait_until(lambda: asked.append(beat(ctl, "nodial", cred)[1]["resync"]) or
                   asked.count(True) >= 1, 30, "the controller asking for snapshots")
        status, _, _ = ctl.call("/v1/lookup", {"model": "tiny", "token_ids": PROMPT})
        assert status == 200 and listener.accepted == 0  # asked; never dialed
    finally:
        listener.sock.close()


@pytest.mark.parametrize("field,value", [
    ("control", "http://user:pw@127.0.0.1:7001"),
    ("control", "file:///etc/passwd"),
    ("control", "/etc/passwd"),
    ("control", "gopher://127.0.0.1:70/x"),
    ("control", "http://127.0.0.1:7001/?next=http://evil"),
    ("url", "http://127.0.0.1:7001/#frag"),
    ("url", "https://exa mple.com/"),
    ("url", "http://bad_host.example/"),
    ("url", "http://" + "a" * 2100 + ".com/"),
    ("url", "http://127.0.0.1:0/"),
    ("transfer", "127.0.0.1"),
    ("transfer", "user@127.0.0.1:9000"),
    ("transfer", "127.0.0.1:99999"),
    ("transfer", "[not-v6]:9000"),
])
def test_bad_addresses_are_refused(ctl: KvtierProcess, field: str, value: str) -> None:
    status, out, _ = ctl.call("/v1/register", body("badurl", **{field: value}))
    assert status == 400 and out["error"].startswith(field), out
    assert all(i["instance"] != "badurl" for i in ctl.call("/v1/instances")[1]["instances"])
    assert ctl.call("/health")[0] == 200


def test_a_registered_tokenizer_path_is_not_loaded(ctl: KvtierProcess) -> None:
    register(ctl, "tok", model="tok-model", tokenizer="/etc")
    status, out, _ = ctl.call("/v1/lookup", {"model": "tok-model", "prompt": "hello"})
    assert status == 400 and "--tokenizer MODEL=PATH" in out["error"] and \
        "not loaded" in out["error"]


def events_body(instance: str, *payloads: bytes, seq: int = 0) -> dict[str, Any]:
    return {"instance": instance, "batches": [
        {"seq": seq + i, "payload": base64.b64encode(p).decode()} for i, p in enumerate(payloads)]}


def test_forged_relayed_events_for_another_instance_are_refused(ctl: KvtierProcess) -> None:
    a, b = register(ctl, "rel-a"), register(ctl, "rel-b")
    forged = counter(ctl, "event", "forged")
    k = keys_of()
    for headers in ({CRED: a}, {}, {CRED: "x" * 43}):
        status, out, _ = ctl.call("/v1/events", events_body("rel-b", batch(stored(k))),
                                  headers=headers)
        assert status == 403
    assert cached(ctl, "rel-b") == 0
    assert counter(ctl, "event", "forged") == forged + 3
    # a's own events land in a's index only, whatever topic they claim
    assert ctl.call("/v1/events", events_body("rel-a", batch(stored(k))),
                    headers={CRED: a})[0] == 200
    assert cached(ctl, "rel-a") == 1024 and cached(ctl, "rel-b") == 0
    # oversized: a batch over the bound (400), a body over the bound (413)
    big = b"\x00" * (1 << 20) + b"x"
    assert ctl.call("/v1/events", events_body("rel-a", big), headers={CRED: a})[0] == 400
    try:  # refused on its Content-Length: 413, or the connection cut while still sending
        status = ctl.call("/v1/events", events_body("rel-a", *[b"\x00" * (1 << 19)] * 10),
                          headers={CRED: a})[0]
    except urllib.error.URLError as e:
        assert isinstance(e.reason, (BrokenPipeError, ConnectionResetError)), e
        status = 413
    assert status == 413
    assert ctl.call("/v1/events", events_body("rel-b", batch(), seq=0),
                    headers={CRED: b})[0] == 200


def test_an_oversized_zmq_message_is_dropped_and_the_socket_serves_on(ctl: KvtierProcess) -> None:
    register(ctl, "zbig")
    k = keys_of()
    small = keys_of(list(range(5000, 5512)))
    pub = Publisher(ctl.events, "zbig")
    try:
        before = stored_batches(ctl)
        wait_until(lambda: pub.send(batch(stored(small[:1]))) or stored_batches(ctl) > before,
                   30, "the events connection")
        pad = {"type": "BlockStored", "block_hashes": [b"p" * (2 << 20)], "medium": "GPU"}
        pub.send(batch(stored(k), pad))  # over 1 MiB: libzmq drops the connection
        wait_until(lambda: pub.send(batch(stored(small))) or
                   cached(ctl, "zbig", list(range(5000, 5512))) == 512, 30,
                   "events after the oversized message")
        assert cached(ctl, "zbig") == 0  # the oversized batch's keys never landed
    finally:
        pub.close()


def test_an_all_blocks_cleared_flood_asks_for_rate_limited_resyncs(ctl: KvtierProcess) -> None:
    pushed = []
    reg = Registrar(ctl.url, body("flood"), TOKEN, heartbeat_s=0.1,
                    snapshot=lambda: pushed.append(1) or snapshot_of(keys_of()[:1]))
    pub = Publisher(ctl.events, "flood")
    try:
        assert reg.registered.wait(10)
        wait_until(lambda: len(pushed) >= 1, 10, "the snapshot at registration")
        cleared = counter(ctl, "event", "cleared")
        wait_until(lambda: pub.send(batch({"type": "AllBlocksCleared"})) or
                   counter(ctl, "event", "cleared") > cleared, 30, "the events connection")
        t0, n0 = time.monotonic(), len(pushed)
        for burst in range(1, 21):  # in bursts: a PUB socket drops past its high-water mark
            for _ in range(100):
                pub.send(batch({"type": "AllBlocksCleared"}))
            wait_until(lambda: counter(ctl, "event", "cleared") >= cleared + 90 * burst, 60,
                       "the flood")
        time.sleep(3 * INTERVAL_S)  # let asks due within the flood arrive
        elapsed = time.monotonic() - t0
        assert len(pushed) - n0 <= elapsed / INTERVAL_S + 2, (len(pushed) - n0, elapsed)
        assert beat(ctl, "flood", reg.credential)[0] == 200 or reg.registered.is_set()
    finally:
        pub.close()
        reg.close()


def test_the_relay_forwards_an_instance_events_under_its_own_name(ctl: KvtierProcess) -> None:
    reg = Registrar(ctl.url, body("relayed"), TOKEN, heartbeat_s=0.2,
                    snapshot=lambda: snapshot_of([]))
    relay = EventRelay(f"tcp://{HOST}:{free_port()}", reg)
    other = register(ctl, "relay-victim")
    pub = Publisher(relay.endpoint, "relay-victim")  # the topic claims another instance
    try:
        assert reg.registered.wait(10)
        wait_until(lambda: pub.send(batch(stored(keys_of()))) or cached(ctl, "relayed") == 1024,
                   30, "relayed events")
        assert cached(ctl, "relay-victim") == 0 and relay.forwarded > 0
        assert beat(ctl, "relay-victim", other)[0] == 200
    finally:
        pub.close()
        relay.close()
        reg.close()
    with pytest.raises(ValueError, match="127.0.0.1"):
        EventRelay("tcp://0.0.0.0:5557", reg)


# -- TLS and start-up refusals

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("certs")
    good = make_certs(folder / "ca", ["controller", "instance"], [HOST, "localhost"])
    rogue = make_certs(folder / "rogue", ["instance"], [HOST], ca_name="rogue CA")
    return {"good": good, "rogue": rogue["instance"]}


def client_context(ca: str, cert: Any = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    return ctx


def test_tls_and_mutual_tls_refuse_plain_and_foreign_clients(tmp_path: Path,
                                                             certs: dict[str, Any]) -> None:
    good, rogue = certs["good"], certs["rogue"]
    srv = good["controller"]
    mine = client_context(srv.ca_file, good["instance"])
    flags = ["--tls-cert", srv.cert_file, "--tls-key", srv.key_file, "--tls-ca", srv.ca_file]
    with controller(tmp_path / "tls.log", TOKEN, extra=flags, ssl_context=mine) as c:
        assert c.call("/health")[0] == 200
        plain = f"http://{HOST}:{c.port}/health"
        with pytest.raises((OSError, urllib.error.URLError)):
            urllib.request.urlopen(plain, timeout=5).read()
        for ctx in (client_context(srv.ca_file, rogue), client_context(srv.ca_file)):
            with pytest.raises((ssl.SSLError, OSError, urllib.error.URLError)):
                urllib.request.urlopen(f"{c.url}/health", timeout=5, context=ctx).read()
        # the registrar over mutual TLS, with the cluster's files
        files = TlsFiles(good["instance"].cert_file, good["instance"].key_file, srv.ca_file)
        reg = Registrar(c.url, body("tls1"), TOKEN, heartbeat_s=0.2, tls=files,
                        snapshot=lambda: snapshot_of(keys_of()))
        try:
            assert reg.registered.wait(10) and reg.credential
            wait_until(lambda: cached(c, "tls1") == 1024, 10, "the snapshot over TLS")
        finally:
            reg.close()
        foreign = Registrar(c.url, body("tls2"), TOKEN, heartbeat_s=0.2, max_backoff_s=1.0,
                            tls=TlsFiles(rogue.cert_file, rogue.key_file, srv.ca_file))
        try:
            time.sleep(1.0)
            assert not foreign.registered.is_set()
        finally:
            foreign.close()
        assert c.call("/health")[0] == 200


def test_start_up_refuses_unsafe_binds(certs: dict[str, Any]) -> None:
    from kvtier.cli.main import main

    away = non_loopback_address() or "192.0.2.2"
    with pytest.raises(SystemExit, match="--host: .*TLS is off.*--insecure-no-tls"):
        main(["controller", "--host", away, "--token", "t"])
    with pytest.raises(SystemExit, match="--events-host: .*no authentication"):
        main(["controller", "--events-host", away])
    with pytest.raises(SystemExit, match="--tls-key: "):
        main(["controller", "--tls-cert", certs["good"]["controller"].cert_file])
    with pytest.raises(SystemExit, match="--tls-ca: mutual TLS needs"):
        main(["controller", "--tls-ca", certs["good"]["controller"].ca_file])
    with pytest.raises(SystemExit, match="--control-token-file: no longer used"):
        main(["controller", "--control-token-file", "/nonexistent"])


def test_slow_loris_headers_are_cut_and_the_controller_keeps_serving(tmp_path: Path) -> None:
    from tests.test_security_control import closed_by_server, loris

    with controller(tmp_path / "loris.log", TOKEN, extra=[
            "--request-timeout-s", "1", "--max-concurrency", "4"]) as c:
        slow = loris(c.url, 6)  # more than --max-concurrency
        assert all(closed_by_server(s, 10.0) for s in slow)
        assert c.call("/v1/instances")[0] == 200
