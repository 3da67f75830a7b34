"""Layer 6: the scheduler side of the vLLM connector: lookups, load and save plans.

Plain Python on vLLM's scheduler objects; no tensors. Each step it tells the
workers which chunks to load (hits vLLM accepted) and which to save.

A chunk computed in a step whose promised KV did not arrive (on any rank, or
in a block shared with another request) was computed on top of KV that was
not there, and must never be stored. The scheduler learns of failed loads
only after the step, so every step's saves are held until then: the affected
ones are dropped (their chunks are saved again once vLLM has recomputed them),
the others run in the next step's ``wait_for_save``. That also keeps the copy
out of the step that computed the chunks, the longest step (a prefill), which
sets the other requests' inter-token latency; vLLM's native offloading stores a
step late too. A request that finishes, or is aborted, before its save ran keeps
its blocks (vLLM's delay-free) until the workers report it saved; a preempted
request's save not yet run is dropped (its blocks may be reused by then).

A reset (``reset_prefix_cache(reset_connector=True)``) is a barrier: a new epoch, carried
to the workers, which clear their stores before any load of that step; until all report it,
nothing is promised from shared tiers and older reports add nothing; saves planned before it
are dropped (docs/architecture.md, "Reset and clear").
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from kvtier.config import KvtierConfig
from kvtier.connectors.vllm.canary import CanarySampler
from kvtier.connectors.vllm.keys import Bypass, request_inputs
from kvtier.connectors.vllm.lora import LoraIdentities
from kvtier.connectors.vllm.meta import KvtierMetadata, KvtierWorkerMeta, LoadSpec, SaveSpec
from kvtier.connectors.vllm.requests import RequestState, common_hit
from kvtier.connectors.vllm.surfaces import EventLog, KvtierStats
from kvtier.keys import ChunkHasher, ChunkKey, Namespace
from kvtier.store import ChunkStore, KeyIndex, lookup_hit, lookup_prefix

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

_MAX_HASHERS = 1024  # one per (tenant salt, LoRA adapter) seen; bounded


class SchedulerPlanner:
    """Per-request bookkeeping of the scheduler-side connector."""

    def __init__(self, cfg: KvtierConfig, namespaces: list[Namespace], block_size: int,
                 shared: ChunkStore | None, loads: bool = True, saves: bool = True) -> None:
        self.cfg, self.shared = cfg, shared
        self.loads, self.saves = loads, saves  # vLLM's kv_consumer / kv_producer roles
        self.index = KeyIndex()
        self._base = [ChunkHasher(ns, cfg.store_partial_chunks, block_size) for ns in namespaces]
        self._unsent: list[Namespace] | None = [h.namespace for h in self._base]  # 1st step's
        self._blocks_per_chunk = cfg.chunk_size // block_size
        self._hashers: dict[tuple[str | None, str | None], list[ChunkHasher]] = {}
        self._reqs: dict[str, RequestState] = {}
        self._bypassed: set[str] = set()
        self._held: dict[str, SaveSpec] = {}  # planned this step, saved next step
        self._ready: list[SaveSpec] = []  # held saves whose step had no failure
        self._releases: list[str] = []
        self.epoch = 0  # resets so far; the workers clear their stores when it grows
        self._workers_epoch = 0  # the epoch every worker has reported passing
        self._nudges = 0  # empty steps still asked for, so idle workers pass a reset
        self._async: list[str] = []  # accepted asynchronous loads, planned next build
        self._prefetch: dict[str, list[list[ChunkKey]]] = {}  # seen, not yet scheduled
        self.bypasses: Counter[str] = Counter()
        self.stats = KvtierStats()
        self.events = EventLog(cfg.chunk_size)
        self.canary = CanarySampler(cfg.verify)
        self.loras = LoraIdentities()  # adapters hashed on their own thread, never here

    # -- lookup ---------------------------------------------------------------

    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """kvtier's hit beyond vLLM's own (whole chunks, or whole blocks of a partial
        chunk when those are stored, held by every shard), leaving >= 1 token to compute."""
        st = self._state(request)
        if st is None or not st.keys[0] or not self.loads:
            return 0
        st.local_computed = num_computed_tokens
        self._lookup(st)
        assert st.hit is not None
        hit = min(st.hit[0].tokens, len(st.prompt) - 1)  # vLLM must compute the last token
        self.stats.add(lookups=1)
        if hit <= num_computed_tokens:
            return 0
        if self.saves and self.canary.sample(request.request_id):  # recompute, then compare
            st.verify = st.hit[0].chunks
            self.stats.add(verify_sampled=1)
            return 0
        self.stats.add(hit_tokens=hit - num_computed_tokens)
        return hit - num_computed_tokens

    def load_is_async(self, request: Request, num_tokens: int) -> bool:
        """Whether the hit just answered needs a read from a lower tier (then it loads
        in the background while the engine runs other requests)."""
        st = self._reqs.get(request.request_id)
        if not num_tokens or st is None or st.hit is None or not self.cfg.async_loads:
            return False
        st.load_async = st.in_memory * self.cfg.chunk_size < st.local_computed + num_tokens
        return st.load_async

    def _lookup(self, st: RequestState) -> None:
        past = self.shared is not None and self._workers_epoch == self.epoch  # the barrier
        sources = self.canary.sources(self.index, self.shared.tiers if past else [])
        st.hit = common_hit([lookup_hit(sources, h, st.prompt, k)
                             for h, k in zip(st.hashers, st.keys)], st.hashers[0], st.prompt)
        st.in_memory = min(lookup_prefix([self.index], hit.keys) for hit in st.hit)

    def seen(self, request: Request) -> None:
        """A new request: if its hit lies in lower tiers, have the workers promote it
        into memory now, before the request is scheduled."""
        st = self._state(request)
        if st is None or not st.keys[0] or not self.loads or self.shared is None \
                or not self.cfg.prefetch or self._workers_epoch != self.epoch \
                or self.canary.sample(request.request_id):
            return
        self._lookup(st)
        assert st.hit is not None
        if st.in_memory < len(st.hit[0].keys):
            self._prefetch[request.request_id] = [h.keys[st.in_memory:] for h in st.hit]

    def accept_load(self, request: Request, num_external_tokens: int,
                    block_ids: list[int] | None = None) -> None:
        """vLLM allocated ``block_ids`` for ``num_external_tokens`` loaded tokens; an
        asynchronous load is planned in the next build (the request is not scheduled)."""
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens > 0:
            start = st.local_computed
            st.pending_load = (start, start + num_external_tokens)
            if st.load_async:
                st.load_async = False
                st.block_ids = list(block_ids or ())
                self._async.append(request.request_id)

    # -- per step -------------------------------------------------------------

    def build(self, out: SchedulerOutput) -> KvtierMetadata:
        """This step's loads; its saves if it loads nothing, and the saves held from
        the last step that turned out safe."""
        for req_id in getattr(out, "preempted_req_ids", None) or ():
            self._drop_held(req_id, reason="preempted")
        self._nudges = max(0, self._nudges - 1)
        meta = KvtierMetadata(saves=self._ready, releases=self._releases, epoch=self.epoch,
                              namespaces=self._unsent, idle=not out.total_num_scheduled_tokens)
        self._ready, self._releases, self._unsent = [], [], None
        for req_id in self._async:
            st = self._reqs.get(req_id)
            if st is not None:
                self._plan_load(req_id, st, meta, is_async=True)
        self._async = []
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
        for load in meta.loads:  # scheduled already: its load reads what it needs
            self._prefetch.pop(load.req_id, None)
        meta.prefetch, self._prefetch = list(self._prefetch.values()), {}
        return meta

    def _plan_load(self, req_id: str, st: RequestState, meta: KvtierMetadata,
                   is_async: bool = False) -> None:
        if st.pending_load is None or st.hit is None:
            return
        cs = self.cfg.chunk_size
        start, end = st.pending_load
        st.pending_load = None
        n = -(-end // cs)
        meta.loads.append(LoadSpec(req_id, st.prompt[:st.hit[0].tokens],
                                   [h.keys[:n] for h in st.hit], list(st.block_ids),
                                   start, end, is_async))
        self.events.know(st.hit[0].keys[:n], st.prompt)
        # A head of a chunk (another prompt's partial chunk) is not this
        # prompt's chunk: that one is still to be saved.
        st.saved_chunks = max(st.saved_chunks, min(n, st.hit[0].chunks))

    def _plan(self, req_id: str, st: RequestState, computed_after: int, meta: KvtierMetadata
              ) -> None:
        cs = self.cfg.chunk_size
        self._plan_load(req_id, st, meta)
        if not self.saves or st.stale:  # kv_consumer: never stores; stale: see reset()
            return
        if computed_after >= len(st.prompt):
            n_save = len(st.keys[0])  # includes the partial tail if that is enabled
        else:
            n_save = min(computed_after // cs, len(st.keys[0]))
        if n_save > st.saved_chunks:
            earlier = self._held.get(req_id)  # a step whose outcome is not known yet
            start = earlier.start_chunk if earlier is not None else st.saved_chunks
            self._held[req_id] = SaveSpec(req_id, st.prompt[:n_save * cs],
                                          [k[:n_save] for k in st.keys], list(st.block_ids),
                                          start, verify=min(st.verify, n_save))
            self.events.know(st.keys[0][:n_save], st.prompt, st.saved_chunks)
            st.saved_chunks = n_save

    def step_done(self, output: KVConnectorOutput) -> None:
        """After a step: fold in the workers' report, and release the held saves
        whose step loaded everything they depend on."""
        meta = output.kv_connector_worker_meta
        failed: dict[str, int] = {}
        if isinstance(meta, KvtierWorkerMeta):
            fresh = meta.epoch >= self.epoch  # else from a step before the last reset
            if fresh:
                self._workers_epoch = self.epoch
            self.index.update(meta.stored if fresh else (), meta.evicted)
            self.index.update(evicted=[key for _, _, key in meta.failed])
            self.canary.apply(meta.service)
            for tier, (stored, removed) in meta.tiers.items():
                self.events.report(tier, stored if fresh else [], removed)
            for req_id, loaded, _ in meta.failed:
                failed[req_id] = min(loaded, failed.get(req_id, loaded))
                st = self._reqs.get(req_id)
                if st is not None:  # saved again once vLLM has recomputed them
                    st.saved_chunks = min(st.saved_chunks, loaded // self.cfg.chunk_size)
        invalid = set(output.invalid_block_ids or ())
        held, self._held = self._held, {}
        for req_id, save in held.items():
            first_bad = self._first_bad_token(save, invalid, failed.get(req_id))
            if first_bad is None:
                self._ready.append(save)
                continue
            log.info("kvtier: %s: a load of its step failed; its chunks are saved after "
                     "vLLM recomputes them", req_id)
            self.stats.add(saves_dropped=1)
            st = self._reqs.get(req_id)
            if st is not None:
                st.saved_chunks = min(st.saved_chunks, first_bad // self.cfg.chunk_size)
            if save.release:
                self._releases.append(req_id)

    def _first_bad_token(self, save: SaveSpec, invalid: set[int], loaded: int | None
                         ) -> int | None:
        """First token of the request whose KV this step cannot be trusted, or None."""
        bad = [i for i, b in enumerate(save.block_ids) if b in invalid] if invalid else []
        bs = self.cfg.chunk_size // self._blocks_per_chunk
        firsts = [bad[0] * bs] if bad else []
        if loaded is not None:
            firsts.append(loaded)
        return min(firsts) if firsts else None

    def finish(self, req_id: str) -> bool:
        """A request finished or was aborted: forget it. True if it must keep its blocks
        for a save not yet run (held, or released for the next step)."""
        self._reqs.pop(req_id, None)
        save = self._held.get(req_id) or next(
            (s for s in self._ready if s.req_id == req_id), None)
        if save is not None:
            save.release = True
            return True
        return False

    def _drop_held(self, req_id: str, reason: str) -> None:
        """Drop ``req_id``'s saves not yet run (held, or released for this step): its
        blocks are vLLM's again and may hold another request's KV when they would run."""
        gone = [s for s in (self._held.pop(req_id, None), *self._ready) if s and s.req_id == req_id]
        self._ready, st = [s for s in self._ready if s.req_id != req_id], self._reqs.get(req_id)
        if gone and st is not None:
            st.saved_chunks = min(st.saved_chunks, *(s.start_chunk for s in gone))
            log.debug("kvtier: %s %s: its save not yet done is dropped", req_id, reason)

    def reset(self) -> None:
        """Empty kvtier, as a barrier (module docstring): the shared tiers and the index
        now, every worker's store (memory and its own writes) with the next step."""
        if self.shared is not None:  # workers clear it again after their barrier
            self.shared.clear()
        self.index = KeyIndex()
        self.epoch += 1  # (between steps: no load of the next step is planned yet)
        self._nudges = 8
        for save in [*self._held.values(), *self._ready]:  # of KV from before the reset
            if save.release:
                self._releases.append(save.req_id)  # its blocks are freed, nothing saved
        self._held, self._ready, self._prefetch = {}, [], {}
        for st in self._reqs.values():
            st.stale = st.stale or bool(st.block_ids or st.saved_chunks or st.pending_load)
        self.events.cleared()

    @property
    def reset_pending(self) -> bool:
        """A reset the workers have not passed yet: vLLM should run (empty) steps, so
        they clear their stores now rather than at the next request (a few at most)."""
        return self._workers_epoch != self.epoch and self._nudges > 0

    def close(self) -> None:
        """Close the shared tiers this process opened. If the workers never passed the
        last reset, clear them again: the workers' writes, flushed at their shutdown
        (before this one), may have landed after the first clear."""
        self.loras.close()
        if self.shared is not None:
            if self._workers_epoch != self.epoch:
                self.shared.clear()
            self.shared.close()

    # -- requests -------------------------------------------------------------

    def _state(self, request: Request) -> RequestState | None:
        st = self._reqs.get(request.request_id)
        if st is not None or request.request_id in self._bypassed:
            return st
        inputs = request_inputs(request, self.loras)
        if isinstance(inputs, Bypass):
            self._bypass(request.request_id, inputs)
            return None
        if request.prompt_token_ids is None:
            return None
        prompt, hashers = list(request.prompt_token_ids), self._hashers_for(*inputs)
        st = RequestState(prompt, hashers, [h.keys(prompt) for h in hashers])
        self._reqs[request.request_id] = st
        return st

    def _bypass(self, req_id: str, reason: Bypass) -> None:
        if not self.bypasses[reason.value] and reason is not Bypass.LORA_PENDING:
            log.warning("kvtier: requests with %s bypass kvtier (their KV depends on more "
                        "than the prompt's tokens); counted in bypasses", reason.value)
        self.bypasses[reason.value] += 1
        self.stats.add(bypassed=1)
        if len(self._bypassed) > 100_000:
            self._bypassed.clear()
        self._bypassed.add(req_id)

    def forget(self, req_id: str) -> None:
        """Drop a bypassed request's id (it finished)."""
        self._bypassed.discard(req_id)

    def _hashers_for(self, salt: str | None, lora: str | None) -> list[ChunkHasher]:
        if (salt, lora) not in self._hashers:
            if len(self._hashers) >= _MAX_HASHERS:
                self._hashers.clear()
            self._hashers[(salt, lora)] = [h.with_inputs(salt, lora) for h in self._base]
        return self._hashers[(salt, lora)]
