"""Layer 4: the hierarchy of tiers (memory first, then disk, then Redis).

- lookup: the longest run of keys present from the start, across tiers,
  asking fastest first and only for what the faster tiers lack.
- get: memory first; lower hits are promoted into memory so later reads are
  fast and a request's chunks land in consecutive memory slots.
- put: into memory at once; to lower tiers by background writers
  (write-through), or only when memory evicts them (write-back).
- Each chunk is written to a tier at most once (writers skip present keys).
- codecs: each lower tier writes with its own codec (encoded on the writer
  thread); reads decode whatever codec a chunk's header names, bounded by the
  size of a memory slot, so a chunk that does not decode is a counted,
  deleted miss, never an exception or a large allocation.
- clear: a barrier (:mod:`kvtier.store.epoch`): a write queued, a promotion
  read or a save gathered before it never lands after it.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from dataclasses import dataclass
from typing import Sequence

from kvtier.codecs import ChunkData, ChunkMeta, Codec, check_codec, decompress
from kvtier.config import WritePolicy
from kvtier.errors import ConfigError, CorruptChunk, ForeignChunk
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store.epoch import EpochGate
from kvtier.store.events import EventLog, StoreEvents
from kvtier.store.latency import LatencyHistogram
from kvtier.store.service import TierService
from kvtier.store.writer import BackgroundWriter
from kvtier.tiers.base import HasContains, Tier, lookup_first, lookup_prefix
from kvtier.tiers.memory import MemoryTier, Slot

log = logging.getLogger(__name__)


class ChunkStore:
    """Tiers in order, fastest first; ``tiers[0]`` may be a :class:`MemoryTier`."""

    def __init__(self, tiers: Sequence[Tier], write_policy: WritePolicy = WritePolicy.WRITE_THROUGH,
                 queue_sizes: Sequence[int] | None = None, track_events: bool = False,
                 codecs: Sequence[Codec] | None = None, clear_wait_s: float = 10.0) -> None:
        if not tiers:
            raise ValueError("a ChunkStore needs at least one tier")
        self.tiers = list(tiers)
        self.memory = tiers[0] if isinstance(tiers[0], MemoryTier) else None
        self.lower = self.tiers[1:] if self.memory else self.tiers
        self.write_policy = write_policy
        sizes = list(queue_sizes or [256] * len(self.lower))
        self.codecs = list(codecs or [Codec.RAW] * len(self.lower))
        self.lossy_ok: set[Codec] = {c for c in self.codecs if c.lossy}
        """Lossy codecs this instance opted in to (configured, or applied by an operator
        with ``lossy: true``); a chunk in any other lossy codec is refused, a miss
        counted ``foreign``: lossy KV reaches only an instance that asked for it."""
        # No decoded chunk may be larger than a memory slot (the engine's chunk).
        self.max_decoded_bytes = self.memory.arena.slot_bytes if self.memory else None
        self.latency = {"load": LatencyHistogram(), "store": LatencyHistogram()}
        """Seconds an engine spent per batch loaded / stored (fed by the cache engine)."""
        self.gate = EpochGate(clear_wait_s)
        """The store's epoch: what started before a :meth:`clear` never lands after it."""
        self.service = TierService()  # tiers the canary took out of service are not read
        self._events = EventLog() if track_events else None
        self._tier_events = {t.name: EventLog() for t in self.lower} if track_events else {}
        self.writers = [BackgroundWriter(t, q, codec=c, on_written=self._tier_events[t.name].stored
                                         if track_events else None, gate=self.gate)
                        for t, q, c in zip(self.lower, sizes, self.codecs) if not t.read_only]
        if self.memory is not None:
            self.memory.on_evict = self._on_memory_evict
            if self._events is not None:
                self.memory.on_change = self._events.record
        # Queued background writes are daemon-thread work: give them a bounded
        # chance to land when the interpreter exits without close().
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s.flush(timeout_s=30.0))

    # -- lookup ---------------------------------------------------------------

    def lookup(self, keys: Sequence[ChunkKey]) -> int:
        """Number of leading keys present in some tier. No payload moves."""
        return lookup_prefix([t for t in self.tiers if self.service.readable(t.name)], keys)

    # -- reads ----------------------------------------------------------------

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Chunks for the keys (None = miss). Release every returned chunk."""
        found: list[ChunkData | None] = [None] * len(keys)
        epoch = self.gate.epoch  # a chunk read before a clear is not promoted after it
        if self.memory is not None and self.service.readable(self.memory.name):
            # raw, unless the management API compressed it
            found = [None if c is None else self._raw(self.memory, k, c)
                     for k, c in zip(keys, self.memory.get_many(keys))]
        for tier in self.lower:
            if not self.service.readable(tier.name):
                continue
            missing = [i for i, c in enumerate(found) if c is None]
            if not missing:
                break
            got = tier.get_many([keys[i] for i in missing])
            raw = [(i, self._raw(tier, keys[i], c)) for i, c in zip(missing, got) if c is not None]
            hits = [(i, c) for i, c in raw if c is not None]
            if hits and self.memory is not None:
                hits = self._promote([keys[i] for i, _ in hits], hits, epoch)
            for i, chunk in hits:
                found[i] = chunk
        return found

    def read_each(self, key: ChunkKey) -> list[tuple[Tier, Codec, ChunkData]]:
        """``key`` as each tier in service holds it (tier, stored codec, decoded to raw),
        each read on its own, nothing promoted: the canary compares every copy.
        Read-only tiers (peers) are skipped. Release every chunk."""
        out = []
        for tier in self.tiers:
            if tier.read_only or not self.service.readable(tier.name) \
                    or not tier.contains_many([key])[0]:
                continue
            (chunk,) = tier.get_many([key])
            codec = chunk.meta.codec if chunk is not None else Codec.RAW
            raw = self._raw(tier, key, chunk) if chunk is not None else None
            if raw is not None:
                out.append((tier, codec, raw))
        return out

    def _raw(self, tier: Tier, key: ChunkKey, chunk: ChunkData) -> ChunkData | None:
        """The chunk decoded to RAW (a private copy; the tier's buffer is released),
        or None when it does not decode: counted ``corrupt`` and deleted from the tier."""
        if chunk.meta.codec is Codec.RAW:
            return chunk
        if chunk.meta.codec.lossy and chunk.meta.codec not in self.lossy_ok:
            chunk.release()
            tier._count_foreign(ForeignChunk(
                f"chunk {key.hex()} is {chunk.meta.codec.name.lower()}-encoded (lossy) and "
                "this instance did not opt in to that codec"))
            return None
        try:
            bound = self.max_decoded_bytes
            if bound is not None and chunk.meta.raw_nbytes > bound:
                raise CorruptChunk(f"decodes to {chunk.meta.raw_nbytes} bytes, a chunk "
                                   f"here is at most {bound}")
            return decompress(chunk)
        except CorruptChunk as exc:
            log.warning("kvtier: %s chunk %s does not decode (%s); deleted, a miss",
                        tier.name, key.hex(), exc)
            tier.stats.add(corrupt=1)
            tier.delete_many([key])
            return None
        except ImportError as exc:  # written by a process that had the codec's package
            log.warning("kvtier: %s chunk %s: %s; a miss", tier.name, key.hex(), exc)
            tier.stats.add(errors=1)
            return None
        finally:
            chunk.release()

    def _promote(self, keys: list[ChunkKey], hits: list[tuple[int, ChunkData]], epoch: int
                 ) -> list[tuple[int, ChunkData]]:
        """Copy lower-tier hits into memory; hand out the memory copies where that worked.
        Hits read in an ``epoch`` a clear has closed stay out of memory."""
        assert self.memory is not None
        with self.gate.publish(epoch) as ok:
            if not ok:
                return hits
            self.memory.put_many([(k, c) for k, (_, c) in zip(keys, hits)])
            promoted = self.memory.refs_many(keys)
        out = []
        for (i, lower_chunk), mem_chunk in zip(hits, promoted):
            if mem_chunk is not None:
                lower_chunk.release()
                out.append((i, mem_chunk))
            else:
                out.append((i, lower_chunk))
        return out

    # -- writes ---------------------------------------------------------------

    def check_codecs(self, meta: ChunkMeta) -> None:
        """Raise ConfigError (naming ``<tier>.codec``) if a tier's codec cannot encode
        the engine's chunks, described by ``meta``; for the engine to call at start-up."""
        for tier, codec in zip(self.lower, self.codecs):
            try:
                check_codec(codec, meta)
            except ValueError as exc:
                raise ConfigError(f"{tier.name}.codec", str(exc)) from None

    def reserve(self, n: int) -> list[Slot] | None:
        """Memory slots to gather ``n`` chunks into (None: no memory tier or no room)."""
        return self.memory.reserve(n) if self.memory is not None else None

    def commit(self, keys: Sequence[ChunkKey], slots: Sequence[Slot],
               metas: Sequence[ChunkMeta], epoch: int | None = None) -> bool:
        """Publish gathered slots; they then flow to the lower tiers in the background.

        ``epoch``: the store's epoch when the gather began (:attr:`gate`); if a clear
        came since, the slots are given back instead (the chunks predate it). Returns
        whether they were published."""
        assert self.memory is not None, "commit needs a memory tier"
        epoch = self.gate.epoch if epoch is None else epoch
        with self.gate.publish(epoch) as ok:
            if not ok:
                self.memory.abort(slots)
                return False
            self.memory.commit([(k, s, m, m.raw_nbytes) for k, s, m in zip(keys, slots, metas)])
            refs = [self.memory.refs_many(keys) for _ in self.writers
                    if self.write_policy is WritePolicy.WRITE_THROUGH]  # one per writer
        for writer, chunks in zip(self.writers, refs):
            writer.submit([(k, c) for k, c in zip(keys, chunks) if c is not None], epoch)
        return True

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> int:
        """Store chunks the caller owns (copied; the caller keeps its references).

        Chunks the memory tier cannot take (full of pinned chunks, or a batch
        larger than the tier) go to the lower tiers even with ``write_back``:
        a chunk is never reported stored unless a tier holds or will hold it.
        Returns how many chunks memory holds or a background writer took.
        """
        keys = [k for k, _ in items]
        epoch = self.gate.epoch
        with self.gate.publish(epoch) as ok:
            if not ok:  # a clear is running: nothing lands until it is done
                return 0
            held = self.memory.put_many(items) if self.memory is not None \
                else [False] * len(keys)
        queued = [False] * len(keys)
        for writer in self.writers:
            refs = self.memory.refs_many(keys) if self.memory is not None else [None] * len(keys)
            batch, where = [], []
            for j, ((key, chunk), ref) in enumerate(zip(items, refs)):
                if ref is not None and self.write_policy is WritePolicy.WRITE_BACK:
                    ref.release()  # memory holds it; it goes down when memory evicts it
                    continue
                if ref is not None:
                    batch.append((key, ref))  # a reference on the memory slot: no copy
                else:  # not in memory: the writer gets a private copy
                    batch.append((key, ChunkData(chunk.meta, chunk.payload.copy())))
                where.append(j)
            if writer.submit(batch, epoch):
                for j in where:
                    queued[j] = True
        return sum(h or q for h, q in zip(held, queued))

    def _on_memory_evict(self, evicted: list[tuple[ChunkKey, ChunkData]]) -> None:
        if self.write_policy is WritePolicy.WRITE_BACK and self.writers:
            # The slot is reused right after this hook: demote a private copy.
            self.writers[0].submit([(k, ChunkData(c.meta, c.payload.copy())) for k, c in evicted])

    # -- management -----------------------------------------------------------

    def tier(self, name: str) -> Tier:
        """The tier called ``name``; KeyError naming the known ones otherwise."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier {name!r} (have: {', '.join(t.name for t in self.tiers)})")

    def delete(self, keys: Sequence[ChunkKey], tier: str | None = None) -> int:
        """Remove keys from one tier or all; returns how many copies were removed."""
        tiers = [self.tier(tier)] if tier else self.tiers
        for t in tiers:
            if t.name in self._tier_events:
                self._tier_events[t.name].record((), keys)
        return sum(t.delete_many(keys) for t in tiers)

    def clear(self, tier: str | None = None) -> int:
        """Delete every chunk of one tier, or of every tier this store writes (a
        read-only tier, the peer tier, is never cleared); returns how many.

        A barrier (:mod:`kvtier.store.epoch`), whichever tiers it clears: a write
        still queued is dropped, a chunk read from a lower tier is not promoted, a
        save gathered before it is not committed, and writes in progress are waited
        for (bounded) before anything is deleted. What that drops outside the cleared
        tier is only a later miss. Each process clears its own store; clearing a
        shared tier twice (TP ranks, the scheduler) is harmless."""
        tiers = [self.tier(tier)] if tier else self.tiers
        with self.gate.barrier() as drained:
            if not drained:
                log.warning("kvtier: clear: a write still running after %.0f s; what it "
                            "writes is deleted when it returns", self.gate.wait_s)
            return sum(self.delete(list(t.iter_keys()), t.name)
                       for t in tiers if not t.read_only)

    def drain_events(self) -> StoreEvents:
        """Memory-tier keys stored and evicted since the last call (for a remote index).

        Fed by the memory tier itself, so every path that changes it (stores,
        promotions, evictions, management operations) is reported."""
        if self._events is None:
            return StoreEvents()
        events = self._events.drain()
        events.tiers = {"memory": (events.stored, events.evicted)} if self.memory else {}
        for name, log_ in self._tier_events.items():
            lower = log_.drain()
            events.tiers[name] = (lower.stored, lower.evicted)
        return events

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait for background writes; False if some did not finish in time."""
        return all(w.flush(timeout_s) for w in self.writers)

    def close(self) -> None:
        """Finish pending writes (bounded) and close every tier."""
        for writer in self.writers:
            writer.close()
        for tier in self.tiers:
            tier.close()


@dataclass(frozen=True)
class PrefixHit:
    """The stored prefix of a prompt: the keys to read and the tokens they cover.

    ``keys[:chunks]`` are the prompt's own whole chunks; a key after them is
    the stored head of the next chunk (another prompt's partial last chunk).
    """

    keys: list[ChunkKey]
    tokens: int
    chunks: int


def lookup_hit(sources: Sequence[HasContains], hasher: ChunkHasher, token_ids: Sequence[int],
               keys: Sequence[ChunkKey] | None = None) -> PrefixHit:
    """Longest stored prefix of ``token_ids``: whole chunks, then (with partial chunks
    on) the longest stored head of the first chunk that missed, in whole granules.

    A head is found when another prompt stored it as its partial last chunk: a
    document asked a different question shares the document's blocks of the
    chunk where the two prompts part.
    """
    keys = hasher.keys(token_ids) if keys is None else keys
    cs, g, n = hasher.chunk_size, hasher.granule, len(token_ids)
    h = lookup_prefix(sources, keys)
    hit = PrefixHit(list(keys[:h]), min(h * cs, hasher.covered(n)), h)
    if not hasher.store_partial or h == len(keys):
        return hit
    # keys[h] (all of chunk h that the prompt has, in whole granules) missed: its
    # shorter heads, longest first, asked of each source in one presence call.
    heads = range(hasher.chunk_tokens(h, n) - g, 0, -g)
    subs = [hasher.sub_key(keys, token_ids, h, t) for t in heads]
    i = lookup_first(sources, subs)
    if i < len(subs):
        return PrefixHit(hit.keys + [subs[i]], h * cs + heads[i], h)
    return hit
