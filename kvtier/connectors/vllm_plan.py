"""Layer 6: the scheduler side of the vLLM connector: lookups, load and save plans.

Plain Python on vLLM's scheduler objects; no tensors. Each step it tells the
worker which chunks to load (hits vLLM accepted) and which to save (prompt
chunks whose every token has been computed by the end of the step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

from kvtier.config import KvtierConfig
from kvtier.engine.layout import LayoutKind, PagedLayout, dtype_name
from kvtier.keys import ChunkHasher, ChunkKey, Namespace
from kvtier.store import ChunkStore, KeyIndex, PrefixHit, lookup_hit

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

_MAX_HASHERS = 1024  # one per tenant salt seen; bounded


@dataclass
class LoadSpec:
    """Load tokens ``[start_token, end_token)`` of a request into its blocks."""

    req_id: str
    token_ids: list[int]
    keys: list[ChunkKey]
    block_ids: list[int]
    start_token: int
    end_token: int


@dataclass
class SaveSpec:
    """Store chunks ``[start_chunk, len(keys))`` of a request from its blocks."""

    req_id: str
    token_ids: list[int]
    keys: list[ChunkKey]
    block_ids: list[int]
    start_chunk: int


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: memory-tier keys stored and evicted during the step."""

    stored: list[ChunkKey] = field(default_factory=list)
    evicted: list[ChunkKey] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Merge the reports of several workers."""
        assert isinstance(other, KvtierWorkerMeta)
        return KvtierWorkerMeta(self.stored + other.stored, self.evicted + other.evicted)


def engine_layout(vllm_config: VllmConfig) -> PagedLayout:
    """The paged KV layout this vLLM instance will use, known before its tensors exist."""
    from vllm.platforms import current_platform

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    kind = LayoutKind.VLLM_CPU if current_platform.is_cpu() else LayoutKind.FLASH_ATTN
    if cc.cache_dtype in (None, "auto"):
        dtype = dtype_name(mc.dtype)
    elif str(cc.cache_dtype).startswith("fp8"):
        dtype = "float8_e5m2" if "e5m2" in str(cc.cache_dtype) else "float8_e4m3fn"
    else:
        raise ValueError(f"kvtier does not support kv cache dtype {cc.cache_dtype!r}")
    return PagedLayout(kind, mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size(),
                       cc.block_size, dtype)


def namespace_for(vllm_config: VllmConfig, cfg: KvtierConfig, layout: PagedLayout) -> Namespace:
    """The key namespace of this instance: same model, layout and chunking => shared KV.

    Only tensor-parallel size 1 is shared correctly today: every rank uses rank 0's
    namespace in the scheduler's lookup (each worker still stores its own shard).
    """
    pc = vllm_config.parallel_config
    return Namespace(model_id=cfg.model_id or str(vllm_config.model_config.model),
                     layout=layout.signature(), chunk_size=cfg.chunk_size,
                     tp_rank=0, tp_size=pc.tensor_parallel_size, salt=cfg.salt)


@dataclass
class _Request:
    prompt: list[int]
    keys: list[ChunkKey]
    hasher: ChunkHasher
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored or need no store
    local_computed: int = 0  # vLLM's own prefix-cache hit at the last lookup
    hit: PrefixHit | None = None  # kvtier's stored prefix at the last lookup
    pending_load: tuple[int, int] | None = None


class SchedulerPlanner:
    """Per-request bookkeeping of the scheduler-side connector."""

    def __init__(self, cfg: KvtierConfig, namespace: Namespace, layout: PagedLayout,
                 shared: ChunkStore | None) -> None:
        self.cfg = cfg
        self.namespace = namespace
        self.layout = layout
        self.shared = shared
        self.index = KeyIndex()
        self._base_hasher = ChunkHasher(namespace, cfg.store_partial_chunks, layout.block_size)
        self._hashers: dict[str, ChunkHasher] = {}
        self._reqs: dict[str, _Request] = {}
        self.num_lookups = 0
        self.num_hit_tokens = 0

    def _hasher(self, salt: str | None) -> ChunkHasher:
        salt = salt or ""
        hasher = self._hashers.get(salt)
        if hasher is None:
            if len(self._hashers) >= _MAX_HASHERS:
                self._hashers.clear()
            hasher = self._base_hasher.with_salt(salt)
            self._hashers[salt] = hasher
        return hasher

    def _state(self, request: Request) -> _Request | None:
        st = self._reqs.get(request.request_id)
        if st is None and request.prompt_token_ids is not None:
            prompt = list(request.prompt_token_ids)
            hasher = self._hasher(getattr(request, "cache_salt", None))
            st = self._reqs[request.request_id] = _Request(prompt, hasher.keys(prompt), hasher)
        return st

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """kvtier's hit beyond vLLM's own (whole chunks, or whole blocks of a partial
        chunk when those are stored), leaving >= 1 token to compute."""
        st = self._state(request)
        if st is None or not st.keys:
            return 0
        st.local_computed = num_computed_tokens
        sources = [self.index] + (self.shared.tiers if self.shared is not None else [])
        st.hit = lookup_hit(sources, st.hasher, st.prompt, st.keys)
        hit = min(st.hit.tokens, len(st.prompt) - 1)  # vLLM must compute the last token
        self.num_lookups += 1
        if hit <= num_computed_tokens:
            return 0
        self.num_hit_tokens += hit - num_computed_tokens
        return hit - num_computed_tokens

    def accept_load(self, request: Request, num_external_tokens: int) -> None:
        """vLLM allocated blocks for ``num_external_tokens`` loaded tokens."""
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens > 0:
            start = st.local_computed
            st.pending_load = (start, start + num_external_tokens)

    def build(self, out: SchedulerOutput) -> KvtierMetadata:
        """Loads and saves for this step; advances per-request state."""
        meta = KvtierMetadata()
        for new in out.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._plan(new.req_id, st, new.num_computed_tokens
                       + out.num_scheduled_tokens.get(new.req_id, 0), meta)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # preempted: blocks were replaced
                st.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                st.block_ids.extend(new_ids[0])
            self._plan(req_id, st, cached.num_computed_tokens[i]
                       + out.num_scheduled_tokens.get(req_id, 0), meta)
        return meta

    def _plan(self, req_id: str, st: _Request, computed_after: int, meta: KvtierMetadata) -> None:
        cs = self.cfg.chunk_size
        if st.pending_load is not None and st.hit is not None:
            start, end = st.pending_load
            st.pending_load = None
            n = -(-end // cs)
            keys = st.hit.keys[:n]
            meta.loads.append(LoadSpec(req_id, st.prompt[:st.hit.tokens], keys,
                                       list(st.block_ids), start, end))
            # A head of a chunk (another prompt's partial chunk) is not this
            # prompt's chunk: that one is still to be saved.
            st.saved_chunks = max(st.saved_chunks, min(n, st.hit.chunks))
        if computed_after >= len(st.prompt):
            n_save = len(st.keys)  # includes the partial tail if that is enabled
        else:
            n_save = min(computed_after // cs, len(st.keys))
        if n_save > st.saved_chunks:
            meta.saves.append(SaveSpec(req_id, st.prompt[:n_save * cs], st.keys[:n_save],
                                       list(st.block_ids), st.saved_chunks))
            st.saved_chunks = n_save

    def finish(self, req_id: str) -> None:
        """Drop a finished request's state."""
        self._reqs.pop(req_id, None)

    def close(self) -> None:
        """Close the shared tiers this process opened."""
        if self.shared is not None:
            self.shared.close()
