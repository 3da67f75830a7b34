"""Layer 3: reusable read buffers for tiers that read chunks into fresh memory (disk)."""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    """Read buffers handed back by ``ChunkData.release()``, kept for reuse up to ``max_bytes``.

    Fresh memory costs a page fault (and a kernel zeroing) per 4 KiB on its first
    write, which slows a 3 MiB read by ~40%; a reused buffer is already mapped.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` (reused if one is free; contents undefined)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Keep ``buf`` for a later :meth:`take`, or drop it if the pool is full."""
        with self._lock:
            if self._bytes + buf.nbytes <= self.max_bytes:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self._bytes += buf.nbytes

    def release_callback(self, buf: np.ndarray) -> GiveBack:
        """What a chunk read into ``buf`` calls on release: ``buf`` goes back to the pool."""
        return GiveBack(self, buf)

    @property
    def nbytes(self) -> int:
        """Bytes held for reuse now."""
        return self._bytes


class GiveBack:
    """Release callback of a read buffer (a class, not a lambda, for clear reprs)."""

    __slots__ = ("pool", "buf")

    def __init__(self, pool: BufferPool, buf: np.ndarray) -> None:
        self.pool, self.buf = pool, buf

    def __call__(self) -> None:
        self.pool.give(self.buf)
