"""Layer 3: the memory tier's arena mapped ahead of use (:class:`Prefaulter`)."""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import threading
import time
from typing import Callable

import numpy as np

from kvtier.threads import NamedThread

log = logging.getLogger(__name__)

MADV_HUGEPAGE = 14  # back the range with transparent huge pages where the kernel allows
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, contents untouched
PREFAULT_AHEAD = 256 << 20  # bytes of arena kept mapped beyond the highest slot used
PREFAULT_PIECE = 32 << 20  # bytes per madvise call of the prefault thread


class Prefaulter:
    """Keeps the arena's pages mapped ahead of the slots in use, on a background thread.

    A fresh arena's pages are mapped lazily: the first save into each slot took a page
    fault per 4 KiB on the engine's thread (measured: 4 chunks of 6 MiB gathered in
    33 ms, where a copy into mapped pages takes 2; every decoder in the step waited).
    ``madvise(MADV_POPULATE_WRITE)`` maps pages without writing them (safe beside
    writers), through ctypes so the GIL is released; it runs :data:`PREFAULT_AHEAD`
    bytes ahead of the highest slot allocated, so memory is committed as the cache
    fills, not all at start-up. The thread exists only while there is mapping to do
    (it holds the buffer meanwhile). Kernels without the call: pages fault in on first
    use.

    ``ahead=None`` maps the whole buffer now, on the caller's thread, before anything is
    stored (pages the call cannot map are touched, which is safe while nothing is
    stored): the engine then never shares its cores with the mapping. Mapping ahead on a
    thread still cost a server that never hits 3% of its throughput and 8% of its ITL
    p99 on two cores (``kvtier bench scale --part miss``): the thread's page faults ran
    on the cores the engine's OpenMP threads compute on, and a step waits for its
    slowest thread. Pinned host buffers of a GPU deployment are mapped at allocation
    the same way. Either way the range is advised to use transparent huge pages where
    the kernel allows (fewer faults, fewer TLB misses for the copy kernels).
    """

    def __init__(self, buffer: np.ndarray, ahead: int | None = PREFAULT_AHEAD) -> None:
        page = mmap.PAGESIZE
        addr = buffer.ctypes.data
        self._buffer = buffer  # alive while a mapping thread works on it
        self._base, self._page, self._ahead = addr, page, ahead
        self._done = -(-addr // page) * page  # mapped up to here
        self._want = self._done
        self._end = (addr + buffer.nbytes) // page * page
        self._cv = threading.Condition()
        self._madvise = _madvise()
        self._running = False
        if self._madvise is not None and self._end > self._done:
            self._madvise(self._done, self._end - self._done, MADV_HUGEPAGE)  # advice only
        if ahead is None:
            t0 = time.monotonic()
            self._map_all()
            took = time.monotonic() - t0
            (log.info if took > 1.0 else log.debug)(
                "memory tier: %.1f GiB mapped in %.1f s before serving (memory.map_at_start)",
                buffer.nbytes / 2**30, took)
        else:
            self.need(0)

    def _map_all(self) -> None:
        end, madvise = self._end, self._madvise
        at = self._done if madvise is None else _populate(madvise, self._done, end)
        err = ctypes.get_errno() if at < end and madvise is not None else errno.EINVAL
        if err != errno.EINVAL:  # no memory now (or mlock limits): the rest maps on use
            log.warning("memory tier: %.1f of %.1f GiB mapped before serving (%s); the rest "
                        "maps as the cache fills", (at - self._base) / 2**30,
                        self._buffer.nbytes / 2**30, os.strerror(err))
            self._done = self._want = at
            return
        if at < end:  # a kernel without the call: write a byte per page (nothing stored yet)
            view = self._buffer[at - self._base:end - self._base]
            view[::self._page] = 0
        self._done = self._want = end

    def need(self, upto: int) -> None:
        """Slots up to byte ``upto`` of the arena are in use: map ahead of them."""
        if self._ahead is None:
            return  # all mapped at start
        page = self._page
        want = min(self._end, -(-(self._base + upto + self._ahead) // page) * page)
        with self._cv:
            if want <= self._want:
                return
            self._want = want
            if self._running or self._madvise is None:
                return
            self._running = True
        NamedThread(target=self._run, name="kvtier-prefault", daemon=True).start()

    @property
    def working(self) -> bool:
        """Whether pages are being mapped ahead (False: unsupported, or it failed)."""
        return self._madvise is not None

    def mapped(self) -> int:
        """Bytes of the arena mapped so far (from its first whole page)."""
        return self._done - self._base

    def idle(self, timeout_s: float) -> bool:
        """Wait until everything asked for is mapped (tests); whether it is."""
        with self._cv:
            return self._cv.wait_for(lambda: self._done >= self._want or self._madvise is None,
                                     timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                madvise = self._madvise
                if self._done >= self._want or madvise is None:
                    self._running = False  # caught up: the thread ends
                    self._cv.notify_all()
                    return
                at, want = self._done, self._want
            at = _populate(madvise, at, want)
            with self._cv:
                if at < want:  # unsupported here (or no memory now): lazy from now on
                    self._madvise = None
                self._done = at
                self._cv.notify_all()


def _populate(madvise: Callable[[int, int, int], int], at: int, end: int) -> int:
    """Map pages ``[at, end)`` writable, :data:`PREFAULT_PIECE` bytes per call; where it
    stopped (``end``, or the first piece the kernel refused: ``ctypes.get_errno()`` says
    why)."""
    while at < end:
        if madvise(at, min(PREFAULT_PIECE, end - at), MADV_POPULATE_WRITE) != 0:
            return at
        at += PREFAULT_PIECE
    return end


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
