"""``kvtier bench engine``: store/retrieve bandwidth of the cache engine vs a plain copy.

Setup: a realistic layout (default: 24 layers, 2 KV heads, head dim 64, bf16,
vLLM CPU paged layout with 128-token blocks), an 8k-token prompt whose blocks
are scattered over an engine KV four times larger, a memory tier holding the
chunks. Store = gather from paged KV into the memory tier's pooled buffers;
retrieve = scatter from the memory tier into other, shuffled blocks. The
baseline is a plain contiguous ``torch`` copy of the same number of bytes,
measured in the same run. Medians over ``--repeats`` rounds; in each round the copy, the store and
the retrieve run back to back, so all three see the same machine load.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import LayoutKind, PagedLayout, torch_dtype
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int,
                         before: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds of each function, measured round-robin so that every one of
    them sees the same machine conditions (other load drifts over a run)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up and is discarded
        for name, fn in fns.items():
            if name in before:
                before[name]()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def _path(engine: CacheEngine) -> str:
    """Which copy path the engine took (and, for the kernels, on which thread pool)."""
    if not engine._transfer._kernels:
        return "torch index ops"
    import numba

    return f"numba kernels ({numba.threading_layer()} threads)"


def run(args: Any) -> dict[str, Any]:
    """Run the benchmark; returns the result dict printed by the CLI."""
    torch.manual_seed(0)
    lay = PagedLayout(LayoutKind(args.layout), args.layers, args.kv_heads, args.head_dim,
                      args.block_size, args.dtype)
    n_blocks = -(-args.tokens // args.block_size)
    engine_blocks = n_blocks * 4
    dtype = torch_dtype(args.dtype)
    kv = [torch.randn(lay.layer_shape(engine_blocks)).to(dtype) for _ in range(args.layers)]
    hasher = ChunkHasher(Namespace("bench", lay.signature(), args.chunk_size))
    chunk_bytes = lay.chunk_nbytes(args.chunk_size // args.block_size)
    mem = MemoryTier(chunk_bytes * (hasher.num_chunks(args.tokens) + 2), chunk_bytes)
    engine = CacheEngine(hasher, lay, ChunkStore([mem]))
    engine.register(kv)
    tokens = torch.randint(0, 50_000, (args.tokens,)).tolist()
    perm = torch.randperm(engine_blocks).tolist()  # disjoint, shuffled source and target
    src_blocks, dst_blocks = perm[:n_blocks], perm[n_blocks:2 * n_blocks]
    keys = hasher.keys(tokens)
    nbytes = len(keys) * chunk_bytes

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    end_token = len(keys) * args.chunk_size
    fns = {"copy": lambda: dst.copy_(src),
           "store": lambda: engine.store_kv(tokens, src_blocks, keys=keys),
           "retrieve": lambda: engine.retrieve_kv(tokens, dst_blocks, end_token, keys=keys)}
    # store needs the chunks absent, retrieve needs them present: each resets its state.
    before = {"store": lambda: mem.delete_many(keys),
              "retrieve": lambda: engine.store_kv(tokens, src_blocks, keys=keys)}
    med = _interleaved_medians(fns, args.repeats, before)
    copy_s, store_s, retrieve_s = med["copy"], med["store"], med["retrieve"]
    bpb = args.chunk_size // args.block_size
    bd = lay.block_dim
    ok = all(torch.equal(kv[layer].select(bd, src_blocks[b]), kv[layer].select(bd, dst_blocks[b]))
             for layer in (0, args.layers - 1) for b in range(len(keys) * bpb))
    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    return {
        "setup": {"layout": lay.signature(), "tokens": args.tokens, "chunks": len(keys),
                  "bytes": nbytes, "chunk_size": args.chunk_size, "repeats": args.repeats,
                  "torch_threads": torch.get_num_threads(), "engine_blocks": engine_blocks,
                  "path": _path(engine)},
        "store_gbps": gbps(store_s), "retrieve_gbps": gbps(retrieve_s), "copy_gbps": gbps(copy_s),
        "store_ratio": copy_s / store_s, "retrieve_ratio": copy_s / retrieve_s,
        "store_ms": store_s * 1e3, "retrieve_ms": retrieve_s * 1e3, "copy_ms": copy_s * 1e3,
        "bitwise_equal": ok,
    }
