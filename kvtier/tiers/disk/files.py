"""Layer 3: the file-level pieces of the disk tier: names, atomic writes, whole-file reads.

A chunk file is ``<root>/<hex[:2]>/<hex>.kvc``. A write goes to a temp file
``.<hex>.<host>.<pid>.<seq>.tmp`` beside it and is renamed into place, so a
reader sees the whole chunk or no file; the host and pid in the name let a
later scan tell a dead writer's leftover from a live writer's file. Clean-up
removes only names of exactly that shape (:func:`is_stale_tmp`): the folder
may be shared with people and other programs, whose ``*.tmp`` files are theirs.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import xxhash

from typing import Callable

import numpy as np

from kvtier.codecs import HEADER_SIZE, parse_header
from kvtier.codecs.format import Header
from kvtier.errors import CorruptChunk
from kvtier.keys import KEY_BYTES, ChunkKey

SUFFIX = ".kvc"
TMP_SUFFIX = ".tmp"
MAX_CHUNK_BYTES = 1024**3
"""Largest payload a chunk file may declare (a chunk of the largest layouts is a few
hundred MiB); a file claiming more is corrupt, refused before any buffer is taken."""
STALE_TMP_S = 600.0
"""A temp file this old is a leftover of a crashed writer (writes take well under a second)."""
HOST_TAG = xxhash.xxh32_hexdigest(socket.gethostname().encode())
_TMP_NAME = re.compile(rf"\.[0-9a-f]{{{2 * KEY_BYTES}}}\.([0-9a-f]{{8}})\.([0-9]+)\.[0-9]+"
                       + re.escape(TMP_SUFFIX))
"""The exact shape of :func:`tmp_path`'s names: ``.<key hex>.<host tag>.<pid>.<seq>.tmp``."""
_stamp_lock = threading.Lock()
_last_stamp_ns = 0


def stamp_ns() -> int:
    """Wall-clock nanoseconds, strictly increasing within this process.

    File times set by the kernel come from a coarse clock: files written in the same
    tick (a few ms) get equal times, and the folder's LRU order between them was left
    to directory order. Writes and reads set their times from this clock instead, so
    a scan orders one process's uses exactly as they happened.
    """
    global _last_stamp_ns
    with _stamp_lock:
        _last_stamp_ns = max(time.time_ns(), _last_stamp_ns + 1)
        return _last_stamp_ns


_CHUNK_NAME = re.compile(rf"[0-9a-f]{{{2 * KEY_BYTES}}}" + re.escape(SUFFIX))
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")


def chunk_path(root: str, key: ChunkKey) -> str:
    """Where the file of ``key`` lives under ``root`` (str paths: pathlib costs ~5% of a write)."""
    h = key.hex()
    return f"{root}/{h[:2]}/{h}{SUFFIX}"


def key_of(name: str) -> ChunkKey | None:
    """The key a chunk file name holds, or None for any other file (only names exactly
    as :func:`chunk_path` writes them: a user's ``ABCD....kvc`` is not ours)."""
    if _CHUNK_NAME.fullmatch(name) is None:
        return None
    return ChunkKey(bytes.fromhex(name[:-len(SUFFIX)]))


def is_shard(name: str) -> bool:
    """Whether a folder name under the root is one of the tier's shard folders."""
    return _SHARD_NAME.fullmatch(name) is not None


def tmp_path(path: str, seq: int) -> str:
    """The temp file a writer uses for ``path`` (``seq`` makes it unique in the process)."""
    folder, name = os.path.split(path)
    return f"{folder}/.{name[:-len(SUFFIX)]}.{HOST_TAG}.{os.getpid()}.{seq}{TMP_SUFFIX}"


def is_stale_tmp(name: str, mtime: float, now: float) -> bool:
    """Whether ``name`` is a kvtier temp file left by a dead writer: named exactly as
    :func:`tmp_path` names them, and its writer (on this host) is gone, or it is old.
    Any other name is never stale: it is not ours to remove."""
    m = _TMP_NAME.fullmatch(name)
    if m is None:
        return False
    if m.group(1) == HOST_TAG:
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # alive but not ours to signal
    return now - mtime > STALE_TMP_S


def write_atomic(path: str, buffers: list[bytes | memoryview], fsync: bool, seq: int) -> int:
    """Write ``buffers`` as the file ``path``: temp file, ``writev``, optional fsync, rename.
    Returns the file's time (:func:`stamp_ns`, set before the rename).

    Creates the shard folder if needed, never the root: a root that vanished
    (an unmounted share) stays an error. Raises OSError; leaves no temp file.
    """
    tmp = tmp_path(path, seq)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        _mkdir(os.path.dirname(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            writev_all(fd, buffers)
            stamp = stamp_ns()
            os.utime(fd, ns=(stamp, stamp))  # we own the temp file: explicit times allowed
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return stamp
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        pass  # another writer made it first


def read_checked(fd: int, key: ChunkKey, take: Callable[[int], np.ndarray],
                 give: Callable[[np.ndarray], None], max_payload: int) -> tuple[Header, np.ndarray, os.stat_result]:
    """(header, payload, the file's stat) of an open chunk file, header first.

    The header is read and checked (magic, version, key, header checksum) and its
    declared payload length compared with the file's size and ``max_payload``
    *before* the payload's buffer is taken: a huge (sparse) file in a shared folder
    is a CorruptChunk, never a giant allocation. The payload's checksum is the
    caller's to check (and ``payload`` to ``give`` back if it fails). Readahead for the
    payload is asked for once the header passed, so the two reads cost about one.
    """
    st = os.fstat(fd)
    if st.st_size < HEADER_SIZE:
        raise CorruptChunk(f"chunk {key.hex()}: file of {st.st_size} bytes")
    head = os.pread(fd, HEADER_SIZE, 0)
    header = parse_header(key, head)
    if header.payload_len != st.st_size - HEADER_SIZE:
        raise CorruptChunk(f"chunk {key.hex()}: file of {st.st_size} bytes, header "
                           f"says {HEADER_SIZE + header.payload_len}")
    if header.payload_len > max_payload:
        raise CorruptChunk(f"chunk {key.hex()}: a payload of {header.payload_len} bytes, "
                           f"over the bound of {max_payload}")
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, HEADER_SIZE, header.payload_len, os.POSIX_FADV_WILLNEED)
    payload = take(header.payload_len)
    try:
        _pread_at(fd, memoryview(payload).cast("B"), HEADER_SIZE, key)
    except BaseException:
        give(payload)
        raise
    return header, payload, st


def _pread_at(fd: int, view: memoryview, pos: int, key: ChunkKey) -> None:
    got = 0
    while got < view.nbytes:
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise CorruptChunk(f"chunk {key.hex()}: file shorter than its size")
        got += n


def writev_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    """``os.writev`` until every byte is written (it may write short)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
