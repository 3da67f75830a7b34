"""The memory tier runs the tier conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier
from kvtier.tiers.memory import MemoryTier
from tests.tier_conformance import TierConformance


class TestMemoryTier(TierConformance):
    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return MemoryTier((capacity_chunks or 64) * self.payload_max, self.payload_max)

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        pytest.skip("not applicable: in-process memory is trusted, it is never re-checked")

    def break_backend(self, tier: Tier) -> None:
        pytest.skip("not applicable: the memory tier lives and dies with its process")


def test_the_arena_is_mapped_ahead_of_its_slots_in_use_and_its_contents_left_alone() -> None:
    """A fresh arena's pages are mapped on a background thread (madvise POPULATE_WRITE)
    ahead of the highest slot allocated: the first save into a slot no longer pays a page
    fault per 4 KiB on the engine's thread, memory is committed as the cache fills, and
    bytes written meanwhile are kept."""
    from kvtier.tiers.memory import SlabArena
    from kvtier.tiers.prefault import PREFAULT_AHEAD

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    mib = 1 << 20
    before = rss()
    arena = SlabArena(mib, 1024)  # 1 GiB: more than mapped ahead
    arena.view(100)[:4] = [1, 2, 3, 4]  # racing the thread: never overwritten
    assert arena.prefault.idle(60)
    if not arena.prefault.working:
        pytest.skip("this kernel has no madvise(MADV_POPULATE_WRITE): pages map on first use")
    assert PREFAULT_AHEAD - mib <= arena.prefault.mapped() <= PREFAULT_AHEAD + 4096
    assert rss() - before >= PREFAULT_AHEAD - 16 * mib  # resident before any write
    slots = arena.alloc(400)  # slots 0..399 in use: mapped up to 400 MiB + ahead
    assert slots is not None and arena.prefault.idle(60)
    assert arena.prefault.mapped() >= 400 * mib + PREFAULT_AHEAD - mib
    assert arena.prefault.mapped() < arena.buffer.nbytes  # not all of it
    assert arena.view(100)[:4].tolist() == [1, 2, 3, 4]


def test_the_arena_is_mapped_whole_before_anything_is_stored_by_default() -> None:
    """``memory.map_at_start`` (the default) maps every page of the buffer when the tier
    is built, on the caller's thread: no mapping thread competes with the engine's cores
    while the cache fills, and nothing is left for a save to fault in. ``false`` keeps
    mapping ahead of use on a thread."""
    import threading

    from kvtier.config.load import load_config
    from kvtier.store.build import build_tiers

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    mib = 1 << 20
    threads = {t.ident for t in threading.enumerate()}
    before = rss()
    tier = build_tiers(load_config(env={}, engine={"tiers": ["memory"],
                                                 "memory.max_bytes": "384MiB"}), mib)[0]
    arena = tier.arena  # type: ignore[attr-defined]
    assert arena.prefault.mapped() >= arena.buffer.nbytes - 4096  # all of it, already
    assert rss() - before >= 384 * mib - 16 * mib
    assert not [t for t in threading.enumerate()
                if t.ident not in threads and t.name == "kvtier-prefault"]
    assert int(arena.buffer.max()) == 0  # mapped, nothing written into it
    slots = arena.alloc(300)
    assert slots is not None and arena.prefault.mapped() >= arena.buffer.nbytes - 4096

    lazy = build_tiers(load_config(env={}, engine={"tiers": ["memory"], "memory.max_bytes": "1GiB",
                                                 "memory.map_at_start": False}), mib)[0]
    assert lazy.arena.prefault.idle(60)  # type: ignore[attr-defined]
    if lazy.arena.prefault.working:  # type: ignore[attr-defined]
        assert lazy.arena.prefault.mapped() < lazy.arena.buffer.nbytes  # type: ignore


def test_mapping_at_start_without_the_kernel_call_touches_each_page_and_keeps_going(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel older than MADV_POPULATE_WRITE (EINVAL, faked here: this kernel has the
    call) gets each page written once at start, while nothing is stored; a refusal for
    want of memory (ENOMEM) leaves the rest to map on use, never fails the tier."""
    import ctypes
    import errno

    import numpy as np

    from kvtier.tiers import prefault

    def kernel(answer: int):  # type: ignore[no-untyped-def]
        def madvise(addr: int, n: int, advice: int) -> int:
            if advice == prefault.MADV_POPULATE_WRITE:
                ctypes.set_errno(answer)
                return -1
            return 0
        return lambda: madvise

    buf = np.full(64 << 20, 7, dtype=np.uint8)
    monkeypatch.setattr(prefault, "_madvise", kernel(errno.EINVAL))
    p = prefault.Prefaulter(buf, None)
    assert p.mapped() >= buf.nbytes - 4096
    page = prefault.mmap.PAGESIZE
    first = -(-buf.ctypes.data // page) * page - buf.ctypes.data
    last = (buf.ctypes.data + buf.nbytes) // page * page - buf.ctypes.data  # whole pages
    assert buf[first:last:page].max() == 0 and buf[first + 1] == 7  # one byte per page
    monkeypatch.setattr(prefault, "_madvise", kernel(errno.ENOMEM))
    buf[:] = 7
    p = prefault.Prefaulter(buf, None)
    assert int(buf.min()) == 7  # nothing written
    assert p.mapped() < page and p.idle(1)  # says what it mapped: nothing past its start
    p.need(1 << 20)  # and no thread started later: mapping at start is over


def test_the_step_trace_records_each_hook_with_what_the_step_asked(tmp_path: Path) -> None:
    import json
    import time
    from types import SimpleNamespace

    from kvtier.connectors.vllm.trace import StepTrace

    trace = StepTrace(str(tmp_path / "t.jsonl"))
    meta = SimpleNamespace(idle=False, loads=[SimpleNamespace(start_token=0, end_token=512,
                                                              is_async=False)],
                           saves=[SimpleNamespace(keys=[[b"a", b"b", b"c"]], start_chunk=1)])
    trace.mark("wait_for_save", time.perf_counter(), meta)
    trace.mark("get_finished", time.perf_counter(), None)
    first, second = (json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines())
    assert first["hook"] == "wait_for_save" and first["load_tokens"] == 512
    assert first["save_chunks"] == 2 and first["async_loads"] == 0 and first["ms"] >= 0
    assert second["hook"] == "get_finished" and "load_tokens" not in second
