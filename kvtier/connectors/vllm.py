"""Layer 6: kvtier as a vLLM v1 KV connector (out of tree, no patch to vLLM).

    KVTransferConfig(kv_connector="KvtierConnector",
                     kv_connector_module_path="kvtier.connectors.vllm",
                     kv_role="kv_both", kv_connector_extra_config={...kvtier config...})

vLLM creates this class twice, in two processes: the *scheduler* role answers
"how many prompt tokens can be loaded" from an index of the worker's memory
tier plus the shared tiers (no bytes move), and plans loads and saves; the
*worker* role owns the KV tensors and moves bytes through a
:class:`~kvtier.engine.cache_engine.CacheEngine`. The worker reports what its
memory tier stored and evicted back through vLLM's worker-metadata channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.config import KvtierConfig, load_config
from kvtier.connectors.vllm_plan import (KvtierMetadata, KvtierWorkerMeta, SchedulerPlanner,
                                         engine_layout, namespace_for)
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import detect_layout
from kvtier.errors import LayoutMismatch
from kvtier.keys import ChunkHasher
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
"""Called in each worker once its cache engine exists, with (config, engine, rank).
Higher layers (the management API's vLLM plugin) register here; this layer
imports none of them."""


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier's tiers (memory, disk, Redis)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(engine=extra)
        self.layout = engine_layout(vllm_config)
        self.config.check_block_size(self.layout.block_size)
        self.namespace = namespace_for(vllm_config, self.config, self.layout)
        self.planner: SchedulerPlanner | None = None
        self.engine: CacheEngine | None = None
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._recompute_on_load_failure()
            shared = build_store(self.config, None, shared_only=True)
            self.planner = SchedulerPlanner(self.config, self.namespace, self.layout, shared)
        log.info("kvtier %s connector: %s, tiers %s", role.name.lower(),
                 self.layout.signature(), [t.value for t in self.config.tiers])

    def _recompute_on_load_failure(self) -> None:
        # A cache must never fail a request: a chunk that cannot be read is
        # recomputed. vLLM's default policy is "fail"; the scheduler reads the
        # policy right after creating this object, so set it here.
        ktc = self._kv_transfer_config
        if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
            try:
                ktc.kv_load_failure_policy = "recompute"
                log.info("kvtier: kv_load_failure_policy set to 'recompute'")
            except (AttributeError, TypeError, ValueError):
                log.warning("kvtier: set kv_load_failure_policy='recompute' in the "
                            "KVTransferConfig; with 'fail' an unreadable chunk fails its request")

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
        hasher = ChunkHasher(self.namespace, self.config.store_partial_chunks,
                             self.layout.block_size)
        self.engine = CacheEngine(hasher, self.layout, store)
        self.engine.register(tensors)
        for hook in ENGINE_READY_HOOKS:
            try:
                hook(self.config, self.engine, _worker_rank())
            except Exception:  # an add-on must not take the engine down
                log.exception("kvtier: engine-ready hook %r failed", hook)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Load this step's hits into paged KV: all chunks and layers, batched, before
        the forward pass. A chunk that cannot be read is reported for recompute."""
        meta = self._meta()
        if meta is None or not meta.loads or self.engine is None:
            return
        for load in meta.loads:
            memory = self.engine.store.memory
            if memory is not None:  # promised chunks must not be evicted mid-load
                memory.pin_many(load.keys)
            try:
                res = self.engine.retrieve_kv(load.token_ids, load.block_ids, load.end_token,
                                              load.start_token, keys=load.keys)
            except Exception:  # never fail the request: recompute instead
                log.exception("kvtier: load of %s failed", load.req_id)
                res = None
            finally:
                if memory is not None:
                    memory.unpin_many(load.keys)
            loaded = res.end if res is not None else load.start_token
            if loaded < load.end_token:
                bs = self.layout.block_size
                bad = load.block_ids[loaded // bs: -(-load.end_token // bs)]
                log.warning("kvtier: %s: loaded %d of %d tokens; %d blocks recomputed",
                            load.req_id, loaded - load.start_token,
                            load.end_token - load.start_token, len(bad))
                self._load_errors.update(bad)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads finish in :meth:`start_load_kv`; nothing to wait for per layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Saves are batched over all layers in :meth:`wait_for_save`."""

    def wait_for_save(self) -> None:
        """Gather the step's completed chunks into the memory tier (one batched copy
        per run and layer); lower tiers are written by background threads."""
        meta = self._meta()
        if meta is None or not meta.saves or self.engine is None:
            return
        for save in meta.saves:
            try:
                self.engine.store_kv(save.token_ids, save.block_ids, start_chunk=save.start_chunk,
                                     keys=save.keys)
            except Exception:  # a failed save is a later miss, never a failed request
                log.exception("kvtier: save of %s failed", save.req_id)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose promised KV could not be loaded this step (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KvtierWorkerMeta | None:
        """Report memory-tier stores and evictions to the scheduler's index."""
        if self.engine is None:
            return None
        events = self.engine.store.drain_events()
        if not events.stored and not events.evicted:
            return None
        return KvtierWorkerMeta(list(events.stored), list(events.evicted))

    def shutdown(self) -> None:
        """Finish background writes (bounded) and close the tiers."""
        if self.engine is not None:
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
        return self.planner.num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Remember the load vLLM accepted; it is planned in :meth:`build_connector_meta`."""
        assert self.planner is not None
        self.planner.accept_load(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvtierMetadata:
        """This step's loads and saves for the worker."""
        assert self.planner is not None
        return self.planner.build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Fold the worker's stored/evicted report into the scheduler's index."""
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, KvtierWorkerMeta) and self.planner is not None:
            self.planner.index.update(meta.stored, meta.evicted)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; saves are synchronous, so blocks can be freed now."""
        if self.planner is not None:
            self.planner.finish(request.request_id)
        return False, None


def _worker_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised (single process, tests): rank 0
        return 0
