"""Layer 6: what the connector's two halves tell each other every step.

Scheduler -> workers: :class:`KvtierMetadata` (loads, saves, prefetches);
workers -> scheduler: :class:`KvtierWorkerMeta` (memory-tier changes, failed
loads). Plain data; vLLM moves it between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorMetadata,
                                                               KVConnectorWorkerMetadata)

from kvtier.keys import ChunkKey, Namespace


@dataclass
class LoadSpec:
    """Load tokens ``[start_token, end_token)`` of a request into its blocks.

    ``keys[s]`` are shard ``s``'s keys (one list per TP rank and PP stage)."""

    req_id: str
    token_ids: list[int]
    keys: list[list[ChunkKey]]
    block_ids: list[int]
    start_token: int
    end_token: int
    is_async: bool = False
    """Read in the background while the engine runs other requests (vLLM's
    ``WAITING_FOR_REMOTE_KVS``); reported done through ``get_finished``."""


@dataclass
class SaveSpec:
    """Store chunks ``[start_chunk, len(keys[s]))`` of a request from its blocks.

    ``release``: the request has finished and holds its blocks for this save;
    the worker reports it done (``get_finished``) once saved."""

    req_id: str
    token_ids: list[int]
    keys: list[list[ChunkKey]]
    block_ids: list[int]
    start_chunk: int
    release: bool = False
    verify: int = 0
    """The canary: chunks ``[start_chunk, verify)`` were a hit kvtier did not serve;
    the worker compares vLLM's fresh KV of them with every tier's stored copy."""


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    """Finished requests whose held saves were dropped: report them done, save nothing."""
    epoch: int = 0
    """Resets of kvtier so far (``reset_prefix_cache(reset_connector=True)``): a worker
    that has seen fewer clears its store first, before any load of the step."""
    prefetch: list[list[list[ChunkKey]]] = field(default_factory=list)
    """Per request seen but not yet scheduled, per shard: keys to promote into memory."""
    idle: bool = False
    """The step computes nothing (vLLM only polls the connector, e.g. every request waits
    for its background load): the workers may wait a little for a load to land."""
    namespaces: list[Namespace] | None = None
    """The scheduler's key namespace per shard, in its first step's metadata: the keys it
    plans with are authoritative; a worker that computed another namespace (a model that
    changed its config while loading in the worker's process) adopts it."""


@dataclass
class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """Workers -> scheduler: memory-tier keys stored and evicted, loads that failed."""

    stored: list[ChunkKey] = field(default_factory=list)
    evicted: list[ChunkKey] = field(default_factory=list)
    failed: list[tuple[str, int, ChunkKey]] = field(default_factory=list)
    """(request id, tokens loaded before the failure, key of the chunk that failed)."""
    epoch: int = 0
    """The last reset this worker has passed: the scheduler trusts reports of the
    current epoch only (anything older describes tiers from before the reset)."""
    tiers: dict[str, tuple[list[ChunkKey], list[ChunkKey]]] = field(default_factory=dict)
    """Per tier: (keys stored, keys removed) by the worker, for vLLM's KV events."""
    service: dict[str, bool] = field(default_factory=dict)
    """Tiers the canary took out of service (True) or an operator put back (False)."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Merge the reports of several workers."""
        assert isinstance(other, KvtierWorkerMeta)
        tiers = dict(self.tiers)
        for name, (stored, removed) in other.tiers.items():
            mine = tiers.get(name, ([], []))
            tiers[name] = (mine[0] + stored, mine[1] + removed)
        service = {t: out or other.service.get(t, False) for t, out in self.service.items()}
        service.update({t: out for t, out in other.service.items() if t not in service})
        return KvtierWorkerMeta(self.stored + other.stored, self.evicted + other.evicted,
                                self.failed + other.failed, min(self.epoch, other.epoch), tiers,
                                service)
