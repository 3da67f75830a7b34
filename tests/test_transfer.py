"""The transfer channel and the peer tier over real TCP on 127.0.0.1.

A real ChunkStore is served by a TransferServer (in this process or a child
process); a PeerTier reads from it. Damage on the wire comes from a small TCP
proxy that flips a byte, cuts or stalls the server's stream.
"""

from __future__ import annotations

import socket
import struct
import threading
import tracemalloc
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.transfer.hello import NONCE, Deadline, client_hello, open_body, parse_open
from kvtier.transfer.wire import (FRAME, MAX_HELLO, Op, Refused, Status, WireError,
                                  contains_body, frame, parse_contains, parse_frame, parse_keys)
from kvtier.config import PeerConfig, TransferConfig, load_config
from kvtier.errors import ConfigError
from kvtier.store import ChunkStore
from kvtier.store.build import build_store
from kvtier.transfer.server import TransferServer
from kvtier.testing.transfer_proc import TransferChild, chunk_key, chunk_payload
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.peer import PeerTier

CHUNK = 64 * 1024
N = 8
NS = "a" * 32


def make_store(n: int = N, nbytes: int = CHUNK) -> ChunkStore:
    mem = MemoryTier((n + 4) * nbytes, nbytes)
    for i in range(n):
        mem.put_many([(chunk_key(i), ChunkData(ChunkMeta("uint8", (nbytes,)),
                                               chunk_payload(i, nbytes)))])
    return ChunkStore([mem])


def peer_tier(address: str, token: str = "tok", namespace: str = NS, **kw: float) -> PeerTier:
    cfg = PeerConfig(peers=[address], timeout_s=kw.pop("timeout_s", 2.0),
                     contains_timeout_s=2.0, backoff_s=kw.pop("backoff_s", 0.0), cache_s=0.0)
    return PeerTier(cfg, token=token, namespace=namespace)


@pytest.fixture(scope="module")
def server() -> Iterator[TransferServer]:
    srv = TransferServer(make_store(), TransferConfig(token="tok", timeout_s=2.0), NS, port=0)
    yield srv
    srv.close()


def keys(n: int = N) -> list[bytes]:
    return [chunk_key(i) for i in range(n)]


def test_round_trip_is_bitwise(server: TransferServer) -> None:
    tier = peer_tier(server.address)
    ask = keys() + [chunk_key(99)]
    assert tier.contains_many(ask) == [True] * N + [False]
    assert tier.contains_prefix(ask) == N
    got = tier.get_many(ask)
    assert got[-1] is None
    for i, chunk in enumerate(got[:-1]):
        assert chunk is not None and chunk.meta == ChunkMeta("uint8", (CHUNK,))
        assert np.array_equal(chunk.payload, chunk_payload(i, CHUNK))
        chunk.release()
    assert tier.stats.hits == N and tier.stats.misses == 1 and tier.stats.corrupt == 0
    tier.get_many(keys(2))  # the pooled connection is reused
    assert len(tier._pools[server.address]._idle) == 1
    tier.close()


def test_batches_over_the_size_bound_are_asked_again() -> None:
    srv = TransferServer(make_store(), TransferConfig(token="tok", max_batch_bytes=1024**2),
                         NS, port=0)
    try:
        srv.cfg.max_batch_bytes = 3 * CHUNK  # answers carry <= 2 chunks: LATER for the rest
        tier = peer_tier(srv.address)
        got = tier.get_many(keys())
        assert all(c is not None and np.array_equal(c.payload, chunk_payload(i, CHUNK))
                   for i, c in enumerate(got))
        tier.close()
    finally:
        srv.close()


def test_peer_tier_in_a_store_promotes_and_never_writes(server: TransferServer) -> None:
    cfg = load_config(env={}, engine={"tiers": ["memory", "peer"], "peer.peers": [server.address],
                                      "transfer.token": "tok"})
    store = build_store(cfg, CHUNK)
    assert store is not None and store.writers == []  # read-only: no background writer
    peer = store.tier("peer")
    assert isinstance(peer, PeerTier)
    peer.namespace = NS
    assert store.lookup(keys()) == N
    got = store.get_many(keys(3))
    assert store.memory is not None and store.memory.contains_many(keys(3)) == [True] * 3
    for c in got:
        assert c is not None
        c.release()
    assert store.put_many([(chunk_key(50), ChunkData(ChunkMeta("uint8", (CHUNK,)),
                                                     chunk_payload(50, CHUNK)))]) == 1
    assert peer.contains_many([chunk_key(50)]) == [False]  # nothing was sent to the peer
    store.close()


def test_scheduler_side_tier_without_namespace_checks_presence_only(server: TransferServer
                                                                    ) -> None:
    tier = peer_tier(server.address, namespace="")
    assert tier.contains_prefix(keys()) == N
    assert tier.get_many(keys(1)) == [None] and tier.stats.errors == 1
    tier.close()


@pytest.mark.parametrize("token,namespace", [("wrong", NS), ("", NS), ("tok", "b" * 32)])
def test_wrong_token_or_namespace_is_refused(server: TransferServer, token: str,
                                             namespace: str) -> None:
    tier = peer_tier(server.address, token=token, namespace=namespace)
    assert tier.get_many(keys(2)) == [None, None]
    assert tier.stats.errors == 1 and tier.stats.hits == 0
    tier.close()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    with pytest.raises(Refused) as refused:
        client_hello(sock, token, namespace, Deadline(5.0))
    want = Status.BAD_TOKEN if token != "tok" else Status.NAMESPACE_MISMATCH
    assert refused.value.status == want
    sock.close()


def test_non_loopback_host_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="transfer.host"):
        load_config(env={}, engine={"transfer.host": "0.0.0.0", "transfer.port": 7000})
    load_config(env={"KVTIER_TRANSFER__TOKEN": "t"},
                engine={"transfer.host": "0.0.0.0", "transfer.port": 7000, "tls.insecure": True})
    with pytest.raises(ConfigError, match="peer.peers"):
        load_config(env={}, engine={"tiers": ["memory", "peer"]})
    with pytest.raises(ConfigError, match=r"peer.peers\[0\]"):
        load_config(env={}, engine={"tiers": ["memory", "peer"], "peer.peers": ["nohost"]})


class Proxy:
    """Forwards 127.0.0.1 connections to ``port``; the server's stream (to the client) can
    have the byte at ``flip`` inverted, be cut after ``cut`` bytes or stall there. Every
    byte clients send is kept in ``sent`` (what a sniffer would see)."""

    def __init__(self, port: int, flip: int = -1, cut: int = -1, stall: bool = False) -> None:
        self.port, self.flip, self.cut, self.stall = port, flip, cut, stall
        self.sent = bytearray()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, damage: bool) -> None:
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if not damage:  # the client's stream
                    self.sent += data
                buf = bytearray(data)
                if damage and seen <= self.flip < seen + len(buf):
                    buf[self.flip - seen] ^= 0xFF
                if damage and 0 <= self.cut < seen + len(buf):
                    dst.sendall(buf[:max(0, self.cut - seen)])
                    if self.stall:
                        self.release.wait(30)
                    break
                dst.sendall(buf)
                seen += len(buf)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.release.set()
        self.sock.close()


HELLO_ANSWER = 2 * FRAME.size + NONCE + 32  # the server's nonce, then its proof
FIRST_ENTRY = HELLO_ANSWER + FRAME.size + 8  # where the first chunk's header starts


def hello(port: int, token: str = "tok", namespace: str = NS) -> socket.socket:
    """A raw socket through HELLO (the client's side of the challenge-response)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    client_hello(sock, token, namespace, Deadline(5.0))
    return sock


@pytest.mark.parametrize("where", [50, 128 + 1000], ids=["header", "payload"])
def test_a_byte_flipped_on_the_wire_is_a_counted_miss(server: TransferServer, where: int) -> None:
    proxy = Proxy(server.port, flip=FIRST_ENTRY + where)
    tier = peer_tier(proxy.address)
    got = tier.get_many(keys(3))
    assert got[0] is None and tier.stats.corrupt == 1
    assert all(c is not None and np.array_equal(c.payload, chunk_payload(i, CHUNK))
               for i, c in enumerate(got) if i)
    tier.close()
    proxy.close()


@pytest.mark.parametrize("stall", [False, True], ids=["cut", "stalled"])
def test_a_stream_cut_or_stalled_mid_batch_is_a_miss_not_a_hang(server: TransferServer,
                                                                stall: bool) -> None:
    proxy = Proxy(server.port, cut=FIRST_ENTRY + 3 * (CHUNK + 136), stall=stall)
    tier = peer_tier(proxy.address, timeout_s=0.5)
    assert tier.get_many(keys(6)) == [None] * 6  # a batch is all or nothing per answer
    assert tier.stats.errors == 1
    tier.close()
    proxy.close()


def test_server_process_killed_is_a_miss_then_skipped() -> None:
    child = TransferChild(4, CHUNK, token="tok", namespace=NS)
    try:
        tier = peer_tier(child.address, backoff_s=60.0)
        got = tier.get_many(keys(4))
        assert all(c is not None for c in got)
        child.kill()  # the pooled connection is now dead
        assert tier.get_many(keys(4)) == [None] * 4
        assert tier.contains_many(keys(4)) == [False] * 4  # in backoff: not even asked
        assert tier.peer_stats["skipped"] >= 1
        tier.close()
    finally:
        child.stop()


def test_oversize_frame_is_refused_before_allocation(server: TransferServer) -> None:
    with pytest.raises(WireError, match="over the bound"):
        parse_frame(FRAME.pack(b"KVTX", 2, Op.GET, 0, 1 << 40), 1 << 20)
    tracemalloc.start()
    try:
        sock = hello(server.port)
        sock.sendall(frame(Op.GET, 1 << 33))  # 8 GiB of keys promised
        assert sock.recv(1) == b""  # the server hung up
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 64 * 1024**2
        sock.close()
    finally:
        tracemalloc.stop()
    tier = peer_tier(server.address)
    assert tier.contains_prefix(keys()) == N  # still serving
    tier.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzzed_messages_parse_or_raise_wire_error(data: bytes) -> None:
    for parse in (lambda b: parse_frame(b[:FRAME.size].ljust(FRAME.size, b"\0"), 1 << 20),
                  parse_open, parse_keys, lambda b: parse_contains(b, 5)):
        try:
            parse(data)
        except WireError:
            pass
    assert parse_contains(contains_body([True, False, True]), 3) == [True, False, True]


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300), st.booleans())
def test_fuzzed_streams_never_break_the_server(server: TransferServer, junk: bytes,
                                               after_hello: bool) -> None:
    sock = hello(server.port) if after_hello else \
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(junk)
    sock.close()
    tier = peer_tier(server.address)
    assert tier.contains_prefix(keys(2)) == 2
    tier.close()


def test_hello_body_bound() -> None:
    assert MAX_HELLO >= len(open_body(b"n" * NONCE, "n" * 1000))
    assert struct.calcsize("<4sBBHQ") == FRAME.size == 16


class Controller:
    """A stand-in for the controller's ``POST /v1/locate`` (the fixed contract)."""

    def __init__(self, holders: list[dict], token: str = "ctl") -> None:
        import http.server
        import json

        self.calls: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append(body)
                ok = self.path == "/v1/locate" and \
                    self.headers.get("Authorization") == f"Bearer {token}"
                data = json.dumps({"holders": holders}).encode() if ok else b"{}"
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_controller_locate_finds_the_holder_and_its_failures_are_misses(
        server: TransferServer) -> None:
    ctl = Controller([{"instance": "a", "transfer": server.address, "chunks": 5,
                       "tiers": {"memory": 5}},
                      {"instance": "me", "transfer": "127.0.0.1:1", "chunks": 7, "tiers": {}}])
    cfg = PeerConfig(controller_url=ctl.url, controller_token="ctl", instance_id="me",
                     contains_timeout_s=2.0, cache_s=60.0, backoff_s=60.0)
    tier = PeerTier(cfg, token="tok", namespace=NS, own_address="127.0.0.1:1")
    try:
        assert tier.contains_many(keys()) == [True] * 5 + [False] * 3
        assert ctl.calls[0] == {"keys": [k.hex() for k in keys()], "exclude": "me"}
        got = tier.get_many(keys(5))
        assert all(c is not None and np.array_equal(c.payload, chunk_payload(i, CHUNK))
                   for i, c in enumerate(got))
        assert len(ctl.calls) == 1  # the answer was cached
    finally:
        ctl.close()
    down = PeerTier(PeerConfig(controller_url=ctl.url, contains_timeout_s=2.0, backoff_s=60.0),
                    token="tok", namespace=NS)
    assert down.contains_many(keys(2)) == [False, False] and down.stats.errors == 1
    assert down.contains_many(keys(2)) == [False, False] and down.peer_stats["skipped"] == 1
    bad = Controller([], token="other")
    refused = PeerTier(PeerConfig(controller_url=bad.url, controller_token="ctl",
                                  contains_timeout_s=2.0), token="tok", namespace=NS)
    assert refused.contains_many(keys(2)) == [False, False] and refused.stats.errors == 1
    bad.close()


def test_transfer_benchmark_reports_both_rates(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kvtier.cli.main import main

    main(["bench", "cluster", "--part", "transfer", "--quick", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["transfer_gbps"] > 0 and res["loopback_tcp_gbps"] > 0
    assert res["transfer_tls_gbps"] > 0 and res["tls_vs_plain"] > 0
    assert res["transfer_vs_loopback"] > 0 and res["peer_stats"]["corrupt"] == 0
    from kvtier.bench.cluster import transfer
    assert "raw loopback TCP" in transfer.table(res)


def test_a_transfer_server_that_cannot_start_is_not_advertised() -> None:
    """TP > 1 (or a port in use) stops the transfer server at the engine-ready hook;
    transfer.port is then 0, so the controller registration that runs next
    advertises no server for peers to dial. The engine here is a stand-in with only
    what the hook reads (its namespace and tiers): starting vLLM with TP = 2 is
    covered elsewhere."""
    from types import SimpleNamespace

    from kvtier.control.vllm_plugin import start_transfer_server
    from kvtier.errors import UnsupportedConfig
    from kvtier.keys import Namespace

    cfg = load_config(env={}, engine={"transfer.port": 9})
    engine = SimpleNamespace(hasher=SimpleNamespace(namespace=Namespace("m", "L", 256,
                                                                        tp_size=2)),
                             store=SimpleNamespace(tiers=[]))
    with pytest.raises(UnsupportedConfig, match="tensor/pipeline parallel"):
        start_transfer_server(cfg, engine, 0)  # type: ignore[arg-type]
    assert cfg.transfer.port == 0
