"""Layer 3: the disk tier: one file per chunk in a folder, local or shared.

Layout: ``<root>/<hex[:2]>/<hex>.kvc`` holds the chunk exactly as the codecs
layer frames it (128-byte header, then the payload), so a file is
self-describing and can be checked on every read. File names, atomic writes
and whole-file reads are in :mod:`kvtier.tiers.disk.files`, the LRU index in
:mod:`kvtier.tiers.disk.lru`, the reusable read buffers in :mod:`kvtier.tiers.buffer_pool`.

- Writes are atomic: a temp file in the same folder, then ``os.replace``. A
  reader (this process or another) sees the whole chunk or no file.
  ``fsync=True`` syncs the file before the rename (the directory is not
  synced: a lost rename after power loss is a lost cache entry, never a torn
  one).
- Capacity: one folder has one byte budget, however many processes share it:
  the first to open the folder records its ``max_bytes`` there and later ones
  follow it (:mod:`kvtier.tiers.disk.folder`). Writes evict the folder's least
  recently used files, one process at a time; the index of the folder is
  rebuilt by amortized rescans, so a put never scans the folder
  (:mod:`kvtier.tiers.disk.folder_index`, which also states the slack: about
  N/32 of the budget with N processes writing).
- Last use lives in the file: reads stamp its times, so every process (and a
  restart) sees one LRU order. Stamping is best effort: a read needs no write
  permission (another user's file, a read-only mount), and such a read's
  recency is kept in this process's index only. Reads and presence checks
  never delete for capacity; only writes evict.
- Sharing: other processes may add and remove files at any time. Presence is
  therefore always asked of the file system (one ``stat`` per key), files
  found that the index does not know are adopted, and files that vanished are
  dropped from it. Only names kvtier writes are ever removed (:mod:`kvtier.tiers.disk.files`).
- Integrity: with the cluster's key (``mac``), files are written with a keyed
  MAC (on the writer's thread); a file read without a valid one is deleted
  and counted ``forged``: left, it would keep promising hits that fail and
  keep the writers (which skip present keys) from storing the real chunk.
  Only bytes that failed are deleted, and only while the name still holds the
  file read: no one can make a reader delete a chunk written with the key.
  A batch is read in two halves at once, the second on the key's helper thread,
  each file's MAC checked right after it is read (one hand-off per batch: a
  hand-off per file cost more than the MAC itself when the helper idled between
  files).
- Failures: a missing file is a plain miss; a file that fails its header
  (read and checked before its payload's buffer is taken: a header declaring
  more than the file holds or than ``max_chunk_bytes``, say a huge sparse
  file, allocates nothing) or checksum is deleted and counted ``corrupt``; a file of another kvtier format
  version (a rolling upgrade sharing the folder) is a miss counted ``foreign``
  and left in place, logged once; any other ``OSError`` (folder
  gone, permissions, disk full) is counted in ``errors`` and turns into a
  miss or ``False``. Nothing is raised to the caller. The root folder is never
  re-created by the tier: if it vanished (an unmounted share), writing into
  the mount point underneath would be wrong.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMac, encode_header, verify_payload
from kvtier.codecs.integrity import Unchecked
from kvtier.config import DiskConfig
from kvtier.errors import CorruptChunk, ForeignChunk, ForgedChunk
from kvtier.keys import ChunkKey
from kvtier.tiers.disk import files, folder
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.buffer_pool import BufferPool
from kvtier.tiers.disk.folder_index import FolderIndex

log = logging.getLogger(__name__)
Signed = tuple[Unchecked, str, tuple[int, int]]
"""A chunk read whose MAC is still to be checked, its path and (device, inode)."""


class DiskTier(Tier):
    """Chunks as files under ``cfg.path``, bounded by ``cfg.max_bytes``, evicted LRU;
    signed and verified with ``mac`` (the cluster's integrity key) when given."""

    name = "disk"

    def __init__(self, cfg: DiskConfig, mac: ChunkMac | None = None,
                 max_chunk_bytes: int = files.MAX_CHUNK_BYTES) -> None:
        super().__init__()
        self.mac = mac
        self.max_chunk_bytes = max_chunk_bytes
        self.root = Path(cfg.path).expanduser()
        self._root = str(self.root)  # str paths: pathlib costs ~5% of a 3 MiB write
        self.fsync = cfg.fsync
        self.pool = BufferPool(cfg.read_pool_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp_seq = itertools.count()
        self._unstamped_logged = False
        self._index = FolderIndex(self._root, cfg.max_bytes, self.stats)

    @property
    def max_bytes(self) -> int:
        """The folder's budget (not necessarily this process's ``disk.max_bytes``)."""
        return self._index.budget

    # -- Tier interface -------------------------------------------------------

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """One ``stat`` per key, so files written or deleted by others are seen."""
        out = [self._present(k) for k in keys]
        if not all(out):
            self._check_root()
        return out

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """Stats keys only up to the first one absent."""
        for n, key in enumerate(keys):
            if not self._present(key):
                self._check_root()
                return n
        return len(keys)

    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        """Writes one file per new chunk, in order. A batch larger than the whole tier
        keeps its first chunks (the rest are dropped): prefixes matter."""
        done = [False] * len(items)
        new: list[int] = []
        seen: set[ChunkKey] = set()
        budget = self.max_bytes
        for i, (key, chunk) in enumerate(items):
            if key in seen or self._present(key):  # ours, or another process's (adopted)
                done[i] = True
                continue
            seen.add(key)
            budget -= HEADER_SIZE + chunk.payload.nbytes
            if budget < 0:
                self.stats.add(dropped=1)
            else:
                new.append(i)
        for i in new:
            done[i] = self._put_new(*items[i])
        # A later chunk of the batch (or another process) may have evicted an earlier
        # one. Asked of the file system, not the index: a concurrent rescan of the
        # folder may have missed a file renamed into place while it listed the shard.
        return [ok and self._present(key) for ok, (key, _) in zip(done, items)]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Reads in order; with a key, the second half of the batch is read (and checked)
        on the key's helper thread meanwhile: the MAC check costs no more than it saves."""
        if self.mac is not None and len(keys) > 1:
            mid = (len(keys) + 1) // 2
            rest = self.mac.submit(self._get_checked, keys[mid:])
            out = self._get_checked(keys[:mid]) + rest.result()
        else:
            out = self._get_checked(keys)
        hits = [c for c in out if c is not None]
        self.stats.add(hits=len(hits), misses=len(out) - len(hits),
                       get_bytes=sum(c.payload.nbytes for c in hits))
        if len(hits) < len(out):
            self._check_root()
        return out

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        n = 0
        for key in keys:
            self._index.gone(key)
            if self._unlink(self._file(key)):
                n += 1
        return n

    def usage(self) -> TierUsage:
        """The folder's bytes and chunks as of this tier's last scan plus its own changes
        since, and the folder's budget."""
        used, num = self._index.usage()
        return TierUsage(used, self.max_bytes, num)

    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every chunk file in the folder now (including other processes' files)."""
        return iter([f.key for f in folder.scan(self._root)[0]])

    def rescan(self) -> None:
        """Re-learn the folder now: other processes' files, the LRU order, the budget file.
        Writes do this on their own, amortized; this is for tests and management."""
        self._index.rescan()

    def close(self) -> None:
        """Leave the folder (its locks); the files stay."""
        self._index.close()

    # -- reads ----------------------------------------------------------------

    def _get_checked(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Each key's chunk, its MAC checked (with a key), or a miss."""
        out: list[ChunkData | None] = []
        for key in keys:
            read = self._get(key)
            out.append(self._check(read) if isinstance(read, tuple) else read)
        return out

    def _present(self, key: ChunkKey) -> bool:
        try:
            st = os.stat(self._file(key))
        except FileNotFoundError:
            self._index.gone(key)
            return False
        except OSError:
            self.stats.add(errors=1)
            return False
        self._index.found(key, st.st_size)
        return True

    def _get(self, key: ChunkKey) -> ChunkData | Signed | None:
        """A verified chunk, a miss, or (with a key) a chunk whose MAC is still to check."""
        path = self._file(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._index.gone(key)
            return None
        except OSError:
            self.stats.add(errors=1)
            return None
        try:
            chunk = self._read(key, fd, path)
            self._stamp(key, fd)
        except ForeignChunk as exc:  # another release's file: not ours to delete
            self._count_foreign(exc)
            return None
        except CorruptChunk:
            self.stats.add(corrupt=1)
            self._drop_bad(key, path, fd)
            return None
        except OSError:
            self.stats.add(errors=1)
            return None
        finally:
            os.close(fd)
        return chunk

    def _check(self, read: Signed) -> ChunkData | None:
        """The chunk if its MAC is valid; else a miss, deleted, counted ``forged`` (or
        ``corrupt``: its checksum failed too)."""
        (key, header, payload), path, ident = read
        try:
            verify_payload(key, header, payload, self.mac)
        except CorruptChunk as exc:
            self.pool.give(payload)  # type: ignore[arg-type]
            if isinstance(exc, ForgedChunk):
                self._count_forged(exc)
            else:
                self.stats.add(corrupt=1)
            self._drop_bad(key, path, ident)
            return None
        return ChunkData(header.meta, payload, self.pool.release_callback(payload))

    def _drop_bad(self, key: ChunkKey, path: str, read: int | tuple[int, int]) -> None:
        """Delete the bad file just read (``read``: its descriptor or (device, inode)) unless
        its name now holds another file (a writer replaced it: not the chunk that failed)."""
        try:
            if isinstance(read, int):
                st = os.fstat(read)
                read = (st.st_dev, st.st_ino)
            now = os.stat(path)
        except OSError:  # gone already, or unreadable: nothing to delete here
            return
        if read == (now.st_dev, now.st_ino):
            self.delete_many([key])

    def _stamp(self, key: ChunkKey, fd: int) -> None:
        """Record the use in the file's times, where every process (and a restart) sees it.

        Best effort: the read succeeded whatever happens here. Explicit times need
        ownership; UTIME_NOW (the fallback) only write access; without either, recency
        stays in this process.
        """
        stamp: int | None = files.stamp_ns()
        try:
            try:
                os.utime(fd, ns=(stamp, stamp))  # fine-grained: see files.stamp_ns
            except PermissionError:  # another user's file: explicit times need ownership
                os.utime(fd)
                stamp = files.stamp_ns()  # at or after the kernel's coarse stamp
        except OSError as exc:
            stamp = None
            if not self._unstamped_logged:
                self._unstamped_logged = True
                log.info("disk tier: cannot stamp access times in %s (%s); reads still work, "
                         "their recency is kept in this process only", self._root, exc)
        self._index.used(key, stamp)

    def _read(self, key: ChunkKey, fd: int, path: str) -> ChunkData | Signed:
        """Header first (checked against the file's size and ``max_chunk_bytes`` before a
        buffer is taken: :func:`files.read_checked`), then the payload into a pooled buffer;
        checked, except for the MAC (with a key): that is left to :meth:`_check`."""
        header, payload, st = files.read_checked(fd, key, self.pool.take, self.pool.give,
                                                 self.max_chunk_bytes)
        if self.mac is None:
            try:
                verify_payload(key, header, payload)
            except CorruptChunk:
                self.pool.give(payload)
                raise
        self._index.found(key, st.st_size)
        if self.mac is not None:
            return (key, header, payload), path, (st.st_dev, st.st_ino)
        return ChunkData(header.meta, payload, self.pool.release_callback(payload))

    # -- writes ---------------------------------------------------------------

    def _put_new(self, key: ChunkKey, chunk: ChunkData) -> bool:
        payload = memoryview(chunk.payload).cast("B")
        size = HEADER_SIZE + payload.nbytes
        header = encode_header(key, chunk.meta, payload, self.mac)
        if not self._index.reserve(size):  # no room the folder's LRU files could make
            self.stats.add(dropped=1)
            return False
        try:
            stamp = files.write_atomic(self._file(key), [header, payload], self.fsync,
                                       next(self._tmp_seq))
        except OSError as exc:
            self._index.unreserve(size)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.stats.add(**{"dropped" if full else "errors": 1})
            return False
        self._index.commit(key, size, stamp)
        self.stats.add(puts=1, put_bytes=payload.nbytes)
        return True

    # -- folder ---------------------------------------------------------------

    def path_of(self, key: ChunkKey) -> Path:
        """Where the file of ``key`` lives (whether or not it exists)."""
        return Path(self._file(key))

    def _file(self, key: ChunkKey) -> str:
        return files.chunk_path(self._root, key)

    def _unlink(self, path: str) -> bool:
        """Remove a file; True if it was there. Errors other than 'absent' are counted."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError:
            self.stats.add(errors=1)
            return False

    def _check_root(self) -> None:
        """After a miss: count an error if the folder itself is gone or unreadable."""
        try:
            os.stat(self.root)
        except OSError:
            self.stats.add(errors=1)
