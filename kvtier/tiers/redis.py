"""Layer 3: the Redis tier: chunks in a Redis / Valkey server or cluster, shared.

Each chunk is stored as the codecs layer frames it (128-byte header, then the
payload) under ``<key_prefix><hex key>``, split into parts when it is larger
than ``max_value_bytes`` (:mod:`kvtier.tiers.redis_values`). Parts are
written before their head, so a reader that finds a head finds its parts.

Every batch is one pipeline (one round trip; a second one only for the parts
of split chunks, and on a cluster to order parts before heads across nodes).
Values go out without being joined into one buffer: a small RESP packer
(:mod:`kvtier.tiers.resp`) sends the header and the caller's payload as
separate socket writes.

Failures: a connection error or timeout (``timeout_s`` bounds every socket
wait) turns the batch into misses / ``False`` and counts ``errors``; then the
tier does not talk to the server for ``reconnect_backoff_s`` (each skipped
call also counts ``errors``), and tries again after. A value that fails its
checks is deleted and counted ``corrupt``; a value of another kvtier format
version (a rolling upgrade sharing the server) is a miss counted ``foreign``
and left in place, logged once. ``OOM`` replies count ``dropped``.
Nothing is raised to the caller. Payloads of hits may be read-only views of
the bytes redis-py returned (no copy).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlparse

from kvtier.codecs import ChunkData, encode_header
from kvtier.codecs.format import Header
from kvtier.config import RedisConfig
from kvtier.errors import CorruptChunk, ForeignChunk
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.redis_values import ValueLayout
from kvtier.tiers.resp import Concat, RespPacker, packing_connection

log = logging.getLogger(__name__)
T = TypeVar("T")
INSTALL_HINT = "pip install 'kvtier[redis]'"
PART_TTL_MARGIN_S = 60
"""Parts outlive their head by this much, so a head never expires before its parts."""
_PROBE = 8  # parts unlinked per round trip when deleting (their number is not stored)


def _import_redis() -> Any:
    try:
        import redis
        import redis.cluster  # noqa: F401  (RedisCluster, used when cfg.cluster)
    except ImportError as exc:
        raise ImportError(f"the redis tier needs redis-py: {INSTALL_HINT} ({exc})") from exc
    return redis


class RedisTier(Tier):
    """Chunks in Redis under ``cfg.key_prefix``; see the module docstring for the layout."""

    name = "redis"

    def __init__(self, cfg: RedisConfig) -> None:
        super().__init__()
        self._redis = _import_redis()
        self.cfg = cfg
        self._layout = ValueLayout(cfg.key_prefix.encode(), cfg.max_value_bytes)
        self._ttl = cfg.ttl_s or None
        self._part_ttl = cfg.ttl_s + PART_TTL_MARGIN_S if cfg.ttl_s else None
        self._client: Any = None
        self._zero_copy = False
        self._client_lock = threading.Lock()
        self._retry_at = 0.0  # monotonic time before which the server is not asked
        self._count = 0  # chunks stored minus deleted by this object (see usage)
        self._count_lock = threading.Lock()
        r = self._redis
        self._down_errors = (r.ConnectionError, r.TimeoutError, r.exceptions.ClusterError,
                             r.exceptions.RedisClusterException, OSError)

    # -- Tier interface -------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """One pipeline of EXISTS on the head keys."""
        if not keys:
            return []
        return self._call(lambda c: [bool(r) for r in self._exists(c, keys)], [False] * len(keys))

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        if not items:
            return []
        return self._call(lambda c: self._put(c, items), [False] * len(items))

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        if not keys:
            return []
        out = self._call(lambda c: self._get(c, keys), [None] * len(keys))
        hits = [c for c in out if c is not None]
        self.stats.add(hits=len(hits), misses=len(out) - len(hits),
                       get_bytes=sum(c.payload.nbytes for c in hits))
        return out

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        n = self._call(lambda c: self._delete(c, [self._head(k) for k in keys]), 0)
        with self._count_lock:
            self._count = max(0, self._count - n)
        return n

    def usage(self) -> TierUsage:
        """``used_bytes`` / ``capacity_bytes``: the server's ``used_memory`` / ``maxmemory``
        from ``INFO memory`` (summed over cluster primaries; all keys, not only ours;
        capacity 0 = no limit set). ``num_chunks``: chunks this object stored minus
        those it deleted, a local estimate (other clients and expiry are not seen)."""
        info = self._call(self._memory_info, None)
        used, cap = info if info is not None else (0, 0)
        return TierUsage(used, cap, self._count)

    def iter_keys(self) -> Iterator[ChunkKey]:
        """SCAN for head keys under the prefix (all primaries on a cluster); a snapshot."""
        pattern = self._layout.scan_pattern()

        def scan(client: Any) -> list[ChunkKey]:
            keys = (self._layout.key_of(name) for name in client.scan_iter(match=pattern,
                                                                            count=1000))
            return [k for k in keys if k is not None]
        return iter(self._call(scan, []))

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except self._down_errors:
                pass  # closing a dead connection: nothing left to release

    # -- batches --------------------------------------------------------------

    def _exists(self, client: Any, keys: Sequence[ChunkKey]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._head(key))
        return pipe.execute()

    def _put(self, client: Any, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        present = self._exists(client, [k for k, _ in items])
        todo = [(i, k, c) for i, ((k, c), p) in enumerate(zip(items, present)) if not p]
        done = [bool(p) for p in present]
        writes = [self._values(key, chunk) for _, key, chunk in todo]
        if self.cfg.cluster:
            # A cluster spreads a chunk's values over nodes and runs them in
            # parallel: heads go in a second pipeline to still land after their parts.
            failed = self._set_all(client, [w[1:] for w in writes])
            heads = self._set_all(client, [[] if bad else w[:1] for w, bad in zip(writes, failed)])
            failed = [a or b for a, b in zip(failed, heads)]
        else:  # one connection, one pipeline: executed in order
            failed = self._set_all(client, [w[1:] + w[:1] for w in writes])
        for (i, _, chunk), bad in zip(todo, failed):
            done[i] = not bad
            if not bad:
                self.stats.add(puts=1, put_bytes=chunk.payload.nbytes)
                with self._count_lock:
                    self._count += 1
        return done

    def _set_all(self, client: Any, groups: list[list[tuple[bytes, Any, int | None]]]
                 ) -> list[bool]:
        """SET every value in one pipeline; per group, whether any of its SETs failed."""
        if not any(groups):
            return [False] * len(groups)
        pipe = client.pipeline(transaction=False)
        for group in groups:
            for name, value, ttl in group:
                pipe.set(name, value, ex=ttl)
        results = pipe.execute(raise_on_error=False)
        out, pos = [], 0
        for group in groups:
            errs = [r for r in results[pos:pos + len(group)] if isinstance(r, Exception)]
            pos += len(group)
            if errs:
                oom = any(isinstance(e, self._redis.exceptions.OutOfMemoryError) for e in errs)
                self.stats.add(**{"dropped" if oom else "errors": 1})
            out.append(bool(errs))
        return out

    def _values(self, key: ChunkKey, chunk: ChunkData) -> list[tuple[bytes, Any, int | None]]:
        """(name, value, ttl) of the head, then of each part; values are not copied."""
        payload = memoryview(chunk.payload).cast("B")
        head = self._head(key)
        values = self._layout.split(encode_header(key, chunk.meta, payload), payload)
        return [(head, self._concat(*values[0]), self._ttl)] + [
            (self._layout.part(head, i), self._concat(*v), self._part_ttl)
            for i, v in enumerate(values[1:], 1)]

    def _get(self, client: Any, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._head(key))
        values = pipe.execute(raise_on_error=False)
        out: list[ChunkData | None] = [None] * len(keys)
        split: list[tuple[int, Header, bytes]] = []
        for i, (key, value) in enumerate(zip(keys, values)):
            if value is None:
                continue
            if isinstance(value, Exception):
                self.stats.add(errors=1)
                continue
            try:
                header, whole = self._layout.parse_head(key, value)
                if whole is not None:
                    out[i] = whole
                else:
                    split.append((i, header, value))
            except ForeignChunk as exc:  # another release's value: not ours to delete
                self._count_foreign(exc)
            except CorruptChunk as exc:
                self._drop_corrupt(client, key, exc)
        if split:
            self._get_parts(client, keys, split, out)
        return out

    def _get_parts(self, client: Any, keys: Sequence[ChunkKey],
                   split: list[tuple[int, Header, bytes]], out: list[ChunkData | None]) -> None:
        """Second round trip: the parts of split chunks, copied once into one buffer.

        The writer's part size is the length of its head value, so instances with
        different ``max_value_bytes`` can share a prefix.
        """
        pipe = client.pipeline(transaction=False)
        counts = []
        for i, header, head in split:
            n = self._layout.num_parts(header, head)
            counts.append(n)
            for p in range(1, n + 1):
                pipe.get(self._layout.part(self._head(keys[i]), p))
        parts = iter(pipe.execute(raise_on_error=False))
        for (i, header, head), n in zip(split, counts):
            key, mine = keys[i], [next(parts) for _ in range(n)]
            if any(p is None or isinstance(p, Exception) for p in mine):
                # Evicted or expired under us (or a delete raced): a plain miss. An
                # orphan head would keep answering EXISTS, so it goes too.
                self._delete(client, [self._head(key)])
                continue
            try:
                out[i] = self._layout.join(key, header, head, mine)
            except CorruptChunk as exc:
                self._drop_corrupt(client, key, exc)

    def _drop_corrupt(self, client: Any, key: ChunkKey, exc: CorruptChunk) -> None:
        log.warning("redis tier: deleting corrupt chunk: %s", exc)
        self.stats.add(corrupt=1)
        self._delete(client, [self._head(key)])

    def _delete(self, client: Any, heads: list[bytes]) -> int:
        """UNLINK heads, then probe-and-unlink their parts ``_PROBE`` at a time."""
        pipe = client.pipeline(transaction=False)
        for head in heads:
            pipe.unlink(head)
            pipe.unlink(ValueLayout.part(head, 1))
        res = pipe.execute()
        n = sum(int(r) for r in res[0::2])
        todo = [(h, 2) for h, more in zip(heads, res[1::2]) if more]
        while todo:  # only split chunks get here
            pipe = client.pipeline(transaction=False)
            for head, first in todo:
                for p in range(first, first + _PROBE):
                    pipe.unlink(ValueLayout.part(head, p))
            res = pipe.execute()
            todo = [(h, f + _PROBE) for j, (h, f) in enumerate(todo)
                    if res[(j + 1) * _PROBE - 1]]
        return n

    def _memory_info(self, client: Any) -> tuple[int, int]:
        if self.cfg.cluster:
            infos = client.info("memory", target_nodes=self._redis.cluster.RedisCluster.PRIMARIES)
            infos = list(infos.values()) if "used_memory" not in infos else [infos]
        else:
            infos = [client.info("memory")]
        used = sum(int(i.get("used_memory", 0)) for i in infos)
        caps = [int(i.get("maxmemory", 0)) for i in infos]
        return used, (0 if 0 in caps else sum(caps))

    # -- connection -----------------------------------------------------------

    def _call(self, op: Callable[[Any], T], fallback: T) -> T:
        """Run ``op`` on the client; a failing server gives ``fallback`` and a backoff."""
        if time.monotonic() < self._retry_at:
            self.stats.add(errors=1)
            return fallback
        try:
            return op(self._connect())
        except self._down_errors as exc:
            log.warning("redis tier: %s unreachable (%s); retrying in %.1f s",
                        self.cfg.url, exc, self.cfg.reconnect_backoff_s)
            self._retry_at = time.monotonic() + self.cfg.reconnect_backoff_s
            self.stats.add(errors=1)
            if self.cfg.cluster:  # rediscover the nodes from scratch next time
                self.close()
        except self._redis.RedisError as exc:
            log.warning("redis tier: %s", exc)
            self.stats.add(errors=1)
        return fallback

    def _connect(self) -> Any:
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        r = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # No retries inside redis-py: a failed call is a miss now, and the backoff
        # above decides when to try again (redis-py's default retries would wait).
        common: dict[str, Any] = dict(socket_timeout=self.cfg.timeout_s,
                                      socket_connect_timeout=self.cfg.timeout_s,
                                      retry=Retry(NoBackoff(), 0))
        if not self.cfg.cluster:
            self._zero_copy = True
            return r.Redis.from_url(self.cfg.url, command_packer=RespPacker(), **common)
        # A cluster passes only known kwargs to its nodes; a connection class that
        # installs the packer gets through for plain TCP (TLS forces its own class).
        if urlparse(self.cfg.url).scheme == "redis":
            common["connection_class"] = packing_connection(r.Connection)
            self._zero_copy = True
        return r.cluster.RedisCluster.from_url(self.cfg.url, **common)

    def _concat(self, *buffers: bytes | memoryview) -> Any:
        """One Redis value made of several buffers; joined only without our packer."""
        return Concat(buffers) if self._zero_copy else b"".join(buffers)

    def _head(self, key: ChunkKey) -> bytes:
        return self._layout.head(key)
