"""Keyed integrity of shared tiers (``integrity.key_file``): the attack of issue #23.

Whoever can write the disk folder or Redis, or runs a peer, could serve any KV
that passes the chunk checksums. With the cluster's key every chunk that leaves
a process carries a keyed MAC, and a reader holding the key serves only chunks
whose MAC it verified: a chunk planted without the key (or with another key, or
tampered with and its checksums recomputed) is a miss counted ``forged``, and is
deleted from disk and Redis, never a chunk written with the key. Readers without
a key still read signed chunks.
"""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMac, ChunkMeta, decode, encode
from kvtier.codecs.format import FLAG_MAC, SIGNED_SIZE
from kvtier.config import DiskConfig, PeerConfig, RedisConfig, TransferConfig, load_config
from kvtier.errors import ConfigError, CorruptChunk, ForeignChunk, ForgedChunk
from kvtier.keys import ChunkHasher, ChunkKey
from kvtier.store import ChunkStore
from kvtier.store.build import build_store
from kvtier.testing.redis_proc import RedisProcess
from kvtier.testing.transfer_proc import chunk_data, chunk_key, chunk_payload
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.peer import PeerTier
from kvtier.transfer.server import TransferServer
from tests.tier_conformance import new_keys, same
from tests.vllm_run import (CHUNK as TOKENS, doc, kvtier_cfg, model,  # noqa: F401
                            req, run, same_output)

SECRET = b"the cluster's secret, 32 bytes or more"
MAC = ChunkMac(SECRET)
OTHER = ChunkMac(b"another cluster's secret, also long enough")
PAYLOAD = 8192
NS = "c" * 32


def chunk(seed: int = 0) -> ChunkData:
    rng = np.random.default_rng(seed)
    return ChunkData(ChunkMeta("uint8", (PAYLOAD,)), rng.integers(0, 256, PAYLOAD, np.uint8))


def blob(key: ChunkKey, c: ChunkData, mac: ChunkMac | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode(key, c, mac))


def tamper(data: bytes) -> bytes:
    """A signed chunk's payload changed and every checksum recomputed (the MAC kept):
    what someone without the key makes of a chunk written with it."""
    out = bytearray(data)
    out[HEADER_SIZE + 5] ^= 0xFF
    struct.pack_into("<Q", out, 20, xxhash.xxh3_64_intdigest(bytes(out[HEADER_SIZE:])))
    struct.pack_into("<I", out, 76, xxhash.xxh32_intdigest(bytes(out[:76])))
    return bytes(out)


def disk(path: Path, mac: ChunkMac | None = None) -> DiskTier:
    return DiskTier(DiskConfig(path=str(path), max_bytes=64 * 1024**2), mac=mac)


# -- the format ---------------------------------------------------------------


def test_signed_chunks_read_with_or_without_the_key_and_forgeries_do_not() -> None:
    key = ChunkKey(b"k" * 16)
    signed, plain = blob(key, chunk(), MAC), blob(key, chunk())
    assert signed[9] == FLAG_MAC and plain[9] == 0 and len(signed) == len(plain)
    for data, mac in [(signed, MAC), (signed, None), (plain, None)]:
        assert np.array_equal(decode(key, data, mac).payload, chunk().payload)
    def mac_field(at: int) -> bytes:  # one bit of the MAC field flipped
        out = bytearray(signed)
        out[SIGNED_SIZE + at] ^= 0x01
        return bytes(out)

    moved = blob(ChunkKey(b"m" * 16), chunk(), MAC)  # signed under another chunk key
    forged = {"no MAC": plain, "another key's MAC": blob(key, chunk(), OTHER),
              "tampered, checksums recomputed": tamper(signed), "nonce": mac_field(0),
              "tag": mac_field(20), "algorithm": mac_field(30),
              "another chunk's MAC": signed[:SIGNED_SIZE] + moved[SIGNED_SIZE:]}
    assert MAC.sign(b"h", chunk().payload) != MAC.sign(b"h", chunk().payload)  # fresh nonces
    for what, data in forged.items():
        with pytest.raises(ForgedChunk):
            decode(key, data, MAC)
    decode(key, forged["tampered, checksums recomputed"])  # passes every checksum


def test_damage_to_a_signed_chunk_is_corrupt_and_unknown_flags_are_foreign() -> None:
    key = ChunkKey(b"k" * 16)
    damaged = bytearray(blob(key, chunk(), MAC))
    damaged[HEADER_SIZE + 5] ^= 0xFF  # checksum not recomputed: damage, not forgery
    with pytest.raises(CorruptChunk) as exc:
        decode(key, bytes(damaged), MAC)
    assert not isinstance(exc.value, ForgedChunk)
    later = bytearray(blob(key, chunk()))
    later[9] = 0x80  # a flag of a later release, its header checksum right
    struct.pack_into("<I", later, 76, xxhash.xxh32_intdigest(bytes(later[:76])))
    with pytest.raises(ForeignChunk):
        decode(key, bytes(later))


# -- disk -----------------------------------------------------------------------


def test_chunks_planted_on_disk_without_the_key_are_forged_misses_then_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = new_keys(3)
    planter = disk(tmp_path)  # write access to the folder, not the key
    planter.put_many([(k, chunk(i)) for i, k in enumerate(keys)])
    reader = disk(tmp_path, MAC)
    with caplog.at_level(logging.WARNING):
        assert reader.get_many(keys) == [None] * 3
        assert reader.get_many(keys[:1]) == [None]  # gone: a plain miss now
    s = reader.stats
    assert (s.forged, s.corrupt, s.hits, s.misses) == (3, 0, 0, 4)
    assert sum("integrity.key_file" in r.getMessage() for r in caplog.records) == 1
    # Deleted: no more promised hits that fail, and the real chunks can be written.
    assert reader.contains_many(keys) == [False] * 3
    assert reader.put_many([(k, chunk(i + 10)) for i, k in enumerate(keys)]) == [True] * 3
    got = reader.get_many(keys)
    assert all(same(c, chunk(i + 10)) for i, c in enumerate(got)) and reader.stats.forged == 3
    assert all(same(c, chunk(i + 10)) for i, c in enumerate(planter.get_many(keys)))


@pytest.mark.parametrize("how", ["another key", "tampered"])
def test_a_forged_file_on_disk_is_a_forged_miss(tmp_path: Path, how: str) -> None:
    key = new_keys(1)[0]
    writer = disk(tmp_path, OTHER if how == "another key" else MAC)
    writer.put_many([(key, chunk())])
    path = writer.path_of(key)
    if how == "tampered":
        path.write_bytes(tamper(path.read_bytes()))
    reader = disk(tmp_path, MAC)
    assert reader.get_many([key]) == [None] and reader.stats.forged == 1
    assert not path.exists()


def test_a_reader_never_deletes_a_chunk_that_replaced_the_forged_one(tmp_path: Path) -> None:
    key = new_keys(1)[0]
    disk(tmp_path).put_many([(key, chunk(1))])
    reader = disk(tmp_path, MAC)
    read = reader._get(key)  # read, its MAC not checked yet
    assert isinstance(read, tuple)
    path = reader.path_of(key)
    good = tmp_path / "good"
    good.write_bytes(blob(key, chunk(2), MAC))
    good.replace(path)  # a writer with the key replaces the file meanwhile
    assert reader._check(read) is None and reader.stats.forged == 1
    assert same(reader.get_many([key])[0], chunk(2))


# -- Redis ----------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_chunks_planted_in_redis_without_the_key_are_forged_misses_then_replaced(
        redis_server: RedisProcess, split: bool) -> None:
    from kvtier.tiers.redis import RedisTier

    cfg = RedisConfig(url=redis_server.url, max_value_bytes=4096 if split else 4 * 1024**2)
    keys = new_keys(3)
    planter = RedisTier(cfg)
    assert planter.put_many([(k, chunk(i)) for i, k in enumerate(keys)]) == [True] * 3
    reader = RedisTier(cfg, mac=MAC)
    assert reader.get_many(keys) == [None] * 3
    assert (reader.stats.forged, reader.stats.corrupt) == (3, 0)
    assert reader.contains_many(keys) == [False] * 3  # deleted, parts and all
    assert reader.put_many([(k, chunk(i + 10)) for i, k in enumerate(keys)]) == [True] * 3
    assert all(same(c, chunk(i + 10)) for i, c in enumerate(reader.get_many(keys)))
    assert all(same(c, chunk(i + 10)) for i, c in enumerate(planter.get_many(keys)))
    other = RedisTier(cfg, mac=OTHER)  # another cluster's key on the same server
    assert other.get_many(keys[:1]) == [None] and other.stats.forged == 1
    for t in (planter, reader, other):
        t.close()


# -- peers ----------------------------------------------------------------------


def serve(mac: ChunkMac | None, n: int = 4) -> TransferServer:
    mem = MemoryTier((n + 1) * PAYLOAD, PAYLOAD)
    for i in range(n):
        mem.put_many([(chunk_key(i), chunk_data(i, PAYLOAD))])
    return TransferServer(ChunkStore([mem]), TransferConfig(token="tok"), NS, port=0, mac=mac)


def peer(address: str, mac: ChunkMac | None) -> PeerTier:
    cfg = PeerConfig(peers=[address], timeout_s=2.0, contains_timeout_s=2.0, backoff_s=0.0,
                     cache_s=0.0)
    return PeerTier(cfg, token="tok", namespace=NS, mac=mac)


@pytest.mark.parametrize("server_key", ["none", "another"])
def test_a_peer_without_the_key_serves_only_forged_misses(server_key: str) -> None:
    server = serve(None if server_key == "none" else OTHER)
    try:
        tier = peer(server.address, MAC)
        assert tier.contains_many([chunk_key(i) for i in range(4)]) == [True] * 4
        assert tier.get_many([chunk_key(i) for i in range(4)]) == [None] * 4
        assert (tier.stats.forged, tier.stats.corrupt, tier.stats.hits) == (4, 0, 0)
        tier.close()
    finally:
        server.close()


def test_a_peer_with_the_key_is_read_by_peers_with_or_without_it() -> None:
    server = serve(MAC)
    try:
        for mac in (MAC, None):
            tier = peer(server.address, mac)
            got = tier.get_many([chunk_key(i) for i in range(4)])
            assert all(c is not None and np.array_equal(c.payload, chunk_payload(i, PAYLOAD))
                       for i, c in enumerate(got))
            assert tier.stats.forged == tier.stats.corrupt == 0
            for c in got:
                c.release()  # type: ignore[union-attr]
            tier.close()
    finally:
        server.close()


# -- configuration ----------------------------------------------------------------


def key_file(tmp_path: Path, text: bytes = b"0123456789abcdef" * 4 + b"\n") -> str:
    path = tmp_path / "kvtier.key"
    path.write_bytes(text)
    return str(path)


def test_the_key_file_from_the_environment_signs_the_shared_tiers(tmp_path: Path) -> None:
    cfg = load_config(env={"KVTIER_INTEGRITY__KEY_FILE": key_file(tmp_path)},
                      engine={"tiers": ["memory", "disk"], "disk.path": str(tmp_path / "d")})
    store = build_store(cfg, PAYLOAD)
    assert store is not None
    tier = store.tier("disk")
    assert isinstance(tier, DiskTier) and tier.mac is not None
    store.close()
    plain = build_store(load_config(env={}, engine={"tiers": ["disk"],
                                                    "disk.path": str(tmp_path / "d")}), None)
    assert plain is not None and plain.tier("disk").mac is None  # type: ignore[attr-defined]
    plain.close()


@pytest.mark.parametrize("content", [b"", b"short", b"  " + b"x" * 31 + b"\n\n"])
def test_a_short_or_missing_key_file_stops_start_up(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, engine={"integrity.key_file": key_file(tmp_path, content)})
    assert exc.value.key == "integrity.key_file" and "at least 32" in str(exc.value)
    with pytest.raises(ConfigError, match="integrity.key_file.*cannot read"):
        load_config(env={"KVTIER_INTEGRITY__KEY_FILE": str(tmp_path / "none")})


def test_the_key_is_never_accepted_inline(tmp_path: Path) -> None:
    secret = "s3cret-" * 8
    yaml_file = tmp_path / "kvtier.yaml"
    yaml_file.write_text(f"integrity:\n  key: {secret}\n")
    for source in [dict(engine={"integrity.key": secret}),
                   dict(engine={"integrity": {"key": secret, "key_file": "/k"}}),
                   dict(env={"KVTIER_INTEGRITY__KEY": secret}),
                   dict(path=str(yaml_file)),
                   dict(engine={"integrity": secret})]:
        with pytest.raises(ConfigError) as exc:
            load_config(**{"env": {}, **source})  # type: ignore[arg-type]
        assert exc.value.key in ("integrity.key", "integrity")
        assert secret not in str(exc.value)


def test_a_key_without_cryptography_stops_start_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cryptography" else real(name, *a))
    with pytest.raises(ConfigError, match="integrity.key_file.*cryptography"):
        load_config(env={}, engine={"integrity.key_file": key_file(tmp_path)})
    load_config(env={}, engine={})  # no key: no MAC is needed
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers", None)
    with pytest.raises(ImportError, match="kvtier\\[integrity\\]"):
        ChunkMac(SECRET)


# -- inside vLLM ------------------------------------------------------------------


@pytest.mark.vllm
def test_a_keyed_instance_misses_chunks_planted_without_the_key(model: str,
                                                                tmp_path: Path) -> None:
    """A process with write access to the folder, not the key, plants checksum-valid
    chunks of wrong KV under an instance's real keys. An instance without the key serves
    them; one with the key misses them (its answer is its answer on an empty folder) and
    replaces them with its own."""
    from kvtier.testing.vllm_cpu import key_namespace

    prompt = doc(model, 21)
    keyed = {"model_id": "integrity-test", "integrity.key_file": key_file(tmp_path)}
    (cold,), = run(model, [[req(prompt)]], kvtier_cfg(tmp_path / "empty", ["disk"], **keyed))
    assert cold["num_cached_tokens"] == 0
    keys = ChunkHasher(key_namespace(model, {"model_id": "integrity-test"})).keys(prompt)
    genuine = disk(tmp_path / "empty" / "chunks").get_many(keys)  # no key: reads signed ones
    assert all(c is not None for c in genuine), "the instance should have stored 4 chunks"
    planter = disk(tmp_path / "attacked" / "chunks")
    planter.put_many([(k, ChunkData(c.meta, np.zeros_like(c.payload)))  # type: ignore[union-attr]
                      for k, c in zip(keys, genuine)])
    attacked = kvtier_cfg(tmp_path / "attacked", ["disk"], model_id="integrity-test")
    (served,), = run(model, [[req(prompt)]], attacked)  # without the key: the attack works
    assert served["num_cached_tokens"] == 4 * TOKENS and not same_output(served, cold)
    (warm,), = run(model, [[req(prompt)]], {**attacked, **keyed})
    # The worker read the planted chunks (prefetched as the request arrived, or loading
    # the hit the scheduler promised from their presence) and found them forged: the
    # whole prompt is computed, as on the empty folder.
    assert warm["num_cached_tokens"] == 0 and same_output(warm, cold)
    signer = ChunkMac((tmp_path / "kvtier.key").read_bytes().strip())  # the instance's key
    reader = disk(tmp_path / "attacked" / "chunks", signer)
    got = reader.get_many(keys)  # the forged files were replaced by the instance's own
    assert all(c is not None for c in got) and reader.stats.forged == 0
