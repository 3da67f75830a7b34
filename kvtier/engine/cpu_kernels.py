"""Layer 5: compiled CPU kernels for moving KV rows (numba, optional).

``torch.index_select`` into a strided buffer runs on one thread and reaches
about 60% of a plain copy here; these kernels copy every (block, layer) row
of a run in parallel and run at plain-copy speed (``kvtier bench engine``).
They are used for CPU tensors with the block dimension first; anything else,
or a machine without numba, uses the torch path in :mod:`kvtier.engine.transfer`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

try:  # numba ships with vLLM; kvtier does not require it
    import numba
    from numba import njit, prange
    from numba.typed import List as TypedList
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

_lock = threading.Lock()  # numba's thread pool takes one caller at a time

if numba is not None:
    @njit(parallel=True, nogil=True, cache=True)
    def _gather(layers, idx, dst):  # pragma: no cover - compiled
        n, num_layers = idx.shape[0], len(layers)
        for t in prange(n * num_layers):
            i, layer = t // num_layers, t % num_layers
            dst[i, layer, :] = layers[layer][idx[i], :]

    @njit(parallel=True, nogil=True, cache=True)
    def _scatter(layers, idx, src):  # pragma: no cover - compiled
        n, num_layers = idx.shape[0], len(layers)
        for t in prange(n * num_layers):
            i, layer = t // num_layers, t % num_layers
            layers[layer][idx[i], :] = src[i, layer, :]


def available() -> bool:
    """Whether the compiled kernels can be used in this process."""
    return numba is not None


class RowKernels:
    """Parallel row copies between per-layer ``[num_blocks, row]`` int64 arrays and runs."""

    def __init__(self, layers: Sequence[np.ndarray]) -> None:
        if numba is None:
            raise RuntimeError("numba is not installed")
        self._layers: Any = TypedList(layers)

    def gather(self, idx: np.ndarray, dst: np.ndarray) -> None:
        """``dst[i, l] = layers[l][idx[i]]`` for every i and l, in parallel."""
        with _lock:
            _gather(self._layers, idx, dst)

    def scatter(self, idx: np.ndarray, src: np.ndarray) -> None:
        """``layers[l][idx[i]] = src[i, l]`` for every i and l, in parallel."""
        with _lock:
            _scatter(self._layers, idx, src)
