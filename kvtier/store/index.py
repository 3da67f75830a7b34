"""Layer 4: a bounded set of keys another process holds (the scheduler's view of
the worker's memory tier), fed by stored/evicted events."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Sequence

from kvtier.keys import ChunkKey


class KeyIndex:
    """Keys believed present elsewhere; bounded, oldest forgotten first.

    Answers ``contains_many`` like a tier, without holding any bytes. It may be
    stale: a key can be evicted after it was reported; the loader then reports
    a load error and the engine recomputes (docs/architecture.md, "Data path of a
    load").
    """

    name = "index"

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[ChunkKey, None] = OrderedDict()
        self._lock = threading.Lock()

    def update(self, stored: Iterable[ChunkKey] = (), evicted: Iterable[ChunkKey] = ()) -> None:
        """Apply events in order: evictions after stores of the same batch."""
        with self._lock:
            for key in stored:
                self._keys[key] = None
                self._keys.move_to_end(key)
            for key in evicted:
                self._keys.pop(key, None)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys are believed present."""
        with self._lock:
            return [k in self._keys for k in keys]

    def __len__(self) -> int:
        return len(self._keys)
