"""The scheduler side of the vLLM connector, on stand-ins for vLLM's scheduler objects.

The planner is plain Python over a few fields of vLLM's ``Request`` and
``SchedulerOutput``; the stand-ins below carry exactly those fields, so each
rule (bypass, keys per shard, failed loads, namespaces) is checked in
milliseconds; the save rule is in tests/test_vllm_saves.py. tests/test_vllm.py
checks the same rules inside real vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvtier.config import load_config
from kvtier.connectors.vllm.keys import (Bypass, check_supported, model_identity,
                                         request_inputs)
from kvtier.connectors.vllm.lora import LoraIdentities, lora_identity
from kvtier.connectors.vllm.scheduler import KvtierWorkerMeta, SchedulerPlanner
from kvtier.errors import UnsupportedConfig
from kvtier.keys import Namespace

CS, BS = 256, 128


def planner(shards: int = 1, **cfg: Any) -> SchedulerPlanner:
    namespaces = [Namespace("m", "vllm_cpu:L4:H1:D64:B128:bfloat16", CS, tp_rank=r,
                            tp_size=shards) for r in range(shards)]
    return SchedulerPlanner(load_config(engine=cfg), namespaces, BS, shared=None)


def request(req_id: str, n: int, **kw: Any) -> Any:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(range(7, 7 + n)),
                           prompt_embeds=None, mm_features=[], lora_request=None,
                           cache_salt=None, **kw)


def step(new: list[tuple[str, list[int], int, int]] = (),
         cached: list[tuple[str, list[int], int, int]] = (), preempted: set[str] = frozenset()
         ) -> Any:
    """A SchedulerOutput stand-in: (req_id, new block ids, computed before, scheduled)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c)
                            for r, b, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, *_ in cached], resumed_req_ids=set(),
            new_block_ids=[(b,) if b else None for _, b, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached]),
        num_scheduled_tokens={r: s for r, _, _, s in [*new, *cached]},
        total_num_scheduled_tokens=sum(s for *_, s in [*new, *cached]),
        preempted_req_ids=set(preempted))


def done(p: SchedulerPlanner, meta: KvtierWorkerMeta | None = None,
         invalid: set[int] = frozenset()) -> None:
    p.step_done(SimpleNamespace(kv_connector_worker_meta=meta, invalid_block_ids=set(invalid)))


def stored(p: SchedulerPlanner, req_id: str, n: int) -> None:
    """Tell the planner the worker stored the first ``n`` chunks of ``req_id``."""
    done(p, KvtierWorkerMeta(stored=[k for keys in p._reqs[req_id].keys for k in keys[:n]]))


def test_with_tensor_parallelism_a_chunk_hits_only_when_every_rank_has_it() -> None:
    p = planner(shards=2)
    r = request("g", 1100)
    st_keys = None
    p.num_new_matched_tokens(r, 0)
    st_keys = p._reqs["g"].keys
    assert st_keys[0] != st_keys[1]  # each rank's shard under its own keys
    p.index.update(stored=st_keys[0][:4] + st_keys[1][:2])
    assert p.num_new_matched_tokens(r, 0) == 2 * CS
    p.index.update(stored=st_keys[1][2:4])
    assert p.num_new_matched_tokens(r, 0) == 4 * CS


def test_prompt_embeds_and_multimodal_requests_bypass_and_are_counted() -> None:
    p = planner()
    embeds = request("h", 600)
    embeds.prompt_embeds = object()
    image = request("i", 600)
    image.mm_features = [SimpleNamespace(identifier="img")]
    assert p.num_new_matched_tokens(embeds, 0) == 0
    assert p.num_new_matched_tokens(image, 0) == 0
    assert p.bypasses == {Bypass.PROMPT_EMBEDS.value: 1, Bypass.MULTIMODAL.value: 1}
    assert not p.build(step(new=[("h", [1, 2, 3, 4, 5], 0, 600)])).loads
    done(p)
    assert not p.build(step(cached=[("h", [], 600, 1)])).saves


def _adapter(folder: Path, weights: bytes, base: str) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
         "base_model_name_or_path": base}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_lora_identity_is_the_adapters_content(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a", b"weights-1", "/models/base")
    same = _adapter(tmp_path / "copy-under-another-name", b"weights-1", "/elsewhere/base")
    other = _adapter(tmp_path / "b", b"weights-2", "/models/base")
    assert lora_identity(str(a)) == lora_identity(str(same)) != lora_identity(str(other))
    before = lora_identity(str(a))
    (a / "adapter_model.safetensors").write_bytes(b"weights-3, retrained")
    assert lora_identity(str(a)) != before  # a changed adapter never matches the old one
    assert lora_identity(str(tmp_path / "missing")) is None


def test_lora_requests_get_their_own_keys_or_bypass(tmp_path: Path) -> None:
    p = planner()
    adapter = _adapter(tmp_path / "a", b"w", "/m")
    base, lora = request("j", 600), request("k", 600)
    lora.lora_request = SimpleNamespace(lora_path=str(adapter), lora_name="x", lora_int_id=1)
    loras = LoraIdentities()
    assert request_inputs(lora, loras) is Bypass.LORA_PENDING  # hashed in the background
    assert loras.wait(30.0)
    assert request_inputs(lora, loras) == (None, lora_identity(str(adapter)))
    p.num_new_matched_tokens(lora, 0)  # a bypass: its adapter is new to this planner
    assert p.loras.wait(30.0)
    again = request("k2", 600)
    again.lora_request = lora.lora_request
    p.num_new_matched_tokens(base, 0)
    p.num_new_matched_tokens(again, 0)
    assert "k" not in p._reqs and p._reqs["j"].keys[0][0] != p._reqs["k2"].keys[0][0]
    gone = request("l", 600)
    gone.lora_request = SimpleNamespace(lora_path=str(tmp_path / "nope"), lora_name="y",
                                        lora_int_id=2)
    assert request_inputs(gone, loras) is Bypass.LORA_UNREADABLE
    loras.close()


def _config(groups: list[Any], method: str | None = None) -> tuple[Any, Any]:
    vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(method=method)
                                  if method else None)
    return vllm_config, SimpleNamespace(kv_cache_groups=groups)


def _group(spec_name: str, **attrs: Any) -> Any:
    return SimpleNamespace(kv_cache_spec=type(spec_name, (), attrs)())


def test_configurations_kvtier_cannot_serve_are_refused_at_start_up() -> None:
    check_supported(*_config([_group("FullAttentionSpec", sliding_window=None)]))
    check_supported(*_config([_group("FullAttentionSpec")], method="ngram"))
    with pytest.raises(UnsupportedConfig, match="2 groups"):
        check_supported(*_config([_group("FullAttentionSpec"), _group("SlidingWindowSpec")]))
    with pytest.raises(UnsupportedConfig, match="MambaSpec"):
        check_supported(*_config([_group("MambaSpec")]))
    with pytest.raises(UnsupportedConfig, match="sliding_window=4096"):
        check_supported(*_config([_group("FullAttentionSpec", sliding_window=4096)]))
    with pytest.raises(UnsupportedConfig, match="eagle3"):
        check_supported(*_config([_group("FullAttentionSpec")], method="eagle3"))


def test_weights_revision_and_quantization_are_part_of_the_model_identity() -> None:
    def cfg(**model: Any) -> Any:
        return SimpleNamespace(model_config=SimpleNamespace(model="/m/llama", **model))
    plain = load_config()
    assert model_identity(cfg(revision=None, quantization=None), plain).startswith(
        "/m/llama|config=")
    names = {model_identity(cfg(revision=r, quantization=q), plain)
             for r in (None, "v2") for q in (None, "fp8")}
    assert len(names) == 4  # each changes the KV of the same tokens: never shared
    renamed = load_config(engine={"model_id": "llama"})
    assert model_identity(cfg(revision="v2", quantization="fp8"), renamed).startswith(
        "llama@v2|quantization=fp8|config=")


def lower_tier_planner(**cfg: Any) -> tuple[SchedulerPlanner, Any]:
    """A planner whose shared tiers are one key set (standing in for disk or Redis)."""
    from kvtier.store import KeyIndex

    lower = KeyIndex()
    p = planner(**cfg)
    p.shared = SimpleNamespace(tiers=[lower])  # type: ignore[assignment]
    return p, lower


def test_a_hit_outside_memory_loads_asynchronously() -> None:
    p, lower = lower_tier_planner()
    hit = request("l", 600)
    lower.update(p._state(hit).keys[0][:2])
    p.seen(hit)  # a new request: its lower-tier chunks are prefetched...
    assert p.num_new_matched_tokens(hit, 0) == 2 * CS
    assert p.load_is_async(hit, 2 * CS)
    p.accept_load(hit, 2 * CS, [5, 6, 7, 8])
    p.num_new_matched_tokens(request("o", 300), 0)
    meta = p.build(step(new=[("o", [1, 2, 3], 0, 300)]))
    (load,) = meta.loads
    assert load.is_async and load.block_ids == [5, 6, 7, 8] and load.end_token == 2 * CS
    assert meta.prefetch == []  # ...unless it is scheduled in the same step
    done(p)
    assert [s.req_id for s in p.build(step()).saves] == ["o"]


def test_a_hit_all_in_memory_loads_in_the_step_and_async_can_be_turned_off() -> None:
    p = planner()
    p.num_new_matched_tokens(request("s", 600), 0)
    p.build(step(new=[("s", [90, 91, 92, 93, 94], 0, 600)]))
    stored(p, "s", 2)
    assert p.num_new_matched_tokens(request("m", 600), 0) == 2 * CS
    assert not p.load_is_async(request("m", 600), 2 * CS)
    q, lower = lower_tier_planner(async_loads=False)
    r = request("l", 600)
    lower.update(q._state(r).keys[0][:2])
    assert q.num_new_matched_tokens(r, 0) == 2 * CS and not q.load_is_async(r, 2 * CS)


def test_a_failed_async_load_is_saved_again_after_recompute() -> None:
    p, lower = lower_tier_planner()
    r = request("l", 600)
    keys = p._state(r).keys[0]
    lower.update(keys[:2])
    p.num_new_matched_tokens(r, 0)
    p.load_is_async(r, 2 * CS)
    p.accept_load(r, 2 * CS, [5, 6, 7, 8, 9])
    p.build(step())
    done(p, KvtierWorkerMeta(failed=[("l", CS, keys[1])]), invalid={7, 8})
    p.build(step(new=[("l", [5, 6, 7, 8, 9], CS, 600 - CS)]))
    done(p)
    (save,) = p.build(step()).saves
    assert save.start_chunk == 1  # chunk 1 did not arrive: saved once recomputed


def test_producer_never_loads_and_consumer_never_saves() -> None:
    p, lower = lower_tier_planner()
    p.loads = False
    r = request("l", 600)
    lower.update(p._state(r).keys[0][:2])
    assert p.num_new_matched_tokens(r, 0) == 0
    c = planner()
    c.saves = False
    c.num_new_matched_tokens(request("a", 1100), 0)
    meta = c.build(step(new=[("a", list(range(9)), 0, 1100)]))
    assert meta.saves == [] and c.finish("a") is False


def test_a_worker_that_computed_another_namespace_takes_the_schedulers() -> None:
    """The scheduler's keys are the ones stored and loaded; a worker whose model changed
    its config while loading (another config digest) would answer lookups, admissions and
    peers under another namespace: every hit a miss. It adopts the scheduler's namespace
    from the first step's metadata, in place, and announces it again (hooks)."""
    import numpy as np

    from kvtier.codecs import ChunkData, ChunkMeta
    from kvtier.connectors.vllm import worker as worker_mod
    from kvtier.connectors.vllm.surfaces import KvtierStats
    from kvtier.control import models as m
    from kvtier.control.api import CacheAPI
    from kvtier.engine.cache_engine import CacheEngine
    from kvtier.engine.layout import LayoutKind, PagedLayout
    from kvtier.keys import ChunkHasher
    from kvtier.store import ChunkStore
    from kvtier.tiers.memory import MemoryTier

    p = planner()
    first, second = p.build(step()), p.build(step())
    theirs = p._base[0].namespace
    assert first.namespaces == [theirs] and second.namespaces is None  # sent once
    layout = PagedLayout(LayoutKind.VLLM_CPU, 4, 1, 64, BS, "bfloat16")
    ours = dataclasses.replace(theirs, model_id="m|config=0123456789abcdef")
    w = worker_mod.KvtierWorker(load_config(), layout, KvtierStats())
    w.engine = CacheEngine(ChunkHasher(ours, False, BS), layout,
                           ChunkStore([MemoryTier(1 << 20, 4096)]))
    api = CacheAPI(w.engine.store, w.engine.hasher, layout)  # holds the worker's hasher
    prompt = list(range(7, 7 + 2 * CS))
    key = p._base[0].keys(prompt)[0]  # stored by the scheduler's plan, under its key
    w.engine.store.memory.put_many([(key, ChunkData(ChunkMeta("uint8", (16,)),
                                                    np.zeros(16, np.uint8)))])
    announced: list[int] = []
    worker_mod.NAMESPACE_HOOKS.append(lambda cfg, engine, shard: announced.append(shard))
    try:
        assert api.lookup(m.Chunks(tokens=prompt)).hit_chunks == 0  # another namespace
        w.start_load(second)  # no namespaces in it: nothing changes
        assert w.engine.hasher.namespace == ours and not announced
        w.start_load(first)
        assert w.engine.hasher.namespace == theirs and announced == [0]
        assert api.lookup(m.Chunks(tokens=prompt)).hit_chunks == 1
        assert w.stats.data["namespace_adoptions"] == 1
        w.wait_for_save(first)  # the same metadata again: adopted once
        assert announced == [0]
    finally:
        worker_mod.NAMESPACE_HOOKS.pop()
        api.close()
