"""Cache engine: batched store/retrieve between paged KV and the store, bitwise exact."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.engine import cpu_kernels
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import LayoutKind, PagedLayout, detect_layout
from kvtier.errors import LayoutMismatch
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier

LAYERS, HEADS, HEAD_DIM, BLOCK, CHUNK = 3, 2, 8, 4, 8  # 2 blocks per chunk


def make(kind: LayoutKind, dtype: str, kernels: bool = True, slots: int = 16,
         partial: bool = False):
    lay = PagedLayout(kind, LAYERS, HEADS, HEAD_DIM, BLOCK, dtype)
    hasher = ChunkHasher(Namespace("m", lay.signature(), CHUNK), partial, BLOCK)
    mem = MemoryTier(slots * lay.chunk_nbytes(2), lay.chunk_nbytes(2))
    eng = CacheEngine(hasher, lay, ChunkStore([mem]))
    return eng, lay, mem


def kv(lay: PagedLayout, blocks: int, fill: str = "randn") -> list[torch.Tensor]:
    dt = getattr(torch, lay.dtype)
    if fill == "zeros":
        return [torch.zeros(lay.layer_shape(blocks), dtype=dt) for _ in range(LAYERS)]
    return [torch.randn(lay.layer_shape(blocks)).to(dt) for _ in range(LAYERS)]


def block(lay: PagedLayout, t: torch.Tensor, b: int) -> torch.Tensor:
    return t.select(lay.block_dim, b)


PARAMS = [(k, d, kern) for k in LayoutKind for d in ("bfloat16", "float16", "float32")
          for kern in (True, False)]


@pytest.mark.parametrize("kind,dtype,kernels", PARAMS)
def test_store_then_retrieve_into_other_blocks_is_bitwise_exact(kind, dtype, kernels) -> None:
    eng, lay, _ = make(kind, dtype)
    src = kv(lay, 40)
    tokens = list(range(1000, 1030))  # 3 full chunks + 6 tokens
    src_ids = [5, 9, 2, 17, 30, 31, 7, 8]
    eng.register(src, use_kernels=kernels)
    assert eng.store_kv(tokens, src_ids) == 3
    assert eng.lookup(tokens) == 24
    dst = kv(lay, 50, "zeros")
    dst_ids = [49, 1, 2, 3, 10, 11, 12, 13]
    eng.register(dst, use_kernels=kernels)
    res = eng.retrieve_kv(tokens, dst_ids, end_token=24)
    assert res.complete and res.end == 24
    for layer in range(LAYERS):
        for i in range(6):
            assert torch.equal(block(lay, src[layer], src_ids[i]), block(lay, dst[layer], dst_ids[i]))
        untouched = block(lay, dst[layer], dst_ids[6])  # past the hit: not written
        assert not untouched.any()


@pytest.mark.parametrize("kind,dtype,kernels", PARAMS)
def test_layerwise_retrieve_moves_one_layer_at_a_time(kind, dtype, kernels) -> None:
    """A layer-wise load copies the block the engine also writes (the one holding the
    first computed token) up front; every other block, a layer per ``scatter``."""
    eng, lay, mem = make(kind, dtype)
    src = kv(lay, 40)
    tokens = list(range(1000, 1030))
    src_ids = [5, 9, 2, 17, 30, 31, 7, 8]
    eng.register(src, use_kernels=kernels)
    assert eng.store_kv(tokens, src_ids) == 3
    dst = kv(lay, 50, "zeros")
    dst_ids = [49, 1, 2, 3, 10, 11, 12, 13]
    eng.register(dst, use_kernels=kernels)
    pending: list = []
    end = 23  # vLLM computes the last token of a fully cached prompt: block 5 is shared
    res = eng.retrieve_kv(tokens, dst_ids, end_token=end, start_token=4, layerwise=pending)
    assert res.complete and res.end == end and len(pending) == 1
    load = pending[0]
    for layer in range(LAYERS):
        assert torch.equal(block(lay, src[layer], src_ids[5]), block(lay, dst[layer], dst_ids[5]))
        assert not block(lay, dst[layer], dst_ids[1]).any()  # deferred
    assert all(e.refs for e in mem._entries.values())  # chunks held until close
    load.scatter(1)
    load.scatter(1)  # once only
    for layer in range(LAYERS):
        for i in range(1, 5):
            got = block(lay, dst[layer], dst_ids[i])
            want = block(lay, src[layer], src_ids[i])
            assert torch.equal(got, want) if layer == 1 else not got.any()
    load.finish()
    load.close()
    assert not any(e.refs for e in mem._entries.values())
    for layer in range(LAYERS):
        for i in range(1, 6):
            assert torch.equal(block(lay, src[layer], src_ids[i]), block(lay, dst[layer], dst_ids[i]))
        assert not block(lay, dst[layer], dst_ids[0]).any()  # the engine's own block
        assert not block(lay, dst[layer], dst_ids[6]).any()  # past the hit
    with pytest.raises(IndexError):
        eng._bound(None).scatter_layer([], LAYERS)


def test_layerwise_retrieve_of_whole_blocks_defers_all() -> None:
    eng, lay, mem = make(LayoutKind.VLLM_CPU, "float32")
    src = kv(lay, 20)
    tokens = list(range(16))
    eng.register(src)
    eng.store_kv(tokens, [0, 1, 2, 3])
    dst = kv(lay, 20, "zeros")
    pending: list = []
    res = eng.retrieve_kv(tokens, [4, 5, 6, 7], end_token=16, kv_caches=dst, layerwise=pending)
    assert res.end == 16 and not any(t.any() for t in dst)
    pending[0].finish()
    pending[0].close()
    assert all(torch.equal(d[4:8], s[0:4]) for d, s in zip(dst, src))


def test_partial_prefix_hit_and_divergence() -> None:
    eng, lay, _ = make(LayoutKind.VLLM_CPU, "bfloat16")
    eng.register(kv(lay, 40))
    a = list(range(32))
    eng.store_kv(a, list(range(8)))
    b = a[:20] + [999] * 12  # diverges inside chunk 2
    assert eng.lookup(b) == 16
    assert eng.lookup([7] + a[1:]) == 0
    assert eng.lookup(a[:15]) == 8  # only whole chunks


def test_partial_last_chunk_in_whole_blocks_serves_other_questions() -> None:
    """A document asked two questions: the second finds the document's whole blocks
    of the chunk where the prompts part (the first prompt's partial last chunk)."""
    eng, lay, _ = make(LayoutKind.VLLM_CPU, "bfloat16", partial=True)
    src = kv(lay, 40)
    eng.register(src)
    document = list(range(100, 121))  # 2 chunks + 5 tokens: 1 whole block of chunk 2
    a, b = document + [1, 2], document + [3, 4]
    assert eng.store_kv(a, [5, 9, 2, 17, 30, 31]) == 3  # the tail's whole block too
    assert eng.lookup(b) == 20  # 2 chunks + the block both prompts share
    longer = document + list(range(7, 20))  # its chunk 2 is full and differs...
    hit = eng.lookup_hit(longer)
    assert hit.tokens == 20 and len(hit.keys) == 3  # ...but its first block is stored
    dst = kv(lay, 40, "zeros")
    res = eng.retrieve_kv(longer[:hit.tokens], [1, 3, 6, 8, 10, 12], end_token=20,
                          kv_caches=dst, keys=hit.keys)
    assert res.complete and res.end == 20
    for layer in range(LAYERS):
        for s_id, d_id in zip([5, 9, 2, 17, 30], [1, 3, 6, 8, 10]):
            assert torch.equal(block(lay, src[layer], s_id), block(lay, dst[layer], d_id))
        assert not block(lay, dst[layer], 12).any()  # past the hit: not written
    eng.register(src)
    assert eng.store_kv(longer, [5, 9, 2, 17, 30, 31, 32, 33]) == 2  # its own chunk 2 and 3
    assert eng.lookup(longer) == 32
    assert eng.lookup(b) == 20  # the shorter head is still there for the next question


def test_partial_chunks_stay_off_by_default() -> None:
    eng, lay, _ = make(LayoutKind.VLLM_CPU, "float32")
    eng.register(kv(lay, 20))
    assert eng.store_kv(list(range(21)), list(range(6))) == 2
    assert eng.lookup(list(range(21))) == 16


def test_retrieve_skips_blocks_the_engine_already_has() -> None:
    eng, lay, _ = make(LayoutKind.VLLM_CPU, "float32")
    src = kv(lay, 20)
    tokens = list(range(24))
    eng.register(src)
    eng.store_kv(tokens, [0, 1, 2, 3, 4, 5])
    dst = kv(lay, 20, "zeros")
    res = eng.retrieve_kv(tokens, [10, 11, 12, 13, 14, 15], end_token=24, start_token=4,
                          kv_caches=dst)
    assert (res.start, res.end) == (4, 24)
    assert not dst[0][10].any()  # block 0 of the request: the engine's own, untouched
    assert torch.equal(dst[0][11], src[0][1]) and torch.equal(dst[2][15], src[2][5])


def test_missing_chunk_stops_the_load_there() -> None:
    eng, lay, mem = make(LayoutKind.VLLM_CPU, "float16")
    eng.register(kv(lay, 20))
    tokens = list(range(32))
    eng.store_kv(tokens, list(range(8)))
    keys = eng.hasher.keys(tokens)
    mem.delete_many([keys[2]])  # evicted between lookup and load
    res = eng.retrieve_kv(tokens, list(range(8, 16)), end_token=32)
    assert not res.complete and res.end == 16


def test_chunks_already_in_memory_are_not_stored_again() -> None:
    eng, lay, mem = make(LayoutKind.VLLM_CPU, "bfloat16")
    eng.register(kv(lay, 20))
    tokens = list(range(24))
    assert eng.store_kv(tokens, list(range(6))) == 3
    assert eng.store_kv(tokens, list(range(6))) == 0
    assert mem.stats.puts == 3


def test_store_with_full_memory_is_a_clean_no_op() -> None:
    eng, lay, mem = make(LayoutKind.VLLM_CPU, "bfloat16", slots=2)
    eng.register(kv(lay, 20))
    tokens = list(range(24))
    mem.put_many([])
    slots = mem.reserve(2)  # someone holds every slot
    assert eng.store_kv(tokens, list(range(6))) == 0
    mem.abort(slots)


def test_layout_detection_and_mismatch() -> None:
    lay = PagedLayout(LayoutKind.FLASH_ATTN, LAYERS, HEADS, HEAD_DIM, BLOCK, "bfloat16")
    assert detect_layout(kv(lay, 5), HEADS, HEAD_DIM, BLOCK) == lay
    cpu = PagedLayout(LayoutKind.VLLM_CPU, LAYERS, HEADS, HEAD_DIM, BLOCK, "bfloat16")
    with pytest.raises(LayoutMismatch, match="layer 0"):
        cpu.check(kv(lay, 5))
    with pytest.raises(LayoutMismatch, match="expected 3 layer"):
        cpu.check(kv(cpu, 5)[:2])
    with pytest.raises(ValueError, match="multiple of the block size"):
        CacheEngine(ChunkHasher(Namespace("m", "x", 6)), cpu, ChunkStore([MemoryTier(1 << 20, 64)]))


def test_kernels_available_here() -> None:
    # numba ships with vLLM; the fast path must not silently fall back in CI.
    assert cpu_kernels.available()


def test_row_kernels_refuse_out_of_range_blocks_and_bad_rows() -> None:
    """The compiled kernels do not bounds-check, so their wrapper must."""
    import numpy as np

    layers = [np.zeros((4, 16), dtype=np.int64) for _ in range(2)]
    k = cpu_kernels.RowKernels(layers)
    rows = np.ones((2, 2, 16), dtype=np.int64)
    with pytest.raises(IndexError, match="block id out of range"):
        k.scatter(np.array([0, 4], dtype=np.int64), rows)
    with pytest.raises(ValueError, match="do not match"):
        k.gather(np.array([0, 1], dtype=np.int64), np.ones((2, 2, 8), dtype=np.int64))
    k.scatter(np.array([3, 1], dtype=np.int64), rows)
    assert layers[0][3].sum() == 16 and layers[1][1].sum() == 16 and layers[0][0].sum() == 0


def test_row_kernels_warm_up_on_scratch_rows_and_leave_the_engines_kv_alone() -> None:
    """Construction runs every kernel once (so the first save's step does not pay for
    loading them) on scratch rows: not one word of the engine's KV changes."""
    import numpy as np

    layers = [np.arange(l * 64, (l + 1) * 64, dtype=np.int64).reshape(4, 16) for l in range(3)]
    before = [a.copy() for a in layers]
    k = cpu_kernels.RowKernels(layers)
    assert all(np.array_equal(a, b) for a, b in zip(layers, before))
    out = np.zeros((2, 3, 16), dtype=np.int64)
    k.gather(np.array([2, 0], dtype=np.int64), out)
    assert np.array_equal(out[0, 1], before[1][2]) and np.array_equal(out[1, 2], before[2][0])


_POOL_CHECK = """
import os, numpy as np, torch
os.sched_setaffinity(0, {0})  # vLLM-CPU pins its main thread to one core
before = torch.get_num_threads()
from kvtier.engine import cpu_kernels
k = cpu_kernels.RowKernels([np.zeros((8, 16), dtype=np.int64) for _ in range(3)])
rows = np.arange(4 * 3 * 16, dtype=np.int64).reshape(4, 3, 16)
k.scatter(np.array([7, 0, 5, 2]), rows)
out = np.empty_like(rows)
k.gather(np.array([7, 0, 5, 2]), out)
assert np.array_equal(out, rows)
import numba
print(before, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, numba.threading_layer())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs CPU affinity and 2 cores")
@pytest.mark.parametrize("numba_env,numba_threads", [(None, "2"), ("1", "1")])
def test_row_kernels_share_torchs_openmp_pool_and_leave_its_settings(
        numba_env: str | None, numba_threads: str) -> None:
    """The kernels run on torch's OpenMP runtime (a second pool fought torch's
    spinning workers for the cores), with torch's thread count although the
    calling thread is pinned to one core (unless NUMBA_NUM_THREADS says
    otherwise), and starting numba's pool (which calls omp_set_num_threads)
    leaves torch's OpenMP thread count as it was: vLLM-CPU's attention checks it."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = "2"
    if numba_env is not None:
        env["NUMBA_NUM_THREADS"] = numba_env
    out = subprocess.run([sys.executable, "-c", _POOL_CHECK], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "2", numba_threads, "omp"]


def test_accelerator_copies_stage_runs_in_pieces_of_whole_blocks(monkeypatch) -> None:
    """The pieces an accelerator stages at a time (CPU tensors here: only the cut is
    under test; benchmarks/device_transfer.py checks the copies on a GPU)."""
    from kvtier.engine import transfer as tr

    lay = PagedLayout(LayoutKind.FLASH_ATTN, LAYERS, HEADS, HEAD_DIM, BLOCK, "float32")
    t = tr.PagedTransfer(lay, kv(lay, 8))
    per_block = LAYERS * lay.page_nbytes
    region = np.arange(5 * per_block, dtype=np.uint8)
    monkeypatch.setattr(tr, "PIECE_BYTES", 2 * per_block + 1)
    pieces = t._pieces(tr.Run(region, [7, 3, 5, 1, 0]))
    assert [p.block_ids for p in pieces] == [[7, 3], [5, 1], [0]]
    assert np.array_equal(np.concatenate([p.region for p in pieces]), region)
    assert all(p.region.base is not None for p in pieces)  # views, not copies
