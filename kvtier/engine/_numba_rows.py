"""Layer 5: the numba row-copy kernels (imported lazily by ``cpu_kernels``).

Module-level functions so numba can cache the compiled code on disk
(``cache=True``); a new process then loads them in milliseconds instead of
compiling for about a second each.

Why the rows are copied the way they are (measured with ``kvtier bench
engine`` and standalone loops on this 2-core EPYC, 100 MB in 64 KiB rows):

- A slice assignment (``dst[i, l, :] = src[b, :]``) goes through numba's
  generic overlap-checking path: 0.6x of a plain ``torch`` copy.
- An explicit inner loop with ordinary stores: 0.6-0.7x. The written buffer
  is far larger than the last-level cache, so every ordinary store first
  reads its cache line from memory (read for ownership): 3 memory transfers
  per byte instead of 2.
- The same loop with non-temporal (streaming) stores, which write around the
  cache: 1.0x, like the large ``memcpy`` behind a plain copy. They are used
  on x86-64; each thread's span of rows ends with ``sfence`` so its streaming
  stores are globally visible before the kernel returns. Elsewhere the kernels fall
  back to ordinary stores.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

STREAMING = platform.machine().lower() in ("x86_64", "amd64")


@intrinsic
def _store(typingctx, arr, i, val):  # pragma: no cover - compiled
    """``arr[i] = val``, as a non-temporal store on x86-64 (no bounds check).

    It addresses ``arr``'s data pointer directly, ignoring strides, so it
    accepts only C-contiguous 1-d arrays (anything else fails to compile).
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"):
        return None
    sig = types.void(arr, i, val)

    def codegen(context, builder, signature, args):
        a, idx, v = args
        ary = context.make_array(signature.args[0])(context, builder, a)
        st = builder.store(v, builder.gep(ary.data, [idx]))
        if STREAMING:
            st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fence(typingctx):  # pragma: no cover - compiled
    """``sfence`` on x86-64 (orders the streaming stores before it); nothing elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if STREAMING:
            fn = builder.module.declare_intrinsic(
                "llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


# The rows are split into ``parts`` contiguous spans (one per thread) rather
# than one task per row, so each thread fences once, not once per row. Rows
# are visited layer by layer (all blocks of layer 0, then layer 1, ...),
# which measured a little faster than block by block.


@njit(parallel=True, nogil=True, cache=True)
def gather(layers, idx, dst, parts):  # pragma: no cover - compiled
    """``dst[i, l] = layers[l][idx[i]]`` for every i, l."""
    n, num_layers = idx.shape[0], len(layers)
    width, total = dst.shape[2], n * num_layers
    for p in prange(parts):
        for t in range(p * total // parts, (p + 1) * total // parts):
            layer, i = t // n, t % n
            out, row = dst[i, layer], layers[layer][idx[i]]
            for j in range(width):
                _store(out, j, row[j])
        _fence()


@njit(parallel=True, nogil=True, cache=True)
def scatter(layers, idx, src, parts):  # pragma: no cover - compiled
    """``layers[l][idx[i]] = src[i, l]`` for every i, l."""
    n, num_layers = idx.shape[0], len(layers)
    width, total = src.shape[2], n * num_layers
    for p in prange(parts):
        for t in range(p * total // parts, (p + 1) * total // parts):
            layer, i = t // n, t % n
            out, row = layers[layer][idx[i]], src[i, layer]
            for j in range(width):
                _store(out, j, row[j])
        _fence()


# One layer at a time (layer-wise loads, ``PagedTransfer.scatter_layer``):
# the run stays one C-contiguous ``[blocks, layers, row]`` array and ``layer``
# picks the column, so each row is still a contiguous 1-d store target.


@njit(parallel=True, nogil=True, cache=True)
def scatter_layer(dst, idx, src, layer, parts):  # pragma: no cover - compiled
    """``dst[idx[i]] = src[i, layer]`` for every i."""
    n, width = idx.shape[0], src.shape[2]
    for p in prange(parts):
        for i in range(p * n // parts, (p + 1) * n // parts):
            out, row = dst[idx[i]], src[i, layer]
            for j in range(width):
                _store(out, j, row[j])
        _fence()
