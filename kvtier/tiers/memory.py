"""Layer 3: the memory tier: one pooled buffer, LRU, pins and reference counts.

The buffer is allocated once and cut into equal slots of one chunk each, so
the hot path never allocates. The engine gathers KV straight into reserved
slots (:meth:`MemoryTier.reserve` / :meth:`MemoryTier.commit`), so a store
into memory is a single copy out of the engine's paged KV. A request's chunks
get consecutive slots when possible, so the engine can move them with one
tensor operation per layer.

Invariants: bytes used never exceed ``max_bytes``; a pinned chunk is never
evicted; a chunk being read (``refs > 0``) is never freed or its slot reused;
a reservation that cannot be met after evicting what may be evicted fails at
once instead of waiting.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.prefault import PREFAULT_AHEAD, Prefaulter

_ALIGN = 64  # keeps slot stride == chunk size for real layouts (see engine.transfer)


class SlabArena:
    """``num_slots`` slots of ``slot_bytes`` in one buffer allocated up front; its pages
    mapped at once (``map_at_start``) or ahead of the slots in use (:class:`Prefaulter`)."""

    def __init__(self, slot_bytes: int, num_slots: int, map_at_start: bool = False) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.num_slots = num_slots
        self.buffer = np.empty(self.slot_bytes * num_slots, dtype=np.uint8)
        self._free = np.ones(num_slots, dtype=bool)
        self.prefault = Prefaulter(self.buffer, None if map_at_start else PREFAULT_AHEAD)

    @property
    def num_free(self) -> int:
        """Slots not allocated."""
        return int(self._free.sum())

    def alloc(self, n: int) -> list[int] | None:
        """``n`` free slots, consecutive if such a run exists; None if fewer are free."""
        if n > self.num_free:
            return None
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.diff(padded)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        fits = np.flatnonzero(ends - starts >= n)
        if fits.size:
            slots = np.arange(starts[fits[0]], starts[fits[0]] + n)
        else:
            slots = np.flatnonzero(self._free)[:n]
        self._free[slots] = False
        self.prefault.need(int(slots[-1] + 1) * self.slot_bytes)
        return slots.tolist()

    def release(self, slots: Sequence[int]) -> None:
        """Return slots to the free pool."""
        self._free[list(slots)] = True

    def view(self, slot: int, nbytes: int | None = None) -> np.ndarray:
        """Writable uint8 view of a slot (its first ``nbytes``)."""
        start = slot * self.slot_bytes
        return self.buffer[start:start + (self.slot_bytes if nbytes is None else nbytes)]


@dataclass
class _Entry:
    slot: int
    meta: ChunkMeta
    nbytes: int
    refs: int = 0
    pins: int = 0
    dead: bool = False


@dataclass(frozen=True)
class Slot:
    """A reserved, not yet committed slot; fill ``buffer`` then commit it."""

    index: int
    buffer: np.ndarray


EvictHook = Callable[[list[tuple[ChunkKey, ChunkData]]], None]
ChangeHook = Callable[[list[ChunkKey], list[ChunkKey]], None]


class MemoryTier(Tier):
    """Chunks in this process's memory, bounded by ``max_bytes``, evicted LRU."""

    name = "memory"

    def __init__(self, max_bytes: int, slot_bytes: int, map_at_start: bool = False) -> None:
        super().__init__()
        num_slots = max_bytes // max(1, -(-slot_bytes // _ALIGN) * _ALIGN)
        self.arena = SlabArena(slot_bytes, num_slots, map_at_start)
        self.pinned = False
        """Whether the arena is page-locked for an accelerator's copies (set by the engine)."""
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ChunkKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.on_evict: EvictHook | None = None
        """Called (outside the lock) with the chunks just evicted; their payloads are
        valid only during the call. Lets the store demote them."""
        self.on_change: ChangeHook | None = None
        """Called (outside the lock) with (keys added, keys removed) after every change,
        whatever caused it (a store, a promotion, an eviction, a delete, a clear): the
        one place another process's view of this tier (the scheduler's index) is fed."""

    # -- zero-copy path -------------------------------------------------------

    def reserve(self, n: int) -> list[Slot] | None:
        """``n`` writable slots (evicting LRU chunks if needed), or None if impossible."""
        evicted: list[tuple[ChunkKey, ChunkData]] = []
        with self._lock:
            if n > self.arena.num_slots or not self._evict_locked(n, evicted):
                return None
        self._after_evict(evicted)
        with self._lock:
            slots = self.arena.alloc(n)
        if slots is None:  # another thread took the space meanwhile
            return None
        return [Slot(i, self.arena.view(i)) for i in slots]

    def commit(self, items: Sequence[tuple[ChunkKey, Slot, ChunkMeta, int]]) -> None:
        """Publish filled slots under their keys. A key already present keeps its
        old copy and the new slot is freed (each chunk is stored once)."""
        added = []
        with self._lock:
            for key, slot, meta, nbytes in items:
                if key in self._entries:
                    self.arena.release([slot.index])
                    continue
                self._entries[key] = _Entry(slot.index, meta, nbytes)
                added.append(key)
                self.stats.add(puts=1, put_bytes=nbytes)
        self._changed(added, [])

    def abort(self, slots: Sequence[Slot]) -> None:
        """Give back reserved slots that will not be committed."""
        with self._lock:
            self.arena.release([s.index for s in slots])

    # -- Tier interface -------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        with self._lock:
            todo = [(k, c) for k, c in items if k not in self._entries]
        fits = [(k, c) for k, c in todo if c.payload.nbytes <= self.arena.slot_bytes]
        # A batch larger than the whole tier keeps its first chunks: prefixes matter.
        fits = fits[:self.arena.num_slots]
        self.stats.add(dropped=len(todo) - len(fits))
        slots = self.reserve(len(fits)) if fits else []
        if slots is None:
            self.stats.add(dropped=len(fits))
            return self.contains_many([k for k, _ in items])
        for (_, chunk), slot in zip(fits, slots):
            slot.buffer[:chunk.payload.nbytes] = chunk.payload.reshape(-1).view(np.uint8)
        self.commit([(k, s, c.meta, c.payload.nbytes) for (k, c), s in zip(fits, slots)])
        return self.contains_many([k for k, _ in items])

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        out = self.refs_many(keys)
        hits = sum(c is not None for c in out)
        self.stats.add(hits=hits, misses=len(out) - hits,
                       get_bytes=sum(c.payload.nbytes for c in out if c is not None))
        return out

    def refs_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Like :meth:`get_many` (references to release), but not counted as reads:
        the store hands these to its background writers."""
        out: list[ChunkData | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    out.append(None)
                    continue
                self._entries.move_to_end(key)
                entry.refs += 1
                view = self.arena.view(entry.slot, entry.nbytes)
                out.append(ChunkData(entry.meta, view, _Unref(self, entry)))
        return out

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        removed = []
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    removed.append(key)
                    self._drop_locked(entry)
        self._changed([], removed)
        return len(removed)

    def usage(self) -> TierUsage:
        with self._lock:
            used = self.arena.slot_bytes * (self.arena.num_slots - self.arena.num_free)
            return TierUsage(used, self.arena.slot_bytes * self.arena.num_slots,
                             len(self._entries))

    def iter_keys(self) -> Iterator[ChunkKey]:
        with self._lock:
            keys = list(self._entries)
        return iter(keys)

    # -- pins -----------------------------------------------------------------

    def pin_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Protect chunks from eviction (counted: pin twice, unpin twice)."""
        with self._lock:
            out = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                out.append(entry is not None)
            return out

    def unpin_many(self, keys: Sequence[ChunkKey]) -> None:
        """Undo one :meth:`pin_many` per key; unknown or unpinned keys are ignored."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1

    def is_pinned(self, key: ChunkKey) -> bool:
        """Whether the chunk is present and pinned."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.pins > 0

    # -- internals ------------------------------------------------------------

    def _evict_locked(self, n: int, evicted: list[tuple[ChunkKey, ChunkData]]) -> bool:
        """Evict LRU chunks until ``n`` slots are free; evict nothing if that is impossible.

        Victims are handed out still referenced, so the eviction hook can read
        them; :meth:`_after_evict` drops those references, freeing the slots.
        """
        need = n - self.arena.num_free
        if need <= 0:
            return True
        victims = [k for k, e in self._entries.items() if e.pins == 0 and e.refs == 0]
        if len(victims) < need:
            return False
        for key in victims[:need]:
            entry = self._entries.pop(key)
            entry.refs += 1
            entry.dead = True
            view = self.arena.view(entry.slot, entry.nbytes)
            evicted.append((key, ChunkData(entry.meta, view, _Unref(self, entry))))
        self.stats.add(evictions=need)
        return True

    def _drop_locked(self, entry: _Entry) -> None:
        entry.dead = True
        if entry.refs == 0:
            self.arena.release([entry.slot])

    def _unref(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs == 0 and entry.dead:
                self.arena.release([entry.slot])

    def _after_evict(self, evicted: list[tuple[ChunkKey, ChunkData]]) -> None:
        if not evicted:
            return
        try:
            self._changed([], [k for k, _ in evicted])
            if self.on_evict is not None:
                self.on_evict(evicted)
        finally:
            for _, chunk in evicted:
                chunk.release()

    def _changed(self, added: list[ChunkKey], removed: list[ChunkKey]) -> None:
        if (added or removed) and self.on_change is not None:
            self.on_change(added, removed)


class _Unref:
    """Release callback of one reference (a class, not a lambda, for clear reprs)."""

    __slots__ = ("tier", "entry")

    def __init__(self, tier: MemoryTier, entry: _Entry) -> None:
        self.tier, self.entry = tier, entry

    def __call__(self) -> None:
        self.tier._unref(self.entry)
