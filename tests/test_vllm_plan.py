"""The scheduler side of the vLLM connector, on stand-ins for vLLM's scheduler objects.

The planner is plain Python over a few fields of vLLM's ``Request`` and
``SchedulerOutput``; the stand-ins below carry exactly those fields, so each
rule (bypass, keys per shard, held saves, failed loads) is checked in
milliseconds. tests/test_vllm.py checks the same rules inside real vLLM.
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


def test_a_steps_saves_run_in_the_next_step_once_its_outcome_is_known() -> None:
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    # Not in the prefill step itself (the longest step: the others' inter-token gap).
    assert not p.build(step(new=[("a", list(range(9)), 0, 1100)])).saves
    done(p)
    (save,) = p.build(step(cached=[("a", [], 1100, 1)])).saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 4 and not save.release
    done(p)
    assert p.finish("a") is False  # nothing left to save: vLLM frees its blocks at once


def loaded_step(p: SchedulerPlanner, others: list[tuple[str, list[int], int, int]] = ()
                ) -> Any:
    """A step in which request "l" loads 2 chunks that "s" stored before, plus ``others``."""
    p.num_new_matched_tokens(request("s", 600), 0)
    p.build(step(new=[("s", [90, 91, 92, 93, 94], 0, 600)]))
    stored(p, "s", 2)
    hit = request("l", 600)
    assert p.num_new_matched_tokens(hit, 0) == 2 * CS
    p.accept_load(hit, 2 * CS)
    return p.build(step(new=[("l", [80, 81, 82, 83, 84], 0, 600 - 2 * CS), *others]))


def test_a_step_with_a_load_holds_its_saves_until_it_is_known_good() -> None:
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    meta = loaded_step(p, [("a", list(range(9)), 0, 1100)])
    assert meta.loads and "a" not in [s.req_id for s in meta.saves]  # outcome not known yet
    done(p)
    meta = p.build(step(cached=[("a", [], 1100, 1)]))
    (save,) = meta.saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 4

def test_a_failed_load_drops_the_steps_saves_and_saves_again_after_recompute() -> None:
    p = planner()
    first = request("a", 1100)
    p.num_new_matched_tokens(first, 0)
    p.build(step(new=[("a", list(range(9)), 0, 1100)]))
    done(p)
    p.build(step(cached=[("a", [], 1100, 1)]))
    stored(p, "a", 4)
    # b shares a's first 1100 tokens and goes on: 4 chunks hit, 8 more to compute.
    b = request("b", 3000)
    assert p.num_new_matched_tokens(b, 0) == 4 * CS
    p.accept_load(b, 4 * CS)
    meta = p.build(step(new=[("b", list(range(20, 44)), 0, 3000 - 4 * CS)]))
    (load,) = meta.loads
    assert (load.start_token, load.end_token) == (0, 4 * CS)
    # Chunk 1 could not be read: chunks computed in this step sit on garbage KV.
    bad_key = load.keys[0][1]
    done(p, KvtierWorkerMeta(failed=[("b", CS, bad_key)]), invalid={22, 23, 24, 25, 26, 27})
    assert p.index.contains_many([bad_key]) == [False]
    # vLLM recomputes from token 256, one chunk in this step: only that chunk is saved
    # (the step's saves of chunks 4-10, computed on the missing chunk 1, are gone).
    assert not p.build(step(cached=[("b", [], CS, CS)])).saves
    done(p)
    (save,) = p.build(step(cached=[("b", [], 2 * CS, 3000 - 2 * CS)])).saves
    assert save.start_chunk == 1 and len(save.keys[0]) == 2
    done(p)
    (save,) = p.build(step(cached=[("b", [], 3000, 1)])).saves
    assert save.start_chunk == 2 and len(save.keys[0]) == 12  # 11 + the partial tail


def test_a_request_sharing_a_failed_block_does_not_save_that_step() -> None:
    p = planner()
    p.num_new_matched_tokens(request("c", 1100), 0)
    loaded_step(p, [("c", [5, 6, 7, 8, 9, 10, 11, 12, 13], 0, 1100)])
    done(p, invalid={6})  # the load went into a block c shares, and failed
    # vLLM recomputes c from token 128; this step gets to token 256: chunk 0 only.
    p.build(step(cached=[("c", [], CS // 2, CS // 2)]))
    done(p)
    (save,) = p.build(step()).saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 1


def test_a_request_finishing_with_a_held_save_keeps_its_blocks_until_saved() -> None:
    p = planner()
    p.num_new_matched_tokens(request("d", 600), 0)
    loaded_step(p, [("d", [1, 2, 3, 4, 5], 0, 600)])
    assert p.finish("d") is True  # vLLM keeps d's blocks (delay free)
    done(p)
    saves = p.build(step()).saves
    assert [(s.req_id, s.release) for s in saves] == [("d", True)]


def test_a_finished_request_whose_save_was_dropped_is_released_without_saving() -> None:
    p = planner()
    p.num_new_matched_tokens(request("e", 600), 0)
    loaded_step(p, [("e", [1, 2, 3, 4, 5], 0, 600)])
    assert p.finish("e")
    done(p, invalid={1})
    meta = p.build(step())
    assert not meta.saves and meta.releases == ["e"]


def test_a_preempted_requests_held_save_is_dropped() -> None:
    p = planner()
    p.num_new_matched_tokens(request("f", 600), 0)
    loaded_step(p, [("f", [1, 2, 3, 4, 5], 0, 600)])
    meta = p.build(step(preempted={"f"}))
    done(p)
    assert [s.req_id for s in meta.saves] == [] and p._reqs["f"].saved_chunks == 0
    assert "f" not in [s.req_id for s in p.build(step()).saves]


@pytest.mark.parametrize("with_load", [False, True])
def test_a_request_preempted_after_its_step_went_well_saves_nothing_from_freed_blocks(
        with_load: bool) -> None:
    """vLLM's order: the step's report (the save released), then the next schedule,
    which preempts the request and may give its blocks to another request before the
    save would run (after that step's forward): the save must not go out."""
    p = planner()
    p.num_new_matched_tokens(request("f", 600), 0)
    if with_load:
        loaded_step(p, [("f", [1, 2, 3, 4, 5], 0, 600)])
    else:
        p.build(step(new=[("f", [1, 2, 3, 4, 5], 0, 600)]))
    done(p)  # f's save is released for the next step
    meta = p.build(step(preempted={"f"}))
    # Not saved, and to be saved again once vLLM has recomputed it on its new blocks.
    assert "f" not in [s.req_id for s in meta.saves] and p._reqs["f"].saved_chunks == 0


def test_a_request_aborted_before_its_released_save_ran_keeps_its_blocks() -> None:
    """An abort between steps (the client went away) finishes a request whose save is
    released for the next step but not run: vLLM must keep its blocks until it is."""
    p = planner()
    p.num_new_matched_tokens(request("d", 600), 0)
    p.build(step(new=[("d", [1, 2, 3, 4, 5], 0, 600)]))
    done(p)
    assert p.finish("d") is True
    assert [(s.req_id, s.release) for s in p.build(step()).saves] == [("d", True)]


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


def test_a_prompt_saved_over_several_steps_gives_every_chunk_its_tokens_and_parent() -> None:
    """KV events name each stored chunk's tokens and parent; a long prompt's saves are
    planned step by step (chunked prefill), each step registering only its new chunks."""
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    prompt, keys = p._reqs["a"].prompt, p._reqs["a"].keys[0]
    p.build(step(new=[("a", list(range(9)), 0, 300)]))  # chunk 0 computed
    done(p)
    p.build(step(cached=[("a", [], 300, 500)]))  # chunks 1 and 2
    done(p)
    p.build(step(cached=[("a", [], 800, 300)]))  # chunk 3
    done(p, KvtierWorkerMeta(tiers={"memory": (keys[:4], [])}))
    stored = [e for e in p.events.take() if type(e).__name__ == "BlockStored"]
    assert [e.block_hashes for e in stored] == [[bytes(k)] for k in keys[:4]]
    assert [e.parent_block_hash for e in stored] == [None] + [bytes(k) for k in keys[:3]]
    assert [e.token_ids for e in stored] == [prompt[i * CS:(i + 1) * CS] for i in range(4)]
