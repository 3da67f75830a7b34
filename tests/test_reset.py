"""A reset (vLLM's ``reset_prefix_cache(reset_connector=True)``) or a management
``clear`` is a barrier: nothing that started before it lands or is served after it.

The slow work is made slow on purpose: a lower tier whose writes or reads wait
on an event, so a write is held mid-flight, or a read is held between reading
and promoting, while the clear runs. Everything else is the real store, writer,
background loads and scheduler planner. Real vLLM: tests/test_reset_vllm.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvtier.codecs import ChunkData, ChunkMeta
from kvtier.config import load_config
from kvtier.connectors.vllm.async_loads import AsyncLoads
from kvtier.connectors.vllm.scheduler import KvtierWorkerMeta, SchedulerPlanner
from kvtier.keys import ChunkKey, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier
from tests.test_vllm_plan import done, request, step

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


def held_loads(n: int) -> tuple[Any, Any, Any, AsyncLoads]:
    """A store whose lower tier holds chunks 0..n-1 and holds its reads until
    ``low.reads`` is set, and background loads over it."""
    store, mem, low = stores()
    low.put_many([(key(i), chunk(i)) for i in range(n)])
    low.reads.clear()
    engine = SimpleNamespace(store=store, fetch=store.get_many)
    return store, mem, low, AsyncLoads(engine, timeout_s=30)  # type: ignore[arg-type]


def test_a_background_load_across_a_clear_is_failed_never_served() -> None:
    store, mem, low, loads = held_loads(3)
    load = SimpleNamespace(start_token=0, end_token=3 * SLOT)
    loads.submit("r", load, [key(i) for i in range(3)])
    assert low.reading.wait(5)  # the fetch thread has read the chunks
    store.clear()
    low.reads.set()
    placed: list = []

    def place(_: Any, chunks: list) -> int:
        placed.append(list(chunks))
        return 0
    deadline = time.monotonic() + 5
    finished: list = []
    while not finished and time.monotonic() < deadline:
        finished = loads.poll(place)
    (fin,) = finished
    assert placed == [[]] and fin.loaded == 0 and not fin.timed_out  # all recomputed
    time.sleep(0.2)  # the fetch thread's last batch
    assert list(mem.iter_keys()) == []
    loads.close()


def test_a_prefetch_across_a_clear_promotes_nothing() -> None:
    store, mem, low, loads = held_loads(8)
    loads.prefetch([key(i) for i in range(8)])
    assert low.reading.wait(5)
    store.clear()
    low.reads.set()
    deadline = time.monotonic() + 5
    while loads._prefetching and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(mem.iter_keys()) == []
    loads.close()


# -- the scheduler's side -------------------------------------------------------

CS, BS = 256, 128


def planner(shared: ChunkStore | None) -> SchedulerPlanner:
    ns = [Namespace("m", "vllm_cpu:L4:H1:D64:B128:bfloat16", CS)]
    return SchedulerPlanner(load_config(engine={}), ns, BS, shared=shared)


def test_after_a_reset_the_scheduler_trusts_shared_tiers_only_once_workers_passed() -> None:
    shared = HeldTier()
    p = planner(ChunkStore([shared]))
    keys = p._state(request("a", 600)).keys[0]  # type: ignore[union-attr]
    shared.put_many([(k, chunk(0)) for k in keys[:2]])
    assert p.num_new_matched_tokens(request("a", 600), 0) == 2 * CS
    p.reset()
    assert list(shared.iter_keys()) == []  # cleared now
    shared.put_many([(k, chunk(0)) for k in keys[:2]])  # a worker's write lands late
    assert p.num_new_matched_tokens(request("b", 600), 0) == 0  # not trusted yet
    meta = p.build(step())
    assert meta.epoch == 1  # the workers clear their stores in this step
    done(p, KvtierWorkerMeta(stored=keys[:2], epoch=0))  # a report from before the reset
    assert p.index.contains_many(keys[:2]) == [False, False]
    assert p.num_new_matched_tokens(request("b", 600), 0) == 0
    done(p, KvtierWorkerMeta(epoch=1))  # every worker passed the barrier
    assert p.num_new_matched_tokens(request("c", 600), 0) == 2 * CS  # (what they left)


def test_a_reset_drops_saves_planned_before_it_and_releases_their_requests() -> None:
    p = planner(None)
    p.num_new_matched_tokens(request("s", 600), 0)
    p.build(step(new=[("s", [90, 91, 92, 93, 94], 0, 600)]))
    done(p, KvtierWorkerMeta(stored=p._reqs["s"].keys[0][:2]))
    assert p.num_new_matched_tokens(request("l", 600), 0) == 2 * CS
    p.accept_load(request("l", 600), 2 * CS)
    p.num_new_matched_tokens(request("f", 900), 0)
    p.build(step(new=[("l", [1, 2, 3, 4, 5], 0, 88), ("f", list(range(10, 18)), 0, 900)]))
    assert p.finish("f") is True  # its save is held (the step loads): it keeps its blocks
    done(p)  # the step went well: the held save is ready for the next step...
    p.reset()  # ...but it copies KV computed before the reset
    meta = p.build(step(cached=[("l", [], 600, 1)]))
    assert meta.saves == [] and meta.releases == ["f"]
    done(p)
    # "l" had KV before the reset: what it computes later is never saved either.
    meta = p.build(step(cached=[("l", [], 601, 1)]))
    assert meta.saves == []
    # A request that arrives after the reset saves as usual.
    p.num_new_matched_tokens(request("n", 600), 0)
    p.build(step(new=[("n", [40, 41, 42, 43, 44], 0, 600)]))
    done(p)
    (save,) = p.build(step()).saves
    assert save.req_id == "n"


def test_after_a_reset_vllm_is_asked_for_a_few_steps_and_close_clears_again() -> None:
    shared = HeldTier()
    p = planner(ChunkStore([shared]))
    assert not p.reset_pending
    p.reset()
    assert p.reset_pending  # an idle engine steps, so its workers pass the barrier now
    for _ in range(8):
        p.build(step())
    assert not p.reset_pending  # bounded: a worker that never reports costs 8 steps
    shared.put_many([(key(1), chunk(1))])  # a worker's write, flushed at its shutdown
    p.close()  # the workers never passed the reset: the shared tiers are cleared again
    assert list(shared.iter_keys()) == []
    p = planner(ChunkStore([HeldTier()]))
    p.reset()
    p.build(step())
    done(p, KvtierWorkerMeta(epoch=1))
    assert not p.reset_pending


def test_an_idle_step_sleeps_until_a_background_load_lands() -> None:
    """A step that computes nothing waits for the fetch thread without the GIL (vLLM would
    loop at once and starve it), and wakes when the load lands, not at its bound."""
    store, mem, low, loads = held_loads(2)
    loads.wait(30.0)  # nothing in flight: returns at once
    loads.submit("r", SimpleNamespace(start_token=0, end_token=2 * SLOT), [key(0), key(1)])
    assert low.reading.wait(5)
    woke: list[float] = []
    waiter = in_thread(lambda: (loads.wait(30.0), woke.append(time.monotonic())))
    time.sleep(0.2)
    assert not woke  # still asleep: the load has not landed
    low.reads.set()
    waiter.join(10)  # woken by the load, long before its 30 s bound
    assert woke and not waiter.is_alive()
    (fin,) = loads.poll(lambda _, chunks: len(chunks) * SLOT)
    assert fin.loaded == 2 * SLOT and not fin.timed_out
    loads.close()


def test_the_scheduler_marks_a_step_that_computes_nothing_idle() -> None:
    from tests.test_vllm_plan import planner

    p = planner()
    assert p.build(step()).idle
    p.num_new_matched_tokens(request("s", 600), 0)
    assert not p.build(step(new=[("s", [1, 2, 3, 4, 5], 0, 600)])).idle
