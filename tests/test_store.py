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


# -- codecs per tier -----------------------------------------------------------------

def kv_chunk(seed: int, shape: tuple[int, ...] = (1, 2, 2, 4, 8)) -> ChunkData:
    values = np.random.default_rng(seed).normal(0, 4, shape).astype(np.float16)
    return ChunkData(ChunkMeta("float16", shape), values.view(np.uint8).reshape(-1))


class KvLowerTier(LowerTier):
    """A lower tier whose slots fit the float16 test chunks."""

    def __init__(self) -> None:
        MemoryTier.__init__(self, 16 * 32768, 32768)
        self.gate = threading.Event()
        self.gate.set()


def test_a_tier_writes_with_its_codec_and_any_reader_decodes_it() -> None:
    from kvtier.codecs import Codec

    low = KvLowerTier()
    writer = ChunkStore([MemoryTier(8 * 512, 512), low], codecs=[Codec.ZSTD])
    items = [(key(i), kv_chunk(i)) for i in range(3)]
    writer.put_many(items)
    assert writer.flush(10)
    stored = low.get_many([key(0)])[0]
    assert stored is not None and stored.meta.codec is Codec.ZSTD
    stored.release()
    for reader_codec in (Codec.RAW, Codec.LZ4):  # configured otherwise: still reads it
        reader = ChunkStore([MemoryTier(8 * 512, 512), low], codecs=[reader_codec])
        got = reader.get_many([k for k, _ in items])
        for (_, want), have in zip(items, got):
            assert have is not None and have.meta.codec is Codec.RAW
            assert bytes(have.payload) == bytes(want.payload)
            have.release()


def test_a_chunk_that_does_not_decode_is_a_counted_deleted_miss() -> None:
    from kvtier.codecs import Codec

    low = KvLowerTier()
    raw = kv_chunk(0)
    bomb = ChunkData(ChunkMeta(raw.meta.dtype, raw.meta.shape, Codec.ZLIB),
                     np.frombuffer(__import__("zlib").compress(bytes(10**7)), np.uint8))
    huge = ChunkData(ChunkMeta("float16", (1, 2, 2, 4096, 8), Codec.ZLIB),  # > a memory slot
                     np.frombuffer(__import__("zlib").compress(bytes(2 * 2 * 2 * 4096 * 8 * 2)),
                                   np.uint8))
    low.put_many([(key(1), bomb), (key(2), huge)])
    store = ChunkStore([MemoryTier(8 * 512, 512), low])
    assert store.get_many([key(1), key(2)]) == [None, None]
    assert low.stats.corrupt == 2 and low.contains_many([key(1), key(2)]) == [False, False]


def test_a_chunk_the_codec_refuses_is_not_written_counted_and_startup_can_refuse() -> None:
    import pytest

    from kvtier.codecs import Codec
    from kvtier.errors import ConfigError

    low = LowerTier()
    store = ChunkStore([MemoryTier(8 * SLOT, SLOT), low], codecs=[Codec.Q8])
    store.put_many([(key(0), chunk(0))])  # uint8 (SLOT,): not a layout q8 understands
    assert store.flush(10)
    assert low.contains_many([key(0)]) == [False] and low.stats.errors == 1
    with pytest.raises(ConfigError, match="lower.codec"):
        store.check_codecs(chunk(0).meta)
    store.check_codecs(kv_chunk(0).meta)


def test_recode_with_each_codec_and_back() -> None:
    from kvtier.codecs import Codec
    from kvtier.store import manage

    low = KvLowerTier()
    store = ChunkStore([MemoryTier(8 * 512, 512), low])
    items = [(key(i), kv_chunk(i)) for i in range(2)]
    low.put_many(items)
    keys = [k for k, _ in items]
    for codec in (Codec.ZSTD, Codec.LZ4, Codec.ZLIB, Codec.RAW):
        assert manage.recode(store, keys, "lower", codec) == 2
        assert all(c.meta.codec is codec for c in low.get_many(keys) if c is not None)
    assert [bytes(c.payload) for c in low.get_many(keys)] == [bytes(c.payload) for _, c in items]
    assert manage.recode(store, keys, "lower", Codec.Q8) == 2  # lossy on request only
    back = store.get_many(keys[:1])[0]
    assert back is not None and back.meta.codec is Codec.RAW
    assert np.abs(back.payload.view(np.float16).astype(np.float32)
                  - items[0][1].payload.view(np.float16).astype(np.float32)).max() < 0.2
