"""The transfer server: serves this instance's chunks to other instances.

One listening socket, one thread per connection: at most
``transfer.max_connections`` in all and ``transfer.max_connections_per_client``
per client address (more are refused at once: BUSY in clear, closed under
TLS), so one client cannot take every slot. A connection opens with TLS when
the instance serves TLS (``tls``: a plain client is answered TLS_REQUIRED;
under mutual TLS a client without a certificate of the cluster's CA fails the
handshake), then HELLO, the token's challenge-response
(:mod:`kvtier.transfer.hello`; a namespace digest other than this instance's
is refused, "" allows presence checks only), all within one deadline of
``timeout_s``: a client trickling bytes is cut. Then any number of
CONTAINS / GET requests (framing: :mod:`kvtier.transfer.wire`). Chunks come
from the store's own tiers (memory first, then its writable lower tiers;
never its read-only peer tier, so two instances never ask each other in a
loop); a memory chunk is sent straight from its slot (the header computed,
the payload not copied), with ``sendmsg`` over header and payload buffers on
plain TCP. With the cluster's integrity key (``mac``) each header carries the
chunk's MAC, computed here on the connection's thread as the chunk is sent
(a chunk read from disk or Redis was verified there first).

Memory is bounded before any read: a GET walks its keys in order in slices
of ``SLICE`` (memory chunks by reference, lower tiers read a slice at a time)
and stops once what it reached fills ``max_batch_bytes``, or after
``GET_KEYS`` keys; the rest is answered LATER and asked again. One answer
thus reads at most ``max_batch_bytes`` plus one slice of chunks, whatever the
request's 65,536 keys. Waits are bounded: an idle connection by
``idle_timeout_s``, everything inside a request by ``timeout_s``.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Protocol, Sequence

from kvtier.codecs import ChunkData, ChunkMac
from kvtier.codecs.format import encode_header
from kvtier.transfer.hello import (Deadline, plain_client, read_hello, refuse, server_hello,
                                   tls_accept)
from kvtier.transfer.wire import (FRAME, GET_KEYS, MAX_KEYS, Op, Status, WireError,
                                  contains_body, frame, get_answer_buffers, parse_frame,
                                  parse_keys, recv_exact, sendmsg_all, set_timeout)
from kvtier.config import TransferConfig, is_loopback
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.net.tls import TlsFiles, server_context
from kvtier.threads import NamedThread
from kvtier.tiers.base import Tier, TierStats, lookup_prefix

log = logging.getLogger(__name__)
SLICE = 8
"""Keys a GET reads from a lower tier at a time (memory chunks are references)."""


class TierSource(Protocol):
    """What the server reads: a store's tiers in order, and which one is memory
    (its chunks are sent from their slots by reference, not read)."""

    tiers: Sequence[Tier]
    memory: Tier | None


class TransferServer:
    """Serves ``store``'s chunks on ``cfg.host``:``port`` (0: any free port) to peers that
    present ``cfg``'s token and, for GET, the namespace digest ``namespace``; signed with
    ``mac`` (the cluster's integrity key) when given; over TLS when ``tls`` serves."""

    def __init__(self, store: TierSource, cfg: TransferConfig, namespace: str,
                 port: int | None = None, mac: ChunkMac | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.namespace = namespace
        self.mac = mac
        self.tls = server_context(tls) if tls is not None and tls.serving else None
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
        self._per_client: dict[str, int] = {}
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = NamedThread(target=self._accept, name="kvtier-transfer",
                                   daemon=True)
        self._thread.start()

    # -- connections ----------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            client = str(addr[0])
            with self._lock:
                mine = self._per_client.get(client, 0)
                if mine < self.cfg.max_connections_per_client:
                    self._per_client[client] = mine + 1
            if mine >= self.cfg.max_connections_per_client:
                self._refuse(conn, f"{mine} connections from {client} already")
                continue
            if not self._slots.acquire(blocking=False):
                self._left(client)
                self._refuse(conn, "too many connections")
                continue
            with self._lock:
                self._conns.add(conn)
            NamedThread(target=self._serve, args=(conn, client),
                        name="kvtier-transfer-conn", daemon=True).start()

    def _left(self, client: str) -> None:
        with self._lock:
            n = self._per_client.pop(client, 1) - 1
            if n > 0:
                self._per_client[client] = n

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """BUSY, on the accept thread: in clear (a TLS client just sees the close)."""
        self.stats.add(errors=1)
        try:
            if self.tls is None:
                conn.settimeout(self.cfg.timeout_s)
                body = message.encode()
                conn.sendall(frame(Op.HELLO, len(body), Status.BUSY) + body)
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, raw: socket.socket, client: str) -> None:
        box = [raw]  # the socket in use: the raw one, then its TLS wrapper
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            full = self._open(box)
            if full is None:
                return
            conn = box[0]
            while not self._closed:
                set_timeout(conn, self.cfg.idle_timeout_s)
                head = recv_exact(conn, FRAME.size)
                set_timeout(conn, self.cfg.timeout_s)
                op, _, body_len = parse_frame(head, 4 + 16 * MAX_KEYS)
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
                self._conns.discard(box[0])
            box[0].close()
            self._slots.release()
            self._left(client)

    def _open(self, box: list[socket.socket]) -> bool | None:
        """TLS (if served; ``box[0]`` becomes the TLS socket) and HELLO within one deadline:
        whether GET is allowed, or None (refused, or it failed)."""
        deadline = Deadline(self.cfg.timeout_s)
        conn = box[0]
        if self.tls is not None:
            if plain_client(conn, deadline):
                self.stats.add(errors=1)
                read_hello(conn, deadline)  # read, so the refusal is not lost to a reset
                refuse(conn, Status.TLS_REQUIRED, "this transfer server speaks TLS only: give "
                       "the client tls.ca_file (and tls.cert_file/key_file for mutual TLS)",
                       deadline)
                return None
            try:
                tls = tls_accept(conn, self.tls, deadline)
            except (OSError, ValueError) as exc:
                self.stats.add(errors=1)
                log.debug("kvtier transfer: TLS handshake failed: %s", exc)
                return None
            with self._lock:
                self._conns.discard(conn)
                self._conns.add(tls)
            box[0] = conn = tls
        namespace = server_hello(conn, self._token, self._check_namespace, deadline)
        if namespace is None:
            self.stats.add(errors=1)
            return None
        return bool(namespace)

    def _check_namespace(self, namespace: str) -> tuple[Status, str] | None:
        if namespace and namespace != self.namespace:
            return (Status.NAMESPACE_MISMATCH, f"this instance serves namespace "
                    f"{self.namespace}, the client asked for {namespace} (another model, "
                    "layout, chunk size or kvtier version)")
        return None

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
        chunks, later = self._gather(keys)
        try:
            payloads = [None if c is None else memoryview(c.payload).cast("B") for c in chunks]
            sent = [i for i, p in enumerate(payloads) if p is not None]
            heads: list[bytes | None] = [None] * len(keys)
            for i, head in zip(sent, self._headers([(keys[i], chunks[i], payloads[i])
                                                    for i in sent])):
                heads[i] = head
            hits = len(sent)
            self.stats.add(hits=hits, misses=later - hits,
                           get_bytes=sum(p.nbytes for p in payloads if p is not None))
            sendmsg_all(conn, get_answer_buffers(heads, payloads, later))
        finally:
            for chunk in chunks:
                if chunk is not None:
                    chunk.release()

    def _gather(self, keys: list[ChunkKey]) -> tuple[list[ChunkData | None], int]:
        """The chunks one answer sends and where LATER starts: keys in order, a slice at a
        time, until ``max_batch_bytes`` (header and payload sizes) or ``GET_KEYS`` keys."""
        chunks: list[ChunkData | None] = [None] * len(keys)
        end = min(len(keys), GET_KEYS)
        total = 0
        try:
            for start in range(0, end, SLICE):
                stop = min(start + SLICE, end)
                chunks[start:stop] = self._read(keys[start:stop])
                for i in range(start, stop):
                    chunk = chunks[i]
                    if chunk is None:
                        continue
                    size = chunk.payload.nbytes + 136
                    if total and total + size > self.cfg.max_batch_bytes:
                        end = i  # the client asks again for the rest
                        break
                    total += size
                if end < stop:
                    break
        except BaseException:
            for chunk in chunks:
                if chunk is not None:
                    chunk.release()
            raise
        for i in range(end, len(keys)):
            chunk, chunks[i] = chunks[i], None
            if chunk is not None:
                chunk.release()
        return chunks, end

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
            try:  # the plain socket's shutdown, also under TLS: wakes its thread's wait
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5.0)
