"""kvtier's copies between an accelerator's paged KV and the memory tier (device check).

Run on a machine with a CUDA GPU (``python benchmarks/device_transfer.py``); on
a CPU-only machine it runs the same checks on the CPU at a toy size. No vLLM:
the engine's KV is built in vLLM's GPU flash-attention layout
(``[2, num_blocks, block_size, num_kv_heads, head_dim]`` per layer), a
Llama-3-8B shape (32 layers, 8 KV heads x 128, bf16, blocks of 16 tokens).

1. Bitwise: store then retrieve through kvtier's CacheEngine and memory tier,
   bulk and layer-wise, in bf16, fp16 and fp32, into other blocks.
2. Speed of a ``--tokens`` store (gather, device to host) and load (scatter,
   host to device), median of ``--reps``: the memory tier pinned (what kvtier
   does on CUDA) and pageable; and the pre-staging copy (strided host views
   moved layer by layer), as the baseline.
3. One engine step that loads a ``--tokens`` hit while computing ``new`` tokens
   (a synthetic forward: per layer the MLP of the shape on ``new`` tokens plus a
   read of the layer's loaded KV): the load in bulk before the forward, against
   layer-wise (copies queued on a side stream, each layer's compute waiting only
   for its own layer). Ratio below 1: layer-wise faster. And a step that saves
   ``--tokens`` of KV: waiting for the copy to host before the forward pass,
   against the copy overlapping it (what ``CacheEngine.store_kv`` does on CUDA).

Prints one JSON object (and writes it to ``$OUT/device_transfer.json`` if OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from typing import Any, Callable

import torch

from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import LayoutKind, PagedLayout
from kvtier.engine.transfer import PagedTransfer
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier

CHUNK = 256


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], Any], reps: int, warm: int = 2) -> float:
    """Median seconds of ``fn`` (device synchronised around each call)."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def setup(dev: torch.device, layers: int, heads: int, head_dim: int, block: int, dtype: str,
          num_blocks: int, tokens: int, pin: bool):
    lay = PagedLayout(LayoutKind.FLASH_ATTN, layers, heads, head_dim, block, dtype)
    bpc = CHUNK // block
    hasher = ChunkHasher(Namespace("m", lay.signature(), CHUNK), True, block)
    chunks = -(-tokens // CHUNK)
    mem = MemoryTier((chunks + 1) * lay.chunk_nbytes(bpc), lay.chunk_nbytes(bpc))
    mem.pinned = not pin  # True: the engine leaves it pageable
    eng = CacheEngine(hasher, lay, ChunkStore([mem]))
    dt = getattr(torch, dtype)
    kv = [torch.randn(lay.layer_shape(num_blocks), device=dev).to(dt) for _ in range(layers)]
    eng.register(kv)
    return eng, lay, mem, kv


def check_bitwise(dev: torch.device) -> dict[str, bool]:
    out = {}
    for dtype in ("bfloat16", "float16", "float32"):
        for layerwise in (False, True):
            eng, lay, _, kv = setup(dev, 3, 2, 16, 16, dtype, 100, 600, pin=True)
            tokens = list(range(600))
            n_blocks = -(-600 // 16)
            src_ids = list(range(5, 5 + n_blocks))
            dst_ids = list(range(99, 99 - n_blocks, -1))  # apart from src_ids
            eng.store_kv(tokens, src_ids)
            hidden = eng.lookup(tokens)  # CUDA: not published before complete_stores
            eng.complete_stores(wait=True)
            # Stored: 2 chunks + the partial chunk's 5 whole blocks (592 tokens). Load
            # all but the last token: its block is shared with the forward pass.
            end = eng.lookup(tokens) - 1
            pending: list = []
            res = eng.retrieve_kv(tokens, dst_ids, end, layerwise=pending if layerwise else None)
            for p in pending:
                p.finish()
                p.close()
            sync(dev)
            loaded = -(-end // 16)
            ok = res.end == end == 591 and (len(pending) == 1) == layerwise
            ok &= hidden == (0 if dev.type == "cuda" else 592)
            for layer in range(3):
                for s, d in zip(src_ids[:loaded], dst_ids[:loaded]):
                    ok &= torch.equal(kv[layer][:, s], kv[layer][:, d])
                for s, d in zip(src_ids[loaded:], dst_ids[loaded:]):  # past the hit
                    ok &= not torch.equal(kv[layer][:, s], kv[layer][:, d])
            out[f"{dtype}{'-layerwise' if layerwise else ''}"] = bool(ok)
    return out


def old_scatter(t: PagedTransfer, runs) -> None:
    """The copy before staging: each layer's strided host view moved on its own."""
    bd = t.layout.block_dim
    for run in runs:
        idx = torch.tensor(run.block_ids, dtype=torch.int64, device=t.device)
        for dst, src in zip(t._layers, t._run_layers(run)):
            dst.index_copy_(bd, idx, src.to(t.device, non_blocking=True))
    sync(t.device)


def speed(dev: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for pin in (True, False):
        eng, lay, mem, kv = setup(dev, a.layers, a.heads, a.head_dim, a.block, "bfloat16",
                                  a.num_blocks, a.tokens, pin)
        tokens = list(range(a.tokens))
        n_blocks = a.tokens // a.block
        src_ids = list(range(n_blocks))
        dst_ids = list(range(n_blocks, 2 * n_blocks))
        nbytes = n_blocks * lay.num_layers * lay.page_nbytes

        def store() -> None:
            mem.clear()
            eng.store_kv(tokens, src_ids)
            eng.complete_stores(wait=True)

        t_store = timed(dev, store, a.reps)
        issue, compute = [], []
        for _ in range(a.reps):  # what the step pays: the call, and the compute stream
            mem.clear()
            sync(dev)
            cuda = dev.type == "cuda"
            if cuda:
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
            t0 = time.perf_counter()
            eng.store_kv(tokens, src_ids)
            issue.append(time.perf_counter() - t0)
            if cuda:
                end.record()
            eng.complete_stores(wait=True)
            sync(dev)
            compute.append(start.elapsed_time(end) / 1e3 if cuda else issue[-1])
        eng.store_kv(tokens, src_ids)
        eng.complete_stores(wait=True)
        t_load = timed(dev, lambda: eng.retrieve_kv(tokens, dst_ids, a.tokens), a.reps)
        name = "pinned" if pin else "pageable"
        res[name] = {"store_gbps": nbytes / t_store / 1e9, "load_gbps": nbytes / t_load / 1e9,
                     "store_ms": t_store * 1e3, "load_ms": t_load * 1e3,
                     "store_call_ms": statistics.median(issue) * 1e3,
                     "store_compute_stream_ms": statistics.median(compute) * 1e3,
                     "arena_pinned": mem.pinned if pin else False}
        if pin:
            chunks = eng.fetch(eng.hasher.keys(tokens))
            from kvtier.engine.transfer import plan_runs
            runs = plan_runs([c.payload for c in chunks],
                             [dst_ids[i * (CHUNK // a.block):(i + 1) * (CHUNK // a.block)]
                              for i in range(len(chunks))])
            t_old = timed(dev, lambda: old_scatter(eng._bound(None), runs), a.reps)
            for c in chunks:
                c.release()
            res["load_strided_before"] = {"load_gbps": nbytes / t_old / 1e9,
                                          "load_ms": t_old * 1e3}
        res["bytes"] = nbytes
        kv.clear()  # frees the device memory before the next configuration
        eng = mem = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return res


def overlap(dev: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    eng, lay, mem, kv = setup(dev, a.layers, a.heads, a.head_dim, a.block, "bfloat16",
                              a.num_blocks, a.tokens, True)
    tokens = list(range(a.tokens))
    n_blocks = a.tokens // a.block
    src_ids = list(range(n_blocks))
    eng.store_kv(tokens, src_ids)
    eng.complete_stores(wait=True)
    dst_ids = list(range(n_blocks, 2 * n_blocks))
    idx = torch.tensor(dst_ids, device=dev)
    hidden, inter = a.hidden, a.intermediate
    w1 = torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16) * 0.01
    w2 = torch.randn(inter, hidden, device=dev, dtype=torch.bfloat16) * 0.01
    rows: dict[str, Any] = {}
    for new in a.new_tokens:
        x0 = torch.randn(new, hidden, device=dev, dtype=torch.bfloat16)

        def forward(wait: Callable[[int], None]) -> None:
            x = x0
            for layer in range(lay.num_layers):
                wait(layer)
                kv_read = kv[layer].index_select(1, idx).float().mean()  # attention's read
                x = (torch.nn.functional.gelu(x @ w1) @ w2) * 0.5 + x + kv_read * 0

        def bulk() -> None:
            eng.retrieve_kv(tokens, dst_ids, a.tokens - 1)
            forward(lambda layer: None)

        def layerwise() -> None:
            pending: list = []
            eng.retrieve_kv(tokens, dst_ids, a.tokens - 1, layerwise=pending)
            forward(lambda layer: [p.scatter(layer) for p in pending])
            for p in pending:
                p.close()

        def save(overlap: bool) -> None:  # a step that saves the hit's chunks
            mem.clear()
            eng.store_kv(tokens, src_ids)
            if not overlap:  # the step waits for the copy to host (before: always)
                eng.complete_stores(wait=True)
            forward(lambda layer: None)
            eng.complete_stores(wait=True)

        t_fwd = timed(dev, lambda: forward(lambda layer: None), a.reps)
        t_bulk = timed(dev, bulk, a.reps)
        t_lw = timed(dev, layerwise, a.reps)
        t_save_wait = timed(dev, lambda: save(False), a.reps)
        t_save = timed(dev, lambda: save(True), a.reps)
        rows[str(new)] = {"forward_ms": t_fwd * 1e3, "bulk_ms": t_bulk * 1e3,
                          "layerwise_ms": t_lw * 1e3, "layerwise_vs_bulk": t_lw / t_bulk,
                          "save_waiting_ms": t_save_wait * 1e3,
                          "save_overlapped_ms": t_save * 1e3,
                          "save_overlapped_vs_waiting": t_save / t_save_wait}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=8192 if cuda else 1024)
    ap.add_argument("--layers", type=int, default=32 if cuda else 4)
    ap.add_argument("--heads", type=int, default=8 if cuda else 2)
    ap.add_argument("--head-dim", type=int, default=128 if cuda else 64)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    ap.add_argument("--intermediate", type=int, default=14336 if cuda else 512)
    ap.add_argument("--new-tokens", type=int, nargs="+",
                    default=[16, 512, 2048, 8192] if cuda else [16, 128])
    ap.add_argument("--reps", type=int, default=10 if cuda else 3)
    a = ap.parse_args()
    a.num_blocks = 2 * a.tokens // a.block + 8
    dev = torch.device("cuda" if cuda else "cpu")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                           "torch": torch.__version__, "setup": {
                               k: v for k, v in vars(a).items() if k != "num_blocks"}}
    t0 = time.perf_counter()
    for name, part in (("bitwise", check_bitwise), ("speed", lambda d: speed(d, a)),
                       ("step", lambda d: overlap(d, a))):
        try:  # one part failing still reports the others
            res[name] = part(dev)
        except Exception:
            res[name] = {"error": traceback.format_exc()}
    if cuda:
        from kvtier.engine.accel import cuda_memcpy2d
        res["layerwise_uses_memcpy2d"] = cuda_memcpy2d() is not None
    res["seconds"] = time.perf_counter() - t0
    text = json.dumps(res, indent=1)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "device_transfer.json"), "w") as f:
            f.write(text)
    return 0 if all(v is True for v in res["bitwise"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
