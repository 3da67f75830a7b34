"""Layer 3: what the processes sharing one disk folder agree on: one byte budget,
one eviction at a time, and the folder's contents as a scan sees them.

Files at the folder's root (shard folders hold only chunks and kvtier temp files):

- ``.kvtier-budget``: the folder's budget in bytes, one integer as text. A tier
  that opens a folder no other tier has open writes its ``max_bytes`` there
  (so restarting a lone instance with a new budget just works); a tier that
  opens a folder in use takes the folder's value, with a warning when its own
  differs. So N processes on one folder share one budget, and a process started
  with a smaller one does not shrink the others' cache. To change the budget
  while processes run, edit the file: each re-reads it at its next rescan.
- ``.kvtier-users.lock``: every open tier holds a shared ``flock`` on it; an
  exclusive one had without waiting means no other tier has the folder open.
- ``.kvtier-evict.lock``: held exclusively while a tier deletes files to fit the
  budget, so two processes do not both evict for the same shortage. Waits for
  it are bounded (:data:`LOCK_WAIT_S`); a tier that cannot get it in time drops
  its write (a later miss) rather than wait or overfill the folder.

A folder kvtier cannot write (a read-only mount) may lack the lock files; reads
need none of this. On Linux NFS, ``flock`` is carried out with byte-range locks,
which other clients honor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from typing import Iterator, NamedTuple

from kvtier.keys import ChunkKey
from kvtier.tiers.disk import files

log = logging.getLogger(__name__)
BUDGET_FILE = ".kvtier-budget"
USERS_LOCK = ".kvtier-users.lock"
EVICT_LOCK = ".kvtier-evict.lock"
LOCK_WAIT_S = 1.0
"""Longest wait for a folder lock (an eviction holds it for milliseconds)."""


class FileInfo(NamedTuple):
    """A chunk file as a scan found it."""

    key: ChunkKey
    size: int
    stamp_ns: int
    """Last use: the later of atime and mtime (reads stamp both, writes set mtime)."""


def scan(root: str) -> tuple[list[FileInfo], bool]:
    """Every chunk file under ``root``, and whether the root could be listed.

    Removes kvtier temp files left by dead writers on the way (never other files).
    Files that vanish during the scan are skipped.
    """
    try:
        shards = [e.path for e in os.scandir(root) if files.is_shard(e.name) and e.is_dir()]
    except OSError:
        return [], False
    now, out = time.time(), []
    for shard in shards:
        try:
            entries = list(os.scandir(shard))
        except OSError:
            continue  # removed meanwhile by another instance
        for entry in entries:
            try:
                key = files.key_of(entry.name)
                if key is not None:
                    st = entry.stat()
                    out.append(FileInfo(key, st.st_size, max(st.st_atime_ns, st.st_mtime_ns)))
                elif files.is_stale_tmp(entry.name, entry.stat().st_mtime, now):
                    os.unlink(entry.path)
            except OSError:
                continue  # removed meanwhile, or not ours to remove
    return out, True


class SharedFolder:
    """The budget and locks of one folder, as seen by one tier (see the module docstring)."""

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.configured = max_bytes
        self._users = _open_lock(f"{root}/{USERS_LOCK}")
        self._evict_fd = _open_lock(f"{root}/{EVICT_LOCK}")
        self._evict_mutex = threading.Lock()  # flock does not exclude threads of one tier
        alone = self._users is None or _flock(self._users, fcntl.LOCK_EX, 0.0)
        self.budget = self._settle(alone)
        if self._users is not None:  # downgrade (or join): others may now open the folder
            _flock(self._users, fcntl.LOCK_SH, LOCK_WAIT_S)

    def _settle(self, alone: bool) -> int:
        recorded = self._read_budget()
        if recorded == self.configured:
            return recorded
        if alone or recorded is None:
            self._write_budget(self.configured)
            return self.configured
        log.warning("disk tier: %s is in use by other processes with a budget of %d bytes; "
                    "using it instead of this process's disk.max_bytes=%d (one folder, one "
                    "budget; to change it, edit %s/%s or restart every process with the new "
                    "value)", self.root, recorded, self.configured, self.root, BUDGET_FILE)
        return recorded

    def refresh(self) -> int:
        """Re-read the folder's budget (someone may have edited the file); returns it."""
        recorded = self._read_budget()
        if recorded is not None and recorded != self.budget:
            log.info("disk tier: %s: folder budget changed from %d to %d bytes",
                     self.root, self.budget, recorded)
            self.budget = recorded
        return self.budget

    @contextlib.contextmanager
    def evicting(self) -> Iterator[bool]:
        """Hold the folder's eviction lock; yields False if it was not had in time."""
        deadline = time.monotonic() + LOCK_WAIT_S
        if not self._evict_mutex.acquire(timeout=LOCK_WAIT_S):
            yield False
            return
        try:
            if self._evict_fd is None:  # no lock file (read-only folder): nothing to exclude
                yield True
                return
            got = _flock(self._evict_fd, fcntl.LOCK_EX, max(0.0, deadline - time.monotonic()))
            try:
                yield got
            finally:
                if got:
                    _flock(self._evict_fd, fcntl.LOCK_UN, 0.0)
        finally:
            self._evict_mutex.release()

    def close(self) -> None:
        """Leave the folder (release the locks). Idempotent."""
        for name in ("_users", "_evict_fd"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        self.close()  # a tier dropped without close() must not hold the folder forever

    def _read_budget(self) -> int | None:
        try:
            with open(f"{self.root}/{BUDGET_FILE}", "rb") as f:
                value = int(f.read(64).strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("disk tier: cannot read %s/%s (%s); using disk.max_bytes=%d",
                        self.root, BUDGET_FILE, exc, self.configured)
            return None
        return value if value >= 0 else None

    def _write_budget(self, value: int) -> None:
        path = f"{self.root}/{BUDGET_FILE}"
        tmp = f"{path}.{files.HOST_TAG}.{os.getpid()}.{id(self)}"
        try:
            with open(tmp, "wb") as f:
                f.write(b"%d\n" % value)
            os.replace(tmp, path)
        except OSError as exc:  # read-only folder: a reader needs no budget on file
            log.info("disk tier: cannot record the budget in %s (%s)", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _open_lock(path: str) -> int | None:
    """A descriptor to ``flock`` (read-only suffices, so others' files serve too)."""
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT):
        try:
            return os.open(path, flags, 0o666)
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def _flock(fd: int, op: int, wait_s: float) -> bool:
    """``flock`` without blocking, retried for at most ``wait_s``; True if had.

    A file system without ``flock`` (ENOLCK) counts as had: a lone process's view.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return True
            return False
