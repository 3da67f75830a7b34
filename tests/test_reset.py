"""A reset (vLLM's ``reset_prefix_cache(reset_connector=True)``) or a management
``clear`` is a barrier: nothing that started before it lands or is served after it.

The slow work is made slow on purpose: a lower tier whose writes or reads wait
on an event, so a write is held mid-flight, or a read is held between reading
and promoting, while the clear runs. Everything else is the real store and writer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.keys import ChunkKey
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier

SLOT = 256


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(16, "little"))


def chunk(v: int) -> ChunkData:
    return ChunkData(ChunkMeta("uint8", (SLOT,)), np.full(SLOT, v % 256, dtype=np.uint8))


class HeldTier(MemoryTier):
    """A memory tier named like a slow one, whose writes and reads can be held."""

    name = "lower"

    def __init__(self, slots: int = 64) -> None:
        super().__init__(slots * SLOT, SLOT)
        self.writes, self.reads = threading.Event(), threading.Event()
        self.writes.set()
        self.reads.set()
        self.writing, self.reading = threading.Event(), threading.Event()
        self.written: list[ChunkKey] = []  # every key a put was asked to write

    def put_many(self, items):  # type: ignore[override]
        self.written += [k for k, _ in items]
        self.writing.set()
        assert self.writes.wait(10)
        return super().put_many(items)

    def get_many(self, keys):  # type: ignore[override]
        got = super().get_many(keys)  # read now, handed back when released
        self.reading.set()
        assert self.reads.wait(10)
        return got


def stores(clear_wait_s: float = 10.0) -> tuple[ChunkStore, MemoryTier, HeldTier]:
    mem, low = MemoryTier(16 * SLOT, SLOT), HeldTier()
    return ChunkStore([mem, low], clear_wait_s=clear_wait_s), mem, low


def in_thread(fn: Any) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_a_write_queued_before_a_clear_is_dropped_and_one_in_flight_is_cleared() -> None:
    store, mem, low = stores()
    low.writes.clear()
    store.put_many([(key(1), chunk(1))])
    assert low.writing.wait(5)  # chunk 1's write is in flight, held
    store.put_many([(key(2), chunk(2))])  # queued behind it
    cleared = in_thread(store.clear)
    time.sleep(0.3)
    assert cleared.is_alive()  # the clear waits for the write in flight...
    low.writes.set()
    cleared.join(5)
    assert not cleared.is_alive()
    assert store.flush(5)
    # ...then deletes what it wrote; the queued write was never even tried.
    assert list(low.iter_keys()) == [] and list(mem.iter_keys()) == []
    assert low.written == [key(1)]
    store.put_many([(key(3), chunk(3))])  # after the barrier, writes land again
    assert store.flush(5) and low.contains_many([key(3)]) == [True]


def test_a_write_that_outlives_the_clears_wait_deletes_itself_when_it_lands() -> None:
    store, _, low = stores(clear_wait_s=0.2)
    low.writes.clear()
    store.put_many([(key(1), chunk(1))])
    assert low.writing.wait(5)
    t0 = time.monotonic()
    store.clear()  # gives up waiting after 0.2 s (a hung tier)
    assert time.monotonic() - t0 < 3
    low.writes.set()
    assert store.flush(5)
    assert low.contains_many([key(1)]) == [False]


def test_a_chunk_read_before_a_clear_is_not_promoted_after_it() -> None:
    store, mem, low = stores()
    low.put_many([(key(1), chunk(7))])
    low.reads.clear()
    got: list = []
    reader = in_thread(lambda: got.extend(store.get_many([key(1)])))
    assert low.reading.wait(5)  # read from the lower tier, not promoted yet
    store.clear()
    low.reads.set()
    reader.join(5)
    assert mem.contains_many([key(1)]) == [False]
    for c in got:
        if c is not None:
            c.release()


def test_a_save_gathered_before_a_clear_is_not_committed() -> None:
    store, mem, low = stores()
    epoch = store.gate.epoch  # what the cache engine records before it gathers
    slots = store.reserve(2)
    assert slots is not None
    store.clear()
    free = mem.arena.num_free
    assert store.commit([key(1), key(2)], slots, [chunk(0).meta] * 2, epoch) is False
    assert mem.arena.num_free == free + 2  # the slots are given back
    assert store.flush(5) and list(mem.iter_keys()) == [] and low.written == []
