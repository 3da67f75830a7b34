"""Management API over real HTTP (uvicorn on 127.0.0.1), on a real store (memory + disk
tiers) and cache engine: every operation, pins with a time to live, metrics, and the
operations' effect on what the engine loads."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from kvtier.config import ControlConfig, DiskConfig
from kvtier.control.api import CacheAPI
from kvtier.control.client import ControlClient, ControlError, encode_chunk
from kvtier.control.server import ControlServer
from kvtier.engine.cache_engine import CacheEngine
from kvtier.engine.layout import LayoutKind, PagedLayout
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier

LAY = PagedLayout(LayoutKind.VLLM_CPU, 2, 2, 8, 4, "float32")
CHUNK_BYTES = LAY.chunk_nbytes(2)
TOKEN = "s3cret-token"


@dataclass
class Setup:
    """A served store with a prompt of 4 chunks stored in memory and on disk."""

    server: ControlServer
    store: ChunkStore
    engine: CacheEngine
    tokens: list[int]
    url: str


def make_setup(path: Path, memory_chunks: int = 32, token: str = "", track_events: bool = False,
               **cfg: Any) -> Setup:
    store = ChunkStore([MemoryTier(memory_chunks * CHUNK_BYTES, CHUNK_BYTES),
                        DiskTier(DiskConfig(path=str(path / "disk")))],
                       track_events=track_events)
    hasher = ChunkHasher(Namespace("m", LAY.signature(), 8))
    engine = CacheEngine(hasher, LAY, store)
    engine.register([torch.randn(LAY.layer_shape(20)) for _ in range(2)])
    tokens = list(range(100, 132))  # 4 chunks
    engine.store_kv(tokens, list(range(8)))
    store.flush(10)
    server = ControlServer(CacheAPI(store, hasher, LAY), ControlConfig(token=token, **cfg), 0)
    return Setup(server, store, engine, tokens, server.url)


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = make_setup(tmp_path)
    yield s
    s.server.close()
    s.store.close()


def call(url: str, op: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    data = json.dumps({} if body is None else body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{url}/v1/{op}", data, headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str, token: str = "") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers),
                                    timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def loads_bitwise(s: Setup) -> bool:
    """Whether the stored prompt loads into fresh blocks exactly as it was computed."""
    src = s.engine._kv
    dst = [torch.zeros(LAY.layer_shape(20)) for _ in range(2)]
    s.engine.register(dst)
    try:
        if not s.engine.retrieve_kv(s.tokens, list(range(10, 18)), 32).complete:
            return False
        return all(torch.equal(src[l][b], dst[l][b + 10]) for l in range(2) for b in range(8))
    finally:
        s.engine.register(src)


def test_lookup_by_tokens_and_keys(setup: Setup) -> None:
    code, res = call(setup.url, "lookup", {"tokens": setup.tokens + [1, 2]})
    assert code == 200 and res["hit_chunks"] == 4 and res["hit_tokens"] == 32
    assert res["tiers"] == {"memory": [True] * 4, "disk": [True] * 4}
    code, res2 = call(setup.url, "lookup", {"keys": res["keys"][:2]})
    assert res2["hit_chunks"] == 2 and res2["hit_tokens"] is None
    assert call(setup.url, "lookup", {"tokens": setup.tokens, "salt": "x"})[1]["hit_chunks"] == 0


def test_lookup_by_tokens_counts_a_stored_head_of_the_next_chunk(tmp_path: Path) -> None:
    """With partial chunks on, a prompt that parts from a stored one inside a chunk
    still has that chunk's stored blocks: lookup reports them as a load would."""
    store = ChunkStore([MemoryTier(32 * CHUNK_BYTES, CHUNK_BYTES)])
    hasher = ChunkHasher(Namespace("m", LAY.signature(), 8), store_partial=True,
                         granule=LAY.block_size)
    engine = CacheEngine(hasher, LAY, store)
    engine.register([torch.randn(LAY.layer_shape(20)) for _ in range(2)])
    tokens = list(range(100, 128))  # 3 chunks of 8 + one block of 4 (the partial chunk)
    assert engine.store_kv(tokens, list(range(7))) == 4
    server = ControlServer(CacheAPI(store, hasher, LAY), port=0)
    try:
        other = tokens + [7, 7, 7, 7]  # the same first 28 tokens, then another block
        code, res = call(server.url, "lookup", {"tokens": other})
        assert code == 200 and res["hit_chunks"] == 3 and res["hit_tokens"] == 28
        assert res["hit_keys"][:3] == res["keys"][:3] and len(res["hit_keys"]) == 4
        assert res["hit_keys"][3] != res["keys"][3]  # the head's own key
        assert engine.lookup_hit(other).tokens == 28  # what the engine would load
    finally:
        server.close()
        store.close()


def test_evict_pin_move_clear(setup: Setup) -> None:
    url = setup.url
    keys = call(url, "lookup", {"tokens": setup.tokens})[1]["keys"]
    assert call(url, "pin", {"keys": keys[:1]})[1] == {"pinned": 1, "expires_in_s": None}
    assert call(url, "evict", {"keys": keys[:2], "tier": "memory"})[1] == {"removed": 1}
    assert call(url, "unpin", {"keys": keys[:1]})[1] == {"unpinned": 1, "ok": True}
    assert call(url, "unpin", {"keys": keys[:1]})[1]["unpinned"] == 0  # the API's pin only
    where = call(url, "lookup", {"keys": keys})[1]["tiers"]
    assert where["memory"] == [True, False, True, True]
    assert call(url, "evict", {"keys": keys[1:2], "tier": "disk"})[1] == {"removed": 1}
    assert call(url, "move", {"keys": keys[1:], "from": "disk", "to": "memory"})[1] == \
        {"moved": 2}  # chunk 1 is nowhere now
    assert call(url, "move", {"keys": keys[2:], "from": "memory", "to": "disk"})[1] == \
        {"moved": 2}
    where = call(url, "lookup", {"keys": keys})[1]["tiers"]
    assert where == {"memory": [True, False, False, False], "disk": [True, False, True, True]}
    assert call(url, "clear", {"tier": "disk"})[1] == {"removed": 3}
    assert call(url, "lookup", {"tokens": setup.tokens})[1]["hit_chunks"] == 1
    assert call(url, "clear")[1] == {"removed": 1}  # no tier: every tier
    assert setup.store.lookup(setup.engine.hasher.keys(setup.tokens)) == 0


def test_memory_changes_reach_the_schedulers_index_as_store_events(tmp_path: Path) -> None:
    """vLLM's scheduler knows the worker's memory tier only from these events."""
    s = make_setup(tmp_path, track_events=True)
    try:
        keys = s.engine.hasher.keys(s.tokens)
        s.store.drain_events()
        assert call(s.url, "move", {"tokens": s.tokens, "from": "memory", "to": "disk"}
                    )[1] == {"moved": 4}
        assert s.store.drain_events().evicted == keys
        assert call(s.url, "move", {"keys": [k.hex() for k in keys[:2]], "from": "disk",
                                    "to": "memory"})[1] == {"moved": 2}
        assert s.store.drain_events().stored == keys[:2]
        assert call(s.url, "clear", {"tier": "memory"})[1] == {"removed": 2}
        assert sorted(s.store.drain_events().evicted) == sorted(keys[:2])
    finally:
        s.server.close()
        s.store.close()


def test_move_to_disk_keeps_serving_the_same_kv(setup: Setup) -> None:
    assert call(setup.url, "move", {"tokens": setup.tokens, "from": "memory", "to": "disk"}
                )[1] == {"moved": 4}
    where = call(setup.url, "lookup", {"tokens": setup.tokens})[1]["tiers"]
    assert where == {"memory": [False] * 4, "disk": [True] * 4}
    assert loads_bitwise(setup)  # from disk, promoted into memory


def test_a_pin_outlives_eviction_pressure_and_its_ttl_releases_it(tmp_path: Path) -> None:
    s = make_setup(tmp_path, memory_chunks=6)
    try:
        keys = call(s.url, "lookup", {"tokens": s.tokens})[1]["keys"]
        assert call(s.url, "pin", {"keys": keys[:2], "ttl_s": 0.5})[1]["pinned"] == 2
        other = list(range(500, 532))
        s.engine.store_kv(other, list(range(8, 16)))  # 4 more chunks in 6 slots
        assert call(s.url, "lookup", {"keys": keys})[1]["tiers"]["memory"][:2] == [True, True]
        status = json.loads(get(s.url, "/v1/status")[1])
        assert status["pinned_chunks"] == 2
        deadline = time.monotonic() + 30
        while json.loads(get(s.url, "/v1/status")[1])["pinned_chunks"]:
            assert time.monotonic() < deadline, "the pin did not expire"
            time.sleep(0.05)
        assert not any(s.store.memory.is_pinned(k) for k in s.engine.hasher.keys(s.tokens))
        s.engine.store_kv(list(range(700, 732)), list(range(8, 16)))  # pressure again
        assert call(s.url, "lookup", {"keys": keys})[1]["tiers"]["memory"][:2] == [False, False]
    finally:
        s.server.close()
        s.store.close()


def test_compressed_chunks_still_load_bitwise_and_pins_survive_recoding(setup: Setup) -> None:
    url = setup.url
    assert call(url, "pin", {"tokens": setup.tokens})[1]["pinned"] == 4
    for tier in ("memory", "disk"):
        assert call(url, "compress", {"tokens": setup.tokens, "tier": tier})[1] == {"recoded": 4}
    keys = setup.engine.hasher.keys(setup.tokens)
    assert all(setup.store.memory.is_pinned(k) for k in keys)
    assert loads_bitwise(setup)
    assert call(url, "decompress", {"tokens": setup.tokens, "tier": "disk"})[1] == {"recoded": 4}
    assert call(url, "evict", {"tokens": setup.tokens, "tier": "memory"})[1] == {"removed": 0}
    assert call(url, "unpin", {"tokens": setup.tokens})[1]["unpinned"] == 4
    assert call(url, "evict", {"tokens": setup.tokens, "tier": "memory"})[1] == {"removed": 4}
    assert loads_bitwise(setup)  # from the decompressed disk copies


def test_status_and_prometheus_metrics(setup: Setup) -> None:
    code, body = get(setup.url, "/v1/status")
    status = json.loads(body)
    assert code == 200 and status["tiers"]["memory"]["num_chunks"] == 4
    assert status["tiers"]["disk"]["write_queue"] == 0
    assert status["tiers"]["disk"]["forged"] == 0
    assert status["tiers"]["memory"]["write_queue"] is None
    hits = status["tiers"]["memory"]["hits"]
    assert hits == 0  # the store's own references (for its writers) are not reads
    setup.store.get_many(setup.engine.hasher.keys(setup.tokens)[:1])[0].release()
    code, text = get(setup.url, "/metrics")
    lines = text.decode().splitlines()
    for name, kind in [("kvtier_tier_hits_total", "counter"),
                       ("kvtier_tier_failures_total", "counter"),
                       ("kvtier_tier_used_bytes", "gauge"),
                       ("kvtier_writer_queue_chunks", "gauge"),
                       ("kvtier_control_request_duration_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in lines
    assert f'kvtier_tier_hits_total{{tier="memory"}} {hits + 1:.1f}' in lines
    assert 'kvtier_tier_chunks{tier="disk"} 4.0' in lines
    assert f'kvtier_tier_capacity_bytes{{tier="memory"}} {32 * 256 * 8:.1f}' in lines

    assert 'kvtier_tier_failures_total{cause="corrupt",tier="disk"} 0.0' in lines
    assert 'kvtier_tier_failures_total{cause="forged",tier="disk"} 0.0' in lines
    assert 'kvtier_writer_queue_capacity_chunks{tier="disk"} 256.0' in lines
    assert 'kvtier_control_requests_total{code="200",op="status"} 1.0' in lines


def test_load_and_store_latency_histograms(setup: Setup) -> None:
    setup.engine.retrieve_kv(setup.tokens, list(range(8, 16)), len(setup.tokens))
    lines = get(setup.url, "/metrics")[1].decode().splitlines()
    assert "# TYPE kvtier_load_seconds histogram" in lines
    assert "# TYPE kvtier_store_seconds histogram" in lines
    assert 'kvtier_load_seconds_bucket{le="+Inf"} 1.0' in lines  # one batch each
    assert 'kvtier_store_seconds_bucket{le="+Inf"} 1.0' in lines
    assert any(line.startswith("kvtier_load_seconds_sum ") for line in lines)


def test_snapshot_lists_what_each_tier_holds(setup: Setup) -> None:
    code, body = get(setup.url, "/v1/snapshot")
    snap = json.loads(body)
    keys = sorted(k.hex() for k in setup.engine.hasher.keys(setup.tokens))
    assert code == 200 and sorted(snap["tiers"]["memory"]) == keys
    assert sorted(snap["tiers"]["disk"]) == keys


def test_health_and_openapi(setup: Setup) -> None:
    assert get(setup.url, "/health") == (200, b'{"status":"ok"}')
    spec = json.loads(get(setup.url, "/openapi.json")[1])
    ops = {p.removeprefix("/v1/") for p in spec["paths"]}
    assert {"lookup", "admit", "evict", "move", "clear", "pin", "unpin", "compress",
            "decompress", "status", "/health", "/metrics"} <= ops
    assert get(setup.url, "/docs")[0] == 200


@pytest.mark.parametrize("op,body,field", [
    ("lookup", {"tokens": "abc"}, "tokens"),
    ("lookup", {"tokens": [-1]}, "tokens.0"),
    ("lookup", {"keys": ["zz"]}, "keys.0"),
    ("lookup", {"keys": ["ab"]}, "keys.0"),
    ("lookup", {}, "body"),
    ("lookup", {"tokens": [1], "keys": []}, "body"),
    ("lookup", {"tokens": [1], "colour": 1}, "colour"),
    ("evict", {"tokens": [1], "tier": "ssd"}, "tier"),
    ("move", {"tokens": [1], "from": "memory"}, "to"),
    ("move", {"tokens": [1], "from": "memory", "to": "memory"}, "to"),
    ("pin", {"tokens": [1], "ttl_s": -1}, "ttl_s"),
    ("compress", {"tokens": [1], "tier": "memory", "codec": "lz5"}, "codec"),
    ("compress", {"tokens": [1]}, "tier"),
])
def test_bad_input_is_a_400_naming_the_field(setup: Setup, op: str, body: dict,
                                             field: str) -> None:
    code, res = call(setup.url, op, body)
    assert code == 400 and res["error"].startswith(f"{field}:"), res


def test_unknown_endpoint_and_bad_json(setup: Setup) -> None:
    assert call(setup.url, "explode")[0] == 404
    req = urllib.request.Request(f"{setup.url}/v1/lookup", b"{not json",
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and json.loads(err.value.read())["error"].startswith("body:")


def test_ctl_client_round_trip(setup: Setup) -> None:
    client = ControlClient(setup.url)
    assert client.health() == {"status": "ok"}
    assert client.call("lookup", {"tokens": setup.tokens})["hit_chunks"] == 4
    with pytest.raises(ControlError) as err:
        client.call("evict", {"tokens": setup.tokens, "tier": "ssd"})
    assert err.value.status == 400 and err.value.message.startswith("tier:")
    chunk = setup.store.get_many(setup.engine.hasher.keys(setup.tokens)[:1])[0]
    try:
        assert encode_chunk(setup.engine.hasher.keys(setup.tokens)[0], chunk)
    finally:
        chunk.release()


def test_kvtier_ctl_prints_tables_and_json(setup: Setup, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli.main import main

    (tmp_path / "prompt").write_text(" ".join(map(str, setup.tokens)))
    ctl = ["ctl", "--url", setup.url]
    assert main([*ctl, "lookup", "--tokens-file", str(tmp_path / "prompt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 of 4 chunks stored, 32 tokens would load"
    assert out[1].split() == ["#", "key", "memory", "disk"] and out[2].split()[2:] == ["yes"] * 2
    assert main([*ctl, "evict", "--tokens", ",".join(map(str, setup.tokens)), "--tier",
                 "memory"]) == 0
    assert capsys.readouterr().out.strip() == "removed: 4"
    assert main([*ctl, "--json", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"]["disk"]["num_chunks"] == 4
    assert main([*ctl, "status"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["tier", "chunks", "used"] and rows[3].split()[:2] == \
        ["disk", "4"]
    assert main([*ctl, "move", "--keys", "ab", "--from", "disk", "--to", "memory"]) == 1
    assert capsys.readouterr().err.startswith("kvtier ctl move: 400: keys.0:")
