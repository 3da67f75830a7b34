"""kvtier as a vLLM v1 KV connector (out of tree, no patch to vLLM).

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
refused at start-up: :mod:`kvtier.connectors.vllm.keys`; when saves run and
why: :mod:`kvtier.connectors.vllm.scheduler`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.config import load_config
from kvtier.connectors.vllm.keys import (all_shards, check_supported, engine_layout,
                                         recompute_on_load_failure, shard_namespace)
from kvtier.connectors.vllm.meta import KvtierMetadata, KvtierWorkerMeta
from kvtier.connectors.vllm.scheduler import SchedulerPlanner
from kvtier.connectors.vllm.surfaces import KvtierStats, KvtierSurfaces
from kvtier.connectors.vllm.worker import KvtierWorker
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
        self.worker: KvtierWorker | None = None
        self._stats = KvtierStats()
        if role == KVConnectorRole.WORKER:
            self.worker = KvtierWorker(self.config, self.layout, self._stats)
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
        self._worker().register(self._vllm_config, kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Load this step's memory hits into paged KV, batched, before the forward pass
        (with ``layerwise``, most blocks a layer at a time in it); start background
        loads. A chunk that cannot be read is reported for recompute."""
        self._worker().start_load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With ``layerwise``, move this layer of the step's loads before its attention
        runs (:mod:`~kvtier.connectors.vllm.layerwise`); else loads are done already."""
        self._worker().wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Saves are batched over all layers in :meth:`wait_for_save`."""

    def wait_for_save(self) -> None:
        """Gather the chunks the scheduler released into the memory tier (one batched
        copy per run and layer); lower tiers are written by background threads."""
        self._worker().wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose held save is done (vLLM may free their blocks), and
        asynchronous loads that completed."""
        return self._worker().get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose promised KV could not be loaded this step (vLLM recomputes them)."""
        return self._worker().take_load_errors()

    def build_connector_worker_meta(self) -> KvtierWorkerMeta | None:
        """Report memory-tier stores and evictions, and failed loads, to the scheduler."""
        return self._worker().report()

    def _worker(self) -> KvtierWorker:
        if self.worker is None:  # vLLM calls worker hooks only on the worker role
            raise RuntimeError("kvtier: a worker hook was called on the scheduler's connector")
        return self.worker

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
        """``reset_prefix_cache(reset_connector=True)``: empty every tier kvtier writes
        (memory, disk, Redis; never a peer's), as a barrier: nothing computed, queued or
        read before it is served or stored after it (:meth:`SchedulerPlanner.reset`)."""
        if self.planner is not None:
            self.planner.reset()
        return True

    def has_pending_push_work(self) -> bool:
        """Keep vLLM stepping (empty steps) after a reset until every worker has cleared
        its store: an idle engine would otherwise leave their queued writes landing."""
        return self.planner is not None and self.planner.reset_pending

    def shutdown(self) -> None:
        """Finish background writes (bounded) and close the tiers."""
        if self.worker is not None:
            self.worker.shutdown()
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

