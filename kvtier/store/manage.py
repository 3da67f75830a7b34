"""Layer 4: management operations over a :class:`ChunkStore`.

The operations of the paper's management API, by chunk key: locate, admit,
evict, move, clear, pin, unpin, compress, decompress, and the snapshot of every
key held (the management API's and the controller's resyncs). Token-level forms
(lookup by prompt) live in the control layer, which owns the hashing.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvtier.codecs import ChunkData, Codec, compress, decompress
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store.hierarchy import ChunkStore


def locate(store: ChunkStore, keys: Sequence[ChunkKey]) -> dict[str, list[bool]]:
    """For each tier, which keys it holds."""
    return {t.name: t.contains_many(keys) for t in store.tiers}


def admit(store: ChunkStore, items: Sequence[tuple[ChunkKey, ChunkData]],
          tier: str | None = None) -> int:
    """Store chunks given by the caller into one tier (synchronously) or the
    hierarchy (memory now, lower tiers in the background); returns chunks held.
    Chunks in a lossy codec opt this instance in to it (the caller checked consent)."""
    store.lossy_ok.update(c.meta.codec for _, c in items if c.meta.codec.lossy)
    if tier is None:
        store.put_many(items)
        return sum(store.memory.contains_many([k for k, _ in items])) if store.memory \
            else len(items)
    target = store.tier(tier)
    stored = target.put_many(items)
    return sum(stored)


def snapshot(store: ChunkStore, hasher: ChunkHasher) -> dict[str, Any]:
    """Every key each tier holds now (shared tiers: other instances' chunks too), hex,
    with the namespace's layout and chunk size they are keyed under."""
    return {"namespace": hasher.namespace.layout, "chunk_size": hasher.chunk_size,
            "tiers": {t.name: [k.hex() for k in t.iter_keys()] for t in store.tiers}}


def evict(store: ChunkStore, keys: Sequence[ChunkKey], tier: str | None = None) -> int:
    """Remove keys from one tier or all; pinned memory chunks stay. Returns copies removed."""
    if store.memory is not None and tier in (None, store.memory.name):
        keys = [k for k in keys if not store.memory.is_pinned(k)]
    return store.delete(keys, tier)


def move(store: ChunkStore, keys: Sequence[ChunkKey], src: str, dst: str) -> int:
    """Copy keys from tier ``src`` to ``dst``, then delete them from ``src``."""
    source, target = store.tier(src), store.tier(dst)
    chunks = source.get_many(keys)
    try:
        items = [(k, c) for k, c in zip(keys, chunks) if c is not None]
        stored = target.put_many(items)
        done = [k for (k, _), ok in zip(items, stored) if ok]
    finally:
        for c in chunks:
            if c is not None:
                c.release()
    source.delete_many(done)
    return len(done)


def clear(store: ChunkStore, tier: str | None = None) -> int:
    """Delete every chunk of one tier or of all (a barrier: :meth:`ChunkStore.clear`);
    returns how many were deleted."""
    return store.clear(tier)


def pin(store: ChunkStore, keys: Sequence[ChunkKey]) -> int:
    """Protect memory-tier chunks from eviction; returns how many were found."""
    return sum(store.memory.pin_many(keys)) if store.memory is not None else 0


def unpin(store: ChunkStore, keys: Sequence[ChunkKey]) -> None:
    """Undo :func:`pin`."""
    if store.memory is not None:
        store.memory.unpin_many(keys)


def recode(store: ChunkStore, keys: Sequence[ChunkKey], tier: str, codec: Codec) -> int:
    """Re-encode chunks of one tier with ``codec`` (RAW = decompress).

    Lossless unless ``codec`` is lossy (Q8, Q4): then the tier serves the
    quantized values from now on. A chunk that does not decode is skipped and
    counted ``corrupt``. Raises ValueError when a lossy codec cannot encode the
    chunks' layout (nothing is rewritten then). Returns how many chunks were
    rewritten. Reads decode any codec transparently (see ChunkStore.get_many); a
    lossy one opts this instance in to it (other instances sharing the tier refuse it).
    """
    if codec.lossy:
        store.lossy_ok.add(codec)
    t = store.tier(tier)
    chunks = t.get_many(keys)
    items = []
    try:
        for key, chunk in zip(keys, chunks):
            if chunk is None or chunk.meta.codec is codec:
                continue
            try:
                raw = decompress(chunk)
            except CorruptChunk:
                t.stats.add(corrupt=1)
                continue
            new = raw if codec is Codec.RAW else compress(raw, codec)
            if new is chunk:  # decompress returned the tier's own buffer: copy it out
                new = ChunkData(chunk.meta, chunk.payload.copy())
            items.append((key, new))
    finally:
        for c in chunks:
            if c is not None:
                c.release()
    t.delete_many([k for k, _ in items])
    stored = t.put_many(items)
    return sum(stored)

