"""vLLM's native KV offloading (``OffloadingConnector``) on vLLM's CPU platform.

Label in reports: "vLLM native offloading + CPU copy shim".

Stock, vLLM's ``CPUOffloadingSpec.get_worker`` refuses to run off CUDA-alike
and XPU devices ("CPU Offloading is currently only supported on CUDA-alike and
XPU GPUs"): its worker moves blocks with ``swap_blocks_batch`` on device
streams. This module exists only so the native connector can be benchmarked
side by side with kvtier here. :class:`CPUCopyOffloadingSpec` subclasses the
stock spec and overrides only ``get_worker``; the worker does the same block
copies as synchronous host-memory copies (one batched index copy per KV
tensor and cache group, never a Python loop per block). Scheduler side,
sizing (``cpu_bytes_to_use``) and the LRU manager stay vLLM's own.

Load it through the connector's out-of-tree spec hook::

    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {
         "spec_name": "CPUCopyOffloadingSpec",
         "spec_module_path": "kvtier.bench.peers.vllm_native_cpu",
         "cpu_bytes_to_use": 268435456}}

It is not part of kvtier's data path; nothing in kvtier imports it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

__all__ = ["CPUCopyOffloadingSpec", "HostCopyOffloadingWorker"]


class HostCopyOffloadingWorker(OffloadingWorker):
    """Moves KV blocks between vLLM's CPU KV cache and an offload buffer, synchronously.

    Mirrors the stock worker's direct (non-canonical) layout: one offload tensor
    per engine KV tensor, each chunk holding ``blocks_per_chunk`` engine pages
    back to back, so chunk ``c`` sub-block ``j`` is row ``c * blocks_per_chunk + j``.
    Every transfer is finished when ``submit_*`` returns.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 num_cpu_chunks: int) -> None:
        self._bpc = blocks_per_chunk
        # Engine KV tensors as (num_blocks, page_size_bytes) int8 views of vLLM's cache.
        self._engine: list[torch.Tensor] = [
            t.tensor.view(torch.int8).view(-1, t.page_size_bytes) for t in kv_caches.tensors]
        self._host: list[torch.Tensor] = [
            torch.zeros((num_cpu_chunks * blocks_per_chunk, t.page_size_bytes),
                        dtype=torch.int8) for t in kv_caches.tensors]
        # Per KV cache group: the distinct tensors its layers live in.
        self._group_tensors: list[list[int]] = [
            sorted({ref.tensor_idx for ref in refs}) for refs in kv_caches.group_data_refs]
        self._finished: list[TransferResult] = []

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        """Engine KV -> offload buffer."""
        return self._transfer(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        """Offload buffer -> engine KV."""
        return self._transfer(job_id, dst_spec, src_spec, store=False)

    def _transfer(self, job_id: int, engine_spec: GPULoadStoreSpec, host_spec: LoadStoreSpec,
                  store: bool) -> bool:
        assert isinstance(engine_spec, GPULoadStoreSpec)
        assert isinstance(host_spec, BlockIDsLoadStoreSpec)
        t0 = time.perf_counter()
        engine_ids, chunk_ids = engine_spec.block_ids, host_spec.block_ids
        assert len(engine_spec.group_sizes) == len(self._group_tensors)
        e_off = c_off = num_bytes = 0
        for g_idx, (size, first) in enumerate(zip(engine_spec.group_sizes,
                                                  engine_spec.block_indices)):
            if size == 0:
                continue
            # A group's first chunk may be partial: skip the sub-blocks before `first`.
            skip = first % self._bpc
            num_chunks = -(-(size + skip) // self._bpc)
            chunks = chunk_ids[c_off:c_off + num_chunks].astype(np.int64)
            rows = (chunks[:, None] * self._bpc + np.arange(self._bpc)).ravel()[skip:skip + size]
            e_idx = torch.from_numpy(engine_ids[e_off:e_off + size].astype(np.int64))
            h_idx = torch.from_numpy(np.ascontiguousarray(rows))
            for t_idx in self._group_tensors[g_idx]:
                engine, host = self._engine[t_idx], self._host[t_idx]
                if store:
                    host.index_copy_(0, h_idx, engine.index_select(0, e_idx))
                else:
                    engine.index_copy_(0, e_idx, host.index_select(0, h_idx))
                num_bytes += size * engine.shape[1]
            e_off += size
            c_off += num_chunks
        assert e_off == len(engine_ids) and c_off == len(chunk_ids)
        self._finished.append(TransferResult(job_id=job_id, success=True,
                                             transfer_size=num_bytes,
                                             transfer_time=time.perf_counter() - t0))
        return True

    def get_finished(self) -> list[TransferResult]:
        """Results of all transfers submitted since the last call (all are done)."""
        done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        """Nothing to wait for: transfers complete inside ``submit_*``."""

    def shutdown(self) -> None:
        """Drop the offload buffers and references to the engine cache."""
        self._engine.clear()
        self._host.clear()


class CPUCopyOffloadingSpec(CPUOffloadingSpec):
    """vLLM's ``CPUOffloadingSpec`` with a worker that runs on the CPU platform."""

    _host_worker: HostCopyOffloadingWorker | None = None

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        """Return the (single) host-copy worker, created on first use."""
        if self._host_worker is None:
            self._host_worker = HostCopyOffloadingWorker(
                kv_caches, self.blocks_per_chunk, self.num_chunks)
        return self._host_worker
