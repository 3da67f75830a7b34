"""The transfer channel's throughput between two processes, beside raw loopback TCP.

A child process serves ``total`` bytes of chunks from its memory tier over the
transfer server; this process reads them all with the peer tier's
``get_many`` (each chunk's header parsed and both checksums verified on
arrival). The baseline, in the same run: a child ``sendall``s the same number
of bytes over a plain socket and this process ``recv_into``s one preallocated
buffer. And the transfer channel over TLS (mutual, certificates of a throwaway
CA made in a temporary folder), and with a cluster integrity key (the server
signs every chunk it sends, the reader verifies each MAC instead of the payload
checksum), in the same run. Medians of several repeats,
the three reads alternating so each sees the same machine. Also: the same read through a ChunkStore
(memory + peer: the chunks are promoted into memory slots, one more copy), and
the latency of a presence check (what vLLM's scheduler pays per lookup).
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import tempfile
import time
from typing import Any

import numpy as np

from kvtier.codecs.integrity import ChunkMac
from kvtier.config import PeerConfig
from kvtier.net.tls import TlsFiles
from kvtier.store import ChunkStore
from kvtier.testing.tls import make_certs
from kvtier.testing.transfer_proc import TransferChild, chunk_key
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.peer import PeerTier

TOKEN, NAMESPACE = "bench", "bench"


def run_transfer(quick: bool) -> dict[str, Any]:
    """``transfer_gbps``, ``transfer_tls_gbps``, ``loopback_tcp_gbps`` and their ratios (plus
    store and contains)."""
    chunk_bytes = 4 * 1024**2  # a 256-token chunk of a ~1B model (24 layers, 4 KV heads, bf16)
    chunks = 16 if quick else 64
    repeats = 3 if quick else 7
    total = chunks * chunk_bytes
    keys = [chunk_key(i) for i in range(chunks)]
    out: dict[str, Any] = {"setup": {"chunk_bytes": chunk_bytes, "chunks": chunks,
                                     "total_bytes": total, "repeats": repeats}}
    certs_dir = tempfile.TemporaryDirectory(prefix="kvtier-bench-tls-")
    certs = make_certs(certs_dir.name, ["server", "client"], ["127.0.0.1"])
    child = TransferChild(chunks, chunk_bytes, token=TOKEN, namespace=NAMESPACE)
    tls_child = TransferChild(chunks, chunk_bytes, token=TOKEN, namespace=NAMESPACE,
                              tls_dir=certs_dir.name)
    raw = TransferChild(chunks, chunk_bytes, token="raw")
    secret = os.urandom(32)
    signed_child = TransferChild(chunks, chunk_bytes, token=TOKEN, namespace=NAMESPACE,
                                 mac_secret=secret)
    try:
        tier = PeerTier(PeerConfig(peers=[child.address], timeout_s=60.0, cache_s=0.0),
                        token=TOKEN, namespace=NAMESPACE, read_pool_bytes=total + chunk_bytes)
        c = certs["client"]
        tls_tier = PeerTier(PeerConfig(peers=[tls_child.address], timeout_s=60.0, cache_s=0.0),
                            token=TOKEN, namespace=NAMESPACE, read_pool_bytes=total + chunk_bytes,
                            tls=TlsFiles(c.cert_file, c.key_file, c.ca_file))
        signed_tier = PeerTier(PeerConfig(peers=[signed_child.address], timeout_s=60.0,
                                          cache_s=0.0), token=TOKEN, namespace=NAMESPACE,
                               read_pool_bytes=total + chunk_bytes, mac=ChunkMac(secret))
        sock = socket.create_connection(("127.0.0.1", raw.port), timeout=60)
        buf = memoryview(np.empty(total, dtype=np.uint8))
        times: list[float] = []
        tls_times: list[float] = []
        raw_times: list[float] = []
        signed_times: list[float] = []
        for _ in range(repeats + 1):  # alternating, so all see the same machine; 1st: warm-up
            times.append(_read(tier, keys))
            tls_times.append(_read(tls_tier, keys))
            signed_times.append(_read(signed_tier, keys))
            raw_times.append(_raw_read(sock, buf))
        sock.close()
        tls_tier.close()
        if signed_tier.stats.as_dict().get("forged"):
            raise RuntimeError(f"signed peer read refused chunks: {signed_tier.stats.as_dict()}")
        signed_tier.close()
        out["transfer_gbps"] = total / statistics.median(times[1:]) / 1e9
        out["transfer_tls_gbps"] = total / statistics.median(tls_times[1:]) / 1e9
        out["loopback_tcp_gbps"] = total / statistics.median(raw_times[1:]) / 1e9
        out["transfer_vs_loopback"] = out["transfer_gbps"] / out["loopback_tcp_gbps"]
        out["tls_vs_plain"] = out["transfer_tls_gbps"] / out["transfer_gbps"]
        out["transfer_signed_gbps"] = total / statistics.median(signed_times[1:]) / 1e9
        # per round, so the drift of a shared machine cancels (as bench tiers does)
        out["signed_vs_plain"] = statistics.median(
            a / b for a, b in zip(times[1:], signed_times[1:]))
        out["contains_ms_p50"], out["contains_ms_p99"] = _contains_ms(tier, keys[:16])
        store = ChunkStore([MemoryTier(total, chunk_bytes), tier])
        store_times = []
        for _ in range(repeats + 1):
            assert store.memory is not None
            store.memory.clear()
            t0 = time.perf_counter()
            got = store.get_many(keys)
            store_times.append(time.perf_counter() - t0)
            assert all(c is not None for c in got), "the store missed a peer chunk"
            for c in got:
                c.release()  # type: ignore[union-attr]
        out["store_gbps"] = total / statistics.median(store_times[1:]) / 1e9
        out["peer_stats"] = tier.stats.as_dict()
        store.close()
    finally:
        child.stop()
        tls_child.stop()
        signed_child.stop()
        raw.stop()
        certs_dir.cleanup()
    return out


def _read(tier: PeerTier, keys: list) -> float:
    t0 = time.perf_counter()
    got = tier.get_many(keys)
    dt = time.perf_counter() - t0
    if any(c is None for c in got):
        raise RuntimeError(f"peer read missed chunks: {tier.stats.as_dict()}")
    for c in got:
        c.release()  # type: ignore[union-attr]
    return dt


def _contains_ms(tier: PeerTier, keys: list) -> tuple[float, float]:
    lat = []
    for _ in range(300):
        t0 = time.perf_counter()
        tier.contains_many(keys)
        lat.append((time.perf_counter() - t0) * 1e3)
    q = np.quantile(lat, [0.5, 0.99])
    return float(q[0]), float(q[1])


def _raw_read(sock: socket.socket, buf: memoryview) -> float:
    """One plain-TCP read of ``buf.nbytes`` bytes into ``buf`` (the baseline)."""
    t0 = time.perf_counter()
    sock.sendall(struct.pack("<Q", buf.nbytes))
    got = 0
    while got < buf.nbytes:
        n = sock.recv_into(buf[got:])
        if not n:
            raise RuntimeError("raw loopback child closed the connection")
        got += n
    return time.perf_counter() - t0


def run(args: Any) -> dict[str, Any]:
    """``kvtier bench cluster --part transfer``."""
    return run_transfer(bool(args.quick))


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    return "\n".join([
        f"{s['chunks']} chunks of {s['chunk_bytes'] / 2**20:.0f} MiB, median of {s['repeats']}",
        f"transfer channel  {res['transfer_gbps']:6.2f} GB/s",
        f"  over TLS        {res['transfer_tls_gbps']:6.2f} GB/s "
        f"({res['tls_vs_plain']:.2f}x plain)",
        f"  signed (MAC)    {res['transfer_signed_gbps']:6.2f} GB/s "
        f"({res['signed_vs_plain']:.2f}x plain)",
        f"raw loopback TCP  {res['loopback_tcp_gbps']:6.2f} GB/s",
        f"ratio             {res['transfer_vs_loopback']:6.2f}x (goal >= 0.7x)",
        f"through the store {res['store_gbps']:6.2f} GB/s; presence check p50 "
        f"{res['contains_ms_p50']:.2f} ms, p99 {res['contains_ms_p99']:.2f} ms"])
