"""Layer 5: the numba row-copy kernels (imported lazily by ``cpu_kernels``).

Module-level functions so numba can cache the compiled code on disk
(``cache=True``); a new process then loads them in milliseconds instead of
compiling for about a second each.
"""

from __future__ import annotations

from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def gather(layers, idx, dst):  # pragma: no cover - compiled
    """``dst[i, l] = layers[l][idx[i]]`` for every i, l."""
    n, num_layers = idx.shape[0], len(layers)
    for t in prange(n * num_layers):
        i, layer = t // num_layers, t % num_layers
        dst[i, layer, :] = layers[layer][idx[i], :]


@njit(parallel=True, nogil=True, cache=True)
def scatter(layers, idx, src):  # pragma: no cover - compiled
    """``layers[l][idx[i]] = src[i, l]`` for every i, l."""
    n, num_layers = idx.shape[0], len(layers)
    for t in prange(n * num_layers):
        i, layer = t // num_layers, t % num_layers
        layers[layer][idx[i], :] = src[i, layer, :]
