"""Layer 6: kvtier as a vLLM v1 KV connector (out of tree, no patch to vLLM).

    KVTransferConfig(kv_connector="KvtierConnector",
                     kv_connector_module_path="kvtier.connectors.vllm",
                     kv_role="kv_both", kv_connector_extra_config={...kvtier config...})

vLLM creates this class twice, in two processes: the *scheduler* role answers
"how many prompt tokens can be loaded" from an index of the worker's memory
tier plus the shared tiers (no bytes move), and plans loads and saves; the
*worker* role owns the KV tensors and moves bytes through a
:class:`~kvtier.engine.cache_engine.CacheEngine`. The worker reports what its
memory tier stored and evicted, and which loads failed, back through vLLM's
worker-metadata channel. What goes into keys, what bypasses kvtier and what is
refused at start-up: :mod:`kvtier.connectors.vllm_keys`; when saves run and
why: :mod:`kvtier.connectors.vllm_plan`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.codecs import ChunkMeta
from kvtier.config import KvtierConfig, load_config
from kvtier.connectors.vllm_async import AsyncLoads
from kvtier.connectors.vllm_keys import (all_shards, check_supported, engine_layout,
                                         recompute_on_load_failure, shard_namespace,
                                         worker_shard)
from kvtier.connectors.vllm_plan import (KvtierMetadata, KvtierWorkerMeta, LoadSpec,
                                         SchedulerPlanner)
from kvtier.connectors.vllm_surfaces import KvtierStats, KvtierSurfaces
from kvtier.connectors.vllm_layerwise import LayerwiseLoads
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import detect_layout
from kvtier.errors import LayoutMismatch
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store.build import build_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

EngineReadyHook = Callable[[KvtierConfig, CacheEngine, int], None]
ENGINE_READY_HOOKS: list[EngineReadyHook] = []
"""Called in each worker once its cache engine exists, with (config, engine, shard index:
the worker's rank within the instance).
Higher layers (the management API's vLLM plugin) register here; this layer
imports none of them."""


class KvtierConnector(KvtierSurfaces, KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier's tiers (memory, disk, Redis)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_supported(vllm_config, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(engine=extra)
        self.layout = engine_layout(vllm_config)
        self.config.check_block_size(self.layout.block_size)
        self.planner: SchedulerPlanner | None = None
        self.engine: CacheEngine | None = None
        self.shard = 0  # index of this worker's keys in a LoadSpec / SaveSpec
        self._load_errors: set[int] = set()
        self._failed: list[tuple[str, int, ChunkKey]] = []
        self._finished_saving: set[str] = set()
        self._awaiting_store: set[str] = set()  # finished, their saves still in flight
        self._async: AsyncLoads | None = None
        self._layerwise = LayerwiseLoads()
        self._stats = KvtierStats()
        if role == KVConnectorRole.SCHEDULER:
            recompute_on_load_failure(self._kv_transfer_config)
            shared = build_store(self.config, None, shared_only=True)
            namespaces = [shard_namespace(vllm_config, self.config, s)
                          for s in all_shards(vllm_config)]
            ktc = self._kv_transfer_config
            self.planner = SchedulerPlanner(self.config, namespaces, self.layout.block_size,
                                            shared, loads=ktc.is_kv_consumer,
                                            saves=ktc.is_kv_producer)
        log.info("kvtier %s connector: %s, tiers %s", role.name.lower(),
                 self.layout.signature(), [t.value for t in self.config.tiers])

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped save is only a later miss.
        return False

    # ------------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Check the engine's KV tensors against the expected layout; build the store."""
        tensors = list(kv_caches.values())
        seen = detect_layout(tensors, self.layout.num_kv_heads, self.layout.head_dim,
                             self.layout.block_size)
        if seen != self.layout:
            raise LayoutMismatch(f"vLLM's KV tensors are {seen.signature()}, but the "
                                 f"scheduler expects {self.layout.signature()}")
        chunk_bytes = self.layout.chunk_nbytes(self.config.chunk_size // self.layout.block_size)
        store = build_store(self.config, chunk_bytes, track_events=True)
        assert store is not None
        store.check_codecs(ChunkMeta(self.layout.dtype, self.layout.chunk_shape(
            self.config.chunk_size // self.layout.block_size)))  # refused at start-up
        shard = worker_shard(self._vllm_config)
        self.shard = all_shards(self._vllm_config).index(shard)
        namespace = shard_namespace(self._vllm_config, self.config, shard)
        hasher = ChunkHasher(namespace, self.config.store_partial_chunks, self.layout.block_size)
        self.engine = CacheEngine(hasher, self.layout, store)
        self.engine.register(tensors)
        self._layerwise = LayerwiseLoads(kv_caches)
        self._async = AsyncLoads(self.engine, self.config.load_timeout_s)
        for hook in ENGINE_READY_HOOKS:
            try:
                hook(self.config, self.engine, self.shard)
            except Exception:  # an add-on must not take the engine down
                log.exception("kvtier: engine-ready hook %r failed", hook)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Load this step's memory hits into paged KV, batched, before the forward pass
        (with ``layerwise``, most blocks a layer at a time in it); start background
        loads. A chunk that cannot be read is reported for recompute."""
        self._layerwise.finish(self._load_errors, self._stats)  # from a step w/o wait_for_save
        meta = self._meta()
        self._reset_if_asked(meta)
        if meta is None or self.engine is None or self._async is None:
            return
        for keys in meta.prefetch:
            self._async.prefetch(keys[self.shard])
        for load in meta.loads:  # pins the chunks memory has, reads in the background
            if load.is_async:
                first, last = self.engine.chunk_range(load.start_token, load.end_token)
                self._async.submit(load.req_id, load, load.keys[self.shard][first:last])
        sync = [load for load in meta.loads if not load.is_async]
        if not sync:
            return
        # Every chunk promised this step is pinned before any load runs (a promotion for
        # one request must not evict another's). Promises were made while this worker
        # was idle (vLLM-CPU schedules synchronously): nothing evicted since.
        memory = self.engine.store.memory
        keys = [k for load in sync for k in load.keys[self.shard]]
        pinned = [k for k, ok in zip(keys, memory.pin_many(keys)) if ok] if memory else []
        try:
            layerwise = self._layerwise.pending if self.config.layerwise else None
            for load in sync:
                self._load(load, time.perf_counter(), layerwise=layerwise)
        finally:
            if memory is not None:
                memory.unpin_many(pinned)  # exactly the pins taken above

    def _load(self, load: LoadSpec, t0: float, chunks: list | None = None,
              layerwise: list | None = None) -> int:
        """Scatter a load's chunks into its blocks (read now, or ``chunks`` read in
        the background); report what did not arrive. Returns tokens loaded.
        ``layerwise``: where to leave the layers :meth:`wait_for_layer_load` moves."""
        assert self.engine is not None
        keys = load.keys[self.shard]
        try:
            res = self.engine.retrieve_kv(load.token_ids, load.block_ids, load.end_token,
                                          load.start_token, keys=keys, chunks=chunks,
                                          layerwise=layerwise)
            loaded = res.end
        except Exception:  # never fail the request: recompute instead
            log.exception("kvtier: load of %s failed", load.req_id)
            loaded = load.start_token
        bs, cs = self.layout.block_size, self.config.chunk_size
        blocks = max(0, -(-loaded // bs) - load.start_token // bs)
        self._stats.add(load_seconds=time.perf_counter() - t0, load_failures=int(
            loaded < load.end_token), loaded_bytes=blocks * self.layout.chunk_nbytes(1))
        if loaded >= load.end_token:
            return loaded
        bad = load.block_ids[loaded // bs: -(-load.end_token // bs)]
        log.warning("kvtier: %s: loaded %d of %d tokens; %d blocks recomputed",
                    load.req_id, loaded - load.start_token, load.end_token - load.start_token,
                    len(bad))
        self._load_errors.update(bad)
        key = keys[min(loaded // cs, len(keys) - 1)]
        self._failed.append((load.req_id, loaded, key))
        if self.engine.store.memory is not None:  # a bad copy must not be promised again
            self.engine.store.memory.delete_many([key])
        return loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With ``layerwise``, move this layer of the step's loads before its attention
        runs (:mod:`~kvtier.connectors.vllm_layerwise`); else loads are done already."""
        if self._layerwise:
            t0 = time.perf_counter()
            known = self._layerwise.wait(layer_name)
            self._stats.add(load_seconds=time.perf_counter() - t0, layerwise_layers=int(known))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Saves are batched over all layers in :meth:`wait_for_save`."""

    def wait_for_save(self) -> None:
        """Gather the chunks the scheduler released (computed last step, with no failed
        load under them) into the memory tier: one batched copy per run and layer;
        lower tiers are written by background threads."""
        self._layerwise.finish(self._load_errors, self._stats)
        meta = self._meta()
        self._reset_if_asked(meta)
        if meta is None or self.engine is None:
            return
        chunk_bytes = self.layout.chunk_nbytes(self.config.chunk_size // self.layout.block_size)
        for save in meta.saves:
            t0 = time.perf_counter()
            try:
                n = self.engine.store_kv(save.token_ids, save.block_ids,
                                         start_chunk=save.start_chunk, keys=save.keys[self.shard])
                self._stats.add(stored_chunks=n, stored_bytes=n * chunk_bytes,
                                store_seconds=time.perf_counter() - t0)
            except Exception:  # a failed save is a later miss, never a failed request
                log.exception("kvtier: save of %s failed", save.req_id)
            if save.release:
                self._awaiting_store.add(save.req_id)
        self._awaiting_store.update(meta.releases)

    def _reset_if_asked(self, meta: KvtierMetadata | None) -> None:
        if meta is not None and meta.reset and self.engine is not None:
            meta.reset = False  # once per step, whichever hook runs first
            self.engine.complete_stores(wait=True)  # no store from before lands after
            if self.engine.store.memory is not None:
                self.engine.store.memory.clear()

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose held save is done (vLLM may free their blocks), and
        asynchronous loads that completed (what did not arrive in time is reported
        as load errors in the same step, and recomputed)."""
        if self.engine is not None:
            self.engine.complete_stores()
            if not self.engine.storing:  # accelerators: once the copies to host landed
                self._finished_saving |= self._awaiting_store
                self._awaiting_store = set()
        done, self._finished_saving = self._finished_saving, set()
        received: set[str] = set()
        if self._async is not None and len(self._async):
            for fin in self._async.poll(lambda load, chunks: self._load(
                    load, time.perf_counter(), chunks)):
                received.add(fin.req_id)
                self._stats.add(async_loads=1, async_timeouts=int(fin.timed_out),
                                async_wait_seconds=fin.seconds)
        return done or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose promised KV could not be loaded this step (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KvtierWorkerMeta | None:
        """Report memory-tier stores and evictions to the scheduler's index."""
        if self.engine is None:
            return None
        self.engine.complete_stores()  # accelerators: stores whose copy to host finished
        events = self.engine.store.drain_events()
        failed, self._failed = self._failed, []
        if not any(s or r for s, r in events.tiers.values()) and not failed:
            return None
        return KvtierWorkerMeta(list(events.stored), list(events.evicted), failed, events.tiers)

    # ------------------------------------------------ vLLM's own surfaces, life cycle

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loads run Python in the forward pass: a full CUDA graph replay
        would skip ``wait_for_layer_load``, so vLLM must capture piecewise graphs."""
        try:
            return load_config(engine=dict(extra_config or {})).layerwise
        except Exception:  # a bad config is refused, with its message, at start-up
            return False

    def reset_cache(self) -> bool:
        """``reset_prefix_cache(reset_connector=True)``: empty every kvtier tier."""
        if self.planner is not None:
            self.planner.reset()
        return True

    def shutdown(self) -> None:
        """Finish background writes (bounded) and close the tiers."""
        if self._async is not None:
            self._async.close()
        if self.engine is not None:
            self.engine.complete_stores(wait=True)
            self.engine.store.close()
        if self.planner is not None:
            self.planner.close()

    def _meta(self) -> KvtierMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KvtierMetadata) else None

    # --------------------------------------------------------------- scheduler

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that kvtier can load (whole chunks)."""
        assert self.planner is not None
        n = self.planner.num_new_matched_tokens(request, num_computed_tokens)
        return n, self.planner.load_is_async(request, n)

    def on_new_request(self, request: Request) -> None:
        """Prefetch: a hit in lower tiers starts moving into memory now."""
        if self.planner is not None:
            self.planner.seen(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Remember the load vLLM accepted; it is planned in :meth:`build_connector_meta`."""
        assert self.planner is not None
        self.planner.accept_load(request, num_external_tokens, blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvtierMetadata:
        """This step's loads, and last step's saves that are safe to run."""
        assert self.planner is not None
        return self.planner.build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Fold the workers' report (stores, evictions, failed loads) into the plan."""
        if self.planner is not None:
            self.planner.step_done(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; it keeps its blocks while a save of it is held."""
        if self.planner is None:
            return False, None
        self.planner.forget(request.request_id)
        return self.planner.finish(request.request_id), None

