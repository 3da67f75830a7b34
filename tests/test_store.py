"""The tier hierarchy: prefix lookup across tiers, promotion, background writes.

A second MemoryTier stands in for a slower tier here (it is a real Tier); the
disk and Redis tiers are exercised in their own tests and through vLLM.
"""

from __future__ import annotations

import threading

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.config import WritePolicy
from kvtier.store import BackgroundWriter, ChunkStore, KeyIndex, lookup_prefix
from kvtier.tiers.memory import MemoryTier

SLOT = 256


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunk(v: int) -> ChunkData:
    return ChunkData(ChunkMeta("uint8", (SLOT,)), np.full(SLOT, v % 256, dtype=np.uint8))


class LowerTier(MemoryTier):
    """A memory tier named like a slow one, optionally blocking its writes."""

    name = "lower"

    def __init__(self, slots: int = 64) -> None:
        super().__init__(slots * SLOT, SLOT)
        self.gate = threading.Event()
        self.gate.set()

    def put_many(self, items):  # type: ignore[override]
        self.gate.wait(10)
        return super().put_many(items)


def test_lookup_is_the_longest_prefix_across_tiers() -> None:
    mem, low = MemoryTier(8 * SLOT, SLOT), LowerTier()
    mem.put_many([(key(0), chunk(0)), (key(2), chunk(2))])
    low.put_many([(key(1), chunk(1)), (key(3), chunk(3))])
    store = ChunkStore([mem, low])
    assert store.lookup([key(i) for i in range(5)]) == 4
    assert store.lookup([key(1), key(0)]) == 2
    assert store.lookup([key(9), key(0)]) == 0


def test_lower_hit_is_promoted_into_memory() -> None:
    mem, low = MemoryTier(8 * SLOT, SLOT), LowerTier()
    low.put_many([(key(1), chunk(7))])
    store = ChunkStore([mem, low])
    (got,) = store.get_many([key(1)])
    assert got is not None and (got.payload == 7).all()
    got.release()
    assert mem.contains_many([key(1)]) == [True]


def test_write_through_reaches_lower_tier_once_in_background() -> None:
    mem, low = MemoryTier(8 * SLOT, SLOT), LowerTier()
    store = ChunkStore([mem, low])
    store.put_many([(key(i), chunk(i)) for i in range(3)])
    store.put_many([(key(0), chunk(0))])  # already there: not written twice
    assert store.flush(10)
    assert low.contains_many([key(i) for i in range(3)]) == [True] * 3
    assert low.stats.puts == 3


def test_reserve_commit_path_writes_through() -> None:
    mem, low = MemoryTier(8 * SLOT, SLOT), LowerTier()
    store = ChunkStore([mem, low], track_events=True)
    slots = store.reserve(2)
    assert slots is not None
    for i, s in enumerate(slots):
        s.buffer[:SLOT] = 40 + i
    store.commit([key(5), key(6)], slots, [ChunkMeta("uint8", (SLOT,))] * 2)
    assert store.flush(10)
    (c,) = low.get_many([key(6)])
    assert (c.payload == 41).all()
    c.release()
    assert store.drain_events().stored == [key(5), key(6)]


def test_slow_tier_never_blocks_and_full_queue_drops() -> None:
    mem, low = MemoryTier(64 * SLOT, SLOT), LowerTier()
    low.gate.clear()  # the lower tier hangs
    store = ChunkStore([mem, low], queue_sizes=[4])
    for i in range(10):
        store.put_many([(key(i), chunk(i))])  # returns at once each time
    assert low.stats.dropped >= 5
    low.gate.set()
    assert store.flush(10)
    assert mem.usage().num_chunks == 10  # memory kept everything
    # chunks held by the queue were released: nothing is still referenced
    assert mem.put_many([(key(100), chunk(1))]) == [True]


def test_write_back_demotes_on_eviction() -> None:
    mem, low = MemoryTier(2 * SLOT, SLOT), LowerTier()
    store = ChunkStore([mem, low], write_policy=WritePolicy.WRITE_BACK, track_events=True)
    store.put_many([(key(i), chunk(i)) for i in range(2)])
    assert store.flush(10) and low.usage().num_chunks == 0  # nothing written yet
    store.put_many([(key(2), chunk(2))])  # evicts key 0 -> demoted
    assert store.flush(10)
    assert low.contains_many([key(0)]) == [True]
    (c,) = low.get_many([key(0)])
    assert (c.payload == 0).all()
    c.release()
    assert key(0) in store.drain_events().evicted


def test_writer_close_is_bounded() -> None:
    low = LowerTier()
    low.gate.clear()
    w = BackgroundWriter(low, max_pending=8)
    w.submit([(key(1), chunk(1))])
    assert w.flush(0.2) is False  # bounded wait, reports the timeout
    low.gate.set()
    w.close(5)
    assert low.contains_many([key(1)]) == [True]


def test_key_index_bounded_and_ordered() -> None:
    idx = KeyIndex(max_keys=3)
    idx.update(stored=[key(i) for i in range(5)])
    assert len(idx) == 3 and idx.contains_many([key(0), key(4)]) == [False, True]
    idx.update(stored=[key(9)], evicted=[key(9), key(4)])
    assert idx.contains_many([key(9), key(4)]) == [False, False]
    assert lookup_prefix([idx], [key(2), key(3)]) == 2


def test_events_report_only_what_memory_holds_and_every_change() -> None:
    """The scheduler's index is fed from these: a chunk memory could not take is
    never reported, and management operations report their removals too."""
    mem, low = MemoryTier(2 * SLOT, SLOT), LowerTier()
    store = ChunkStore([mem, low], WritePolicy.WRITE_BACK, track_events=True)
    store.put_many([(key(0), chunk(0)), (key(1), chunk(1))])
    assert mem.pin_many([key(0), key(1)]) == [True, True]  # memory now full of pinned chunks
    store.put_many([(key(2), chunk(2))])
    events = store.drain_events()
    assert sorted(events.stored) == [key(0), key(1)] and not events.evicted
    assert store.flush(10)
    # Memory could not take chunk 2: even write-back sends it down rather than losing it.
    assert low.contains_many([key(2)]) == [True]
    mem.unpin_many([key(0), key(1)])
    store.delete([key(0)], tier="memory")  # e.g. the management API's move or evict
    mem.clear()
    events = store.drain_events()
    assert not events.stored and sorted(events.evicted) == [key(0), key(1)]
    store.put_many([(key(3), chunk(3))])
    store.delete([key(3)])
    store.put_many([(key(3), chunk(3))])  # net effect within one report: present
    events = store.drain_events()
    assert events.stored == [key(3)] and not events.evicted
