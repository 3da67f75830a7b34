"""Layer 3: a byte-bounded LRU index of keys and sizes (plain Python, no I/O).

The disk tier keeps one for the files of its folder; it holds the lock around
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
        self.indexed_bytes = sum(self._sizes.values())
        """Sizes of the indexed keys (reservations not included)."""
        self.reserved = 0
        """Bytes of writes in flight."""

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def used(self) -> int:
        """Indexed bytes plus reservations."""
        return self.indexed_bytes + self.reserved

    def keys(self) -> list[ChunkKey]:
        """Every key, least recently used first."""
        return list(self._sizes)

    def replace(self, items: Iterable[tuple[ChunkKey, int]]) -> None:
        """New contents (e.g. from a scan), least recently used first; reservations stay."""
        self._sizes = OrderedDict(items)
        self.indexed_bytes = sum(self._sizes.values())

    def add(self, key: ChunkKey, size: int) -> bool:
        """Index a key found (not reserved); False if it was already there."""
        if key in self._sizes:
            return False
        self._sizes[key] = size
        self.indexed_bytes += size
        return True

    def reserve(self, size: int) -> None:
        """Count ``size`` bytes of a write in flight."""
        self.reserved += size

    def unreserve(self, size: int) -> None:
        """A write in flight failed: its bytes are no longer used."""
        self.reserved -= size

    def commit(self, key: ChunkKey, size: int) -> None:
        """A reserved write landed: index it, most recently used (counted once if a scan
        or another writer indexed it first)."""
        self.reserved -= size
        self.forget(key)
        self.add(key, size)

    def forget(self, key: ChunkKey) -> int | None:
        """Drop a key; its size, or None if it was not indexed."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.indexed_bytes -= size
        return size

    def touch(self, key: ChunkKey) -> None:
        """Mark a key most recently used (no-op if absent)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def evict(self, max_bytes: int, on_evict: Callable[[ChunkKey], bool]) -> int:
        """Offer least recently used keys to ``on_evict`` until ``used <= max_bytes``.

        ``on_evict(key)`` returns True when the key's bytes are gone (it leaves the
        index), False to keep it (it becomes most recently used). Each key is offered
        at most once, so the loop ends even if every key is kept. Returns how many left.
        """
        n = 0
        for _ in range(len(self._sizes)):
            if self.used <= max_bytes or not self._sizes:
                break
            key, size = next(iter(self._sizes.items()))
            if on_evict(key):
                self.forget(key)
                n += 1
            else:
                self._sizes.move_to_end(key)
        return n
