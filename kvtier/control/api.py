"""Layer 7: the management operations over cached KV, by prompt or by chunk key.

:class:`CacheAPI` turns validated requests (:mod:`kvtier.control.models`) into
the store's management operations (:mod:`kvtier.store.manage`): lookup,
admit, evict, move, clear, pin, unpin, compress, decompress, status. It knows
nothing of HTTP; input the models cannot check (a tier this store lacks, a
chunk that fails admission) raises ``ValueError`` naming the field, which the
server answers with a 400.
"""

from __future__ import annotations

from kvtier.codecs import Codec
from kvtier.control import models as m
from kvtier.control.admission import ChunkShape, admit_chunk, decode_b64
from kvtier.control.pins import PinLeases
from kvtier.engine.layout import PagedLayout
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store import ChunkStore, lookup_hit, manage

_CODECS = {m.Codec.ZSTD: Codec.ZSTD, m.Codec.LZ4: Codec.LZ4, m.Codec.ZLIB: Codec.ZLIB,
           m.Codec.Q8: Codec.Q8, m.Codec.Q4: Codec.Q4}
_LOSSY = {m.Codec.Q8, m.Codec.Q4}


class CacheAPI:
    """Management operations for one store whose chunks have ``layout``; prompts are
    hashed with ``hasher`` (the engine's own, so every key input it folds in applies)."""

    def __init__(self, store: ChunkStore, hasher: ChunkHasher, layout: PagedLayout) -> None:
        self.store = store
        self.hasher = hasher
        self.layout = layout
        self.pins = PinLeases(store.memory)
        self.chunk_bytes = layout.chunk_nbytes(hasher.chunk_size // layout.block_size)

    def close(self) -> None:
        """Stop background work (the pin expiry thread)."""
        self.pins.close()

    # -- addressing -----------------------------------------------------------

    def keys(self, req: m.Chunks) -> list[ChunkKey]:
        """Keys named by ``keys`` or by ``tokens`` (+ ``salt``)."""
        if req.keys is not None:
            return [ChunkKey(bytes.fromhex(k)) for k in req.keys]
        assert req.tokens is not None
        return self._hasher(req.salt).keys(req.tokens)

    def _hasher(self, salt: str | None) -> ChunkHasher:
        return self.hasher.with_salt(salt) if salt else self.hasher

    def _tier(self, field: str, name: str | None) -> str | None:
        if name is None:
            return None
        names = [t.name for t in self.store.tiers]
        if name not in names:
            raise ValueError(f"{field}: unknown tier {name!r} (have: {', '.join(names)})")
        return name

    # -- operations -------------------------------------------------------------

    def lookup(self, req: m.Chunks) -> m.LookupResult:
        """How much of a prompt is cached, and where each chunk lives.

        By ``tokens``, ``hit_tokens`` is what a load would give the engine: the
        whole stored chunks, then (with ``store_partial_chunks``) the longest
        stored head of the next chunk, whose key is the last of ``hit_keys``.
        """
        keys = self.keys(req)
        where = manage.locate(self.store, keys)
        hex_keys = [k.hex() for k in keys]
        if req.tokens is None:
            return m.LookupResult(chunks=len(keys), keys=hex_keys, tiers=where,
                                  hit_chunks=self.store.lookup(keys), hit_tokens=None)
        found = lookup_hit(self.store.tiers, self._hasher(req.salt), req.tokens, keys)
        return m.LookupResult(chunks=len(keys), keys=hex_keys, tiers=where,
                              hit_chunks=found.chunks, hit_tokens=found.tokens,
                              hit_keys=[k.hex() for k in found.keys])

    def evict(self, req: m.InTier) -> m.Removed:
        """Remove chunks from one tier (``tier``) or all; pinned chunks stay."""
        tier = self._tier("tier", req.tier)
        return m.Removed(removed=manage.evict(self.store, self.keys(req), tier))

    def move(self, req: m.MoveRequest) -> m.Moved:
        """Move chunks from tier ``from`` to tier ``to``."""
        src, dst = self._tier("from", req.from_), self._tier("to", req.to)
        assert src is not None and dst is not None
        if src == dst:
            raise ValueError("to: the same tier as 'from'")
        moved = manage.move(self.store, self.keys(req), src, dst)
        self.pins.prune()
        return m.Moved(moved=moved)

    def clear(self, req: m.ClearRequest) -> m.Removed:
        """Delete everything in one tier (``tier``) or in all, pinned chunks too."""
        removed = manage.clear(self.store, self._tier("tier", req.tier))
        self.pins.prune()
        return m.Removed(removed=removed)

    def resume(self, req: m.ResumeRequest) -> m.Resumed:
        """Put a tier the canary took out of service (``tier``, or every one) back in
        service: the store reads it again, lookups count it again."""
        service = self.store.service
        names = [self._tier("tier", req.tier)] if req.tier else service.out_of_service
        return m.Resumed(resumed=[n for n in names if n is not None and service.resume(n)])

    def pin(self, req: m.PinRequest) -> m.Pinned:
        """Protect memory-tier chunks from eviction, for ever or for ``ttl_s``."""
        return m.Pinned(pinned=self.pins.pin(self.keys(req), req.ttl_s), expires_in_s=req.ttl_s)

    def unpin(self, req: m.Chunks) -> m.Unpinned:
        """Release one pin this API took per key (a load's own pins are never touched)."""
        return m.Unpinned(unpinned=self.pins.unpin(self.keys(req)))

    def compress(self, req: m.CompressRequest) -> m.Recoded:
        """Re-encode chunks of ``tier`` with a codec (reads decode them); a lossy one
        only with ``lossy: true``."""
        if req.codec in _LOSSY and not req.lossy:
            raise ValueError(f"codec: {req.codec.value} is lossy (hits then differ from the "
                             f"engine's own KV); send lossy: true to accept that")
        return self._recode(req, _CODECS[req.codec])

    def decompress(self, req: m.RecodeRequest) -> m.Recoded:
        """Store chunks of ``tier`` raw again."""
        return self._recode(req, Codec.RAW)

    def _recode(self, req: m.RecodeRequest, codec: Codec) -> m.Recoded:
        tier = self._tier("tier", req.tier)
        assert tier is not None
        keys = self.keys(req)
        try:
            recoded = manage.recode(self.store, keys, tier, codec)
        except ImportError as exc:  # the codec's package is not installed
            raise ValueError(f"codec: {codec.name.lower()} needs kvtier[codecs] ({exc})") from None
        if self.store.memory is not None and tier == self.store.memory.name:
            self.pins.reapply(keys)  # a re-encoded chunk is a new memory entry, unpinned
        return m.Recoded(recoded=recoded)

    def admit(self, req: m.AdmitRequest) -> m.Admitted:
        """Store chunks of a prompt computed elsewhere, each checked against this
        instance's keys and layout first (:mod:`kvtier.control.admission`).
        All or nothing: one refused chunk stores none."""
        tier = self._tier("tier", req.tier)
        keys = self._hasher(req.salt).keys(req.tokens)
        items, seen = [], set()
        for i, c in enumerate(req.chunks):
            field = f"chunks[{i}]"
            if c.index >= len(keys):
                raise ValueError(f"{field}.index: the prompt has {len(keys)} chunks")
            if c.index in seen:
                raise ValueError(f"{field}.index: chunk {c.index} given twice")
            seen.add(c.index)
            blob = decode_b64(f"{field}.data", c.data, self.chunk_bytes + 128)
            want = ChunkShape.expected(self.layout, self.hasher, c.index, len(req.tokens))
            items.append((keys[c.index], admit_chunk(f"{field}.data", keys[c.index], blob, want,
                                                     lossy_ok=req.lossy)))
        return m.Admitted(admitted=manage.admit(self.store, items, tier))

    def snapshot(self) -> m.Snapshot:
        """Every key each tier holds now (shared tiers: other instances' chunks too)."""
        return m.Snapshot(**manage.snapshot(self.store, self.hasher))

    def status(self) -> m.Status:
        """Usage and counters of every tier."""
        queues = {w.tier.name: w.pending for w in self.store.writers}
        tiers = {}
        for t in self.store.tiers:
            u = t.usage()
            tiers[t.name] = m.TierStatus(used_bytes=u.used_bytes, capacity_bytes=u.capacity_bytes,
                                         num_chunks=u.num_chunks, write_queue=queues.get(t.name),
                                         **t.stats.as_dict())
        service = self.store.service
        return m.Status(namespace=self.hasher.namespace.layout, chunk_size=self.hasher.chunk_size,
                        pinned_chunks=self.pins.count(), tiers=tiers,
                        out_of_service=service.out_of_service, verify_checks=service.checks,
                        verify_mismatches=dict(service.mismatches))
