"""The Redis tier shared by instances that race and die, against a real redis-server:
readers delete only what failed twice, orphan parts expire, a hung server costs
a bounded wait and a growing backoff."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest
import redis

from kvtier.codecs import ChunkMeta
from kvtier.keys import ChunkKey
from kvtier.testing.redis_proc import RedisClusterProcess, RedisProcess
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis.split import SplitChunks
from tests.test_tier_redis import MAX_VALUE, tier_at
from tests.tier_conformance import make_chunk, new_keys, same

pytestmark = pytest.mark.redis
META = ChunkMeta("uint8", (3 * MAX_VALUE,))  # a head and 3 parts


def names(key: ChunkKey, prefix: bytes = b"kvtier:") -> list[bytes]:
    head = prefix + key.hex().encode()
    return [head] + [head + b":%d" % p for p in (1, 2, 3)]


def snapshot(raw: redis.Redis) -> dict[bytes, bytes]:
    return {k: raw.get(k) for k in raw.keys()}


def part_writer(server: RedisProcess, **kw: Any) -> RedisTier:
    """A tier whose head writes fail (ACL: it may write only part names): a writer
    that dies after its parts, before its head, for real on the server's side."""
    raw = redis.Redis.from_url(server.url)
    raw.execute_command("ACL", "SETUSER", "partwriter", "on", ">pw", "resetkeys",
                        "%R~kvtier:*", "%W~kvtier:*:*", "+@all")
    return tier_at(f"redis://partwriter:pw@127.0.0.1:{server.port}/0", **kw)


# -- readers delete only what they verified bad twice --------------------------

def test_a_reader_catching_an_overwrite_in_progress_deletes_nothing(
        redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, key = redis.Redis.from_url(redis_server.url), new_keys(1)[0]
    a, b = make_chunk(META, 1), make_chunk(META, 2)  # two instances' KV for one prefix
    assert tier_at(redis_server.url).put_many([(key, a)]) == [True]
    second = part_writer(redis_server, orphan_part_ttl_s=1)
    # It checked presence before the first chunk landed, so it writes too.
    monkeypatch.setattr(second, "_exists", lambda client, keys: [0] * len(keys))
    assert second.put_many([(key, b)]) == [False]  # its parts landed, its head did not
    state = snapshot(raw)
    assert names(key)[0] in state and 0 < raw.pttl(names(key)[1]) <= 1000
    reader = tier_at(redis_server.url)
    assert reader.get_many([key]) == [None]  # head of one write, parts of another
    assert snapshot(raw) == state and reader.stats.corrupt == 0  # nothing deleted
    # The second writer is dead: its parts expire, and the head left without parts
    # is then found (twice) and removed, so EXISTS stops promising a hit.
    deadline = time.monotonic() + 5
    while raw.exists(names(key)[1]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert reader.get_many([key]) == [None] and raw.dbsize() == 0
    assert reader.stats.corrupt == 0


@pytest.mark.parametrize("lands", ["head", "parts"])
def test_a_write_that_settles_between_the_two_reads_is_not_deleted(
        redis_server: RedisProcess, lands: str) -> None:
    raw, key = redis.Redis.from_url(redis_server.url), new_keys(1)[0]
    a, b = make_chunk(META, 1), make_chunk(META, 2)
    tier_at(redis_server.url).put_many([(key, a)])
    tier_at(redis_server.url, key_prefix="b:").put_many([(key, b)])
    want_a, want_b = [raw.get(n) for n in names(key)], [raw.get(n) for n in names(key, b"b:")]
    if lands == "head":  # B's parts are in, its head is about to land
        mixed, rest = [want_a[0], *want_b[1:]], {names(key)[0]: want_b[0]}
    else:  # B's head and first part are in, its other parts are about to land
        mixed, rest = [want_b[0], want_b[1], *want_a[2:]], dict(zip(names(key)[2:], want_b[2:]))
    for n, v in zip(names(key), mixed):
        raw.set(n, v)
    reader = tier_at(redis_server.url)
    real = SplitChunks._recheck

    def writer_finishes_first(self: SplitChunks, *args: Any) -> None:
        for n, v in rest.items():
            raw.set(n, v)
        real(self, *args)
    reader._split._recheck = writer_finishes_first.__get__(reader._split)  # type: ignore
    got = reader.get_many([key])[0]
    assert (got is None) if lands == "head" else same(got, b)
    assert reader.stats.corrupt == 0 and [raw.get(n) for n in names(key)] == want_b
    assert same(tier_at(redis_server.url).get_many([key])[0], b)


def test_bytes_that_fail_twice_are_deleted(redis_server: RedisProcess) -> None:
    """Two finished writers interleaved (A's head, B's parts) stay inconsistent for good:
    as damaged bytes do, they fail twice and go, so the prefix can be stored again."""
    raw, key = redis.Redis.from_url(redis_server.url), new_keys(1)[0]
    tier_at(redis_server.url).put_many([(key, make_chunk(META, 1))])
    tier_at(redis_server.url, key_prefix="b:").put_many([(key, make_chunk(META, 2))])
    for n, nb in zip(names(key)[1:], names(key, b"b:")[1:]):
        raw.set(n, raw.get(nb))
    reader = tier_at(redis_server.url, key_prefix="kvtier:")
    assert reader.get_many([key]) == [None] and reader.stats.corrupt == 1
    assert not any(raw.exists(n) for n in names(key))


# -- orphan parts ---------------------------------------------------------------

def test_parts_whose_head_never_lands_expire_without_a_ttl(redis_server: RedisProcess) -> None:
    raw, key = redis.Redis.from_url(redis_server.url), new_keys(1)[0]
    writer = part_writer(redis_server, ttl_s=0, orphan_part_ttl_s=1)
    assert writer.put_many([(key, make_chunk(META))]) == [False]
    assert raw.dbsize() == 3 and not raw.exists(names(key)[0])
    assert all(0 < raw.pttl(n) <= 1000 for n in names(key)[1:])
    time.sleep(1.3)
    assert raw.dbsize() == 0


def test_cluster_parts_are_kept_once_their_head_is_written(
        redis_cluster: RedisClusterProcess) -> None:
    tier, key = tier_at(redis_cluster.url, cluster=True, key_prefix="keep:"), new_keys(1)[0]
    assert tier.put_many([(key, make_chunk(META))]) == [True]
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    assert [client.ttl(n) for n in names(key, b"keep:")] == [-1] * 4  # heads went first
    assert tier.delete_many([key]) == 1
    client.close()


# -- a hung server ----------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def test_a_hung_server_costs_a_bounded_wait_then_recovers(redis_server: RedisProcess) -> None:
    contains_s, timeout_s = 0.15, 0.5
    tier = tier_at(redis_server.url, timeout_s=timeout_s, contains_timeout_s=contains_s,
                   reconnect_backoff_s=0.1, reconnect_backoff_max_s=0.8)
    keys = new_keys(4)
    assert tier.put_many([(keys[0], make_chunk(ChunkMeta("uint8", (64,))))]) == [True]
    healthy = max(timed(lambda: tier.contains_many(keys))[1] for _ in range(50))
    healthy_get = max(timed(lambda: tier.get_many(keys))[1] for _ in range(20))
    pid = int(redis.Redis.from_url(redis_server.url).info("server")["process_id"])
    calls: list[tuple[str, float]] = []
    os.kill(pid, signal.SIGSTOP)  # accepts connections (backlog), never answers
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # a scheduler's lookups, and a worker's loads
            kind = "get" if len(calls) % 10 == 9 else "contains"
            fn = (lambda: tier.get_many(keys)) if kind == "get" else (
                lambda: tier.contains_many(keys))
            out, dt = timed(fn)
            assert not any(out)
            calls.append((kind, dt))
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGCONT)
    worst = {k: max((dt for kk, dt in calls if kk == k), default=0.0) for k in ("contains", "get")}
    probes = [dt for _, dt in calls if dt > 0.05]  # the others skipped the server
    print(f"\nhealthy worst: contains {healthy * 1e3:.1f} ms, get {healthy_get * 1e3:.1f} ms; "
          f"paused worst: contains {worst['contains'] * 1e3:.0f} ms, get {worst['get'] * 1e3:.0f}"
          f" ms; {len(probes)} of {len(calls)} calls in 3 s reached the server")
    assert worst["contains"] < 1.5 * contains_s and worst["get"] < 1.5 * timeout_s
    assert 1 <= len(probes) <= 10 and len(calls) > 100
    deadline = time.monotonic() + 5  # resumed: back within the (bounded) backoff
    while tier.contains_many(keys[:1]) != [True]:
        assert time.monotonic() < deadline, "the tier did not come back"
        time.sleep(0.05)
    assert same(tier.get_many(keys[:1])[0], make_chunk(ChunkMeta("uint8", (64,))))
