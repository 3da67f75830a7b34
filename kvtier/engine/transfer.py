"""Layer 5: batched copies between paged KV and contiguous chunk buffers.

A *run* is a list of chunks whose buffers are adjacent in memory (the memory
tier hands a request consecutive slots), viewed together as one tensor
``[total_blocks, num_layers, *page]``. Moving a run costs one indexed tensor
copy per layer (``index_select`` out / ``index_copy_`` in), whatever the number
of chunks and blocks: never a Python loop per block or per token.
``scatter_layer`` moves one layer of the runs; the bulk calls move all of
them. :meth:`PagedTransfer.begin_scatter` is the layer-wise
load: on an accelerator it queues every layer's host-to-device copy on a side
stream at once and the compute stream waits only for the layer it is about to
read (the copies overlap the forward pass); on the CPU, where the copy and the
forward share the cores, each layer is copied when it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kvtier.engine import cpu_kernels
from kvtier.engine.accel import PIECE_BYTES, HostCopies, PendingCopy, cuda_memcpy2d
from kvtier.engine.layout import PagedLayout, torch_dtype


@dataclass
class Run:
    """Chunks stored back to back: ``region`` holds all their blocks, in order."""

    region: np.ndarray  # uint8, the union of the chunks' payloads
    block_ids: list[int]  # engine block of each block row of ``region``


def plan_runs(payloads: Sequence[np.ndarray], block_ids: Sequence[Sequence[int]]) -> list[Run]:
    """Group chunk buffers that are adjacent in memory into runs."""
    runs: list[Run] = []
    start = 0
    for i in range(1, len(payloads) + 1):
        if i < len(payloads) and _adjacent(payloads[i - 1], payloads[i]):
            continue
        first, nbytes = payloads[start], sum(p.nbytes for p in payloads[start:i])
        # Safe: the chunks of a run are valid buffers that touch, so their union is too.
        region = np.lib.stride_tricks.as_strided(first, shape=(nbytes,), strides=(1,))
        runs.append(Run(region, [b for ids in block_ids[start:i] for b in ids]))
        start = i
    return runs


def _adjacent(a: np.ndarray, b: np.ndarray) -> bool:
    return a.ctypes.data + a.nbytes == b.ctypes.data


def _word(nbytes: int) -> torch.dtype:
    """The widest integer type that tiles ``nbytes``: wider words copy faster on CPU."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if nbytes % size == 0:
            return dtype
    return torch.uint8


class PagedTransfer:
    """Moves runs in and out of one engine's per-layer KV tensors."""

    def __init__(self, layout: PagedLayout, kv_caches: Sequence[torch.Tensor],
                 use_kernels: bool = True) -> None:
        layout.check(kv_caches)
        self.layout = layout
        self.device = kv_caches[0].device
        bd = layout.block_dim
        row_bytes = layout.page_nbytes // (2 if bd == 1 else 1)
        self._word = _word(row_bytes)
        # Each layer as [(2,) num_blocks, row] of machine words: a block is then
        # one (or two) contiguous rows, whatever the element dtype.
        self._layers = [t.view(*t.shape[:bd + 1], -1).view(self._word) for t in kv_caches]
        self._dtype = torch_dtype(layout.dtype)
        self._kernels = None
        self._host_copies: HostCopies | None = None  # CUDA saves' side stream, made on use
        if (use_kernels and cpu_kernels.available() and self.device.type == "cpu" and bd == 0
                and self._word is torch.int64):
            self._kernels = cpu_kernels.RowKernels([t.numpy() for t in self._layers])

    def _run_layers(self, run: Run, region: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer views of a run (or of ``region``, a uint8 copy of it on the
        accelerator), shaped like the engine's layer tensors."""
        lay, bd = self.layout, self.layout.block_dim
        total = len(run.block_ids)
        rows = (torch.from_numpy(run.region) if region is None else region).view(self._word)
        rows = rows.view(total, lay.num_layers, *( (2, -1) if bd == 1 else (-1,) ))
        return [rows[:, layer].movedim(0, bd) for layer in range(lay.num_layers)]

    def _run_rows(self, run: Run) -> tuple[np.ndarray, np.ndarray]:
        """Block ids and the run as ``[blocks, layers, row]`` int64, for the kernels."""
        idx = np.asarray(run.block_ids, dtype=np.int64)
        return idx, run.region.view(np.int64).reshape(len(idx), self.layout.num_layers, -1)

    def _pieces(self, run: Run) -> list[Run]:
        """``run`` cut into runs of at most :data:`PIECE_BYTES` (whole blocks): a
        block is contiguous in a run, so each piece is a slice of its region."""
        per_block = self.layout.num_layers * self.layout.page_nbytes
        step = max(1, PIECE_BYTES // per_block)
        return [Run(run.region[i * per_block:(i + step) * per_block], run.block_ids[i:i + step])
                for i in range(0, len(run.block_ids), step)]

    def gather(self, runs: Sequence[Run], wait: bool = True) -> PendingCopy | None:
        """Copy the runs' blocks out of paged KV into their buffers.

        On an accelerator each piece of a run (:data:`PIECE_BYTES`) is gathered
        on the device, in stream order (before anything later can overwrite the
        blocks), into a staging copy, which one contiguous copy sends to the host
        on a side stream (a DMA when the host buffer is pinned; a strided host
        view would be made contiguous on the CPU first). ``wait=False`` on CUDA
        returns a :class:`PendingCopy` that says when the buffers are filled;
        else (and always on the CPU) the copy is complete on return (None)."""
        bd = self.layout.block_dim
        pending = None
        try:
            for run in runs:
                if self._kernels is not None:
                    self._kernels.gather(*self._run_rows(run))
                    continue
                if self.device.type == "cpu":
                    idx = torch.tensor(run.block_ids, dtype=torch.int64)
                    for src, dst in zip(self._layers, self._run_layers(run)):
                        torch.index_select(src, bd, idx, out=dst)
                    continue
                for piece in self._pieces(run):
                    idx = torch.tensor(piece.block_ids, dtype=torch.int64, device=self.device)
                    staging = torch.empty(piece.region.nbytes, dtype=torch.uint8,
                                          device=self.device)
                    for src, dst in zip(self._layers, self._run_layers(piece, staging)):
                        torch.index_select(src, bd, idx, out=dst)
                    host = torch.from_numpy(piece.region)
                    if self.device.type != "cuda":
                        host.copy_(staging)
                        continue
                    if self._host_copies is None:
                        self._host_copies = HostCopies(self.device)
                    pending = pending or PendingCopy(self._host_copies)
                    pending.add(host, staging)
        except BaseException:
            if pending is not None:  # no copy may still write the buffers once we raise
                pending.wait()
            raise
        if pending is not None and wait:
            pending.wait()
            return None
        return pending

    def scatter(self, runs: Sequence[Run]) -> None:
        """Copy the runs' buffers into their blocks of paged KV (on an accelerator, one
        contiguous copy per piece of a run, then one indexed copy per layer)."""
        bd = self.layout.block_dim
        for run in runs:
            if self._kernels is not None:
                self._kernels.scatter(*self._run_rows(run))
                continue
            for piece in ([run] if self.device.type == "cpu" else self._pieces(run)):
                idx = torch.tensor(piece.block_ids, dtype=torch.int64, device=self.device)
                # Freed after the indexed copies are queued: the allocator reuses it
                # only for work queued after them on this stream.
                staging = None if self.device.type == "cpu" else \
                    torch.from_numpy(piece.region).to(self.device, non_blocking=True)
                for dst, src in zip(self._layers, self._run_layers(piece, staging)):
                    dst.index_copy_(bd, idx, src)
        if self.device.type != "cpu":
            torch.accelerator.synchronize()  # the host buffers may be reused on return

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.layout.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        return layer

    def scatter_layer(self, runs: Sequence[Run], layer: int) -> None:
        """Copy one layer of the runs' buffers into their blocks of paged KV."""
        bd, layer = self.layout.block_dim, self._layer(layer)
        for run in runs:
            if self._kernels is not None:
                idx, rows = self._run_rows(run)
                self._kernels.scatter_layer(idx, rows, layer)
                continue
            idx = torch.tensor(run.block_ids, dtype=torch.int64, device=self.device)
            dst, src = self._layers[layer], self._run_layers(run)[layer]
            if self.device.type != "cpu":
                src = src.to(self.device, non_blocking=True)
            dst.index_copy_(bd, idx, src)
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def begin_scatter(self, runs: Sequence[Run]) -> LayerScatter:
        """Start a layer-wise load of the runs (see :class:`LayerScatter`)."""
        return LayerScatter(self, list(runs))


class LayerScatter:
    """A scatter of runs one layer at a time, in step with a forward pass.

    :meth:`layer` must be called before the compute that reads that layer; it
    returns once that compute may be issued. :meth:`done` returns once every
    queued copy has finished (the runs' host buffers may be reused then).
    """

    def __init__(self, transfer: PagedTransfer, runs: list[Run]) -> None:
        self.transfer = transfer
        self.runs = runs
        self.todo = set(range(transfer.layout.num_layers))
        self._events: list[Any] | None = None
        self._stream: Any = None
        if transfer.device.type == "cuda" and runs:
            self._queue_all()

    def _queue_all(self) -> None:
        t, cuda = self.transfer, torch.cuda
        copy2d = cuda_memcpy2d()
        self._stream = cuda.Stream(device=t.device)
        self._stream.wait_stream(cuda.current_stream(t.device))  # blocks handed out before
        self._events = []
        try:
            self._queue(copy2d)
        except BaseException:  # nothing may still read the chunks or write KV once we raise
            self._stream.synchronize()
            raise

    def _queue(self, copy2d: Any) -> None:
        t = self.transfer
        bd, cuda, lay = t.layout.block_dim, torch.cuda, t.layout
        assert self._events is not None
        row = lay.page_nbytes  # one block of one layer
        with cuda.stream(self._stream):
            idxs = [torch.tensor(r.block_ids, dtype=torch.int64).to(t.device, non_blocking=True)
                    for r in self.runs]
            for layer in range(lay.num_layers):
                for run, idx in zip(self.runs, idxs):
                    nb = len(run.block_ids)
                    # One layer of the run on the device. Allocated on the side stream
                    # and used only there: the allocator hands it out again only for
                    # work queued after this layer's copies (one layer's worth held).
                    part = torch.empty(nb * row, dtype=torch.uint8, device=t.device)
                    if copy2d is not None:  # one strided DMA: the layer's page of each block
                        err = copy2d(part.data_ptr(), row, run.region.ctypes.data + layer * row,
                                     lay.num_layers * row, row, nb, 1,
                                     self._stream.cuda_stream)
                        if err != 0:
                            raise RuntimeError(f"cudaMemcpy2DAsync failed: error {err}")
                    else:  # torch makes the strided host view contiguous first
                        part.copy_(torch.from_numpy(run.region).view(nb, lay.num_layers, row)
                                   [:, layer].reshape(-1), non_blocking=True)
                    rows = part.view(t._word).view(nb, *((2, -1) if bd == 1 else (-1,)))
                    t._layers[layer].index_copy_(bd, idx, rows.movedim(0, bd))
                ev = cuda.Event()
                ev.record(self._stream)
                self._events.append(ev)

    def layer(self, layer: int) -> None:
        """Layer ``layer`` is in paged KV for whatever the caller issues next."""
        layer = self.transfer._layer(layer)
        if layer not in self.todo:
            return
        self.todo.discard(layer)
        if self._events is not None:
            torch.cuda.current_stream(self.transfer.device).wait_event(self._events[layer])
        else:
            self.transfer.scatter_layer(self.runs, layer)

    def done(self) -> None:
        """Wait for every queued copy (the host buffers are free to reuse after)."""
        if self._stream is not None:
            self._stream.synchronize()
