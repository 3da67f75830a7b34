"""Attacks on the transfer channel, each against a real TransferServer on 127.0.0.1.

Every test ends with a normal client reading its chunks: the attack was refused
or bounded and the server still serves. TLS uses certificates of a throwaway CA
(kvtier.testing.tls); a "rogue" CA is a second, unrelated one.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import xxhash

from kvtier.codecs import ChunkData, ChunkMeta, encode_header
from kvtier.config import DiskConfig, PeerConfig, TransferConfig
from kvtier.net.tls import TlsFiles
from kvtier.testing.tls import make_certs
from kvtier.testing.transfer_proc import chunk_key, chunk_payload
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.peer import PeerTier
from kvtier.transfer.client import PeerConnection
from kvtier.transfer.hello import Deadline, client_hello, open_body
from kvtier.transfer.server import SLICE, TransferServer
from kvtier.transfer.wire import (FRAME, GET_KEYS, LATER, MAX_KEYS, Op, Refused, Status,
                                  WireError, frame, keys_body, parse_frame)
from tests.test_transfer import Proxy

TOKEN = "s3cret-transfer-token"
NS = "c" * 32
CHUNK = 64 * 1024
N = 8


class Source:
    """What a TransferServer reads: tiers in order, and which one is memory."""

    def __init__(self, *tiers: object, memory: object = None) -> None:
        self.tiers = list(tiers)
        self.memory = memory


def memory_source(n: int = N, nbytes: int = CHUNK) -> Source:
    mem = MemoryTier((n + 4) * nbytes, nbytes)
    for i in range(n):
        mem.put_many([(chunk_key(i), ChunkData(ChunkMeta("uint8", (nbytes,)),
                                               chunk_payload(i, nbytes)))])
    return Source(mem, memory=mem)


def keys(n: int = N) -> list:
    return [chunk_key(i) for i in range(n)]


def reader(address: str, tls: TlsFiles | None = None, token: str = TOKEN) -> PeerTier:
    cfg = PeerConfig(peers=[address], timeout_s=5.0, contains_timeout_s=5.0, backoff_s=0.0,
                     cache_s=0.0)
    return PeerTier(cfg, token=token, namespace=NS, tls=tls)


def still_serves(address: str, tls: TlsFiles | None = None, n: int = N,
                 nbytes: int = CHUNK) -> None:
    tier = reader(address, tls)
    got = tier.get_many(keys(n))
    for i, chunk in enumerate(got):
        assert chunk is not None and np.array_equal(chunk.payload, chunk_payload(i, nbytes))
        chunk.release()
    tier.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("certs")
    good = make_certs(folder / "good", ["server", "client"], ["127.0.0.1"])
    rogue = make_certs(folder / "rogue", ["client"], ["127.0.0.1"], ca_name="rogue CA")
    c, s, r = good["client"], good["server"], rogue["client"]
    return {"server": TlsFiles(s.cert_file, s.key_file, s.ca_file),
            "client": TlsFiles(c.cert_file, c.key_file, c.ca_file),
            "rogue": TlsFiles(r.cert_file, r.key_file, c.ca_file),
            "no_cert": TlsFiles(ca_file=c.ca_file)}


@pytest.fixture(scope="module")
def tls_server(certs: dict) -> Iterator[TransferServer]:
    srv = TransferServer(memory_source(), TransferConfig(token=TOKEN, timeout_s=2.0), NS,
                         port=0, tls=certs["server"])
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def server() -> Iterator[TransferServer]:
    srv = TransferServer(memory_source(), TransferConfig(token=TOKEN, timeout_s=2.0), NS,
                         port=0)
    yield srv
    srv.close()


# -- TLS ------------------------------------------------------------------------


def test_plain_client_of_a_tls_server_is_told_tls_is_required(
        tls_server: TransferServer, certs: dict) -> None:
    with pytest.raises(Refused, match="TLS only") as refused:
        PeerConnection("127.0.0.1", tls_server.port, TOKEN, NS, 2.0)
    assert refused.value.status == Status.TLS_REQUIRED
    tier = reader(tls_server.address)
    assert tier.get_many(keys(2)) == [None, None] and tier.stats.errors == 1
    tier.close()
    still_serves(tls_server.address, certs["client"])


@pytest.mark.parametrize("who", ["rogue", "no_cert"])
def test_client_without_a_certificate_of_the_cluster_ca_fails_the_handshake(
        tls_server: TransferServer, certs: dict, who: str) -> None:
    with pytest.raises((OSError, WireError)):  # ssl.SSLError, a reset, the server's close
        conn = PeerConnection("127.0.0.1", tls_server.port, TOKEN, NS, 2.0,
                              ssl_context(certs[who]))
        conn.contains(keys(1), 2.0)  # TLS 1.3: a refused certificate shows on first use
    tier = reader(tls_server.address, certs[who])
    assert tier.get_many(keys(2)) == [None, None] and tier.stats.hits == 0
    tier.close()
    still_serves(tls_server.address, certs["client"])


def test_tls_client_checks_the_server_certificate(server: TransferServer,
                                                  tls_server: TransferServer,
                                                  certs: dict) -> None:
    rogue_ca = TlsFiles(certs["rogue"].cert_file, certs["rogue"].key_file,
                        str(Path(certs["rogue"].cert_file).parent / "ca.pem"))
    with pytest.raises(WireError, match="TLS handshake"):  # the server's cert: another CA
        PeerConnection("127.0.0.1", tls_server.port, TOKEN, NS, 2.0, ssl_context(rogue_ca))
    with pytest.raises((OSError, WireError)):  # TLS client, plain server: no handshake
        PeerConnection("127.0.0.1", server.port, TOKEN, NS, 2.0, ssl_context(certs["client"]))
    still_serves(server.address)


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    from kvtier.net.tls import client_context
    return client_context(files)


# -- HELLO ----------------------------------------------------------------------


def test_token_never_crosses_the_wire_and_a_replayed_hello_is_refused(
        server: TransferServer) -> None:
    rec = Proxy(server.port)
    tier = reader(rec.address)
    assert all(c is not None for c in tier.get_many(keys(2)))
    tier.close()
    rec.close()
    opening = bytes(rec.sent[:FRAME.size + len(open_body(b"n" * 32, NS)) + FRAME.size + 32])
    assert TOKEN.encode() not in rec.sent and TOKEN.encode().hex().encode() not in rec.sent
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(opening)  # the recorded opening: its proof answers another nonce
    _, status, n = parse_frame(sock.recv(FRAME.size, socket.MSG_WAITALL), 4096)
    assert status == Status.OK and n == 32  # the server's (fresh) nonce
    sock.recv(n, socket.MSG_WAITALL)
    _, status, n = parse_frame(sock.recv(FRAME.size, socket.MSG_WAITALL), 4096)
    assert status == Status.BAD_TOKEN
    sock.close()
    with pytest.raises(Refused, match="BAD_TOKEN"):
        PeerConnection("127.0.0.1", server.port, "wrong", NS, 2.0)
    still_serves(server.address)


def test_another_protocol_version_is_refused_clearly(server: TransferServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    body = struct.pack("<H", len(TOKEN)) + TOKEN.encode() + struct.pack("<H", 0)
    sock.sendall(struct.pack("<4sBBHQ", b"KVTX", 1, Op.HELLO, 0, len(body)) + body)
    head = sock.recv(FRAME.size, socket.MSG_WAITALL)
    _, status, n = parse_frame(head, 4096)
    assert status == Status.BAD_VERSION
    assert b"protocol v2, the client v1" in sock.recv(n, socket.MSG_WAITALL)
    sock.close()
    still_serves(server.address)


# -- bounds ---------------------------------------------------------------------


def test_65536_key_get_reads_a_bounded_slice(tmp_path: Path) -> None:
    nbytes, n = 1024**2, 48
    disk = DiskTier(DiskConfig(path=str(tmp_path / "disk"), read_pool_bytes=0))
    disk.put_many([(chunk_key(i), ChunkData(ChunkMeta("uint8", (nbytes,)),
                                            chunk_payload(i, nbytes))) for i in range(n)])
    srv = TransferServer(Source(disk), TransferConfig(token=TOKEN, timeout_s=5.0,
                                                      max_batch_bytes=2 * 1024**2), NS, port=0)
    try:
        ask = keys(n) + [chunk_key(10**6 + i) for i in range(MAX_KEYS - n)]
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        client_hello(sock, TOKEN, NS, Deadline(5.0))
        tracemalloc.start()
        try:
            body = keys_body(ask)
            sock.sendall(frame(Op.GET, len(body)) + body)
            _, status, body_len = parse_frame(sock.recv(FRAME.size, socket.MSG_WAITALL), 1 << 30)
            answer = sock.recv(body_len, socket.MSG_WAITALL)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sent = struct.unpack_from("<Q", answer, 0)[0]
        assert status == Status.OK and sent == nbytes + 128  # one chunk fits, the rest LATER
        assert disk.stats.hits <= SLICE  # read: one slice, not 48 MiB (nor 65,536 lookups)
        assert peak < 24 * 1024**2, peak  # all 48 chunks would be 48 MiB
        sock.close()
        # Misses only: one answer examines GET_KEYS keys; the rest is LATER.
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        client_hello(sock, TOKEN, NS, Deadline(5.0))
        body = keys_body(ask[n:])
        sock.sendall(frame(Op.GET, len(body)) + body)
        _, status, body_len = parse_frame(sock.recv(FRAME.size, socket.MSG_WAITALL), 1 << 30)
        entries = np.frombuffer(sock.recv(body_len, socket.MSG_WAITALL), np.uint64)
        assert (entries == 0).sum() == GET_KEYS and (entries == LATER).sum() == len(entries) \
            - GET_KEYS
        sock.close()
        still_serves(srv.address, n=n, nbytes=nbytes)  # asks again until it has them all
    finally:
        srv.close()
        disk.close()


def huge_header(key: bytes, payload_len: int, shape: tuple[int, ...]) -> bytes:
    """A well-formed chunk header (checksum right) declaring ``payload_len`` bytes."""
    head = bytearray(encode_header(key, ChunkMeta("uint8", (1,)), b"\0"))
    struct.pack_into("<B", head, 8, len(shape))
    struct.pack_into("<Q", head, 12, payload_len)
    struct.pack_into(f"<{len(shape)}I", head, 44, *shape)
    struct.pack_into("<I", head, 76, xxhash.xxh32_intdigest(bytes(head[:76])))
    return bytes(head)


@pytest.mark.parametrize("declared", ["64GiB", "1MiB"])
def test_sparse_64gib_chunk_file_is_a_miss_without_allocation(tmp_path: Path,
                                                              declared: str) -> None:
    disk = DiskTier(DiskConfig(path=str(tmp_path / "disk")))
    disk.put_many([(chunk_key(i), ChunkData(ChunkMeta("uint8", (CHUNK,)),
                                            chunk_payload(i, CHUNK))) for i in range(N)])
    bad = chunk_key(N)
    path = disk.path_of(bad)
    path.parent.mkdir(exist_ok=True)
    size = 64 * 1024**3
    plen, shape = (size, (65536, 1024**2)) if declared == "64GiB" else (1024**2, (1024**2,))
    with open(path, "wb") as f:
        f.write(huge_header(bad, plen, shape))
        f.truncate(128 + size)  # sparse: no disk space used
    srv = TransferServer(Source(disk), TransferConfig(token=TOKEN, timeout_s=5.0), NS, port=0)
    try:
        tier = reader(srv.address)
        tracemalloc.start()
        try:
            assert tier.get_many([bad]) == [None]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024**2
        assert disk.stats.corrupt == 1 and not path.exists()  # a bad file of ours: deleted
        tier.close()
        still_serves(srv.address)
    finally:
        srv.close()
        disk.close()


def trickle(port: int, data: bytes, pause: float) -> bool:
    """Send ``data`` a byte at a time; True if the server hung up before the end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for b in data:
            sock.sendall(bytes([b]))
            time.sleep(pause)
        sock.settimeout(10)
        return sock.recv(4096) == b""  # no answer: we were cut, not answered
    except (ConnectionError, OSError):
        return True
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_slow_loris_opening_is_cut_at_one_deadline(certs: dict, tls: bool) -> None:
    """Each byte comes well within timeout_s (0.2s apart, the bound 1s), so only a bound
    on the whole opening cuts it: 30 bytes would take 6s."""
    srv = TransferServer(memory_source(), TransferConfig(token=TOKEN, timeout_s=1.0,
                                                         idle_timeout_s=60.0), NS, port=0,
                         tls=certs["server"] if tls else None)
    try:
        opening = frame(Op.HELLO, 34 + 32) + open_body(os.urandom(32), NS + "x" * 32)
        first = b"\x16\x03\x01\x02\x00" if tls else b""  # a TLS record of 512 bytes...
        assert trickle(srv.port, (first + opening)[:30], 0.2)
        still_serves(srv.address, certs["client"] if tls else None)
    finally:
        srv.close()


def test_idle_authenticated_connection_outlives_the_opening_deadline(certs: dict) -> None:
    srv = TransferServer(memory_source(), TransferConfig(token=TOKEN, timeout_s=0.5,
                                                         idle_timeout_s=60.0), NS, port=0)
    try:
        conn = PeerConnection("127.0.0.1", srv.port, TOKEN, NS, 2.0)
        time.sleep(1.0)  # idle past timeout_s: idle_timeout_s applies now
        assert conn.contains(keys(2), 2.0) == [True, True]
        conn.close()
    finally:
        srv.close()


def test_one_client_cannot_take_every_connection() -> None:
    srv = TransferServer(memory_source(), TransferConfig(token=TOKEN, max_connections=4,
                                                         max_connections_per_client=2), NS,
                         port=0)
    try:
        held = [PeerConnection("127.0.0.1", srv.port, TOKEN, NS, 2.0) for _ in range(2)]
        with pytest.raises((Refused, OSError)) as refused:
            PeerConnection("127.0.0.1", srv.port, TOKEN, NS, 2.0)
        if isinstance(refused.value, Refused):
            assert refused.value.status == Status.BUSY
        # Another client address (a loopback alias) is still served meanwhile.
        other = socket.create_connection(("127.0.0.1", srv.port), timeout=5,
                                         source_address=("127.0.0.2", 0))
        client_hello(other, TOKEN, NS, Deadline(5.0))
        other.close()
        for conn in held:
            conn.close()
        for _ in range(50):  # the server frees the slots as it sees the closes
            try:
                still_serves(srv.address)
                break
            except AssertionError:
                time.sleep(0.1)
        else:
            still_serves(srv.address)
    finally:
        srv.close()
