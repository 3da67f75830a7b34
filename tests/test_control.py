"""Management API over real HTTP on 127.0.0.1, on a real store and cache engine."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch

from kvtier.codecs import ChunkData, ChunkMeta, encode
from kvtier.control.api import CacheAPI
from kvtier.control.http import ControlServer
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import LayoutKind, PagedLayout
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier

LAY = PagedLayout(LayoutKind.VLLM_CPU, 2, 2, 8, 4, "float32")
CHUNK_BYTES = LAY.chunk_nbytes(2)


class Lower(MemoryTier):
    """A second in-process tier standing in for a slower one (a real Tier)."""

    name = "lower"


@pytest.fixture()
def setup():
    store = ChunkStore([MemoryTier(32 * CHUNK_BYTES, CHUNK_BYTES), Lower(32 * CHUNK_BYTES,
                                                                         CHUNK_BYTES)])
    hasher = ChunkHasher(Namespace("m", LAY.signature(), 8))
    engine = CacheEngine(hasher, LAY, store)
    kv = [torch.randn(LAY.layer_shape(20)) for _ in range(2)]
    engine.register(kv)
    tokens = list(range(100, 132))  # 4 chunks
    engine.store_kv(tokens, list(range(8)))
    store.flush(10)
    server = ControlServer(CacheAPI(store, hasher))
    yield server, store, tokens, engine
    server.close()
    store.close()


def call(server: ControlServer, op: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(f"{server.url}/v1/{op}", data,
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_lookup_by_tokens_and_keys(setup) -> None:
    server, _, tokens, _ = setup
    code, res = call(server, "lookup", {"tokens": tokens + [1, 2]})
    assert code == 200 and res["hit_chunks"] == 4 and res["hit_tokens"] == 32
    assert res["tiers"]["memory"] == [True] * 4 and res["tiers"]["lower"] == [True] * 4
    code, res2 = call(server, "lookup", {"keys": res["keys"][:2]})
    assert res2["hit_chunks"] == 2
    assert call(server, "lookup", {"tokens": tokens, "salt": "other"})[1]["hit_chunks"] == 0


def test_lookup_by_tokens_counts_a_stored_head_of_the_next_chunk() -> None:
    """With partial chunks on, a prompt that parts from a stored one inside a chunk
    still has that chunk's stored blocks: lookup reports them as a load would."""
    store = ChunkStore([MemoryTier(32 * CHUNK_BYTES, CHUNK_BYTES)])
    hasher = ChunkHasher(Namespace("m", LAY.signature(), 8), store_partial=True,
                         granule=LAY.block_size)
    engine = CacheEngine(hasher, LAY, store)
    engine.register([torch.randn(LAY.layer_shape(20)) for _ in range(2)])
    tokens = list(range(100, 128))  # 3 chunks of 8 + one block of 4 (the partial chunk)
    assert engine.store_kv(tokens, list(range(7))) == 4
    store.flush(10)
    server = ControlServer(CacheAPI(store, hasher))
    try:
        other = tokens + [7, 7, 7, 7]  # the same first 28 tokens, then another block
        code, res = call(server, "lookup", {"tokens": other})
        assert code == 200 and res["hit_chunks"] == 3 and res["hit_tokens"] == 28
        assert res["hit_keys"][:3] == res["keys"][:3] and len(res["hit_keys"]) == 4
        assert res["hit_keys"][3] != res["keys"][3]  # the head's own key
        assert engine.lookup_hit(other).tokens == 28  # what the engine would load
    finally:
        server.close()
        store.close()


def test_evict_pin_move_clear(setup) -> None:
    server, store, tokens, _ = setup
    keys = call(server, "lookup", {"tokens": tokens})[1]["keys"]
    assert call(server, "pin", {"keys": keys[:1]})[1] == {"pinned": 1}
    assert call(server, "evict", {"keys": keys[:2], "tier": "memory"})[1] == {"removed": 1}
    assert call(server, "unpin", {"keys": keys[:1]})[0] == 200
    where = call(server, "lookup", {"keys": keys})[1]["tiers"]
    assert where["memory"] == [True, False, True, True]
    assert call(server, "move", {"keys": keys[2:], "from": "memory", "to": "lower"})[1] == \
        {"moved": 2}
    assert call(server, "lookup", {"keys": keys})[1]["tiers"]["memory"] == [True, False, False,
                                                                           False]
    assert call(server, "clear", {"tier": "lower"})[1] == {"removed": 4}
    assert call(server, "lookup", {"tokens": tokens})[1]["hit_chunks"] == 1


def test_compressed_chunks_still_load_bitwise(setup) -> None:
    server, store, tokens, engine = setup
    for tier in ("memory", "lower"):
        assert call(server, "compress", {"tokens": tokens, "tier": tier})[1] == {"recoded": 4}
    dst = [torch.zeros(LAY.layer_shape(20)) for _ in range(2)]
    src = engine._kv
    engine.register(dst)
    assert engine.retrieve_kv(tokens, list(range(10, 18)), 32).complete
    assert all(torch.equal(src[l][b], dst[l][b + 10]) for l in range(2) for b in range(8))
    assert call(server, "decompress", {"tokens": tokens, "tier": "lower"})[1] == {"recoded": 4}


def test_admit_status_metrics(setup) -> None:
    server, store, _, _ = setup
    key = bytes(range(16))
    chunk = ChunkData(ChunkMeta("uint8", (64,)), np.arange(64, dtype=np.uint8))
    blob = b"".join(bytes(b) for b in encode(key, chunk))
    req = urllib.request.Request(f"{server.url}/v1/admit?key={key.hex()}&tier=lower", blob)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read()) == {"admitted": 1}
    with urllib.request.urlopen(f"{server.url}/v1/status", timeout=10) as resp:
        status = json.loads(resp.read())
    assert status["tiers"]["lower"]["num_chunks"] == 5
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'kvtier_num_chunks{tier="memory"} 4' in text


@pytest.mark.parametrize("op,body,field", [
    ("lookup", {"tokens": "abc"}, "tokens"),
    ("lookup", {"keys": ["zz"]}, "keys"),
    ("lookup", {"keys": ["ab"]}, "keys"),
    ("evict", {"tokens": [1], "tier": "ssd"}, "tier"),
    ("move", {"tokens": [1], "from": "memory"}, "to"),
    ("compress", {"tokens": [1], "tier": "memory", "codec": "lz5"}, "codec"),
])
def test_bad_input_is_a_400_naming_the_field(setup, op: str, body: dict, field: str) -> None:
    code, res = call(setup[0], op, body)
    assert code == 400 and res["error"].startswith(f"{field}:")


def test_unknown_endpoint_and_bad_json(setup) -> None:
    server = setup[0]
    assert call(server, "explode")[0] == 404
    req = urllib.request.Request(f"{server.url}/v1/lookup", b"{not json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    bad = urllib.request.Request(f"{server.url}/v1/admit?key={'00' * 16}", b"garbage")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400 and b"body:" in err.value.read()
