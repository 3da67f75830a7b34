"""The Redis tier against a real redis-server: the conformance suite (single node
and cluster), then split values, TTLs, backoff, bounded waits and OOM."""

from __future__ import annotations

import socket
import sys
import time
import uuid

import numpy as np
import pytest
import redis

from kvtier.testing.redis_proc import RedisClusterProcess, RedisProcess
from kvtier.codecs import HEADER_SIZE, ChunkMac, ChunkMeta
from kvtier.config import RedisConfig
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier
from kvtier.tiers.redis import RedisTier
from kvtier.net.backoff import JITTER
from kvtier.tiers.redis.values import PART_TTL_MARGIN_S
from tests.tier_conformance import TierConformance, as_version, make_chunk, new_keys, same

pytestmark = pytest.mark.redis
MAX_VALUE = 4096  # small, so the suite's 8 KiB payloads are split into parts
FIRST = MAX_VALUE - HEADER_SIZE


def tier_at(url: str, mac: ChunkMac | None = None, **kw: object) -> RedisTier:
    opts: dict = dict(max_value_bytes=MAX_VALUE, timeout_s=1.0, reconnect_backoff_s=0.2)
    return RedisTier(RedisConfig(url=url, **{**opts, **kw}), mac=mac)


def flip_value(client: redis.Redis, name: bytes, offset: int) -> None:
    value = bytearray(client.get(name))
    value[offset] ^= 0xFF
    client.set(name, bytes(value))


def restamp(client: redis.Redis, name: bytes, version: int) -> None:
    value = client.get(name)
    client.set(name, as_version(value[:HEADER_SIZE], version) + value[HEADER_SIZE:])


class TestRedisTier(TierConformance):
    evicts_lru = False  # Redis's maxmemory policy evicts, not the tier

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisProcess) -> None:
        self.server = redis_server

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return tier_at(self.server.url)

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        flip_value(redis.Redis.from_url(self.server.url), b"kvtier:" + key.hex().encode(),
                   HEADER_SIZE + 10)

    def set_version(self, tier: Tier, key: ChunkKey, version: int) -> None:
        restamp(redis.Redis.from_url(self.server.url), b"kvtier:" + key.hex().encode(), version)

    def break_backend(self, tier: Tier) -> None:
        self.server.stop()

    def restore_backend(self, tier: Tier) -> None:
        self.server.start()


class TestSignedRedisTier(TestRedisTier):
    """The suite again with the cluster's integrity key (split values included): chunks
    signed on write, their MAC checked on read; damage is still ``corrupt``."""

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return tier_at(self.server.url, mac=ChunkMac(b"a cluster secret of 32 bytes or more"))


class TestRedisClusterTier(TierConformance):
    evicts_lru = False

    @pytest.fixture(autouse=True)
    def _cluster(self, redis_cluster: RedisClusterProcess) -> None:
        self.cluster = redis_cluster
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"  # one namespace per test on the shared cluster

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return tier_at(self.cluster.url, cluster=True, key_prefix=self.prefix)

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        client = redis.cluster.RedisCluster.from_url(self.cluster.url)
        flip_value(client, self.prefix.encode() + key.hex().encode(), HEADER_SIZE + 10)
        client.close()

    def set_version(self, tier: Tier, key: ChunkKey, version: int) -> None:
        client = redis.cluster.RedisCluster.from_url(self.cluster.url)
        restamp(client, self.prefix.encode() + key.hex().encode(), version)
        client.close()

    def break_backend(self, tier: Tier) -> None:
        self.cluster.stop()

    def restore_backend(self, tier: Tier) -> None:
        self.cluster.start()  # same ports, membership from nodes.conf, no data


@pytest.mark.parametrize("size", [0, FIRST, FIRST + 1, FIRST + 3 * MAX_VALUE,
                                  FIRST + 3 * MAX_VALUE + 5])
def test_split_values_round_trip(redis_server: RedisProcess, size: int) -> None:
    tier, key = tier_at(redis_server.url), new_keys(1)[0]
    c = make_chunk(ChunkMeta("uint8", (size,)), size)
    assert tier.put_many([(key, c)]) == [True]
    raw = redis.Redis.from_url(redis_server.url)
    parts = -(-max(0, size - FIRST) // MAX_VALUE)
    assert raw.dbsize() == 1 + parts
    assert all(len(raw.get(k)) <= MAX_VALUE for k in raw.keys())
    assert same(tier.get_many([key])[0], c)
    assert list(tier.iter_keys()) == [key]  # parts are not keys
    assert tier.delete_many([key]) == 1 and raw.dbsize() == 0


def test_missing_part_is_a_miss_and_drops_the_head(redis_server: RedisProcess) -> None:
    tier, key = tier_at(redis_server.url), new_keys(1)[0]
    tier.put_many([(key, make_chunk(ChunkMeta("uint8", (3 * MAX_VALUE,))))])
    raw = redis.Redis.from_url(redis_server.url)
    raw.delete(b"kvtier:" + key.hex().encode() + b":2")  # as if Redis had evicted it
    assert tier.get_many([key]) == [None]
    assert tier.stats.corrupt == 0 and raw.dbsize() == 0


def test_corrupt_part_is_detected(redis_server: RedisProcess) -> None:
    tier, key = tier_at(redis_server.url), new_keys(1)[0]
    tier.put_many([(key, make_chunk(ChunkMeta("uint8", (3 * MAX_VALUE,))))])
    raw = redis.Redis.from_url(redis_server.url)
    flip_value(raw, b"kvtier:" + key.hex().encode() + b":1", 7)
    assert tier.get_many([key]) == [None] and tier.stats.corrupt == 1 and raw.dbsize() == 0


def test_ttl_is_set_on_head_and_longer_on_parts(redis_server: RedisProcess) -> None:
    tier, key = tier_at(redis_server.url, ttl_s=100), new_keys(1)[0]
    tier.put_many([(key, make_chunk(ChunkMeta("uint8", (2 * MAX_VALUE,))))])
    raw = redis.Redis.from_url(redis_server.url)
    head = b"kvtier:" + key.hex().encode()
    assert 90 < raw.ttl(head) <= 100
    assert 100 < raw.ttl(head + b":1") <= 100 + PART_TTL_MARGIN_S
    plain = tier_at(redis_server.url, key_prefix="plain:")
    plain.put_many([(key, make_chunk(ChunkMeta("uint8", (2 * MAX_VALUE,))))])
    assert raw.ttl(b"plain:" + key.hex().encode()) == -1  # ttl_s=0: no expiry
    assert raw.ttl(b"plain:" + key.hex().encode() + b":1") == -1  # orphan expiry lifted


def test_backoff_skips_the_server_then_reconnects(redis_server: RedisProcess) -> None:
    tier, keys = tier_at(redis_server.url, reconnect_backoff_s=0.5), new_keys(2)
    assert tier.put_many([(keys[0], make_chunk(ChunkMeta("uint8", (64,))))]) == [True]
    redis_server.stop()
    assert tier.contains_many(keys[:1]) == [False] and tier.stats.errors == 1
    redis_server.start()  # back at once, but the tier waits out its backoff
    assert tier.contains_many(keys[:1]) == [False] and tier.stats.errors == 2
    time.sleep(0.5 * (1 + JITTER) + 0.05)  # the backoff, jittered
    assert tier.put_many([(keys[1], make_chunk(ChunkMeta("uint8", (64,))))]) == [True]
    assert tier.contains_many(keys) == [False, True]  # a fresh server: keys[0] is gone


def test_a_server_that_never_answers_costs_one_timeout(tmp_path: object) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        tier = tier_at(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout_s=0.2,
                       reconnect_backoff_s=10)
        t0 = time.monotonic()
        assert tier.get_many(new_keys(3)) == [None] * 3
        assert tier.contains_many(new_keys(3)) == [False] * 3  # skipped: in backoff
        assert time.monotonic() - t0 < 1.5
        assert tier.stats.errors == 2 and tier.stats.misses == 3


def test_unix_socket_url(tmp_path: object) -> None:
    sock = f"{tmp_path}/redis.sock"
    with RedisProcess(f"{tmp_path}/srv", extra_args=("--unixsocket", sock)):
        tier, key = tier_at(f"unix://{sock}"), new_keys(1)[0]
        c = make_chunk(ChunkMeta("float16", (3000,)))
        assert tier.put_many([(key, c)]) == [True] and same(tier.get_many([key])[0], c)


def test_full_server_drops_writes(redis_server: RedisProcess) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", raw.info("memory")["used_memory"] + 256 * 1024)
    tier = tier_at(redis_server.url, max_value_bytes=1 << 20)
    meta = ChunkMeta("uint8", (64 * 1024,))
    items = [(k, make_chunk(meta, i)) for i, k in enumerate(new_keys(16))]
    done = tier.put_many(items)
    assert done[0] and not done[-1] and tier.stats.dropped > 0 and tier.stats.errors == 0
    u = tier.usage()
    assert 0 < u.used_bytes and u.capacity_bytes == int(raw.config_get("maxmemory")["maxmemory"])
    assert sum(c is not None for c in tier.get_many([k for k, _ in items])) == sum(done)


def test_cluster_usage_and_key_spread(redis_cluster: RedisClusterProcess) -> None:
    tier = tier_at(redis_cluster.url, cluster=True, key_prefix="spread:")
    keys = new_keys(24)
    tier.put_many([(k, make_chunk(ChunkMeta("uint8", (256,)), i)) for i, k in enumerate(keys)])
    counts = [len(list(redis.Redis(port=n.port).scan_iter(b"spread:*")))
              for n in redis_cluster.nodes]
    assert sum(counts) == 24 and min(counts) > 0  # the keys really are spread
    assert tier.usage().used_bytes > 0 and tier.usage().num_chunks == 24
    assert tier.clear() == 24


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'kvtier\[redis\]'"):
        RedisTier(RedisConfig())


def test_payload_of_a_hit_is_a_view_not_a_copy(redis_server: RedisProcess) -> None:
    tier, key = tier_at(redis_server.url, max_value_bytes=1 << 20), new_keys(1)[0]
    tier.put_many([(key, make_chunk(ChunkMeta("uint8", (100_000,))))])
    got = tier.get_many([key])[0]
    assert got is not None and isinstance(got.payload.base, bytes)
    assert np.shares_memory(got.payload, np.frombuffer(got.payload.base, dtype=np.uint8))


def test_resp_packer_matches_redis_py_and_sends_payloads_unjoined() -> None:
    from redis.connection import PythonRespSerializer
    from redis._parsers.encoders import Encoder

    from kvtier.tiers.redis.resp import Concat, RespPacker
    payload = np.arange(50_000, dtype=np.uint8)
    args = ("SET", b"kvtier:ab", Concat([b"h" * 128, memoryview(payload)]), "EX", 60)
    ours = RespPacker().pack(*args)
    plain = ("SET", b"kvtier:ab", b"h" * 128 + payload.tobytes(), "EX", 60)
    theirs = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode).pack(*plain)
    assert b"".join(bytes(x) for x in ours) == b"".join(bytes(x) for x in theirs)
    assert any(isinstance(x, memoryview) and np.shares_memory(np.frombuffer(x, np.uint8), payload)
               for x in ours)
    assert b"".join(RespPacker().pack("CLIENT SETINFO", "LIB-NAME", "x")) == \
        b"".join(PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode).pack(
            "CLIENT SETINFO", "LIB-NAME", "x"))


def test_readers_with_another_part_size_share_chunks(redis_server: RedisProcess) -> None:
    small, big = tier_at(redis_server.url), tier_at(redis_server.url, max_value_bytes=1 << 20)
    keys = new_keys(2)
    c = make_chunk(ChunkMeta("uint8", (5 * MAX_VALUE,)))
    small.put_many([(keys[0], c)])
    big.put_many([(keys[1], c)])
    assert same(big.get_many(keys[:1])[0], c) and same(small.get_many(keys[1:])[0], c)
    assert big.delete_many(keys[:1]) == 1 and redis.Redis.from_url(redis_server.url).dbsize() == 1


def test_fixtures_fail_without_redis_server_unless_told_to_skip(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.redis_server import require_redis
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("KVTIER_SKIP_REDIS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="redis-server is not on PATH"):
        require_redis()
    monkeypatch.setenv("KVTIER_SKIP_REDIS", "1")
    with pytest.raises(pytest.skip.Exception):
        require_redis()
