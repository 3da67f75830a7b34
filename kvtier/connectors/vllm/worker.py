"""The worker side of the vLLM connector: owns the KV tensors and moves bytes.

One per worker process (TP rank). It checks vLLM's KV tensors against the expected
layout, builds this worker's :class:`~kvtier.engine.cache_engine.CacheEngine` and
store, runs the loads the scheduler planned (in the step before the forward pass,
layer by layer in it, or in the background) and the saves it released, and reports
memory-tier changes and failed loads back to the scheduler
(:class:`~kvtier.connectors.vllm.meta.KvtierWorkerMeta`). Everything here runs on the
engine's own thread, except what :class:`~kvtier.connectors.vllm.async_loads.AsyncLoads`
does on its fetch thread (reads and promotions, never a KV tensor).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from kvtier.codecs import ChunkMeta
from kvtier.config import KvtierConfig
from kvtier.connectors.vllm.async_loads import AsyncLoads
from kvtier.connectors.vllm.canary import Canary
from kvtier.connectors.vllm.keys import all_shards, shard_namespace, worker_shard
from kvtier.connectors.vllm.layerwise import LayerwiseLoads
from kvtier.connectors.vllm.meta import KvtierMetadata, KvtierWorkerMeta, LoadSpec
from kvtier.connectors.vllm.surfaces import KvtierStats
from kvtier.connectors.vllm.trace import StepTrace
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import PagedLayout, detect_layout
from kvtier.errors import LayoutMismatch
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store.build import build_store
from kvtier.tiers.peer import PeerTier

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("kvtier.vllm")

EngineReadyHook = Callable[[KvtierConfig, CacheEngine, int], None]
ENGINE_READY_HOOKS: list[EngineReadyHook] = []
"""Called in each worker once its cache engine exists, with (config, engine, shard index:
the worker's rank within the instance).
Higher layers (the management API's vLLM plugin) register here; this layer
imports none of them."""
NAMESPACE_HOOKS: list[EngineReadyHook] = []
"""Called in a worker after it adopted the scheduler's key namespace in place of its own
(same arguments): what announced the old one (the controller's registration) again."""


class KvtierWorker:
    """The worker role's state and steps; :class:`KvtierConnector` calls it from vLLM's
    worker hooks with the step's metadata."""

    def __init__(self, config: KvtierConfig, layout: PagedLayout, stats: KvtierStats) -> None:
        self.config = config
        self.layout = layout
        self.stats = stats
        self.engine: CacheEngine | None = None
        self.shard = 0  # index of this worker's keys in a LoadSpec / SaveSpec
        self.load_errors: set[int] = set()
        self._failed: list[tuple[str, int, ChunkKey]] = []
        self._finished_saving: set[str] = set()
        self._awaiting_store: set[str] = set()  # finished, their saves still in flight
        self._async: AsyncLoads | None = None
        self._layerwise = LayerwiseLoads()
        self._canary: Canary | None = None
        self._idle = False  # this step computes nothing (the scheduler says so)
        self._trace = StepTrace.from_env()  # KVTIER_STEP_TRACE: a debug step timeline
        self.epoch = 0  # the scheduler's resets this worker has applied
        self._reported_epoch = 0

    def register(self, vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor]) -> None:
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
        shard = worker_shard(vllm_config)
        self.shard = all_shards(vllm_config).index(shard)
        namespace = shard_namespace(vllm_config, self.config, shard)
        hasher = ChunkHasher(namespace, self.config.store_partial_chunks, self.layout.block_size)
        for tier in store.tiers:  # its peers serve only this namespace's chunks
            if isinstance(tier, PeerTier):
                tier.namespace = namespace.seed().hex()
        self.engine = CacheEngine(hasher, self.layout, store)
        self.engine.register(tensors)
        self._layerwise = LayerwiseLoads(kv_caches)
        self._async = AsyncLoads(self.engine, self.config.load_timeout_s)
        if self.config.verify.sample_rate > 0:
            self._canary = Canary(self.config.verify, self.engine)
        for hook in ENGINE_READY_HOOKS:
            try:
                hook(self.config, self.engine, self.shard)
            except Exception:  # an add-on must not take the engine down
                log.exception("kvtier: engine-ready hook %r failed", hook)

    def start_load(self, meta: KvtierMetadata | None) -> None:
        """Load this step's memory hits into paged KV, batched, before the forward pass
        (with ``layerwise``, most blocks a layer at a time in it); start background
        loads. A chunk that cannot be read is reported for recompute."""
        self._traced("start_load", lambda: self._start_load(meta), meta)

    def _traced(self, hook: str, step: Callable[[], Any], meta: KvtierMetadata | None) -> Any:
        """``step()``, timed into the step trace when ``KVTIER_STEP_TRACE`` is set."""
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            if self._trace is not None:
                self._trace.mark(hook, t0, meta)

    def _start_load(self, meta: KvtierMetadata | None) -> None:
        self._layerwise.finish(self.load_errors, self.stats)  # from a step w/o wait_for_save
        self._adopt_namespace(meta)
        self._reset_if_asked(meta)
        self._idle = meta is not None and meta.idle
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
        # one request must not evict another's). The promise itself is not a pin: a chunk
        # can be evicted between it and here (the fetch thread promotes, and so evicts, at
        # any time). Such a chunk is read from a lower tier if one holds it; otherwise the
        # load stops at it and the rest of the request is recomputed (a miss, never wrong
        # KV), and the eviction reaches the scheduler's index in this step's report.
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
        self.stats.add(load_seconds=time.perf_counter() - t0, load_failures=int(
            loaded < load.end_token), loaded_bytes=blocks * self.layout.chunk_nbytes(1))
        if loaded >= load.end_token:
            return loaded
        bad = load.block_ids[loaded // bs: -(-load.end_token // bs)]
        log.warning("kvtier: %s: loaded %d of %d tokens; %d blocks recomputed",
                    load.req_id, loaded - load.start_token, load.end_token - load.start_token,
                    len(bad))
        self.load_errors.update(bad)
        key = keys[min(loaded // cs, len(keys) - 1)]
        self._failed.append((load.req_id, loaded, key))
        if self.engine.store.memory is not None:  # a bad copy must not be promised again
            self.engine.store.memory.delete_many([key])
        return loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With ``layerwise``, move this layer of the step's loads before its attention
        runs (:mod:`~kvtier.connectors.vllm.layerwise`); else loads are done already."""
        if self._layerwise:
            t0 = time.perf_counter()
            known = self._layerwise.wait(layer_name)
            self.stats.add(load_seconds=time.perf_counter() - t0, layerwise_layers=int(known))

    def wait_for_save(self, meta: KvtierMetadata | None) -> None:
        """Gather the chunks the scheduler released (computed last step, with no failed
        load under them) into the memory tier: one batched copy per run and layer;
        lower tiers are written by background threads."""
        self._traced("wait_for_save", lambda: self._wait_for_save(meta), meta)

    def _wait_for_save(self, meta: KvtierMetadata | None) -> None:
        self._layerwise.finish(self.load_errors, self.stats)
        self._adopt_namespace(meta)
        self._reset_if_asked(meta)
        if meta is None or self.engine is None:
            return
        chunk_bytes = self.layout.chunk_nbytes(self.config.chunk_size // self.layout.block_size)
        for save in meta.saves:
            if save.verify > save.start_chunk and self._canary is not None:
                self._canary.submit(save, self.shard)  # a private copy, checked elsewhere
            t0 = time.perf_counter()
            try:
                n = self.engine.store_kv(save.token_ids, save.block_ids,
                                         start_chunk=save.start_chunk, keys=save.keys[self.shard])
                self.stats.add(stored_chunks=n, stored_bytes=n * chunk_bytes,
                                store_seconds=time.perf_counter() - t0)
            except Exception:  # a failed save is a later miss, never a failed request
                log.exception("kvtier: save of %s failed", save.req_id)
            if save.release:
                self._awaiting_store.add(save.req_id)
        self._awaiting_store.update(meta.releases)

    def _adopt_namespace(self, meta: KvtierMetadata | None) -> None:
        """The scheduler's namespace for this shard is the one its keys are made with; a
        worker that computed another one (its model changed the config while loading, in
        a process the scheduler does not share) hashes with the scheduler's from now on:
        its management API, admissions and peers then name the same chunks. Computed
        apart, the two only ever give misses (the worker stores and loads the keys the
        scheduler sends), never wrong KV."""
        if meta is None or meta.namespaces is None or self.engine is None:
            return
        theirs, hasher = meta.namespaces[self.shard], self.engine.hasher
        if theirs == hasher.namespace:
            return
        ours = hasher.namespace
        differ = [k for k in vars(ours) if getattr(ours, k) != getattr(theirs, k)]
        log.warning("kvtier: this worker computed another key namespace than the scheduler "
                    "(%s differ: the model's config changed while it loaded?); using the "
                    "scheduler's", ", ".join(differ))
        hasher.adopt(theirs)
        self.stats.add(namespace_adoptions=1)
        for tier in self.engine.store.tiers:
            if isinstance(tier, PeerTier):
                tier.namespace = theirs.seed().hex()
        for hook in NAMESPACE_HOOKS:
            try:
                hook(self.config, self.engine, self.shard)
            except Exception:  # an add-on must not take the engine down
                log.exception("kvtier: namespace hook %r failed", hook)

    def _reset_if_asked(self, meta: KvtierMetadata | None) -> None:
        """The scheduler reset kvtier: clear this worker's store, as a barrier, before any
        load of the step (once, whichever hook runs first)."""
        if meta is None or meta.epoch <= self.epoch:
            return
        self.epoch = meta.epoch
        if self.engine is not None:
            self.engine.complete_stores(wait=True)  # copies to host end before slots go
            # Memory, and every tier this worker writes (disk, Redis: the scheduler
            # cleared them, but this worker's queued writes could land after that; each
            # rank clears them again once its own writes are stopped, idempotently).
            # Background loads that started before are failed at their poll.
            self.engine.store.clear()

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose held save is done (vLLM may free their blocks), and
        asynchronous loads that completed (what did not arrive in time is reported
        as load errors in the same step, and recomputed)."""
        return self._traced("get_finished", self._get_finished, None)

    def _get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        if self.engine is not None:
            self.engine.complete_stores()
            if not self.engine.storing:  # accelerators: once the copies to host landed
                self._finished_saving |= self._awaiting_store
                self._awaiting_store = set()
        done, self._finished_saving = self._finished_saving, set()
        received: set[str] = set()
        if self._async is not None and len(self._async):
            if self._idle:  # vLLM loops at once: let the fetch thread have the GIL
                self._async.wait()
            for fin in self._async.poll(lambda load, chunks: self._load(
                    load, time.perf_counter(), chunks)):
                received.add(fin.req_id)
                self.stats.add(async_loads=1, async_timeouts=int(fin.timed_out),
                                async_wait_seconds=fin.seconds)
        return done or None, received or None

    def take_load_errors(self) -> set[int]:
        """Blocks whose promised KV could not be loaded this step (vLLM recomputes them)."""
        errors, self.load_errors = self.load_errors, set()
        return errors

    def report(self) -> KvtierWorkerMeta | None:
        """Report memory-tier stores and evictions to the scheduler's index."""
        if self.engine is None:
            return None
        self.engine.complete_stores()  # accelerators: stores whose copy to host finished
        events = self.engine.store.drain_events()
        failed, self._failed = self._failed, []
        if self._canary is not None:
            self._canary.drain(self.stats)
        service = self.engine.store.service.take_changes()
        passed = self.epoch != self._reported_epoch  # the scheduler waits to hear it
        self._reported_epoch = self.epoch
        if not any(s or r for s, r in events.tiers.values()) and not failed and not passed \
                and not service:
            return None
        return KvtierWorkerMeta(list(events.stored), list(events.evicted), failed, self.epoch,
                                events.tiers, service)

    def shutdown(self) -> None:
        """Finish background loads and writes (bounded) and close the tiers."""
        if self._async is not None:
            self._async.close()
        if self._canary is not None:
            self._canary.close()
        if self.engine is not None:
            self.engine.complete_stores(wait=True)
            self.engine.store.close()
