"""Memory tier policy: LRU, pins, reference counts, byte budget, threads."""

from __future__ import annotations

import random
import threading

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.tiers.memory import MemoryTier

SLOT = 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunk(value: int, n: int = SLOT) -> ChunkData:
    return ChunkData(ChunkMeta("uint8", (n,)), np.full(n, value % 256, dtype=np.uint8))


def tier(slots: int = 4) -> MemoryTier:
    return MemoryTier(max_bytes=slots * SLOT, slot_bytes=SLOT)


def test_lru_evicts_least_recently_used() -> None:
    t = tier(3)
    t.put_many([(key(i), chunk(i)) for i in range(3)])
    [c.release() for c in t.get_many([key(0)])]  # 0 is now most recent
    t.put_many([(key(3), chunk(3))])
    assert t.contains_many([key(i) for i in range(4)]) == [True, False, True, True]
    assert t.stats.evictions == 1


def test_pinned_chunk_is_never_evicted_and_put_fails_cleanly() -> None:
    t = tier(2)
    t.put_many([(key(0), chunk(0)), (key(1), chunk(1))])
    assert t.pin_many([key(0), key(1), key(9)]) == [True, True, False]
    assert t.put_many([(key(2), chunk(2))]) == [False]  # no room, no wait
    assert t.stats.dropped == 1
    t.unpin_many([key(1)])
    assert t.put_many([(key(2), chunk(2))]) == [True]
    assert t.contains_many([key(0), key(1), key(2)]) == [True, False, True]


def test_pins_are_counted() -> None:
    t = tier(1)
    t.put_many([(key(0), chunk(0))])
    t.pin_many([key(0)])
    t.pin_many([key(0)])
    t.unpin_many([key(0)])
    assert t.is_pinned(key(0))
    t.unpin_many([key(0)])
    assert not t.is_pinned(key(0))


def test_chunk_being_read_is_not_reused_underneath_the_reader() -> None:
    t = tier(1)
    t.put_many([(key(0), chunk(7))])
    (held,) = t.get_many([key(0)])
    assert t.put_many([(key(1), chunk(9))]) == [False]  # the only slot is referenced
    assert t.delete_many([key(0)]) == 1  # deleted from the index ...
    assert t.put_many([(key(1), chunk(9))]) == [False]  # ... but its slot is still held
    assert (held.payload == 7).all()
    held.release()
    held.release()  # idempotent
    assert t.put_many([(key(1), chunk(9))]) == [True]


def test_reserve_prefers_consecutive_slots() -> None:
    t = tier(8)
    slots = t.reserve(3)
    assert slots is not None and [s.index for s in slots] == [0, 1, 2]
    t.abort(slots)
    assert t.usage().used_bytes == 0


def test_budget_is_never_exceeded_under_pressure() -> None:
    t = MemoryTier(max_bytes=10 * SLOT + 17, slot_bytes=SLOT)
    rng = random.Random(0)
    for i in range(300):
        n = rng.randint(1, 6)
        t.put_many([(key(rng.randint(0, 50)), chunk(i, rng.randint(1, SLOT))) for _ in range(n)])
        u = t.usage()
        assert u.used_bytes <= t.max_bytes and u.num_chunks <= 10


def test_same_key_stored_once() -> None:
    t = tier(4)
    t.put_many([(key(0), chunk(1))])
    t.put_many([(key(0), chunk(2))])
    (c,) = t.get_many([key(0)])
    assert (c.payload == 1).all() and t.stats.puts == 1
    c.release()


def test_oversized_payload_is_dropped() -> None:
    t = tier(2)
    assert t.put_many([(key(0), chunk(0, SLOT + 1))]) == [False]
    assert t.stats.dropped == 1


def test_concurrent_readers_and_writers_see_consistent_bytes() -> None:
    t = tier(16)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(400):
            k = rng.randint(0, 40)
            if rng.random() < 0.5:
                t.put_many([(key(k), chunk(k))])
            else:
                for c in t.get_many([key(k)]):
                    if c is not None:
                        if not (c.payload == k % 256).all():
                            errors.append(f"key {k} read wrong bytes")
                        c.release()
            if rng.random() < 0.05:
                t.delete_many([key(rng.randint(0, 40))])
            if rng.random() < 0.05:
                t.pin_many([key(k)])
                t.unpin_many([key(k)])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    [th.start() for th in threads]
    [th.join(60) for th in threads]
    assert not errors
    assert t.usage().used_bytes <= t.max_bytes
    # every slot is either free or owned by exactly one live entry: nothing leaked
    assert t.usage().num_chunks == t.arena.num_slots - t.arena.num_free
