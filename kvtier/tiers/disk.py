"""Layer 3: the disk tier: one file per chunk in a folder, local or shared.

Layout: ``<root>/<hex[:2]>/<hex>.kvc`` holds the chunk exactly as the codecs
layer frames it (128-byte header, then the payload), so a file is
self-describing and can be checked on every read.

- Writes are atomic: a temp file in the same folder, then ``os.replace``. A
  reader (this process or another) sees the whole chunk or no file.
  ``fsync=True`` syncs the file before the rename (the directory is not
  synced: a lost rename after power loss is a lost cache entry, never a torn
  one).
- Capacity: ``max_bytes`` over file sizes, evicting least recently used
  files. Access order lives in memory; reads also stamp the file's atime, so
  an index rebuilt at start-up (by scanning the folder) keeps that order.
- Sharing: other processes may add and remove files at any time. Presence is
  therefore always asked of the file system (one ``stat`` per key), files
  found that the index does not know are adopted, and files that vanished are
  dropped from it. Each instance enforces ``max_bytes`` over the files it knows.
- Failures: a missing file is a plain miss; a file that fails its header or
  checksum is deleted and counted ``corrupt``; any other ``OSError`` (folder
  gone, permissions, disk full) is counted in ``errors`` and turns into a
  miss or ``False``. Nothing is raised to the caller. The root folder is never
  re-created by the tier: if it vanished (an unmounted share), writing into
  the mount point underneath would be wrong.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import xxhash

from kvtier.codecs import HEADER_SIZE, ChunkData, encode_header, parse_header, verify_payload
from kvtier.config import DiskConfig
from kvtier.errors import CorruptChunk
from kvtier.keys import KEY_BYTES, ChunkKey
from kvtier.tiers.base import Tier, TierUsage

SUFFIX = ".kvc"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 600.0
"""A temp file this old is a leftover of a crashed writer (writes take well under a second)."""
_HOST_TAG = xxhash.xxh32_hexdigest(socket.gethostname().encode())


class DiskTier(Tier):
    """Chunks as files under ``cfg.path``, bounded by ``cfg.max_bytes``, evicted LRU."""

    name = "disk"

    def __init__(self, cfg: DiskConfig) -> None:
        super().__init__()
        self.root = Path(cfg.path).expanduser()
        self._root = str(self.root)  # str paths: pathlib costs ~5% of a 3 MiB write
        self.max_bytes = cfg.max_bytes
        self.fsync = cfg.fsync
        self.pool = BufferPool(cfg.read_pool_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()  # key -> file size, LRU first
        self._used = 0  # sizes in the index plus writes in flight
        self._lock = threading.Lock()
        self._tmp_seq = itertools.count()
        self._rebuild_index()

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
        with self._lock:  # a later chunk of the batch may have evicted an earlier one
            return [ok and key in self._index for ok, (key, _) in zip(done, items)]

    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        out = [self._get(key) for key in keys]
        hits = [c for c in out if c is not None]
        self.stats.add(hits=len(hits), misses=len(out) - len(hits),
                       get_bytes=sum(c.payload.nbytes for c in hits))
        if len(hits) < len(out):
            self._check_root()
        return out

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        n = 0
        for key in keys:
            with self._lock:
                self._forget_locked(key)
            if self._unlink(self._file(key)):
                n += 1
        return n

    def usage(self) -> TierUsage:
        """Bytes and chunks this instance knows of (its writes, scans and adoptions)."""
        with self._lock:
            return TierUsage(sum(self._index.values()), self.max_bytes, len(self._index))

    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every chunk file in the folder now (including other processes' files)."""
        return iter([key for key, _, _ in self._scan()])

    # -- reads ----------------------------------------------------------------

    def _present(self, key: ChunkKey) -> bool:
        try:
            st = os.stat(self._file(key))
        except FileNotFoundError:
            with self._lock:
                self._forget_locked(key)
            return False
        except OSError:
            self.stats.add(errors=1)
            return False
        self._adopt(key, st.st_size)
        return True

    def _get(self, key: ChunkKey) -> ChunkData | None:
        path = self._file(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self._forget_locked(key)
            return None
        except OSError:
            self.stats.add(errors=1)
            return None
        try:
            chunk = self._read(key, fd)
        except CorruptChunk:
            self.stats.add(corrupt=1)
            self.delete_many([key])
            return None
        except OSError:
            self.stats.add(errors=1)
            return None
        finally:
            os.close(fd)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return chunk

    def _read(self, key: ChunkKey, fd: int) -> ChunkData:
        """The whole file in one ``preadv``: header, and payload into a buffer of its size.

        One large request lets the kernel read the file in a few big I/Os; a small
        header read first would start readahead small and ramp up (~25% slower cold).
        """
        st = os.fstat(fd)
        if st.st_size < HEADER_SIZE:
            raise CorruptChunk(f"chunk {key.hex()}: file of {st.st_size} bytes")
        head = bytearray(HEADER_SIZE)
        payload = self.pool.take(st.st_size - HEADER_SIZE)
        try:
            _preadv_all(fd, [head, payload], key)
            header = parse_header(key, head)
            if header.payload_len != payload.nbytes:
                raise CorruptChunk(f"chunk {key.hex()}: file of {st.st_size} bytes, header "
                                   f"says {HEADER_SIZE + header.payload_len}")
            verify_payload(key, header, payload)
        except (CorruptChunk, OSError):
            self.pool.give(payload)
            raise
        # Record the access in the file itself, so a restarted index keeps LRU order
        # (relatime mounts would not); mtime is kept as the write time.
        os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        self._adopt(key, st.st_size)
        return ChunkData(header.meta, payload, _GiveBack(self.pool, payload))

    # -- writes ---------------------------------------------------------------

    def _put_new(self, key: ChunkKey, chunk: ChunkData) -> bool:
        payload = memoryview(chunk.payload).cast("B")
        size = HEADER_SIZE + payload.nbytes
        header = encode_header(key, chunk.meta, payload)
        self._reserve(size)
        try:
            self._write(self._file(key), header, payload)
        except OSError as exc:
            with self._lock:
                self._used -= size
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.stats.add(**{"dropped" if full else "errors": 1})
            return False
        with self._lock:
            if key in self._index:  # another thread wrote it meanwhile: counted once
                self._used -= size
            else:
                self._index[key] = size
        self.stats.add(puts=1, put_bytes=payload.nbytes)
        return True

    def _write(self, path: str, header: bytes, payload: memoryview) -> None:
        """Atomic write: temp file in the same folder, ``writev``, optional fsync, rename."""
        folder, name = os.path.split(path)
        tmp = (f"{folder}/.{name[:-len(SUFFIX)]}.{_HOST_TAG}.{os.getpid()}."
               f"{next(self._tmp_seq)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            _mkdir(folder)  # the shard folder only: a missing root stays an error
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _writev_all(fd, [header, payload])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            self._unlink(tmp)
            raise

    def _reserve(self, size: int) -> None:
        """Count ``size`` bytes as used, evicting LRU files first so the total fits."""
        with self._lock:
            self._used += size
            self._evict_locked()

    def _adopt(self, key: ChunkKey, size: int) -> None:
        """Index a file found on disk that this instance did not write (or forgot)."""
        with self._lock:
            if key in self._index:
                return
            self._index[key] = size
            self._used += size
            self._evict_locked(keep=key)

    def _evict_locked(self, keep: ChunkKey | None = None) -> None:
        # Unlinks happen under the lock so a concurrent put of a victim key cannot
        # adopt the file between our decision and its removal.
        while self._used > self.max_bytes and self._index:
            key, size = next(iter(self._index.items()))
            if key == keep:
                if len(self._index) == 1:
                    break
                self._index.move_to_end(key)
                continue
            del self._index[key]
            self._used -= size
            self._unlink(self._file(key))
            self.stats.add(evictions=1)

    def _forget_locked(self, key: ChunkKey) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._used -= size

    # -- folder ---------------------------------------------------------------

    def path_of(self, key: ChunkKey) -> Path:
        """Where the file of ``key`` lives (whether or not it exists)."""
        return Path(self._file(key))

    def _file(self, key: ChunkKey) -> str:
        h = key.hex()
        return f"{self._root}/{h[:2]}/{h}{SUFFIX}"

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

    def _scan(self) -> Iterator[tuple[ChunkKey, int, int]]:
        """(key, size, last use in ns) of every chunk file; removes stale temp files."""
        try:
            shards = [e for e in os.scandir(self.root) if e.is_dir() and len(e.name) == 2]
        except OSError:
            self.stats.add(errors=1)
            return
        now = time.time()
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except OSError:
                continue  # removed meanwhile by another instance
            for entry in entries:
                try:
                    if entry.name.endswith(TMP_SUFFIX):
                        if _stale_tmp(entry.name, entry.stat().st_mtime, now):
                            os.unlink(entry.path)
                        continue
                    key = _key_of(entry.name)
                    if key is not None:
                        st = entry.stat()
                        yield key, st.st_size, max(st.st_atime_ns, st.st_mtime_ns)
                except OSError:
                    continue  # removed meanwhile

    def _rebuild_index(self) -> None:
        found = sorted(self._scan(), key=lambda f: f[2])
        with self._lock:
            self._index = OrderedDict((key, size) for key, size, _ in found)
            self._used = sum(self._index.values())
            self._evict_locked()


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

    @property
    def nbytes(self) -> int:
        """Bytes held for reuse now."""
        return self._bytes


class _GiveBack:
    """Release callback of a read buffer (a class, not a lambda, for clear reprs)."""

    __slots__ = ("pool", "buf")

    def __init__(self, pool: BufferPool, buf: np.ndarray) -> None:
        self.pool, self.buf = pool, buf

    def __call__(self) -> None:
        self.pool.give(self.buf)


def _key_of(name: str) -> ChunkKey | None:
    """The key a chunk file name holds, or None for any other file."""
    if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
        return None
    try:
        return ChunkKey(bytes.fromhex(name[:-len(SUFFIX)]))
    except ValueError:
        return None


def _stale_tmp(name: str, mtime: float, now: float) -> bool:
    """A temp file is stale if its writer (on this host) is dead, or it is old."""
    parts = name.split(".")  # "", hex, host, pid, seq, "tmp"
    if len(parts) == 6 and parts[2] == _HOST_TAG and parts[3].isdigit():
        try:
            os.kill(int(parts[3]), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # alive but not ours to signal
    return now - mtime > STALE_TMP_S


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass  # another writer made it first


def _preadv_all(fd: int, buffers: list, key: ChunkKey) -> None:
    """Fill ``buffers`` from the file's start (``preadv`` may return short)."""
    views = [memoryview(b).cast("B") for b in buffers]
    pos = 0
    while views:
        n = os.preadv(fd, views, pos)
        if n == 0:
            raise CorruptChunk(f"chunk {key.hex()}: file shorter than its size")
        pos += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _writev_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """``os.writev`` until every byte is written (it may write short)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
