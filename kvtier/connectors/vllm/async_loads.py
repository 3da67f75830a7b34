"""Layer 6: asynchronous loads in the worker (vLLM's ``WAITING_FOR_REMOTE_KVS``).

A hit that is not all in the memory tier is loaded without holding up the
engine: the scheduler answers ``load_kv_async``, the request waits for its KV
while the engine keeps running the others, and here

1. ``submit`` (from ``start_load_kv``) pins the chunks memory already has and
   hands the keys to one background thread, which reads them from disk, Redis
   or a peer a few at a time (each promoted into a memory slot; header and
   checksum verified as on every read). No KV tensor is touched off the
   engine's thread.
2. ``poll`` (from ``get_finished``, every step, on the engine's thread) takes
   the fetches that are done, or past ``load_timeout_s``, scatters what has
   arrived into the request's blocks (one batched copy from the slots) and
   reports the request finished receiving. What did not arrive in time is
   reported as invalid blocks in the same step, so vLLM recomputes it; a late
   batch is released when it lands, never copied.

When a step computes nothing (every request waits for its KV), vLLM calls
the connector again at once, in a loop that holds the GIL nearly all the time:
the fetch thread then gets it only at the interpreter's switch interval, and
a load of a few chunks took minutes (measured: 2 minutes per request of 4
zlib chunks). ``wait`` lets the engine's thread sleep, without the GIL, until
a load lands or a few milliseconds pass.

Also ``prefetch``: keys of a request the scheduler has only seen (not yet
scheduled) are promoted into memory in the background, so its later load is
a memory hit.

A clear of the store (vLLM's ``reset_prefix_cache(reset_connector=True)``, the
management API's ``clear``) is a barrier for both: each load records the
store's epoch when it is submitted, and one that a clear overtook is reported
failed (every block recomputed) and never scattered; its chunks, and a
prefetch's, are not promoted into memory after the clear
(:mod:`kvtier.store.epoch`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kvtier.codecs import ChunkData
from kvtier.engine.cache_engine import CacheEngine
from kvtier.keys import ChunkKey
from kvtier.threads import pool

log = logging.getLogger("kvtier.vllm")

FETCH_BATCH = 4  # chunks per read: what arrived counts even if the rest is late
IDLE_WAIT_S = 0.005  # an empty step waits at most this long for a load to land


@dataclass
class _Fetch:
    """One request's background read; ``chunks`` grows a batch at a time."""

    keys: list[ChunkKey]
    deadline: float
    pinned: list[ChunkKey]
    epoch: int  # the store's, when submitted
    chunks: list[ChunkData | None] = field(default_factory=list)
    done: bool = False
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, got: Sequence[ChunkData | None]) -> bool:
        """Append a batch; False (and the batch released) once nobody will use it."""
        with self.lock:
            if not self.abandoned:
                self.chunks.extend(got)
                return True
        _release(got)
        return False

    def take(self) -> list[ChunkData | None]:
        """What has arrived, for the caller to release; later batches are dropped."""
        with self.lock:
            self.abandoned = True
            got, self.chunks = self.chunks, []
        return got


@dataclass
class Finished:
    """A load that completed (``loaded`` tokens of ``[start, end)`` are in KV)."""

    req_id: str
    start: int
    loaded: int
    end: int
    seconds: float
    timed_out: bool


class AsyncLoads:
    """The worker's asynchronous loads and prefetches (see the module docstring)."""

    def __init__(self, engine: CacheEngine, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self._pool = pool(1, "kvtier-fetch")
        self._loads: dict[str, tuple[object, _Fetch, float]] = {}
        self._prefetching: set[ChunkKey] = set()
        self._landed = threading.Event()  # a load finished reading since the last wait

    def __len__(self) -> int:
        return len(self._loads)

    def submit(self, req_id: str, load: object, keys: list[ChunkKey]) -> None:
        """Start reading ``keys`` (the load's chunks) in the background."""
        memory = self.engine.store.memory
        pinned = [k for k, ok in zip(keys, memory.pin_many(keys)) if ok] if memory else []
        now = time.monotonic()
        fetch = _Fetch(keys, now + self.timeout_s, pinned, self.engine.store.gate.epoch)
        self._loads[req_id] = (load, fetch, now)
        self._pool.submit(self._read, fetch)

    def prefetch(self, keys: list[ChunkKey]) -> None:
        """Promote keys into memory in the background (best effort, bounded)."""
        memory = self.engine.store.memory
        if memory is None or not keys:
            return
        todo = [k for k, there in zip(keys, memory.contains_many(keys))
                if not there and k not in self._prefetching]
        if not todo or len(self._prefetching) > 4096:
            return
        self._prefetching.update(todo)
        self._pool.submit(self._prefetch, todo, self.engine.store.gate.epoch)

    def wait(self, timeout_s: float = IDLE_WAIT_S) -> None:
        """Sleep (the GIL released) until a load in flight lands or ``timeout_s`` passes;
        at once when none is in flight or one has landed already (for :meth:`poll`)."""
        self._landed.clear()  # before looking: a load landing after the look wakes us
        if self._loads and not any(fetch.done for _, fetch, _ in self._loads.values()):
            self._landed.wait(timeout_s)

    def poll(self, place: Callable[[object, list[ChunkData | None]], int]) -> list[Finished]:
        """Complete the loads that are done or past their deadline: ``place(load,
        chunks)`` scatters the chunks and returns the tokens now in KV."""
        now = time.monotonic()
        gate = self.engine.store.gate
        out = []
        for req_id, (load, fetch, t0) in list(self._loads.items()):
            stale = not gate.is_open(fetch.epoch)  # a clear came after it started
            if not fetch.done and now < fetch.deadline and not stale:
                continue
            del self._loads[req_id]
            timed_out = not fetch.done and not stale
            chunks = fetch.take()
            if stale:  # what it read predates the clear: never served, all recomputed
                _release(chunks)
                chunks = []
                log.info("kvtier: %s: the store was cleared during its background load; "
                         "recomputed", req_id)
            try:
                loaded = place(load, chunks)
            finally:
                self._unpin(fetch.pinned)
            start, end = load.start_token, load.end_token  # type: ignore[attr-defined]
            fin = Finished(req_id, start, loaded, end, time.monotonic() - t0, timed_out)
            if timed_out:
                log.warning("kvtier: %s: background load cut short after %.1f s; %d of %d "
                            "tokens recomputed", req_id, fin.seconds, end - loaded, end - start)
            out.append(fin)
        return out

    def close(self) -> None:
        """Stop reading; loads in flight are abandoned (their chunks released)."""
        for _, fetch, _ in self._loads.values():
            _release(fetch.take())
            self._unpin(fetch.pinned)
        self._loads.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- background thread ----------------------------------------------------

    def _read(self, fetch: _Fetch) -> None:
        try:
            gate = self.engine.store.gate
            for i in range(0, len(fetch.keys), FETCH_BATCH):
                if fetch.abandoned or time.monotonic() >= fetch.deadline \
                        or not gate.is_open(fetch.epoch):
                    break
                got = self.engine.fetch(fetch.keys[i:i + FETCH_BATCH])
                if not fetch.add(got) or any(c is None for c in got):
                    break  # a miss ends the prefix; what follows cannot be used
        except Exception:  # a failing tier is a miss: the rest is recomputed
            log.exception("kvtier: background read failed")
        finally:
            fetch.done = True
            self._landed.set()

    def _prefetch(self, keys: list[ChunkKey], epoch: int) -> None:
        gate = self.engine.store.gate
        try:
            for i in range(0, len(keys), FETCH_BATCH):
                if not gate.is_open(epoch):  # a clear since it was asked: moot
                    break
                got = self.engine.fetch(keys[i:i + FETCH_BATCH])
                _release(got)
                if any(c is None for c in got):
                    break
        except Exception:
            log.exception("kvtier: prefetch failed")
        finally:
            self._prefetching.difference_update(keys)

    def _unpin(self, keys: list[ChunkKey]) -> None:
        memory = self.engine.store.memory
        if memory is not None and keys:
            memory.unpin_many(keys)


def _release(chunks: Sequence[ChunkData | None]) -> None:
    for chunk in chunks:
        if chunk is not None:
            chunk.release()
