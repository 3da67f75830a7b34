"""Layer 7: pins taken through the management API, each with an optional time to live.

The memory tier counts pins per chunk, and the connector pins the chunks of
every load for its duration; this table remembers which of those pins the API
took, so ``unpin`` releases only its own (never a load's) and an expired pin
is released by a daemon thread without anyone asking.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from typing import Sequence

from kvtier.keys import ChunkKey
from kvtier.threads import NamedThread
from kvtier.tiers.memory import MemoryTier

_IDLE_WAKE_S = 60.0  # bound on one wait of the expiry thread


class PinLeases:
    """API-held pins on ``memory``: counted per key, released on unpin or expiry."""

    def __init__(self, memory: MemoryTier | None) -> None:
        self.memory = memory
        self._leases: dict[ChunkKey, list[float]] = {}  # key -> expiry times (inf: none)
        self._expiries: list[tuple[float, int, ChunkKey]] = []  # heap of (expiry, seq, key)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = NamedThread(target=self._run, name="kvtier-control-pins",
                                   daemon=True)
        self._thread.start()

    def pin(self, keys: Sequence[ChunkKey], ttl_s: float | None = None) -> int:
        """Pin the keys the memory tier holds; returns how many it held."""
        if self.memory is None:
            return 0
        found = [k for k, ok in zip(keys, self.memory.pin_many(keys)) if ok]
        expiry = math.inf if ttl_s is None else time.monotonic() + ttl_s
        with self._cond:
            for key in found:
                self._leases.setdefault(key, []).append(expiry)
                if ttl_s is not None:
                    heapq.heappush(self._expiries, (expiry, next(self._seq), key))
            self._cond.notify_all()
        return len(found)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        """Release one API pin per key (the latest taken); returns how many were released."""
        with self._cond:
            released = [key for key in keys if self._drop_lease(key, None)]
        return self._release(released)

    def prune(self) -> int:
        """Forget the pins of chunks memory no longer holds (cleared or moved away), so
        they can never release another holder's pin later; returns how many were forgotten."""
        if self.memory is None:
            return 0
        with self._cond:
            keys = list(self._leases)
            gone = [k for k, there in zip(keys, self.memory.contains_many(keys)) if not there]
            for key in gone:
                del self._leases[key]
        return len(gone)

    def reapply(self, keys: Sequence[ChunkKey]) -> None:
        """Pin again chunks that were stored anew under a pinned key (re-encoded): those
        the API holds pins on that memory holds unpinned."""
        if self.memory is None:
            return
        with self._cond:
            again = [k for k in keys if k in self._leases and not self.memory.is_pinned(k)
                     for _ in self._leases[k]]
        self.memory.pin_many(again)

    def count(self) -> int:
        """Chunks with at least one API pin."""
        with self._cond:
            return len(self._leases)

    def expire(self, now: float | None = None) -> int:
        """Release every pin whose time has come; returns how many were released."""
        now = time.monotonic() if now is None else now
        released = []
        with self._cond:
            while self._expiries and self._expiries[0][0] <= now:
                expiry, _, key = heapq.heappop(self._expiries)
                if self._drop_lease(key, expiry):  # an unpin may have released it already
                    released.append(key)
        return self._release(released)

    def _drop_lease(self, key: ChunkKey, expiry: float | None) -> bool:
        """Forget one lease of ``key`` (the latest, or the one ending at ``expiry``); under
        the lock. False if there was none."""
        held = self._leases.get(key)
        if not held or (expiry is not None and expiry not in held):
            return False
        if expiry is None:
            held.pop()
        else:
            held.remove(expiry)
        if not held:
            del self._leases[key]
        return True

    def _release(self, keys: list[ChunkKey]) -> int:
        """Unpin in memory the chunks whose leases were just dropped."""
        if self.memory is not None and keys:
            self.memory.unpin_many(keys)
        return len(keys)

    def close(self) -> None:
        """Stop the expiry thread (pins stay as they are)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                nxt = self._expiries[0][0] if self._expiries else math.inf
                wait = min(_IDLE_WAKE_S, max(0.0, nxt - time.monotonic()))
                if wait > 0:
                    self._cond.wait(wait)
                if self._closed:
                    return
            self.expire()
