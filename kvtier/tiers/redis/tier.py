"""Layer 3: the Redis tier: chunks in a Redis / Valkey server or cluster, shared.

Each chunk is stored as the codecs layer frames it (128-byte header, then the
payload) under ``<key_prefix><hex key>``, split into parts when it is larger
than ``max_value_bytes`` (:mod:`kvtier.tiers.redis.values`). Parts are
written before their head, so a reader that finds a head finds its parts.

Every batch is one pipeline (one round trip; more only for split chunks: their
parts, and on a cluster to order parts before heads across nodes). Values go
out without being joined into one buffer: a small RESP packer
(:mod:`kvtier.tiers.redis.resp`) sends the header and the caller's payload as
separate socket writes.

Orphans: parts are written with a short expiry (``orphan_part_ttl_s``), and
only once their head is written (a later round trip, after the heads on a
cluster too) is it lifted (``ttl_s`` 0) or set to ``ttl_s`` + a margin. So the
parts of a writer that died before its head expire even without ``ttl_s``; a
head whose parts are gone is a miss and is deleted by the reader that finds it.

Readers delete only what they verified bad twice. A split chunk that fails its
checks (two writers of one prefix can store different bytes, and a reader may
catch one's head with the other's parts) is read once more, with expiries: a
head that changed or parts that changed in between are a plain miss (or a hit
if now whole); parts still on their orphan expiry belong to a write in
progress: a plain miss. Only the same bytes failing again are deleted
(``corrupt``; a head whose parts are gone is deleted uncounted). A whole value
is written by one SET, so it is deleted on its first failure.

Failures: a connection error or timeout turns the batch into misses /
``False``, counts ``errors`` and starts a growing backoff
(:mod:`kvtier.tiers.redis.conn`: ``timeout_s`` bounds every socket wait,
``contains_timeout_s`` those of presence checks). A value of another kvtier
format version (a rolling upgrade sharing the server) is a miss counted
``foreign`` and left in place, logged once. ``OOM`` replies count ``dropped``.
With the cluster's integrity key (``mac``), values are written with a keyed
MAC (on the writer's thread) and a value read without a valid one is deleted
by the rules above and counted ``forged`` (left, it would block the real
chunk: writers skip present keys).
Nothing is raised to the caller. Payloads of hits may be read-only views of
the bytes redis-py returned (no copy).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Sequence, cast

from kvtier.codecs import ChunkData, ChunkMac, encode_header
from kvtier.codecs.format import Header
from kvtier.config import RedisConfig
from kvtier.errors import CorruptChunk, ForeignChunk, ForgedChunk
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.redis.conn import RedisConnection
from kvtier.tiers.redis.split import SplitChunks
from kvtier.tiers.redis.values import PART_TTL_MARGIN_S, ValueLayout
from kvtier.tiers.redis.resp import Concat

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'kvtier[redis]'"


def _import_redis() -> Any:
    try:
        import redis
        import redis.cluster  # noqa: F401  (RedisCluster, used when cfg.cluster)
    except ImportError as exc:
        raise ImportError(f"the redis tier needs redis-py: {INSTALL_HINT} ({exc})") from exc
    return redis


class RedisTier(Tier):
    """Chunks in Redis under ``cfg.key_prefix``; see the module docstring for the layout.
    Signed and verified with ``mac`` (the cluster's integrity key) when given."""

    name = "redis"

    def __init__(self, cfg: RedisConfig, mac: ChunkMac | None = None) -> None:
        super().__init__()
        self._redis = _import_redis()
        self.cfg = cfg
        self.mac = mac
        self._layout = ValueLayout(cfg.key_prefix.encode(), cfg.max_value_bytes, mac)
        self._ttl = cfg.ttl_s or None
        self._part_ttl = cfg.ttl_s + PART_TTL_MARGIN_S if cfg.ttl_s else None
        self._conn = RedisConnection(cfg, self._redis, self.stats)
        self._split = SplitChunks(self._layout, self.stats, self._count_forged)
        self._count = 0  # chunks stored minus deleted by this object (see usage)
        self._count_lock = threading.Lock()

    # -- Tier interface -------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """One pipeline of EXISTS on the head keys, bounded by ``contains_timeout_s``."""
        if not keys:
            return []
        return self._conn.call(lambda c: [bool(r) for r in self._exists(c, keys)],
                               [False] * len(keys), quick=True)

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        if not items:
            return []
        return self._conn.call(lambda c: self._put(c, items), [False] * len(items))

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        if not keys:
            return []
        out = self._conn.call(lambda c: self._get(c, keys), [None] * len(keys))
        hits = [c for c in out if c is not None]
        self.stats.add(hits=len(hits), misses=len(out) - len(hits),
                       get_bytes=sum(c.payload.nbytes for c in hits))
        return out

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        if not keys:
            return 0
        n = self._conn.call(lambda c: self._delete(c, [self._head(k) for k in keys]), 0)
        with self._count_lock:
            self._count = max(0, self._count - n)
        return n

    def usage(self) -> TierUsage:
        """``used_bytes`` / ``capacity_bytes``: the server's ``used_memory`` / ``maxmemory``
        from ``INFO memory`` (summed over cluster primaries; all keys, not only ours;
        capacity 0 = no limit set). ``num_chunks``: chunks this object stored minus
        those it deleted, a local estimate (other clients and expiry are not seen)."""
        info = self._conn.call(self._memory_info, None)
        used, cap = info if info is not None else (0, 0)
        return TierUsage(used, cap, self._count)

    def iter_keys(self) -> Iterator[ChunkKey]:
        """SCAN for head keys under the prefix (all primaries on a cluster); a snapshot."""
        pattern = self._layout.scan_pattern()

        def scan(client: Any) -> list[ChunkKey]:
            keys = (self._layout.key_of(name) for name in client.scan_iter(match=pattern,
                                                                            count=1000))
            return [k for k in keys if k is not None]
        return iter(self._conn.call(scan, []))

    def close(self) -> None:
        self._conn.close()

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
        kept = self._keep_parts(client, [[] if bad else [n for n, _, _ in w[1:]]
                                         for w, bad in zip(writes, failed)])
        failed = [a or b for a, b in zip(failed, kept)]
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

    def _keep_parts(self, client: Any, names: list[list[bytes]]) -> list[bool]:
        """Once their heads are written: lift the parts' orphan expiry (or set the chunk's);
        per group, whether it failed (a part already gone: a very slow write)."""
        if not any(names):
            return [False] * len(names)
        pipe = client.pipeline(transaction=False)
        for group in names:
            for name in group:
                if self._part_ttl:
                    pipe.expire(name, self._part_ttl)
                else:
                    pipe.persist(name)
        results, out, pos = pipe.execute(raise_on_error=False), [], 0
        for group in names:
            mine = results[pos:pos + len(group)]
            pos += len(group)
            if any(isinstance(r, Exception) for r in mine):
                self.stats.add(errors=1)
            out.append(not all(r is True or r == 1 for r in mine))  # 0: deleted meanwhile
        return out

    def _values(self, key: ChunkKey, chunk: ChunkData) -> list[tuple[bytes, Any, int | None]]:
        """(name, value, ttl) of the head, then of each part (on their orphan expiry until
        :meth:`_keep_parts`); values are not copied."""
        payload = memoryview(chunk.payload).cast("B")
        head = self._head(key)
        values = self._layout.split(encode_header(key, chunk.meta, payload, self.mac), payload)
        return [(head, self._concat(*values[0]), self._ttl)] + [
            (self._layout.part(head, i), self._concat(*v), self.cfg.orphan_part_ttl_s)
            for i, v in enumerate(values[1:], 1)]

    def _get(self, client: Any, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._head(key))
        values = pipe.execute(raise_on_error=False)
        out: list[ChunkData | None] = [None] * len(keys)
        split: list[tuple[int, Header, bytes]] = []
        signed: list[tuple[int, Header]] = []  # whole values whose MAC is still to check
        for i, (key, value) in enumerate(zip(keys, values)):
            if value is None:
                continue
            if isinstance(value, Exception):
                self.stats.add(errors=1)
                continue
            try:
                header, whole = self._layout.parse_head(key, value, check=self.mac is None)
                if whole is None:
                    split.append((i, header, value))
                elif self.mac is not None:
                    signed.append((i, header))
                out[i] = whole
            except ForeignChunk as exc:  # another release's value: not ours to delete
                self._count_foreign(exc)
            except CorruptChunk as exc:
                self._drop_bad(client, key, exc)
        if signed:  # half of them on the key's helper thread
            assert self.mac is not None
            why = self.mac.check_all([(keys[i], h, cast(ChunkData, out[i]).payload)
                                      for i, h in signed])
            for (i, _), exc in zip(signed, why):
                if exc is not None:
                    out[i] = None
                    self._drop_bad(client, keys[i], exc)
        if split:
            self._split.read(client, keys, split, out)
        return out

    def _drop_bad(self, client: Any, key: ChunkKey, exc: CorruptChunk) -> None:
        """A whole value that failed: one SET wrote it, so it is deleted on its first
        failure; counted ``forged`` (no valid MAC) or ``corrupt``."""
        if isinstance(exc, ForgedChunk):
            self._count_forged(exc)
        else:
            log.warning("redis tier: deleting corrupt chunk: %s", exc)
            self.stats.add(corrupt=1)
        self._delete(client, [self._head(key)])

    def _delete(self, client: Any, heads: list[bytes]) -> int:
        return self._split.delete(client, heads)

    def _memory_info(self, client: Any) -> tuple[int, int]:
        if self.cfg.cluster:
            infos = client.info("memory", target_nodes=self._redis.cluster.RedisCluster.PRIMARIES)
            infos = list(infos.values()) if "used_memory" not in infos else [infos]
        else:
            infos = [client.info("memory")]
        used = sum(int(i.get("used_memory", 0)) for i in infos)
        caps = [int(i.get("maxmemory", 0)) for i in infos]
        return used, (0 if 0 in caps else sum(caps))

    # -- helpers ------------------------------------------------------------

    def _concat(self, *buffers: bytes | memoryview) -> Any:
        """One Redis value made of several buffers; joined only without our packer."""
        return Concat(buffers) if self._conn.zero_copy else b"".join(buffers)

    def _head(self, key: ChunkKey) -> bytes:
        return self._layout.head(key)
