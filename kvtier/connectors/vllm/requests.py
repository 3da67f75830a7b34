"""Layer 6: one request as the scheduler side of the connector sees it.

Its prompt and keys (one list per shard), its last hit and what of it the
workers' memory tiers hold, what of it is saved or planned, the load vLLM
accepted; and the hit every shard holds (:func:`common_hit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store import PrefixHit


@dataclass
class RequestState:
    """What the scheduler knows of one request: its keys per shard, its last hit, what
    of it is saved or planned, the load vLLM accepted."""

    prompt: list[int]
    hashers: list[ChunkHasher]  # one per shard
    keys: list[list[ChunkKey]]  # one list per shard
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored, or planned to be
    local_computed: int = 0  # vLLM's own prefix-cache hit at the last lookup
    hit: list[PrefixHit] | None = None  # per shard, the same length
    in_memory: int = 0  # leading chunks of the hit the workers' memory tiers hold
    load_async: bool = False  # the last hit answered needs a lower-tier read
    pending_load: tuple[int, int] | None = None
    stale: bool = False  # had KV when kvtier was reset: none of it is ever saved
    verify: int = 0  # the canary: leading chunks that were a hit, recomputed and checked


def common_hit(hits: list[PrefixHit], hasher: ChunkHasher, prompt: list[int]
               ) -> list[PrefixHit]:
    """The hit every shard holds: the shards' own when they agree, else the whole
    chunks they all hold (a head of a partial chunk only counts when all have it)."""
    if all(h.tokens == hits[0].tokens and h.chunks == hits[0].chunks for h in hits):
        return hits
    n = min(h.chunks for h in hits)
    tokens = min(n * hasher.chunk_size, hasher.covered(len(prompt)))
    return [PrefixHit(h.keys[:n], tokens, n) for h in hits]
