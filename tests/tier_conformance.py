"""The conformance suite every tier runs (the fsspec way).

A tier's test module subclasses :class:`TierConformance` and implements
:meth:`~TierConformance.make_tier`, plus the hooks that apply to its medium:
:meth:`~TierConformance.corrupt` (damage a stored chunk behind the tier's
back) and :meth:`~TierConformance.break_backend` /
:meth:`~TierConformance.restore_backend` (take the medium away, give it back).
A hook left alone skips its tests, with the reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterator

import numpy as np
import pytest

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier

METAS = [
    ChunkMeta("bfloat16", (2, 2, 16, 2, 8)),  # a tiny real layout: layers, K/V, tokens, heads, dim
    ChunkMeta("float32", (3, 5, 7)),
    ChunkMeta("float16", (1000,)),
    ChunkMeta("int8", (1,)),
    ChunkMeta("uint8", (8192,)),
    ChunkMeta("int64", (4, 4, 4, 4)),
    ChunkMeta("float32", (0,)),
]


def new_keys(n: int) -> list[ChunkKey]:
    """Random, distinct keys."""
    return [ChunkKey(os.urandom(16)) for _ in range(n)]


def make_chunk(meta: ChunkMeta, seed: int = 0) -> ChunkData:
    """A chunk of random bytes shaped by ``meta``."""
    rng = np.random.default_rng(seed)
    return ChunkData(meta, rng.integers(0, 256, meta.raw_nbytes, dtype=np.uint8))


def same(got: ChunkData | None, want: ChunkData) -> bool:
    """Bitwise equal payload and equal meta."""
    return (got is not None and got.meta == want.meta
            and got.payload.nbytes == want.payload.nbytes
            and bytes(got.payload.data) == bytes(want.payload.data))


class TierConformance:
    """Tests every tier passes. Subclass it and implement :meth:`make_tier`."""

    payload_max = 8192
    """Largest payload the suite stores (the memory tier's slot size)."""
    evicts_lru = True
    """Whether the tier enforces its own capacity with LRU eviction."""

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        """A fresh, empty tier; ``capacity_chunks`` payloads of ``payload_max`` bytes fit."""
        raise NotImplementedError

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        """Damage the stored bytes of ``key`` behind the tier's back."""
        pytest.skip(f"{type(self).__name__}: stored bytes cannot be damaged from outside")

    def set_version(self, tier: Tier, key: ChunkKey, version: int) -> None:
        """Rewrite the stored header of ``key`` as format ``version`` (see :func:`as_version`)."""
        pytest.skip(f"{type(self).__name__}: stored bytes cannot be rewritten from outside")

    def break_backend(self, tier: Tier) -> None:
        """Take the medium away (folder deleted, server killed)."""
        pytest.skip(f"{type(self).__name__}: the medium cannot be taken away")

    def restore_backend(self, tier: Tier) -> None:
        """Give the medium back after :meth:`break_backend` (empty is fine)."""

    @pytest.fixture
    def tier(self, tmp_path: object) -> Iterator[Tier]:
        t = self.make_tier(tmp_path)
        yield t
        t.close()

    def chunk(self, seed: int = 0) -> ChunkData:
        return make_chunk(ChunkMeta("uint8", (self.payload_max,)), seed)

    # -- data -----------------------------------------------------------------

    def test_round_trip_is_bitwise(self, tier: Tier) -> None:
        keys = new_keys(len(METAS))
        items = [(k, make_chunk(m, i)) for i, (k, m) in enumerate(zip(keys, METAS))]
        assert tier.put_many(items) == [True] * len(items)
        got = tier.get_many(keys)
        for (_, want), chunk in zip(items, got):
            assert same(chunk, want), want.meta
            assert chunk is not None and chunk.payload.dtype == np.uint8
            assert chunk.payload.ndim == 1 and chunk.payload.nbytes == want.meta.raw_nbytes
            chunk.release()
        assert tier.stats.hits == len(items)
        assert tier.stats.get_bytes == tier.stats.put_bytes == sum(m.raw_nbytes for m in METAS)

    def test_contains_many_and_prefix(self, tier: Tier) -> None:
        keys = new_keys(5)
        tier.put_many([(keys[i], self.chunk(i)) for i in (0, 1, 3)])
        assert tier.contains_many(keys) == [True, True, False, True, False]
        assert tier.contains_prefix(keys) == 2
        assert tier.contains_prefix(keys[2:]) == 0
        assert tier.contains_many([]) == [] and tier.contains_prefix([]) == 0

    def test_absent_keys_are_misses(self, tier: Tier) -> None:
        keys = new_keys(3)
        tier.put_many([(keys[1], self.chunk())])
        got = tier.get_many(keys)
        assert got[0] is None and got[2] is None and same(got[1], self.chunk())
        assert (tier.stats.hits, tier.stats.misses) == (1, 2)
        assert tier.get_many([]) == [] and tier.put_many([]) == []
        assert tier.stats.errors == tier.stats.corrupt == 0

    def test_put_of_present_key_is_not_written_again(self, tier: Tier) -> None:
        key = new_keys(1)[0]
        assert tier.put_many([(key, self.chunk(1))]) == [True]
        assert tier.put_many([(key, self.chunk(2))]) == [True]
        assert (tier.stats.puts, tier.stats.put_bytes) == (1, self.payload_max)
        assert same(tier.get_many([key])[0], self.chunk(1))

    def test_delete_many_counts_present_keys(self, tier: Tier) -> None:
        keys = new_keys(4)
        tier.put_many([(k, self.chunk(i)) for i, k in enumerate(keys[:3])])
        assert tier.delete_many([keys[0], keys[1], keys[3]]) == 2
        assert tier.contains_many(keys) == [False, False, True, False]
        assert tier.delete_many(keys[:2]) == 0 and tier.delete_many([]) == 0
        assert tier.get_many(keys[:1]) == [None]

    def test_iter_keys_usage_and_clear(self, tier: Tier) -> None:
        keys = new_keys(4)
        tier.put_many([(k, self.chunk(i)) for i, k in enumerate(keys)])
        assert sorted(tier.iter_keys()) == sorted(keys)
        assert tier.usage().num_chunks == 4
        assert tier.clear() == 4
        assert list(tier.iter_keys()) == [] and tier.usage().num_chunks == 0

    # -- capacity -------------------------------------------------------------

    def test_capacity_is_kept_by_evicting_lru(self, tmp_path: object) -> None:
        if not self.evicts_lru:
            pytest.skip(f"{type(self).__name__}: capacity belongs to the server")
        tier = self.make_tier(tmp_path, capacity_chunks=4)
        keys = new_keys(6)
        for i in range(4):
            assert tier.put_many([(keys[i], self.chunk(i))]) == [True]
        tier.get_many([keys[0]])[0].release()  # keys[0] becomes the most recently used
        for i in (4, 5):
            assert tier.put_many([(keys[i], self.chunk(i))]) == [True]
            u = tier.usage()
            assert u.used_bytes <= u.capacity_bytes
        assert tier.contains_many(keys) == [True, False, False, True, True, True]
        assert tier.stats.evictions == 2 and tier.usage().num_chunks == 4
        tier.close()

    # -- threads --------------------------------------------------------------

    def test_concurrent_threads_stay_consistent(self, tier: Tier) -> None:
        shared = new_keys(12)
        want = {k: self.chunk(i) for i, k in enumerate(shared)}
        errors: list[BaseException] = []
        wrong: list[ChunkKey] = []

        def work(t: int) -> None:
            rng = np.random.default_rng(t)
            own = new_keys(3)
            try:
                for _ in range(40):
                    batch = [shared[i] for i in rng.choice(len(shared), 3, replace=False)]
                    op = rng.integers(4)
                    if op == 0:
                        tier.put_many([(k, want[k]) for k in batch])
                    elif op == 1:
                        for k, c in zip(batch, tier.get_many(batch)):
                            if c is not None:
                                wrong.extend([] if same(c, want[k]) else [k])
                                c.release()
                    elif op == 2:
                        tier.delete_many(batch[:1])
                    else:
                        tier.contains_many(batch)
                own_items = [(k, self.chunk(100 + t)) for k in own]
                assert tier.put_many(own_items) == [True] * 3
                got = tier.get_many(own)
                assert all(same(c, self.chunk(100 + t)) for c in got)
                for c in got:
                    c.release()
            except BaseException as exc:  # noqa: BLE001 (re-raised in the main thread)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads)
        if errors:
            raise errors[0]
        assert wrong == []
        assert tier.stats.errors == tier.stats.corrupt == 0

    # -- failures -------------------------------------------------------------

    def test_corrupt_bytes_are_a_counted_miss(self, tier: Tier) -> None:
        keys = new_keys(2)
        tier.put_many([(k, self.chunk(i)) for i, k in enumerate(keys)])
        self.corrupt(tier, keys[0])
        got = tier.get_many(keys)
        assert got[0] is None and same(got[1], self.chunk(1))
        assert tier.stats.corrupt == 1 and tier.stats.hits == 1
        assert tier.contains_many(keys) == [False, True]  # the damaged chunk is gone

    def test_other_format_version_is_a_counted_miss_left_in_place(
            self, tier: Tier, caplog: pytest.LogCaptureFixture) -> None:
        keys = new_keys(3)
        tier.put_many([(k, self.chunk(i)) for i, k in enumerate(keys)])
        self.set_version(tier, keys[0], 2)  # a newer release shares the medium
        self.set_version(tier, keys[1], 0)  # and an older one
        with caplog.at_level(logging.WARNING):
            got = tier.get_many(keys)
            assert tier.get_many(keys[:2]) == [None, None]
        assert got[:2] == [None, None] and same(got[2], self.chunk(2))
        assert (tier.stats.foreign, tier.stats.corrupt, tier.stats.errors) == (4, 0, 0)
        assert tier.contains_many(keys) == [True, True, True]  # nothing deleted
        assert sum("format v" in r.getMessage() for r in caplog.records) == 1  # logged once

    def test_backend_gone_gives_misses_then_recovers(self, tier: Tier) -> None:
        keys = new_keys(4)
        tier.put_many([(keys[0], self.chunk(0))])
        self.break_backend(tier)
        assert tier.contains_many(keys[:2]) == [False, False]
        assert tier.contains_prefix(keys[:2]) == 0
        assert tier.get_many(keys[:2]) == [None, None]
        assert tier.put_many([(keys[2], self.chunk(2))]) == [False]
        assert tier.delete_many(keys[:1]) == 0
        tier.usage()
        list(tier.iter_keys())
        assert tier.stats.errors > 0 and tier.stats.corrupt == 0
        self.restore_backend(tier)
        deadline = time.monotonic() + 10
        while tier.put_many([(keys[3], self.chunk(3))]) != [True]:
            assert time.monotonic() < deadline, "the tier did not come back"
            time.sleep(0.05)
        assert same(tier.get_many([keys[3]])[0], self.chunk(3))


def as_version(header: bytes, version: int) -> bytes:
    """``header`` rewritten as a well-formed header of format ``version`` (same layout,
    checksum recomputed): what another kvtier release would have written."""
    import struct

    import xxhash
    fixed = bytearray(header[:76])  # magic .. shape: the part the header checksum covers
    struct.pack_into("<H", fixed, 4, version)
    return bytes(fixed) + struct.pack("<I", xxhash.xxh32_intdigest(bytes(fixed))) + header[80:]
