"""Layer 5: what copies between an accelerator's paged KV and host memory need.

CUDA only, all of it; the CPU never gets here. Checked on a GPU by
``benchmarks/device_transfer.py`` (bitwise and speed), never in CI.

- :func:`pin_host_memory`: the memory tier's arena page-locked, so copies to
  and from it are asynchronous DMA at the link's speed;
- :class:`HostCopies` / :class:`PendingCopy`: device-to-host copies of saves on
  a side stream, overlapping the engine's next work, with bounded staging memory;
- :func:`cuda_memcpy2d`: one strided DMA per layer of a run, for layer-wise loads.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PIECE_BYTES = 256 << 20
"""A bulk copy stages a run on the device this much at a time."""
STAGING_BYTES = 1 << 30
"""Most device memory a save's copies to host hold (outside the engine's memory
budget): a save up to this size overlaps the engine whole; past it, the step waits
for the oldest copies first."""


def pin_host_memory(buffer: np.ndarray, device: torch.device) -> bool:
    """Page-lock ``buffer`` for ``device``'s copy engines (CUDA only; a no-op elsewhere).

    Copies between the memory tier and an accelerator are then true
    asynchronous DMA; from pageable memory the driver stages them through a
    bounce buffer and the calling thread waits for each. Returns whether the
    buffer is pinned; a failure (the OS limit on locked memory) is logged and
    only costs speed."""
    if device.type != "cuda" or buffer.nbytes == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 0)
    if int(err) != 0:
        log.warning("kvtier: could not pin %d bytes of host memory (%s); copies to %s stay "
                    "synchronous", buffer.nbytes, err, device)
        return False
    return True


_MEMCPY2D: list[Any] = []


def cuda_memcpy2d() -> Any:
    """CUDA's ``cudaMemcpy2DAsync`` from the runtime torch loaded, or None.

    torch has no strided host-to-device copy: it makes a strided host view
    contiguous on the CPU first (a pageable temporary, so the copy also stops
    being asynchronous). A layer of a chunk is such a view (chunks are
    block-major), so layer-wise loads on CUDA copy it with one 2-d DMA instead.
    """
    if not _MEMCPY2D:
        fn = None
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
            for path in sorted(paths):
                f = ctypes.CDLL(path).cudaMemcpy2DAsync
                f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_void_p]
                f.restype = ctypes.c_int
                fn = f
                break
        except (OSError, AttributeError):
            fn = None
        if fn is None:
            log.info("kvtier: no CUDA runtime library found; layer-wise loads copy each layer "
                     "through a contiguous host temporary")
        _MEMCPY2D.append(fn)
    return _MEMCPY2D[0]


class HostCopies:
    """An engine's device-to-host copies: one side stream, and every staging buffer
    held until its copy is done (the allocator cannot hand it out while the DMA
    still reads it). Past :data:`STAGING_BYTES` held in all, :meth:`add` first
    waits for the oldest copies, so device memory stays bounded."""

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.Stream(device=device)
        self._device = device
        self._held: deque[tuple[Any, torch.Tensor]] = deque()  # (event, staging), in order
        self._bytes = 0

    def add(self, host: torch.Tensor, staging: torch.Tensor) -> Any:
        """Queue ``host <- staging`` after the work queued so far on the current stream;
        returns the event that marks it done."""
        while self._held and self._bytes + staging.numel() > STAGING_BYTES:
            self._held[0][0].synchronize()
            self.reap()
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            host.copy_(staging, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self._stream)
        self._held.append((event, staging))
        self._bytes += staging.numel()
        return event

    def reap(self) -> None:
        """Let go of the staging of every finished copy (one stream: they finish in order)."""
        while self._held and self._held[0][0].query():
            self._bytes -= self._held.popleft()[1].numel()


class PendingCopy:
    """The copies of one :meth:`PagedTransfer.gather` (``wait=False``)."""

    def __init__(self, copies: HostCopies) -> None:
        self._copies = copies
        self._last: Any = None

    def add(self, host: torch.Tensor, staging: torch.Tensor) -> None:
        self._last = self._copies.add(host, staging)

    def done(self) -> bool:
        """Whether the host buffers hold the data (never blocks)."""
        if self._last is not None and not self._last.query():
            return False
        self._copies.reap()
        return True

    def wait(self) -> None:
        """Block until the host buffers hold the data."""
        if self._last is not None:
            self._last.synchronize()
        self._copies.reap()
