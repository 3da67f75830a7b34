"""Layer 5: the engine-agnostic cache engine: lookup, store, retrieve.

Works on any engine's paged KV through a :class:`PagedLayout`; imports no
engine. Token ``i`` of a request lives in block ``block_ids[i // block_size]``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.engine.layout import PagedLayout
from kvtier.engine.accel import PendingCopy, pin_host_memory
from kvtier.engine.transfer import PagedTransfer, Run, plan_runs
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store import ChunkStore, PrefixHit, lookup_hit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrieveResult:
    """What a retrieve loaded: tokens ``[start, end)`` are now in paged KV."""

    start: int
    end: int
    requested_end: int

    @property
    def complete(self) -> bool:
        """True when every requested token was loaded."""
        return self.end >= self.requested_end


class LayerwiseLoad:
    """The deferred part of a layer-wise retrieve: its chunks stay referenced until
    :meth:`close`; :meth:`scatter` makes one layer's blocks ready for the forward pass."""

    def __init__(self, transfer: PagedTransfer, runs: list[Run], chunks: list[ChunkData]
                 ) -> None:
        self.chunks = chunks
        self.failed = False  # a layer's copy raised: the blocks are to be recomputed
        self._scatter = transfer.begin_scatter(runs)

    @property
    def block_ids(self) -> list[int]:
        """The engine blocks this load writes layer by layer (reported if it fails)."""
        return [b for run in self._scatter.runs for b in run.block_ids]

    @property
    def todo(self) -> set[int]:
        """Layers not made ready yet."""
        return self._scatter.todo

    def scatter(self, layer: int) -> None:
        """Make ``layer`` of the deferred blocks ready (once; later calls do nothing)."""
        self._scatter.layer(layer)

    def finish(self) -> None:
        """Make every layer not made ready yet ready now."""
        for layer in sorted(self.todo):
            self.scatter(layer)

    def close(self) -> None:
        """Release the chunks (after the last layer, or to abandon the load)."""
        try:
            self._scatter.done()  # copies still reading the chunks' buffers end first
        finally:
            for chunk in self.chunks:
                chunk.release()
            self.chunks = []
            self.todo.clear()


class CacheEngine:
    """Moves whole chunks between one engine's paged KV and a :class:`ChunkStore`."""

    def __init__(self, hasher: ChunkHasher, layout: PagedLayout, store: ChunkStore) -> None:
        if hasher.chunk_size % layout.block_size:
            raise ValueError(f"chunk size {hasher.chunk_size} is not a multiple of the "
                             f"block size {layout.block_size}")
        self.hasher = hasher
        self.layout = layout
        self.store = store
        self.blocks_per_chunk = hasher.chunk_size // layout.block_size
        self._transfer: PagedTransfer | None = None
        self._kv: list[torch.Tensor] | None = None
        self._inflight: deque[tuple[PendingCopy, list[ChunkKey], list, list[ChunkMeta], int]] \
            = deque()  # stores whose copy to host is still running (accelerators), by epoch

    def register(self, kv_caches: Sequence[torch.Tensor], use_kernels: bool = True) -> None:
        """Bind the engine's per-layer KV tensors (checked against the layout).

        ``use_kernels=False`` forces the plain torch copy path (tests compare both).
        """
        self._transfer = PagedTransfer(self.layout, kv_caches, use_kernels)
        self._kv = list(kv_caches)
        memory = self.store.memory
        if memory is not None and not memory.pinned:
            memory.pinned = pin_host_memory(memory.arena.buffer, self._transfer.device)

    # -- lookup ---------------------------------------------------------------

    def lookup(self, token_ids: Sequence[int], keys: Sequence[ChunkKey] | None = None) -> int:
        """Number of leading tokens whose KV is stored (whole chunks; with partial
        chunks on, then whole blocks of the next). No bytes move."""
        return self.lookup_hit(token_ids, keys).tokens

    def lookup_hit(self, token_ids: Sequence[int], keys: Sequence[ChunkKey] | None = None
                   ) -> PrefixHit:
        """The stored prefix: its keys and tokens (retrieve ``token_ids[:tokens]`` with
        those keys)."""
        return lookup_hit(self.store.tiers, self.hasher, token_ids, keys)

    # -- store ----------------------------------------------------------------

    def store_kv(self, token_ids: Sequence[int], block_ids: Sequence[int],
                 kv_caches: Sequence[torch.Tensor] | None = None, start_chunk: int = 0,
                 keys: Sequence[ChunkKey] | None = None) -> int:
        """Gather the prompt's chunks from paged KV into the store; returns chunks stored.

        Chunks already in memory are skipped. One batched copy per layer for
        all new chunks; lower tiers are written in the background. On CUDA the
        copy to host overlaps what the engine does next: the chunks are
        published by a later :meth:`complete_stores` (each store and each
        connector step calls it).
        """
        t0 = time.perf_counter()
        self.complete_stores()
        n = self._store_kv(token_ids, block_ids, kv_caches, start_chunk, keys)
        if n:
            self.store.latency["store"].observe(time.perf_counter() - t0)
        return n

    def _store_kv(self, token_ids: Sequence[int], block_ids: Sequence[int],
                  kv_caches: Sequence[torch.Tensor] | None, start_chunk: int,
                  keys: Sequence[ChunkKey] | None) -> int:
        transfer = self._bound(kv_caches)
        epoch = self.store.gate.epoch  # a clear from now on drops this store at commit
        keys = list(self.hasher.keys(token_ids) if keys is None else keys)
        n_tok = len(token_ids)
        todo = [i for i in range(start_chunk, len(keys))
                if self._blocks(i, n_tok)[-1] < len(block_ids)]
        present = self.store.memory.contains_many([keys[i] for i in todo]) \
            if self.store.memory is not None else [False] * len(todo)
        todo = [i for i, there in zip(todo, present) if not there]
        if not todo:
            return 0
        slots = self.store.reserve(len(todo))
        if slots is None:
            return self._store_without_memory(todo, keys, n_tok, block_ids, transfer)
        metas, payloads, ids = [], [], []
        for i, slot in zip(todo, slots):
            blocks = self._blocks(i, n_tok)
            meta = ChunkMeta(self.layout.dtype, self.layout.chunk_shape(len(blocks)))
            metas.append(meta)
            payloads.append(slot.buffer[:meta.raw_nbytes])
            ids.append([block_ids[b] for b in blocks])
        try:
            pending = transfer.gather(plan_runs(payloads, ids), wait=False)
        except BaseException:
            self.store.memory.abort(slots)
            raise
        if pending is None:
            self.store.commit([keys[i] for i in todo], slots, metas, epoch)
        else:  # published by complete_stores once the copy to host is done
            self._inflight.append((pending, [keys[i] for i in todo], slots, metas, epoch))
        return len(todo)

    @property
    def storing(self) -> bool:
        """Whether a store's copy to host is still running (accelerators only)."""
        return bool(self._inflight)

    def complete_stores(self, wait: bool = False) -> int:
        """Publish stores whose copy to host has finished (accelerators: the copy
        overlaps the engine's next work); ``wait``: all of them. Returns chunks
        published. Until then a stored chunk is not found (a miss, never wrong KV); one
        gathered before a clear of the store is dropped (its slots given back)."""
        n = 0
        while self._inflight and (wait or self._inflight[0][0].done()):
            pending, keys, slots, metas, epoch = self._inflight.popleft()
            pending.wait()
            n += len(keys) if self.store.commit(keys, slots, metas, epoch) else 0
        return n

    def _store_without_memory(self, todo: list[int], keys: list[ChunkKey], n_tok: int,
                              block_ids: Sequence[int], transfer: PagedTransfer) -> int:
        """No memory tier, or no room for all the chunks at once: gather into private
        buffers; the store keeps in memory what fits (leading chunks first) and hands
        the rest to the lower tiers. Only what a tier takes is reported stored."""
        if not self.store.lower and self.store.memory is None:
            return 0
        chunks = self.gather_chunks(n_tok, block_ids, todo)
        return self.store.put_many([(keys[i], chunk) for i, chunk in chunks])

    def gather_chunks(self, num_tokens: int, block_ids: Sequence[int], chunks: Sequence[int]
                      ) -> list[tuple[int, ChunkData]]:
        """Private copies of chunks ``chunks`` of a request of ``num_tokens`` tokens, out
        of paged KV into fresh buffers (the store is not touched): one batched gather.
        A chunk whose blocks are not all in ``block_ids`` is left out."""
        transfer = self._bound(None)
        out, runs = [], []
        for i in chunks:
            blocks = self._blocks(i, num_tokens)
            if blocks[-1] >= len(block_ids):
                continue
            meta = ChunkMeta(self.layout.dtype, self.layout.chunk_shape(len(blocks)))
            buf = np.empty(meta.raw_nbytes, dtype=np.uint8)
            runs.append(Run(buf, [block_ids[b] for b in blocks]))
            out.append((i, ChunkData(meta, buf)))
        if runs:
            transfer.gather(runs)
        return out

    # -- retrieve -------------------------------------------------------------

    def retrieve_kv(self, token_ids: Sequence[int], block_ids: Sequence[int], end_token: int,
                    start_token: int = 0, kv_caches: Sequence[torch.Tensor] | None = None,
                    keys: Sequence[ChunkKey] | None = None,
                    chunks: Sequence[ChunkData | None] | None = None,
                    layerwise: list[LayerwiseLoad] | None = None) -> RetrieveResult:
        """Load tokens ``[start_token, end_token)`` from the store into paged KV.

        ``start_token`` must be block aligned (blocks before it are the engine's
        own and are not touched). Stops at the first chunk that cannot be read;
        the result says how far it got, so the engine recomputes the rest.
        ``chunks``: the chunks :meth:`fetch` brought for this range (consumed
        and released here); without it they are read from the store now.

        ``layerwise``: a list to append a :class:`LayerwiseLoad` to instead of
        moving every layer now. Only the blocks the engine will also write
        (the one holding ``end``, where the forward pass appends the first
        computed token, and any after it) are copied now, all layers; the
        caller moves each layer of the rest with ``scatter(layer)`` before that
        layer's attention reads it, and calls ``close()`` at the end.
        """
        t0 = time.perf_counter()
        res = self._retrieve_kv(token_ids, block_ids, end_token, start_token, kv_caches, keys,
                                chunks, layerwise)
        if res.end > res.start:
            self.store.latency["load"].observe(time.perf_counter() - t0)
        return res

    def chunk_range(self, start_token: int, end_token: int) -> tuple[int, int]:
        """Indices ``[first, last)`` of the chunks that tokens ``[start, end)`` touch."""
        cs = self.hasher.chunk_size
        return start_token // cs, -(-end_token // cs)

    def fetch(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Read chunks from the store (lower tiers are promoted to memory); no KV
        tensor is touched, so this may run on any thread. Release every chunk."""
        return self.store.get_many(keys) if keys else []

    def _retrieve_kv(self, token_ids: Sequence[int], block_ids: Sequence[int], end_token: int,
                     start_token: int, kv_caches: Sequence[torch.Tensor] | None,
                     keys: Sequence[ChunkKey] | None,
                     chunks: Sequence[ChunkData | None] | None,
                     layerwise: list[LayerwiseLoad] | None = None) -> RetrieveResult:
        bs, cs = self.layout.block_size, self.hasher.chunk_size
        try:
            transfer = self._bound(kv_caches)
            if start_token % bs:
                raise ValueError(f"start_token {start_token} is not a multiple of block "
                                 f"size {bs}")
        except BaseException:
            for chunk in chunks or ():
                if chunk is not None:
                    chunk.release()
            raise
        first, last = self.chunk_range(start_token, end_token)
        if chunks is None:
            keys = list(self.hasher.keys(token_ids) if keys is None else keys)
            chunks = self.fetch(keys[first:last]) if last > first else []
        deferred = None
        try:
            loaded = []
            for chunk in chunks:
                if chunk is None or not self._valid(chunk, first + len(loaded), len(token_ids)):
                    break
                loaded.append(chunk)
            end = start_token if not loaded else min(end_token, (first + len(loaded)) * cs)
            row = self.layout.num_layers * self.layout.page_nbytes  # one block, all layers
            # Blocks before ``split`` hold loaded tokens only; the forward pass also
            # writes into the ones from ``split`` on, so those are never deferred.
            split = end // bs if layerwise is not None else 0
            now: tuple[list, list] = ([], [])
            later: tuple[list, list] = ([], [])
            for j, chunk in enumerate(loaded):
                blocks = self._blocks(first + j, len(token_ids))
                skip = max(0, start_token // bs - blocks[0])  # engine already has these
                cut = min(max(skip, split - blocks[0]), len(blocks))
                for part, lo, hi in ((later, skip, cut), (now, cut, len(blocks))):
                    if hi > lo:
                        part[0].append(chunk.payload[lo * row: hi * row])
                        part[1].append([block_ids[b] for b in blocks[lo:hi]])
            transfer.scatter(plan_runs(*now))
            if later[0]:
                assert layerwise is not None
                deferred = LayerwiseLoad(transfer, plan_runs(*later), loaded)
                layerwise.append(deferred)
        finally:
            kept = {id(c) for c in deferred.chunks} if deferred is not None else set()
            for chunk in chunks:
                if chunk is not None and id(chunk) not in kept:
                    chunk.release()
        return RetrieveResult(start_token, max(start_token, end), end_token)

    # -- helpers --------------------------------------------------------------

    def _blocks(self, chunk: int, num_tokens: int) -> range:
        """Block indices (within the request) that chunk ``chunk`` covers."""
        ntok = self.hasher.chunk_tokens(chunk, num_tokens)
        first = chunk * self.blocks_per_chunk
        return range(first, first + -(-ntok // self.layout.block_size))

    def _valid(self, chunk: ChunkData, index: int, num_tokens: int) -> bool:
        want = ChunkMeta(self.layout.dtype,
                         self.layout.chunk_shape(len(self._blocks(index, num_tokens))))
        if chunk.meta != want or chunk.payload.nbytes != want.raw_nbytes:
            log.warning("kvtier: chunk %d has meta %s, expected %s; treated as a miss",
                        index, chunk.meta, want)
            return False
        return True

    def _bound(self, kv_caches: Sequence[torch.Tensor] | None) -> PagedTransfer:
        if kv_caches is not None and (self._kv is None or any(
                a is not b for a, b in zip(kv_caches, self._kv))):
            self.register(kv_caches)
        if self._transfer is None:
            raise RuntimeError("no KV tensors registered: call register() first")
        return self._transfer
