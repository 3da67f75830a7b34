"""Layer 3: the read-only ``peer`` tier: chunks that other instances hold.

Where the chunks are comes from a static list of transfer servers
(``peer.peers``) or from the controller's locate call (``peer.controller_url``).
Presence checks run in vLLM's scheduler on every lookup, so they are kept
to milliseconds: answers are cached for ``cache_s``, every wait is bounded by
``contains_timeout_s``, and a peer (or controller) that failed is skipped
for ``backoff_s`` (a fixed :class:`kvtier.net.backoff.Backoff`). Reads
(``get_many``, in the worker) use ``timeout_s``.
Every chunk is verified on arrival (header, key, both checksums, see
:func:`kvtier.transfer.wire.read_chunks`; with the cluster's integrity key,
its MAC: a chunk without a valid one counts ``forged``); a bad chunk, a
refused connection, a peer that is down: each is a miss, counted, never an
exception.

``put_many`` stores nothing (``read_only``: the store runs no writer for it).
The namespace digest presented to peers is set by the connector's worker once
its engine's hasher exists (``KvtierWorker.register``); without one (the
scheduler) only presence checks are possible, which is all it needs.
Its own transfer address (``own_address``) is never asked. With ``tls``
dialing, connections to peers (and the controller's locate calls) speak TLS,
the peer's certificate checked against the cluster's CA and the dialled host.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, Sequence

from kvtier.codecs import ChunkData, ChunkMac
from kvtier.errors import ForgedChunk
from kvtier.transfer.wire import MAX_KEYS, Refused, WireError
from kvtier.config.cluster import PeerConfig, parse_address
from kvtier.keys import ChunkKey
from kvtier.net.backoff import Backoff
from kvtier.net.http import HttpClient
from kvtier.net.tls import TlsFiles, client_context
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.buffer_pool import BufferPool
from kvtier.transfer.client import PeerConnection, PeerPool
from kvtier.tiers.peer.locate import MAX_ANSWER, LocateError, locate

_FAILURES = (OSError, WireError, Refused, ValueError)
_CACHE_MAX = 65536


class PeerTier(Tier):
    """Read-only tier over other instances' transfer servers."""

    name = "peer"
    read_only = True

    def __init__(self, cfg: PeerConfig, token: str = "", own_address: str = "",
                 namespace: str = "", max_chunk_bytes: int = 256 * 1024**2,
                 read_pool_bytes: int = 64 * 1024**2, mac: ChunkMac | None = None,
                 tls: TlsFiles | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.token = token
        self._tls = client_context(tls) if tls is not None and tls.dialing else None
        self.mac = mac
        """The cluster's integrity key: chunks arriving without its MAC are misses."""
        self.namespace = namespace
        """This instance's namespace digest (hex); "" allows presence checks only."""
        self.max_chunk_bytes = max_chunk_bytes
        self.own_address = own_address
        self._pools: dict[str, PeerPool] = {}
        self._static = [a for a in cfg.peers if a != own_address]
        self._cache: dict[ChunkKey, tuple[float, str | None]] = {}  # key -> (expiry, holder)
        self._lock = threading.Lock()
        # Fixed and unjittered: peer.backoff_s means "skipped for that long".
        self._controller = Backoff(cfg.backoff_s, cfg.backoff_s, jitter=0.0)
        self._http = HttpClient(cfg.contains_timeout_s, MAX_ANSWER,  # connects on first use
                                tls=tls if tls is not None and tls.dialing else None)
        self._buffers = BufferPool(read_pool_bytes)
        self.peer_stats = {"contains_calls": 0, "locate_calls": 0, "skipped": 0}

    def _count(self, name: str) -> None:
        with self._lock:
            self.peer_stats[name] += 1

    def _pool(self, address: str) -> PeerPool:
        with self._lock:
            pool = self._pools.get(address)
            if pool is None:
                host, port = parse_address("peer", address)
                pool = PeerPool(address, host, port, self.token, self.cfg.max_connections,
                                self.cfg.backoff_s, self._tls)
                self._pools[address] = pool
            return pool

    # -- presence -------------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        if len(keys) > MAX_KEYS:  # one message's worth; the rest reads as absent
            return self.contains_many(keys[:MAX_KEYS]) + [False] * (len(keys) - MAX_KEYS)
        keys = list(keys)
        now = time.monotonic()
        known: dict[int, bool] = {}
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is not None and hit[0] > now:
                    known[i] = hit[1] is not None
        todo = [i for i in range(len(keys)) if i not in known]
        if todo:
            holders = self._ask([keys[i] for i in todo])
            with self._lock:
                if len(self._cache) > _CACHE_MAX:
                    self._cache.clear()
                for i, holder in zip(todo, holders):
                    if holder is not False:  # False: nobody could be asked; not cached
                        self._cache[keys[i]] = (now + self.cfg.cache_s, holder)
                    known[i] = isinstance(holder, str)
        return [known[i] for i in range(len(keys))]

    def _ask(self, keys: list[ChunkKey]) -> list[str | None | bool]:
        """Per key the address of a peer holding it, None (nobody does) or False (not asked)."""
        if self.cfg.controller_url:
            return self._locate(keys)
        holder: list[str | None | bool] = [False] * len(keys)
        for address in self._static:
            pool = self._pool(address)
            if not pool.available():
                self.stats.add(errors=1)
                self._count("skipped")
                continue
            todo = [i for i, h in enumerate(holder) if not isinstance(h, str)]
            if not todo:
                break
            try:
                self._count("contains_calls")
                got = pool.call(self.namespace, self.cfg.contains_timeout_s, lambda c: c.contains(
                    [keys[i] for i in todo], self.cfg.contains_timeout_s))
            except _FAILURES:
                self.stats.add(errors=1)
                continue
            for i, there in zip(todo, got):  # type: ignore[call-overload]
                holder[i] = address if there else None
        return holder

    def _locate(self, keys: list[ChunkKey]) -> list[str | None | bool]:
        if not self._controller.ready():
            self.stats.add(errors=1)
            self._count("skipped")
            return [False] * len(keys)
        try:
            self._count("locate_calls")
            holders = locate(self._http, self.cfg.controller_url, self.cfg.controller_token,
                             keys, self.cfg.instance_id or None, self.cfg.contains_timeout_s)
        except LocateError:
            self._controller.failed()
            self.stats.add(errors=1)
            return [False] * len(keys)
        self._controller.succeeded()
        out: list[str | None | bool] = [None] * len(keys)
        for h in holders:  # most chunks first; skip ourselves and peers in backoff
            if h.transfer != self.own_address and h.chunks and self._pool(h.transfer).available():
                out[:h.chunks] = [h.transfer] * h.chunks
                break
        return out

    # -- reads ----------------------------------------------------------------

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        keys = list(keys)
        out: list[ChunkData | None] = [None] * len(keys)
        for address in self._sources(keys):
            todo = [i for i, c in enumerate(out) if c is None]
            if not todo:
                break
            pool = self._pool(address)
            if not pool.available():
                self.stats.add(errors=1)
                continue
            ask = [keys[i] for i in todo]
            try:
                got, failed = pool.call(self.namespace, self.cfg.timeout_s, lambda c: c.get(
                    ask, self.cfg.timeout_s, self._buffers.take, self._buffers.give,
                    self.max_chunk_bytes, self.mac))
            except _FAILURES:
                self.stats.add(errors=1)
                continue
            for exc in failed:  # nothing to delete on a peer: its copy stays its business
                if isinstance(exc, ForgedChunk):
                    self._count_forged(exc)
                else:
                    self.stats.add(corrupt=1)
            for i, chunk in zip(todo, got):
                if chunk is not None:
                    out[i] = chunk
        hits = [c for c in out if c is not None]
        self.stats.add(hits=len(hits), misses=len(out) - len(hits),
                       get_bytes=sum(c.payload.nbytes for c in hits))
        return out

    def _sources(self, keys: list[ChunkKey]) -> list[str]:
        """Peers to ask, in order: those known to hold the keys, then the static list."""
        now = time.monotonic()
        with self._lock:
            cached = [h[1] for k in keys if (h := self._cache.get(k)) and h[0] > now and h[1]]
        if self.cfg.controller_url and not cached:
            cached = [h for h in self._locate(keys) if isinstance(h, str)]
        order: list[str] = []
        for address in cached + self._static:
            if address not in order and address != self.own_address:
                order.append(address)
        return order

    # -- the rest of the interface --------------------------------------------

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        """Read-only: nothing is stored here (chunks reach peers through their own saves)."""
        return [False] * len(items)

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            for key in keys:
                self._cache.pop(key, None)
        return 0

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, 0)

    def iter_keys(self) -> Iterator[ChunkKey]:
        return iter(())

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()
        self._http.close()


__all__ = ["PeerConnection", "PeerTier"]
