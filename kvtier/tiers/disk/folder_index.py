"""Layer 3: one tier's view of a shared disk folder: its files in last-use order,
the folder's budget, and eviction in the folder's LRU order.

The view is rebuilt by scanning the folder (:func:`kvtier.tiers.disk.folder.scan`):
at start, then after this tier wrote 1/:data:`RESCAN_FRACTION` of the budget or
:data:`RESCAN_S` passed, at its next write; so a put never scans, and other
processes' files and deletions are learned at the next rescan. Order comes
from each file's times (every process stamps its reads there), then from what
only this process knows (reads it could not stamp), then from the old order.

Eviction holds the folder's eviction lock and re-``stat``s each victim: a file
read or rewritten since this tier learned its times is kept (it is no longer
least recently used), one already gone counts as freed. Slack: each writing
process may add up to 1/RESCAN_FRACTION of the budget between its scans that
the others do not see yet, so N writing processes can exceed the budget by
about N/RESCAN_FRACTION of it, plus writes in flight.
"""

from __future__ import annotations

import os
import threading
import time

from kvtier.keys import ChunkKey
from kvtier.tiers.disk import files, folder
from kvtier.tiers.base import TierStats
from kvtier.tiers.disk.lru import SizeIndex

RESCAN_FRACTION = 32
"""A tier rescans the folder after writing 1/RESCAN_FRACTION of the budget."""
RESCAN_S = 60.0
"""... or when its last scan is this old, at its next write."""
_MAX_LOCAL_USES = 1 << 16  # reads whose recency only this process knows (bounded)


class FolderIndex:
    """The files of one folder as this tier knows them. Thread-safe.

    Counts ``evictions`` and ``errors`` into ``stats`` (the tier's).
    """

    def __init__(self, root: str, max_bytes: int, stats: TierStats) -> None:
        self.root = root
        self.stats = stats
        self.folder = folder.SharedFolder(root, max_bytes)
        self._index = SizeIndex()  # LRU first; used includes writes in flight
        self._stamps: dict[ChunkKey, int] = {}  # last use known per file, to spot others' use
        self._local_uses: dict[ChunkKey, int] = {}  # reads that could not stamp their file
        self._since_scan = 0  # bytes this tier wrote since its last scan
        self._landed: dict[ChunkKey, int] | None = None  # writes landed during a scan
        self._scan_at = 0.0
        self._lock = threading.Lock()
        self.rescan()
        if self._index.used > self.budget:  # e.g. a lone restart with a smaller budget
            self.evict()

    @property
    def budget(self) -> int:
        """The folder's byte budget."""
        return self.folder.budget

    def __contains__(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self._index

    def usage(self) -> tuple[int, int]:
        """Bytes and files of the folder as of the last scan plus this tier's changes."""
        with self._lock:
            return self._index.indexed_bytes, len(self._index)

    # -- what this tier saw ---------------------------------------------------

    def found(self, key: ChunkKey, size: int) -> None:
        """A file seen on disk (maybe another process's). Never evicts: reads and presence
        checks must not delete, nor need write access."""
        with self._lock:
            self._index.add(key, size)

    def gone(self, key: ChunkKey) -> None:
        """A file that is absent (deleted here or found missing)."""
        with self._lock:
            self._index.forget(key)
            self._stamps.pop(key, None)
            self._local_uses.pop(key, None)

    def used(self, key: ChunkKey, stamp: int | None) -> None:
        """A read of ``key``; ``stamp``: the time its file now records (None: the file's
        times could not be set, recency is kept in this process)."""
        with self._lock:
            self._index.touch(key)
            if stamp is not None:
                self._stamps[key] = stamp
                return
            self._local_uses.pop(key, None)
            self._local_uses[key] = time.time_ns()
            if len(self._local_uses) > _MAX_LOCAL_USES:
                del self._local_uses[next(iter(self._local_uses))]

    # -- writes ---------------------------------------------------------------

    def reserve(self, size: int) -> bool:
        """Count a write of ``size`` bytes before it lands, evicting to fit the budget;
        False (nothing reserved) if it does not fit."""
        if self._rescan_due():
            self.rescan()
        with self._lock:
            self._index.reserve(size)
            self._since_scan += size
            full = self._index.used > self.budget
        if full and not self.evict():
            self.unreserve(size)
            return False
        return True

    def unreserve(self, size: int) -> None:
        """A reserved write did not land."""
        with self._lock:
            self._index.unreserve(size)

    def commit(self, key: ChunkKey, size: int, stamp: int) -> None:
        """A reserved write landed as ``key``'s file, whose times are ``stamp``."""
        with self._lock:
            self._index.commit(key, size)
            self._stamps[key] = stamp
            if self._landed is not None:
                self._landed[key] = size

    # -- the folder -----------------------------------------------------------

    def rescan(self) -> None:
        """Learn the folder as it is now (see the module docstring for the order)."""
        self.folder.refresh()
        with self._lock:
            self._landed = {}
        found, ok = folder.scan(self.root)
        if not ok:
            self.stats.add(errors=1)
        with self._lock:
            old = {k: i for i, k in enumerate(self._index.keys())}
            local = self._local_uses
            last = {f.key: max(f.stamp_ns, local.get(f.key, 0)) for f in found}
            found.sort(key=lambda f: (last[f.key], old.get(f.key, -1)))
            self._index.replace((f.key, f.size) for f in found)
            # A file renamed into place after the scan listed its shard is still there.
            for key, size in (self._landed or {}).items():
                self._index.add(key, size)
            self._landed = None
            self._stamps = {f.key: f.stamp_ns for f in found}
            self._local_uses = {k: t for k, t in local.items() if k in last}
            self._since_scan = 0
            self._scan_at = time.monotonic()

    def evict(self) -> bool:
        """Delete least recently used files until the folder fits its budget, one process
        at a time; False if it still does not fit (lock not had in time, files kept)."""
        with self.folder.evicting() as locked:
            if not locked:
                return False
            with self._lock:  # unlinks under the lock: a put cannot adopt a victim meanwhile
                self._index.evict(self.budget, self._evict_file)
                return self._index.used <= self.budget

    def close(self) -> None:
        """Leave the folder (its locks)."""
        self.folder.close()

    def _rescan_due(self) -> bool:
        with self._lock:
            return (self._since_scan >= self.budget // RESCAN_FRACTION
                    or time.monotonic() - self._scan_at > RESCAN_S)

    def _evict_file(self, key: ChunkKey) -> bool:
        """Remove one victim unless another process used it since we learned its times."""
        path = files.chunk_path(self.root, key)
        try:
            st = os.stat(path)
        except FileNotFoundError:  # another process removed it: its bytes are free
            self._stamps.pop(key, None)
            return True
        except OSError:
            self.stats.add(errors=1)
            return False
        last, known = max(st.st_atime_ns, st.st_mtime_ns), self._stamps.get(key)
        if known is not None and last > known:
            self._stamps[key] = last
            return False  # read or rewritten since: no longer least recently used
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:  # e.g. a read-only folder: it stays, and so does its size
            self.stats.add(errors=1)
            return False
        else:
            self.stats.add(evictions=1)
        self._stamps.pop(key, None)
        self._local_uses.pop(key, None)
        return True
