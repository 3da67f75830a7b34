"""Layer 3: a byte-bounded LRU index of keys and sizes (plain Python, no I/O).

The disk tier keeps one for the files it knows; it holds the lock around
every call (this class is not thread-safe on its own).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

from kvtier.keys import ChunkKey


class SizeIndex:
    """Keys with their sizes, least recently used first, and the bytes counted as used.

    ``used`` is the sizes in the index plus reservations for writes in flight
    (:meth:`reserve`), so a write is accounted for before its bytes land.
    """

    def __init__(self, items: Iterable[tuple[ChunkKey, int]] = ()) -> None:
        self._sizes: OrderedDict[ChunkKey, int] = OrderedDict(items)
        self.used = sum(self._sizes.values())

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[ChunkKey]:
        """Every key, least recently used first."""
        return list(self._sizes)

    @property
    def indexed_bytes(self) -> int:
        """Sizes of the indexed keys (reservations not included)."""
        return sum(self._sizes.values())

    def add(self, key: ChunkKey, size: int) -> bool:
        """Index a key found (not reserved); False if it was already there."""
        if key in self._sizes:
            return False
        self._sizes[key] = size
        self.used += size
        return True

    def reserve(self, size: int) -> None:
        """Count ``size`` bytes of a write in flight."""
        self.used += size

    def unreserve(self, size: int) -> None:
        """A write in flight failed: its bytes are no longer used."""
        self.used -= size

    def commit(self, key: ChunkKey, size: int) -> None:
        """A reserved write landed: index it (counted once if another writer was first)."""
        if key in self._sizes:
            self.used -= size
        else:
            self._sizes[key] = size

    def forget(self, key: ChunkKey) -> int | None:
        """Drop a key; its size, or None if it was not indexed."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used -= size
        return size

    def touch(self, key: ChunkKey) -> None:
        """Mark a key most recently used (no-op if absent)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def evict(self, max_bytes: int, on_evict: Callable[[ChunkKey], None],
              keep: ChunkKey | None = None) -> int:
        """Drop least recently used keys until ``used <= max_bytes``; ``keep`` stays
        (unless it is the only key left). Calls ``on_evict(key)`` for each; returns how many."""
        n = 0
        while self.used > max_bytes and self._sizes:
            key, size = next(iter(self._sizes.items()))
            if key == keep:
                if len(self._sizes) == 1:
                    break
                self._sizes.move_to_end(key)
                continue
            del self._sizes[key]
            self.used -= size
            on_evict(key)
            n += 1
        return n
