"""What kvtier's cost grows with (issue 26): a partial-chunk lookup asks each tier once,
a LoRA adapter is hashed off the scheduler thread, and `kvtier bench scale` runs."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import pytest

from kvtier.codecs import ChunkMeta
from kvtier.config import PeerConfig, RedisConfig, TransferConfig, load_config
from kvtier.connectors.vllm.keys import Bypass
from kvtier.connectors.vllm.lora import lora_identity
from kvtier.connectors.vllm.scheduler import SchedulerPlanner
from kvtier.keys import ChunkHasher, ChunkKey, Namespace
from kvtier.store import ChunkStore, PrefixHit, lookup_hit, lookup_prefix
from kvtier.testing.redis_proc import RedisProcess
from kvtier.tiers.base import Tier
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.peer import PeerTier
from kvtier.transfer.server import TransferServer
from tests.redis_server import require_redis
from tests.tier_conformance import make_chunk

CS, G = 256, 16
META = ChunkMeta("uint8", (1024,))
NS = "b" * 32


class Counting:
    """A real tier, with its presence calls counted (each is one round trip to Redis or a
    peer: RedisTier sends one pipeline, PeerTier one CONTAINS per peer)."""

    def __init__(self, tier: Tier) -> None:
        self.tier, self.calls = tier, 0

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self.calls += 1
        return self.tier.contains_many(keys)


def sequential_hit(sources: Sequence[Any], hasher: ChunkHasher, tokens: list[int]) -> PrefixHit:
    """The lookup before issue 26: one presence call per candidate head, longest first."""
    keys = hasher.keys(tokens)
    h = lookup_prefix(sources, keys)
    hit = PrefixHit(list(keys[:h]), min(h * CS, hasher.covered(len(tokens))), h)
    if h == len(keys):
        return hit
    for t in range(hasher.chunk_tokens(h, len(tokens)) - G, 0, -G):
        key = hasher.sub_key(keys, tokens, h, t)
        if lookup_prefix(sources, [key]):
            return PrefixHit(hit.keys + [key], h * CS + t, h)
    return hit


DOC = list(range(1000, 1000 + 2 * CS + 64))  # 2 chunks and 4 blocks of a third
STORED = DOC + [1, 2, 3, 4, 5, 6, 7]  # its last partial chunk: the 64 tokens in whole blocks
PROMPTS = {
    "parts after the stored head": DOC + list(range(50, 350)),
    "parts inside the stored head": DOC[:2 * CS + 30] + list(range(50, 350)),
    "is the stored prompt": STORED,
    "shares nothing": list(range(5, 700)),
    "shares one chunk": DOC[:CS] + list(range(9, 400)),
}


def hasher() -> ChunkHasher:
    return ChunkHasher(Namespace("m", "l", CS), store_partial=True, granule=G)


def check_one_call_per_tier(remote: Tier, fill: Callable[[list], object]) -> None:
    """``remote`` holds what ``fill`` stores; every prompt's hit, looked up in memory then
    ``remote``, is the sequential lookup's, with at most two presence calls to ``remote``."""
    h = hasher()
    keys = h.keys(STORED)
    assert len(keys) == 3  # two chunks and the 64-token head of the third
    fill([(k, make_chunk(META, i)) for i, k in enumerate(keys)])
    memory = MemoryTier(8 * META.raw_nbytes, META.raw_nbytes)
    memory.put_many([(keys[0], make_chunk(META))])  # the first chunk is in memory too
    for name, prompt in PROMPTS.items():
        new, old = Counting(remote), Counting(remote)
        got = lookup_hit([memory, new], h, prompt)
        want = sequential_hit([memory, old], h, prompt)
        assert (got.keys, got.tokens, got.chunks) == (want.keys, want.tokens, want.chunks), name
        # At most one call for the whole chunks and one for every candidate head.
        assert new.calls <= 2, name
    found = lookup_hit([memory, Counting(remote)], h, PROMPTS["parts after the stored head"])
    assert (found.tokens, found.chunks) == (2 * CS + 64, 2)
    counted = Counting(remote)
    sequential_hit([memory, counted], h, PROMPTS["parts after the stored head"])
    assert counted.calls == 1 + 12  # before: heads of 240, 224, ..., 64 tokens, one by one
    memory.close()


def test_a_partial_lookup_asks_redis_once_for_every_head(redis_server: RedisProcess) -> None:
    from kvtier.tiers.redis import RedisTier

    tier = RedisTier(RedisConfig(url=redis_server.url, timeout_s=2.0))
    try:
        check_one_call_per_tier(tier, tier.put_many)
    finally:
        tier.close()


def test_a_partial_lookup_asks_a_peer_once_for_every_head() -> None:
    """A PeerTier (no presence cache) reading a real TransferServer over TCP; the
    peer's own count of CONTAINS round trips agrees with the wrapper's."""
    store = ChunkStore([MemoryTier(8 * META.raw_nbytes, META.raw_nbytes)])
    srv = TransferServer(store, TransferConfig(token="tok", timeout_s=2.0), NS, port=0)
    peer = PeerTier(PeerConfig(peers=[srv.address], timeout_s=2.0, contains_timeout_s=2.0,
                               backoff_s=0.0, cache_s=0.0), token="tok", namespace=NS)
    try:
        check_one_call_per_tier(peer, store.put_many)  # fills the store the peer serves
        before = peer.peer_stats["contains_calls"]
        lookup_hit([peer], hasher(), PROMPTS["parts after the stored head"])
        assert peer.peer_stats["contains_calls"] - before == 2  # the chunks, then the heads
    finally:
        peer.close()
        srv.close()
        store.close()


# -- LoRA adapters are hashed off the scheduler thread -----------------------------

_OPENS: list[tuple[str, str]] | None = None  # (thread name, path) while a test records


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENS is not None and isinstance(args[0], (str, Path)):
        _OPENS.append((threading.current_thread().name, str(args[0])))


sys.addaudithook(_audit)  # for the process's life; records only while _OPENS is a list


def planner() -> SchedulerPlanner:
    ns = Namespace("m", "vllm_cpu:L4:H1:D64:B16:bfloat16", CS)
    return SchedulerPlanner(load_config(engine={"store_partial_chunks": False}), [ns], G,
                            shared=None)


def lora_request(req_id: str, adapter: Path | None) -> Any:
    lora = None if adapter is None else SimpleNamespace(lora_path=str(adapter), lora_name="x",
                                                        lora_int_id=1)
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(range(7, 7 + 600)),
                           prompt_embeds=None, mm_features=[], lora_request=lora,
                           cache_salt=None)


def test_a_lora_adapter_is_hashed_off_the_scheduler_thread(tmp_path: Path) -> None:
    global _OPENS
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "wb") as f:  # large and sparse: reading it is slow, stat is not
        f.truncate(256 << 20)
    p = planner()
    _OPENS = []
    try:
        assert p.num_new_matched_tokens(lora_request("first", adapter), 0) == 0
        assert p.bypasses[Bypass.LORA_PENDING.value] == 1 and "first" not in p._reqs
        assert p.loras.wait(300.0)
        p.num_new_matched_tokens(lora_request("second", adapter), 0)
        p.num_new_matched_tokens(lora_request("base", None), 0)
        mine = threading.current_thread().name
        assert not [path for who, path in _OPENS if who == mine and str(adapter) in path]
        assert {who for who, path in _OPENS if str(adapter) in path} == {"kvtier-lora_0"}
    finally:
        _OPENS = None
    first_id = lora_identity(str(adapter))
    want = p._base[0].with_inputs(None, first_id).keys(list(range(7, 607)))
    assert p._reqs["second"].keys[0] == want != p._reqs["base"].keys[0]
    assert p.bypasses[Bypass.LORA_PENDING.value] == 1  # the second used the digest
    # The adapter changes (retrained): a new identity, after one more bypass.
    with open(weights, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"retrained")
    os.utime(weights, ns=(1, 1))  # a new stamp even on a coarse clock
    p.num_new_matched_tokens(lora_request("third", adapter), 0)
    assert p.bypasses[Bypass.LORA_PENDING.value] == 2 and "third" not in p._reqs
    assert p.loras.wait(300.0)
    p.num_new_matched_tokens(lora_request("fourth", adapter), 0)
    assert lora_identity(str(adapter)) != first_id
    assert p._reqs["fourth"].keys[0] != p._reqs["second"].keys[0]
    assert not p.build(SimpleNamespace(  # the bypassed requests plan no load or save
        scheduled_new_reqs=[SimpleNamespace(req_id="third", block_ids=([1, 2],),
                                            num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(),
                                              new_block_ids=[], num_computed_tokens=[]),
        num_scheduled_tokens={"third": 600}, total_num_scheduled_tokens=600,
        preempted_req_ids=set())).saves
    p.close()


def test_an_unreadable_adapter_bypasses_without_a_hash(tmp_path: Path) -> None:
    p = planner()
    assert p.num_new_matched_tokens(lora_request("gone", tmp_path / "missing"), 0) == 0
    assert p.bypasses == {Bypass.LORA_UNREADABLE.value: 1}
    p.close()


# -- kvtier bench scale ------------------------------------------------------------

def test_bench_scale_scheduler_quick_prints_its_keys() -> None:
    """The scheduler-overhead part runs end to end (vLLM's scheduler, both connectors)
    and prints one JSON object; its numbers are not judged here (benchmarks, not tests)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli.main", "bench", "scale",
                           "--part", "scheduler", "--quick", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for key in ("scheduler_us_per_step_kvtier", "scheduler_us_per_step_native",
                "scheduler_ratio_vs_native"):
        assert res[key] > 0
    assert res["scheduler_headline"]["running"] == 256
    assert {(p["running"], p["prompt_tokens"]) for p in res["points"]} >= {(256, 1024)}


def test_token_bytes_of_a_list_match_numpys_and_refuse_what_numpy_refuses() -> None:
    """A prompt's list goes the fast way (array('I')); the bytes, so the keys, are the
    same as numpy's little-endian uint32, and ids outside [0, 2**32) are still refused."""
    import numpy as np

    from kvtier.keys import token_bytes

    ids = [0, 1, 255, 256, 65535, 2**31, 2**32 - 1, 7] * 100
    assert token_bytes(ids) == np.asarray(ids, dtype="<u4").tobytes() == token_bytes(
        np.asarray(ids))
    for bad in ([-1], [2**32], [1, 2**40]):
        try:
            token_bytes(bad)
        except ValueError as exc:
            assert "[0, 2**32)" in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")


def _scale(part: str) -> dict:
    """``kvtier bench scale --part PART --toy --json``'s object (toy sizes: the part runs
    end to end against the real servers; its numbers are not judged here)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli.main", "bench", "scale",
                           "--part", part, "--toy", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_scale_controller_ingests_every_event_and_answers_lookups() -> None:
    """Simulated instances over the real events socket: the part itself fails unless the
    index ends up holding every chunk sent and every lookup names the instances holding
    the document, with the index in memory and in a real redis-server."""
    require_redis()
    res = _scale("controller")
    assert {(p["backend"], p["instances"]) for p in res["points"]} == {("memory", 8),
                                                                       ("redis", 8)}
    assert res["controller_lookup_p99_ms"] > 0 and res["controller_lookup_p99_ms_redis"] > 0
    assert res["router_instances"] == 8 and res["router_decision_p99_ms"] > 0
    assert res["controller_bytes_per_million_chunks"] > 0


def test_bench_scale_miss_runs_vllms_own_client_against_both_servers() -> None:
    res = _scale("miss")
    assert set(res["medians"]) == {"vllm", "kvtier-memory"}
    assert res["miss_path_throughput_ratio"] > 0 and res["miss_path_itl_p99_ratio"] > 0
    assert len(res["paired_ratios"]["throughput"]) == res["setup"]["rounds"] == 1


def test_bench_scale_beyond_memory_reads_back_what_native_dropped() -> None:
    """Six documents, a CPU budget of two: native offloading has dropped each document
    by the time it comes back; kvtier's disk tier still holds it."""
    res = _scale("beyond")
    s = res["summary"]
    assert res["setup"]["working_set_over_budget"] >= 2.9
    assert s["kvtier-disk"]["errors"] == 0 and s["native"]["errors"] == 0
    assert s["kvtier-disk"]["hit_rate"] > 0.5
    assert s["kvtier-disk"]["hit_rate"] > s["native"]["hit_rate"] + 0.3


def test_bench_scale_long_context_hits_whole_documents() -> None:
    res = _scale("long")
    assert [p["tokens"] for p in res["points"]] == [1024, 2048]
    for p in res["points"]:
        assert p["kvtier_cached_tokens"] >= p["tokens"] - 256
        assert p["bytes_moved"] == p["kvtier_cached_tokens"] * res["setup"]["kv_bytes_per_token"]
