"""Layer 3: the peer tier's connections to other instances' transfer servers.

A :class:`PeerPool` per peer address keeps up to ``max_connections`` open,
authenticated connections (over TLS when the instance dials with TLS: the
server's certificate checked against the cluster's CA and the dialled host;
the token proven, never sent: :mod:`kvtier.transfer.hello`) and lends one per call (thread-safe; a call never
shares a connection). A connection that failed in any way is closed, never
returned. After a failure the peer is skipped for ``backoff_s`` (a fixed
:class:`kvtier.net.backoff.Backoff`): a peer that is down or hung costs one
bounded wait, then nothing.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Callable, Sequence

import numpy as np

from kvtier.codecs import ChunkData, ChunkMac
from kvtier.errors import CorruptChunk
from kvtier.transfer.hello import Deadline, client_hello, tls_connect
from kvtier.transfer.wire import (FRAME, Op, Refused, Status, WireError, frame, keys_body,
                                  parse_contains, parse_frame, read_chunks, read_message,
                                  recv_exact, set_timeout)
from kvtier.keys import ChunkKey
from kvtier.net.backoff import Backoff

log = logging.getLogger(__name__)


class PeerConnection:
    """One authenticated connection to a transfer server (TLS with ``tls``, a client
    context); connecting, TLS and HELLO together within ``timeout_s``."""

    def __init__(self, host: str, port: int, token: str, namespace: str,
                 timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
        deadline = Deadline(timeout_s)
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                self.sock = tls_connect(self.sock, tls, host, deadline)
            client_hello(self.sock, token, namespace, deadline)
            set_timeout(self.sock, timeout_s)
        except BaseException:
            self.sock.close()
            raise

    def contains(self, keys: Sequence[ChunkKey], timeout_s: float) -> list[bool]:
        set_timeout(self.sock, timeout_s)
        body = keys_body(keys)
        self.sock.sendall(frame(Op.CONTAINS, len(body)) + body)
        status, answer = read_message(self.sock, Op.CONTAINS, 4 + len(keys))
        if status != Status.OK:
            raise Refused(status, answer.decode(errors="replace"))
        return parse_contains(answer, len(keys))

    def get(self, keys: Sequence[ChunkKey], timeout_s: float, take: Callable[[int], np.ndarray],
            give: Callable[[np.ndarray], None], max_body: int, mac: ChunkMac | None = None
            ) -> tuple[list[ChunkData | None], list[CorruptChunk]]:
        """Chunks of ``keys`` (None = miss), asking again for those sent LATER, verified
        (with ``mac``: against the cluster's key); and why each bad one failed."""
        set_timeout(self.sock, timeout_s)
        out: list[ChunkData | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        failed: list[CorruptChunk] = []
        while todo:
            body = keys_body([keys[i] for i in todo])
            self.sock.sendall(frame(Op.GET, len(body)) + body)
            op, status, body_len = parse_frame(recv_exact(self.sock, FRAME.size), max_body)
            if op != Op.GET:
                raise WireError(f"answer to GET came as op {op}")
            if status != Status.OK:
                raise Refused(status, recv_exact(self.sock, body_len).decode(errors="replace"))
            got, later, bad = read_chunks(self.sock, [keys[i] for i in todo], body_len, take,
                                          give, max_body, mac)
            failed += bad
            for i, chunk in zip(todo, got):
                out[i] = chunk
            if len(later) == len(todo):
                raise WireError("the server sent none of the chunks asked for")
            todo = [todo[j] for j in later]
        return out, failed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class PeerPool:
    """Pooled connections to one peer, with a backoff after failures."""

    def __init__(self, address: str, host: str, port: int, token: str,
                 max_connections: int, backoff_s: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.host, self.port = host, port
        self.token = token
        self.tls = tls
        self.max_connections = max_connections
        # Fixed and unjittered: peer.backoff_s means "skipped for that long".
        self.backoff = Backoff(backoff_s, backoff_s, jitter=0.0)
        self._idle: list[tuple[str, PeerConnection]] = []
        self._lock = threading.Lock()
        self._logged = False

    def available(self) -> bool:
        """False while the peer is in its backoff after a failure."""
        return self.backoff.ready()

    def call(self, namespace: str, timeout_s: float,
             fn: Callable[[PeerConnection], object]) -> object:
        """Run ``fn`` on a pooled connection (opened with ``namespace`` if none is idle).

        Raises what the call raised (OSError, WireError, Refused) after closing the
        connection and starting the backoff. A reused connection that the server
        has closed meanwhile is retried once on a fresh one.
        """
        conn, reused = self._take(namespace, timeout_s)
        try:
            try:
                result = fn(conn)
            except (ConnectionError, WireError) as exc:
                conn.close()
                if not reused:
                    raise
                log.debug("kvtier peer %s: stale connection (%s), reconnecting", self.address, exc)
                conn = PeerConnection(self.host, self.port, self.token, namespace, timeout_s,
                                      self.tls)
                result = fn(conn)
        except BaseException as exc:
            conn.close()
            self._failed(exc)
            raise
        self.backoff.succeeded()
        with self._lock:
            if len(self._idle) < self.max_connections:
                self._idle.append((namespace, conn))
                conn = None  # type: ignore[assignment]
        if conn is not None:
            conn.close()
        return result

    def _take(self, namespace: str, timeout_s: float) -> tuple[PeerConnection, bool]:
        with self._lock:
            for j in range(len(self._idle) - 1, -1, -1):
                if self._idle[j][0] == namespace:
                    return self._idle.pop(j)[1], True
        try:
            return PeerConnection(self.host, self.port, self.token, namespace, timeout_s,
                                      self.tls), False
        except BaseException as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        wait = self.backoff.failed()
        if not self._logged or isinstance(exc, Refused):
            self._logged = True
            log.warning("kvtier peer %s: %s; a miss, not asked again for %.1fs",
                        self.address, exc or type(exc).__name__, wait)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()
