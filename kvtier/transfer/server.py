"""The transfer server: serves this instance's chunks to other instances.

One listening socket, one thread per connection (at most
``transfer.max_connections``). A connection starts with HELLO (token compared
in constant time; a namespace digest other than this instance's is refused,
"" allows presence checks only), then any number of CONTAINS / GET requests
(framing: :mod:`kvtier.transfer.wire`). Chunks come from the store's own tiers
(memory first, then its writable lower tiers; never its read-only peer tier,
so two instances never ask each other in a loop); a memory chunk is sent
straight from its slot (the header computed, the payload not copied), with
``sendmsg`` over header and payload buffers. With the cluster's integrity key
(``mac``) each header carries the chunk's MAC, computed here on the
connection's thread as the chunk is sent (a chunk read from disk or Redis
was verified there first). Waits are bounded: an idle connection by
``idle_timeout_s``, everything inside a request by ``timeout_s``.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from typing import Protocol, Sequence

from kvtier.codecs import ChunkData, ChunkMac
from kvtier.codecs.format import encode_header
from kvtier.transfer.wire import (FRAME, MAX_HELLO, Op, Status, WireError, contains_body, frame,
                                get_answer_buffers, parse_frame, parse_hello, parse_keys,
                                recv_exact, sendmsg_all, set_timeout)
from kvtier.config import TransferConfig, is_loopback
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier, TierStats, lookup_prefix

log = logging.getLogger(__name__)


class TierSource(Protocol):
    """What the server reads: a store's tiers in order, and which one is memory
    (its chunks are sent from their slots by reference, not read)."""

    tiers: Sequence[Tier]
    memory: Tier | None


class TransferServer:
    """Serves ``store``'s chunks on ``cfg.host``:``port`` (0: any free port) to peers that
    present ``cfg``'s token and, for GET, the namespace digest ``namespace``; signed with
    ``mac`` (the cluster's integrity key) when given."""

    def __init__(self, store: TierSource, cfg: TransferConfig, namespace: str,
                 port: int | None = None, mac: ChunkMac | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.namespace = namespace
        self.mac = mac
        self._token = cfg.resolve_token().encode()
        if not self._token and not is_loopback(cfg.host):
            raise ConfigError("transfer.host", f"{cfg.host} is not loopback: a token is needed")
        self.sources = [t for t in store.tiers if not getattr(t, "read_only", False)]
        self.stats = TierStats()  # hits / misses / get_bytes: chunks served; errors: refused
        self._sock = socket.create_server((cfg.host, cfg.port if port is None else port),
                                          backlog=64)
        self.port = self._sock.getsockname()[1]
        self.address = f"{cfg.host}:{self.port}"
        self._slots = threading.BoundedSemaphore(cfg.max_connections)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="kvtier-transfer",
                                        daemon=True)
        self._thread.start()

    # -- connections ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, Status.BUSY, "too many connections")
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kvtier-transfer-conn",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket, status: Status, message: str) -> None:
        self.stats.add(errors=1)
        try:
            conn.settimeout(self.cfg.timeout_s)
            body = message.encode()
            conn.sendall(frame(Op.HELLO, len(body), status) + body)
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_timeout(conn, self.cfg.timeout_s)
            full = self._hello(conn)
            if full is None:
                return
            while not self._closed:
                set_timeout(conn, self.cfg.idle_timeout_s)
                head = recv_exact(conn, FRAME.size)
                set_timeout(conn, self.cfg.timeout_s)
                op, _, body_len = parse_frame(head, 4 + 16 * 65536)
                keys = parse_keys(recv_exact(conn, body_len))
                if op == Op.CONTAINS:
                    body = contains_body(self._contains(keys))
                    conn.sendall(frame(Op.CONTAINS, len(body)) + body)
                elif op == Op.GET and full:
                    self._get(conn, keys)
                else:
                    msg = b"GET needs this instance's namespace in HELLO" if op == Op.GET \
                        else b"unknown op"
                    conn.sendall(frame(op, len(msg), Status.NAMESPACE_REQUIRED
                                       if op == Op.GET else Status.BAD_REQUEST) + msg)
                    return
        except (OSError, WireError) as exc:  # closed, timed out or broke the protocol
            log.debug("kvtier transfer: connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _hello(self, conn: socket.socket) -> bool | None:
        """Check the HELLO: True (all ops), False (CONTAINS only) or None (refused)."""
        op, _, body_len = parse_frame(recv_exact(conn, FRAME.size), MAX_HELLO)
        if op != Op.HELLO:
            self._refuse(conn, Status.BAD_REQUEST, "a connection starts with HELLO")
            return None
        token, namespace = parse_hello(recv_exact(conn, body_len))
        if not hmac.compare_digest(token, self._token):
            self._refuse(conn, Status.BAD_TOKEN, "wrong transfer token")
            return None
        if namespace and namespace != self.namespace:
            self._refuse(conn, Status.NAMESPACE_MISMATCH, f"this instance serves namespace "
                         f"{self.namespace}, the client asked for {namespace} (another model, "
                         "layout, chunk size or kvtier version)")
            return None
        conn.sendall(frame(Op.HELLO, 2) + b"ok")
        return bool(namespace)

    # -- operations -----------------------------------------------------------

    def _contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        present = [False] * len(keys)
        for tier in self.sources:
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                break
            for i, there in zip(todo, tier.contains_many([keys[i] for i in todo])):
                present[i] = there
        return present

    def _get(self, conn: socket.socket, keys: list[ChunkKey]) -> None:
        chunks = self._read(keys)
        try:
            payloads: list[memoryview | None] = []
            total, later = 0, len(keys)
            for i, chunk in enumerate(chunks):
                if chunk is not None and total and total + chunk.payload.nbytes + 136 \
                        > self.cfg.max_batch_bytes:
                    later = i  # the client asks again for the rest
                    break
                payloads.append(None if chunk is None else memoryview(chunk.payload).cast("B"))
                total += 0 if chunk is None else chunk.payload.nbytes + 136
            payloads += [None] * (len(keys) - len(payloads))
            sent = [i for i, p in enumerate(payloads) if p is not None]
            heads: list[bytes | None] = [None] * len(keys)
            for i, head in zip(sent, self._headers([(keys[i], chunks[i], payloads[i])
                                                    for i in sent])):
                heads[i] = head
            hits = sum(h is not None for h in heads)
            self.stats.add(hits=hits, misses=later - hits,
                           get_bytes=sum(p.nbytes for p in payloads if p is not None))
            sendmsg_all(conn, get_answer_buffers(heads, payloads, later))
        finally:
            for chunk in chunks:
                if chunk is not None:
                    chunk.release()

    def _headers(self, items: list[tuple[ChunkKey, ChunkData | None, memoryview | None]]
                 ) -> list[bytes]:
        """The chunks' headers; signed with the cluster's key, half on its helper thread."""
        def head(item: tuple[ChunkKey, ChunkData | None, memoryview | None]) -> bytes:
            key, chunk, view = item
            assert chunk is not None and view is not None
            return encode_header(key, chunk.meta, view, self.mac)
        return self.mac.map(head, items) if self.mac is not None else [head(x) for x in items]

    def _read(self, keys: list[ChunkKey]) -> list[ChunkData | None]:
        """Chunks from the store's own tiers (memory references, lower tiers' reads)."""
        found: list[ChunkData | None] = [None] * len(keys)
        for tier in self.sources:
            todo = [i for i, c in enumerate(found) if c is None]
            if not todo:
                break
            ask = [keys[i] for i in todo]
            got = tier.refs_many(ask) if tier is self.store.memory else tier.get_many(ask)
            for i, chunk in zip(todo, got):
                found[i] = chunk
        return found

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """Leading keys this server would serve (for tests and tools)."""
        return lookup_prefix(self.sources, keys)

    def close(self) -> None:
        """Stop accepting and drop every connection. Idempotent."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5.0)
