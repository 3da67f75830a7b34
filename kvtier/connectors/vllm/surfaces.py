"""Layer 6: kvtier in vLLM's own surfaces: its stats log line, its /metrics, its KV events.

- :class:`KvtierStats` travels from the workers (bytes moved, seconds, failed
  loads) and the scheduler (lookups, promised tokens, bypassed requests,
  dropped saves) to vLLM's logger process, which prints it on its periodic
  "KV Transfer metrics" line and feeds :class:`KvtierPromMetrics`
  (``vllm:kvtier_*_total`` on ``vllm serve``'s ``/metrics``).
- :class:`EventLog` turns the workers' reports of what each tier stored and
  removed into vLLM's KV events (``BlockStored`` / ``BlockRemoved`` /
  ``AllBlocksCleared``, published on ``--kv-events-config``'s stream), the
  tier as the medium: ``CPU`` (memory), ``DISK``, ``REDIS``. One block of an
  event is one kvtier chunk (``block_size`` = the chunk size; a partial last
  chunk is shorter); its hash is the chunk key (16 bytes), its parent the key
  before it. A consumer that missed events resyncs from the management API's
  ``/v1/snapshot``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

from kvtier.keys import ChunkKey

MEDIUM = {"memory": "CPU", "disk": "DISK", "redis": "REDIS"}

# Counters and what they count; the scheduler's are per instance, the workers' are
# summed over the workers (each moves its own shard's bytes).
COUNTERS = {
    "lookups": "Requests kvtier looked up",
    "hit_tokens": "Prompt tokens kvtier promised to load (beyond vLLM's own prefix cache)",
    "bypassed": "Requests that bypassed kvtier (multimodal, prompt embeddings, unreadable LoRA)",
    "saves_dropped": "Saves dropped because a load of their step failed (saved again later)",
    "loaded_bytes": "Bytes kvtier loaded into vLLM's KV cache",
    "load_seconds": "Seconds the workers spent loading",
    "load_failures": "Promised loads that failed (recomputed by vLLM)",
    "stored_chunks": "Chunks gathered out of vLLM's KV cache into kvtier",
    "stored_bytes": "Bytes gathered out of vLLM's KV cache into kvtier",
    "store_seconds": "Seconds the workers spent gathering",
    "layerwise_layers": "Layers of loads moved inside the forward pass (layerwise: true)",
    "async_loads": "Loads from lower tiers done in the background (vLLM's asynchronous loads)",
    "async_timeouts": "Background loads cut short by load_timeout_s (the rest recomputed)",
    "async_wait_seconds": "Seconds requests waited for their background loads",
    "verify_sampled": "Requests with a hit served cold for the canary (verify.sample_rate)",
    "verify_checks": "Stored copies the canary compared with vLLM's recompute",
    "verify_mismatches": "Stored copies that were not vLLM's KV (deleted; by tier: "
                         "verify_mismatch)",
    "verify_tiers_out": "Tiers the canary took out of service (until resumed)",
    "verify_skipped": "Chunks the canary did not check (its queue was full)",
    "namespace_adoptions": "Workers that computed another key namespace than the scheduler "
                           "and took the scheduler's",
}
MISMATCH = "verify_mismatch_"  # + tier: a stats key, the tier label of verify_mismatch


@dataclass
class KvtierStats(KVConnectorStats):
    """Counters of one interval (a flat dict of numbers, summed when aggregated)."""

    def reset(self) -> None:
        self.data = {}

    def add(self, **counts: float) -> None:
        """Add to counters (and to :attr:`totals`, which :meth:`take` keeps)."""
        totals = self.__dict__.setdefault("totals", {})
        for name, value in counts.items():
            self.data[name] = self.data.get(name, 0) + value
            totals[name] = totals.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in (other.data or {}).items():
            if isinstance(value, (int, float)):
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """What vLLM's periodic log line shows."""
        d = self.data
        out: dict[str, int | float] = {f"kvtier_{k}": round(v, 3) if isinstance(v, float) else v
                                       for k, v in d.items() if v}
        if d.get("load_seconds"):
            out["kvtier_load_GBps"] = round(d.get("loaded_bytes", 0) / d["load_seconds"] / 1e9, 2)
        if d.get("store_seconds"):
            out["kvtier_store_GBps"] = round(d.get("stored_bytes", 0) / d["store_seconds"] / 1e9,
                                             2)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> KvtierStats | None:
        """This interval's stats (None if nothing happened); starts the next."""
        if self.is_empty():
            return None
        out = KvtierStats(data=dict(self.data))
        self.reset()
        return out


class KvtierPromMetrics(KVConnectorPromMetrics):
    """``vllm:kvtier_<counter>_total`` per engine on ``vllm serve``'s /metrics."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[tuple[int, str], Any] = {}
        for name, doc in COUNTERS.items():
            counter = self._counter_cls(name=f"vllm:kvtier_{name}", documentation=doc,
                                        labelnames=labelnames)
            for engine, values in per_engine_labelvalues.items():
                self._counters[(engine, name)] = counter.labels(*values)
        self._labels = per_engine_labelvalues
        self._mismatch = self._counter_cls(
            name="vllm:kvtier_verify_mismatch", labelnames=labelnames + ["tier"],
            documentation="Stored copies that were not vLLM's KV, by tier (the canary)")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            counter = self._counters.get((engine_idx, name))
            if counter is not None and value:
                counter.inc(value)
            elif name.startswith(MISMATCH) and value and engine_idx in self._labels:
                self._mismatch.labels(*self._labels[engine_idx], name[len(MISMATCH):]).inc(value)


class EventLog:
    """KV events from the workers' tier reports, with the tokens the scheduler saw.

    Only shard 0's keys are published (one event per chunk, not per rank).
    Bounded: tokens are remembered for the last ``max_keys`` chunks planned,
    pending events are capped at ``max_events`` (older ones dropped first).
    """

    def __init__(self, chunk_size: int, max_keys: int = 200_000,
                 max_events: int = 100_000) -> None:
        self.chunk_size = chunk_size
        self._chunks: OrderedDict[ChunkKey, tuple[ChunkKey | None, list[int]]] = OrderedDict()
        self._events: list[KVCacheEvent] = []
        self.max_keys, self.max_events = max_keys, max_events

    def know(self, keys: list[ChunkKey], token_ids: list[int], start: int = 0) -> None:
        """Remember the parent and tokens of shard 0's chunks ``keys[start:]`` of a prompt
        (those before were known already: a long prompt's saves are planned step by step,
        and each would otherwise walk it from the start again)."""
        cs = self.chunk_size
        for i in range(start, len(keys)):
            self._chunks[keys[i]] = (keys[i - 1] if i else None, token_ids[i * cs:(i + 1) * cs])
            self._chunks.move_to_end(keys[i])
        while len(self._chunks) > self.max_keys:
            self._chunks.popitem(last=False)

    def report(self, tier: str, stored: list[ChunkKey], removed: list[ChunkKey]) -> None:
        """Events for one tier's changes (keys of other shards are skipped)."""
        medium = MEDIUM.get(tier, tier.upper())
        for key in stored:
            known = self._chunks.get(key)
            if known is not None:
                parent, tokens = known
                self._add(BlockStored(block_hashes=[bytes(key)],
                                      parent_block_hash=bytes(parent) if parent else None,
                                      token_ids=tokens, block_size=self.chunk_size,
                                      lora_id=None, medium=medium, lora_name=None))
        gone = [bytes(k) for k in removed if k in self._chunks]
        if gone:
            self._add(BlockRemoved(block_hashes=gone, medium=medium))

    def cleared(self) -> None:
        """Every tier was emptied (``reset_prefix_cache(reset_connector=True)``)."""
        self._add(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        """The events since the last call."""
        events, self._events = self._events, []
        return events

    def _add(self, event: KVCacheEvent) -> None:
        self._events.append(event)
        if len(self._events) > self.max_events:
            del self._events[:len(self._events) - self.max_events]


class KvtierSurfaces:
    """The connector's methods for vLLM's stats line, /metrics and KV events (mixed
    into :class:`~kvtier.connectors.vllm.KvtierConnector`)."""

    planner: Any
    _stats: KvtierStats

    def get_kv_connector_stats(self) -> KvtierStats | None:
        """This interval's counters (vLLM's stats log line and /metrics)."""
        return self.planner.stats.take() if self.planner is not None else self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvtierStats:
        """Rebuild stats from their dict (in vLLM's logger process)."""
        return KvtierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> KvtierPromMetrics:
        """``vllm:kvtier_*_total`` counters on ``vllm serve``'s /metrics."""
        return KvtierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def take_events(self) -> list[Any]:
        """kvtier's stores and removals per tier, for vLLM's KV events stream."""
        return self.planner.events.take() if self.planner is not None else []
