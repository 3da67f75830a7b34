"""Layer 5: batched copies between paged KV and contiguous chunk buffers.

A *run* is a list of chunks whose buffers are adjacent in memory (the memory
tier hands a request consecutive slots), viewed together as one tensor
``[total_blocks, num_layers, *page]``. Moving a run costs one indexed tensor
copy per layer (``index_select`` out / ``index_copy_`` in), whatever the number
of chunks and blocks: never a Python loop per block or per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvtier.engine import cpu_kernels
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
        if (use_kernels and cpu_kernels.available() and self.device.type == "cpu" and bd == 0
                and self._word is torch.int64):
            self._kernels = cpu_kernels.RowKernels([t.numpy() for t in self._layers])

    def _run_layers(self, run: Run) -> list[torch.Tensor]:
        """Per-layer views of a run, shaped like the engine's layer tensors."""
        lay, bd = self.layout, self.layout.block_dim
        total = len(run.block_ids)
        rows = torch.from_numpy(run.region).view(self._word)
        rows = rows.view(total, lay.num_layers, *( (2, -1) if bd == 1 else (-1,) ))
        return [rows[:, layer].movedim(0, bd) for layer in range(lay.num_layers)]

    def _run_rows(self, run: Run) -> tuple[np.ndarray, np.ndarray]:
        """Block ids and the run as ``[blocks, layers, row]`` int64, for the kernels."""
        idx = np.asarray(run.block_ids, dtype=np.int64)
        return idx, run.region.view(np.int64).reshape(len(idx), self.layout.num_layers, -1)

    def gather(self, runs: Sequence[Run]) -> None:
        """Copy the runs' blocks out of paged KV into their buffers."""
        bd = self.layout.block_dim
        for run in runs:
            if self._kernels is not None:
                self._kernels.gather(*self._run_rows(run))
                continue
            idx = torch.tensor(run.block_ids, dtype=torch.int64, device=self.device)
            for src, dst in zip(self._layers, self._run_layers(run)):
                if self.device.type == "cpu":
                    torch.index_select(src, bd, idx, out=dst)
                else:  # accelerator: gather on device, then one copy to host
                    dst.copy_(src.index_select(bd, idx), non_blocking=True)
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def scatter(self, runs: Sequence[Run]) -> None:
        """Copy the runs' buffers into their blocks of paged KV."""
        bd = self.layout.block_dim
        for run in runs:
            if self._kernels is not None:
                self._kernels.scatter(*self._run_rows(run))
                continue
            idx = torch.tensor(run.block_ids, dtype=torch.int64, device=self.device)
            for dst, src in zip(self._layers, self._run_layers(run)):
                if self.device.type != "cpu":
                    src = src.to(self.device, non_blocking=True)
                dst.index_copy_(bd, idx, src)
        if self.device.type != "cpu":
            torch.accelerator.synchronize()
