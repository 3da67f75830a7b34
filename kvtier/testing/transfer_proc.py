"""A transfer server in a child process, serving a memory tier of made-up chunks.

``python -m kvtier.testing.transfer_proc CHUNKS CHUNK_BYTES [TOKEN] [NAMESPACE] [TLS_DIR]``
fills a memory tier with ``CHUNKS`` chunks (``chunk_key(i)`` -> ``chunk_payload(i,
CHUNK_BYTES)``), serves them on a free port of 127.0.0.1, prints ``{"port": ...}`` and
runs until its stdin closes. With ``TLS_DIR`` (a folder of
:func:`kvtier.testing.tls.make_certs` with a ``server`` certificate) it serves TLS,
mutual. :class:`TransferChild` starts and stops one (bounded waits).

With ``raw`` as TOKEN it serves plain TCP instead (the benchmark's baseline): for each
8-byte request ``n`` it ``sendall``s ``n`` bytes of one buffer of CHUNKS * CHUNK_BYTES.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import IO, cast

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.config import TransferConfig
from kvtier.keys import ChunkKey
from kvtier.net.tls import TlsFiles
from kvtier.testing.procs import last_json_line


def chunk_key(i: int) -> ChunkKey:
    return ChunkKey(b"kvtier-test-" + i.to_bytes(4, "little"))


def chunk_payload(i: int, nbytes: int) -> np.ndarray:
    """Deterministic bytes for chunk ``i`` (different per chunk)."""
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8)


def chunk_data(i: int, nbytes: int) -> ChunkData:
    return ChunkData(ChunkMeta("uint8", (nbytes,)), chunk_payload(i, nbytes))


SECRET_ENV = "KVTIER_TRANSFER_CHILD_SECRET"
"""A cluster secret (hex) for the child's transfer server: it signs every chunk it sends."""


class TransferChild:
    """A child process serving ``chunks`` chunks of ``chunk_bytes`` over the transfer channel."""

    def __init__(self, chunks: int, chunk_bytes: int, token: str = "", namespace: str = "ns",
                 timeout_s: float = 120.0, tls_dir: str = "", mac_secret: bytes = b"") -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if mac_secret:  # the child signs every chunk it sends with this cluster secret
            env[SECRET_ENV] = mac_secret.hex()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.testing.transfer_proc", str(chunks), str(chunk_bytes),
             token, namespace, tls_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = cast(IO[str], self.proc.stdout).readline()  # bounded by the child's start-up
        info = last_json_line(line)
        if info is None:
            self.stop()
            raise RuntimeError(f"transfer child did not start: {line!r}")
        self.port = int(info["port"])
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                cast(IO[str], self.proc.stdin).close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


def server_tls(folder: str) -> TlsFiles:
    """The ``server`` certificate of a :func:`~kvtier.testing.tls.make_certs` folder."""
    return TlsFiles(f"{folder}/server.pem", f"{folder}/server-key.pem", f"{folder}/ca.pem")


def main(argv: list[str]) -> None:
    from kvtier.codecs.integrity import ChunkMac
    from kvtier.store import ChunkStore
    from kvtier.transfer.server import TransferServer
    from kvtier.tiers.memory import MemoryTier

    chunks, nbytes = int(argv[0]), int(argv[1])
    token = argv[2] if len(argv) > 2 else ""
    if token == "raw":
        return _raw_server(chunks * nbytes)
    namespace = argv[3] if len(argv) > 3 else "ns"
    memory = MemoryTier(chunks * nbytes, nbytes)
    for i in range(chunks):
        memory.put_many([(chunk_key(i), chunk_data(i, nbytes))])
    store = ChunkStore([memory])
    tls = server_tls(argv[4]) if len(argv) > 4 and argv[4] else None
    secret = os.environ.get(SECRET_ENV, "")
    mac = ChunkMac(bytes.fromhex(secret)) if secret else None
    server = TransferServer(store, TransferConfig(token=token, max_batch_bytes=64 * 1024**2),
                            namespace, port=0, mac=mac, tls=tls)
    print(json.dumps({"port": server.port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.close()


def _raw_server(total: int) -> None:
    import socket
    import struct
    import threading

    data = memoryview(np.ones(total, dtype=np.uint8))
    sock = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)

    def serve() -> None:
        conn, _ = sock.accept()
        while head := conn.recv(8, socket.MSG_WAITALL):
            (n,) = struct.unpack("<Q", head)
            conn.sendall(data[:min(n, total)])

    threading.Thread(target=serve, daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
