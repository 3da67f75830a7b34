"""Layer 6: the canary: a sample of hits checked against the engine's own recompute.

Bytes-level checks (header, checksums) catch damaged chunks, not a chunk that is
valid but wrong (another prompt's KV under this key, another ISA's packing, a
bug in a writer). So, for a sample of requests that have a hit
(``verify.sample_rate``, decided by a hash of the request id, so a given request
is always sampled or never):

- scheduler (:class:`CanarySampler`): kvtier reports no hit, vLLM computes the
  prefix itself, and the request's save plan names how many leading chunks were
  hits (:attr:`~kvtier.connectors.vllm.meta.SaveSpec.verify`);
- worker (:class:`Canary`): after the forward pass (``wait_for_save``) those
  chunks are gathered out of the paged KV into private buffers, and a background
  thread (``kvtier-canary``; lower tiers are never read on the engine thread)
  compares them with the copy every tier holds, each tier read on its own and
  decoded to raw. A copy further than ``verify.tolerance`` (relative L2 error,
  float32; a lossy codec's chunk within that codec's own error) is a mismatch:
  logged with tier and key, counted, deleted from that tier, and the fresh chunk
  stored in its place. A tier with ``verify.max_mismatches`` mismatches is taken
  out of service (:class:`~kvtier.store.service.TierService`) until an operator
  resumes it.

What it cannot catch: a chunk no sampled request hits, a peer's chunk (read
only, not read here), and a lossy codec's error within its own bound.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from kvtier.codecs import ChunkData, Codec
from kvtier.config import VerifyConfig
from kvtier.connectors.vllm.meta import SaveSpec
from kvtier.connectors.vllm.surfaces import MISMATCH, KvtierStats
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import torch_dtype
from kvtier.keys import ChunkKey
from kvtier.store import KeyIndex
from kvtier.threads import NamedThread
from kvtier.tiers.base import Tier

log = logging.getLogger("kvtier.vllm")

# A lossy codec's chunk differs from the engine's KV by design: it matches within the
# codec's own error. Measured on the tiny model's KV in vLLM (relative L2 per chunk,
# two prompts): q8 0.0058, q4 0.095; the bounds leave room, and stay far below the
# 1.4 of a wrong chunk.
LOSSY_TOLERANCE = {Codec.Q8: 0.05, Codec.Q4: 0.3}
# vLLM makes its internal id "<caller's id>-<8 random hex>"; the caller's id is hashed,
# so that the same request is sampled in every run (offline ids "0".."379" never are
# at the default 1%, which keeps test runs deterministic).
_VLLM_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def sampled(req_id: str, rate: float) -> bool:
    """Whether request ``req_id`` is a canary: a hash of its id below ``rate`` (the same
    answer every time it is asked, so a rescheduled request stays cold)."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    digest = hashlib.blake2b(_VLLM_SUFFIX.sub("", req_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


def relative_error(stored: ChunkData, fresh: ChunkData) -> float:
    """``||stored - fresh|| / ||fresh||`` over the chunk's values in float32; 0.0 when
    the bytes are equal, infinity when the two are not the same dtype and shape."""
    if stored.meta != fresh.meta or stored.payload.nbytes != fresh.payload.nbytes:
        return float("inf")
    a = np.asarray(stored.payload).reshape(-1).view(np.uint8)
    b = np.asarray(fresh.payload).reshape(-1).view(np.uint8)
    if np.array_equal(a, b):
        return 0.0
    dtype = torch_dtype(fresh.meta.dtype)
    x = torch.from_numpy(a.copy()).view(dtype).float()
    y = torch.from_numpy(b.copy()).view(dtype).float()
    norm = float(torch.linalg.vector_norm(y))
    diff = float(torch.linalg.vector_norm(x - y))
    if norm == 0.0 or diff != diff:  # all zeros fresh, or NaN: only equal bytes match
        return float("inf")
    return diff / norm


def tolerance_for(codec: Codec, tolerance: float) -> float:
    """The largest relative error a copy stored in ``codec`` may have and still be the
    engine's KV: ``tolerance``, or a lossy codec's own error bound if larger."""
    return max(tolerance, LOSSY_TOLERANCE.get(codec, 0.0))


class CanarySampler:
    """The scheduler's part: which requests with a hit are served cold and checked,
    and which tiers its lookups still count."""

    def __init__(self, cfg: VerifyConfig) -> None:
        self.rate = cfg.sample_rate
        self.out: set[str] = set()  # tiers out of service, as the workers reported

    def sample(self, req_id: str) -> bool:
        """Whether this request's hit is recomputed and checked instead of served."""
        return sampled(req_id, self.rate)

    def sources(self, index: KeyIndex, tiers: Sequence[Tier]) -> list:
        """What lookups ask: the workers' memory index and the shared tiers in service."""
        return ([index] if "memory" not in self.out else []) \
            + [t for t in tiers if t.name not in self.out]

    def apply(self, changes: dict[str, bool]) -> None:
        """Fold in the workers' reports of tiers taken out of (or back in) service."""
        for tier, out in changes.items():
            (self.out.add if out else self.out.discard)(tier)


class Canary:
    """The worker's part: gathers the sampled chunks on the engine thread; compares,
    counts and repairs on its own thread."""

    def __init__(self, cfg: VerifyConfig, engine: CacheEngine, max_queued: int = 64) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = engine.store
        self._queue: queue.Queue[list[tuple[ChunkKey, ChunkData]] | None] = \
            queue.Queue(max_queued)  # bounded: a full queue skips the check, never waits
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()  # for the engine thread's stats
        self._thread = NamedThread(target=self._run, name="kvtier-canary", daemon=True)
        self._thread.start()

    def submit(self, save: SaveSpec, shard: int) -> None:
        """Engine thread, after the forward pass: copy the save's chunks to verify out
        of paged KV and queue their check. Never raises (a canary never fails a step)."""
        keys = save.keys[shard]
        todo = range(save.start_chunk, min(save.verify, len(keys)))
        if not todo:
            return
        try:
            fresh = self.engine.gather_chunks(len(save.token_ids), save.block_ids, todo)
            self._queue.put_nowait([(keys[i], chunk) for i, chunk in fresh])
        except queue.Full:
            self._count(verify_skipped=len(todo))
        except Exception:
            log.exception("kvtier canary: gathering %s's chunks failed", save.req_id)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for key, fresh in batch:
                try:
                    self.check(key, fresh)
                except Exception:  # a broken tier must not stop the canary
                    log.exception("kvtier canary: checking %s failed", key.hex())

    def check(self, key: ChunkKey, fresh: ChunkData) -> None:
        """Compare every tier's copy of ``key`` with the engine's ``fresh`` one."""
        wrong = False
        for tier, codec, stored in self.store.read_each(key):
            try:
                err = relative_error(stored, fresh)
            finally:
                stored.release()
            self.store.service.checked()
            self._count(verify_checks=1)
            if err <= tolerance_for(codec, self.cfg.tolerance):
                continue
            wrong = True
            log.error("kvtier canary: the %s tier's chunk %s is not the engine's KV "
                      "(relative error %.3g > %g): deleted and stored again from the "
                      "engine's copy", tier.name, key.hex(), err, self.cfg.tolerance)
            self.store.delete([key], tier=tier.name)
            self._count(**{"verify_mismatches": 1, MISMATCH + tier.name: 1})
            if self.store.service.mismatch(tier.name, self.cfg.max_mismatches):
                self._count(verify_tiers_out=1)
        if wrong:  # the engine's copy replaces what was deleted (tiers holding it skip it)
            self.store.put_many([(key, fresh)])

    def _count(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)

    def drain(self, stats: KvtierStats) -> None:
        """Engine thread: move the counts since the last call into the worker's stats."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if counts:
            stats.add(**counts)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the queued checks (bounded) and stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
