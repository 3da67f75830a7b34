"""The canary (``verify.*``): sampling, the comparison, the scheduler's plan, the worker's
checks against every tier, out of service and back. In real vLLM:
``test_vllm_canary.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.codecs import ChunkData, ChunkMeta, Codec
from kvtier.config import DiskConfig, VerifyConfig, load_config
from kvtier.connectors.vllm.canary import Canary, relative_error, sampled, tolerance_for
from kvtier.connectors.vllm.surfaces import KvtierStats
from kvtier.control import models as m
from kvtier.control.api import CacheAPI
from kvtier.engine.layout import LayoutKind, PagedLayout
from kvtier.keys import ChunkHasher, ChunkKey, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier
from tests.test_vllm_plan import CS, KvtierWorkerMeta, done, planner, request, step


def chunk(values: torch.Tensor) -> ChunkData:
    """A bfloat16 chunk of ``values`` (shape [1, 2, 8])."""
    raw = values.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().copy()
    return ChunkData(ChunkMeta("bfloat16", (1, 2, 8)), raw)


def kv(seed: int) -> torch.Tensor:
    return torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(seed))


# -- sampling and comparison ----------------------------------------------------------


def test_sampling_is_deterministic_per_request_and_follows_the_rate() -> None:
    ids = [f"cmpl-{i}" for i in range(20_000)]
    assert not any(sampled(r, 0.0) for r in ids)
    assert all(sampled(r, 1.0) for r in ids)
    share = sum(sampled(r, 0.05) for r in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [sampled(r, 0.05) for r in ids[:500]] == [sampled(r, 0.05) for r in ids[:500]]
    # vLLM's random suffix on the caller's id does not change the answer
    assert all(sampled(f"{r}-1f2e3d4c", 0.05) == sampled(r, 0.05) for r in ids[:2000])
    # a lower rate samples a subset of what a higher rate samples
    assert all(sampled(r, 0.1) for r in ids if sampled(r, 0.02))


def test_equal_bytes_match_bitwise_and_a_wrong_chunk_does_not() -> None:
    fresh = chunk(kv(1))
    assert relative_error(chunk(kv(1)), fresh) == 0.0
    wrong = relative_error(chunk(kv(2)), fresh)  # another prompt's KV: about sqrt(2)
    assert 1.0 < wrong < 2.0 and wrong > tolerance_for(Codec.RAW, 0.02)
    other_shape = ChunkData(ChunkMeta("bfloat16", (2, 1, 8)), chunk(kv(1)).payload)
    assert relative_error(other_shape, fresh) == float("inf")


def test_a_last_bits_difference_is_within_the_tolerance_and_zero_is_bitwise() -> None:
    x = kv(3)
    near = chunk(x * (1 + 2 ** -7))  # one bf16 ulp or so on every value
    err = relative_error(near, chunk(x))
    assert 0 < err < VerifyConfig().tolerance
    assert err > tolerance_for(Codec.RAW, 0.0)  # tolerance 0: bitwise only
    # a lossy codec's copy matches within that codec's own error, never a wrong chunk's
    assert tolerance_for(Codec.Q4, 0.0) < 1.0 and tolerance_for(Codec.Q8, 0.0) > 0


# -- the scheduler's part ---------------------------------------------------------------


def test_a_sampled_hit_is_reported_as_none_and_its_save_verifies_the_hit_chunks() -> None:
    p = planner(**{"verify.sample_rate": 1.0})
    p.num_new_matched_tokens(request("s", 1100), 0)
    p.build(step(new=[("s", list(range(9)), 0, 1100)]))
    done(p, KvtierWorkerMeta(stored=p._reqs["s"].keys[0][:3]))
    assert p.num_new_matched_tokens(request("c", 1100), 0) == 0  # 3 chunks held, not served
    assert p.num_new_matched_tokens(request("c", 1100), 0) == 0  # asked again: the same
    p.build(step(new=[("c", list(range(20, 29)), 0, 1100)]))
    done(p)
    (save,) = [s for s in p.build(step()).saves if s.req_id == "c"]
    assert (save.start_chunk, save.verify, len(save.keys[0])) == (0, 3, 4)
    assert p.stats.data["verify_sampled"] == 2


def test_off_by_default_rate_and_a_tier_out_of_service_is_not_counted() -> None:
    p = planner(**{"verify.sample_rate": 0.0})
    p.num_new_matched_tokens(request("s", 600), 0)
    p.build(step(new=[("s", list(range(5)), 0, 600)]))
    done(p, KvtierWorkerMeta(stored=p._reqs["s"].keys[0][:2]))
    assert p.num_new_matched_tokens(request("a", 600), 0) == 2 * CS
    done(p, KvtierWorkerMeta(service={"memory": True}))  # the workers' report
    assert p.num_new_matched_tokens(request("b", 600), 0) == 0
    done(p, KvtierWorkerMeta(service={"memory": False}))
    assert p.num_new_matched_tokens(request("c", 600), 0) == 2 * CS
    merged = KvtierWorkerMeta(service={"disk": False}).aggregate(
        KvtierWorkerMeta(service={"disk": True, "redis": False}))
    assert merged.service == {"disk": True, "redis": False}  # out on any rank: out


# -- the worker's part ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = ChunkStore([MemoryTier(1 << 20, slot_bytes=64),
                    DiskTier(DiskConfig(path=str(tmp_path / "disk")))])
    yield s
    s.close()


class _Engine:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store


KEY = ChunkKey(bytes(range(16)))


def test_a_wrong_but_valid_copy_is_counted_deleted_replaced_and_its_tier_taken_out(
        store: ChunkStore) -> None:
    fresh, disk = chunk(kv(1)), store.tier("disk")
    store.memory.put_many([(KEY, fresh)])
    disk.put_many([(KEY, chunk(kv(2)))])  # checksums right, KV another prompt's
    canary = Canary(VerifyConfig(sample_rate=1.0, max_mismatches=1), _Engine(store))  # type: ignore[arg-type]
    try:
        canary.check(KEY, fresh)
        stats = KvtierStats()
        canary.drain(stats)
        assert stats.data == {"verify_checks": 2, "verify_mismatches": 1,
                              "verify_mismatch_disk": 1, "verify_tiers_out": 1}
        assert store.flush()
        (copy,) = disk.get_many([KEY])  # the engine's copy replaced the wrong one
        assert copy is not None and relative_error(copy, fresh) == 0.0
        copy.release()
        # out of service: neither read nor looked up, until an operator resumes it
        assert store.service.out_of_service == ["disk"]
        assert store.service.take_changes() == {"disk": True}
        store.memory.delete_many([KEY])
        assert store.lookup([KEY]) == 0 and store.get_many([KEY]) == [None]
        api = CacheAPI(store, ChunkHasher(Namespace("m", "l", 16)),
                       PagedLayout(LayoutKind.VLLM_CPU, 2, 1, 8, 4, "bfloat16"))
        try:
            status = api.status()
            assert status.out_of_service == ["disk"]
            assert status.verify_mismatches == {"disk": 1} and status.verify_checks == 2
            assert api.resume(m.ResumeRequest()).resumed == ["disk"]
        finally:
            api.close()
        assert store.service.take_changes() == {"disk": False}
        assert store.lookup([KEY]) == 1
    finally:
        canary.close()


def test_copies_that_match_are_only_counted(store: ChunkStore) -> None:
    fresh = chunk(kv(4))
    store.put_many([(KEY, fresh)])
    assert store.flush()
    canary = Canary(VerifyConfig(sample_rate=1.0), _Engine(store))  # type: ignore[arg-type]
    try:
        canary.check(KEY, chunk(kv(4)))
        stats = KvtierStats()
        canary.drain(stats)
        assert stats.data == {"verify_checks": 2}
        assert store.service.out_of_service == [] and not store.service.take_changes()
    finally:
        canary.close()


def test_the_config_section_defaults_and_bounds() -> None:
    cfg = load_config(env={}, engine={})
    assert (cfg.verify.sample_rate, cfg.verify.max_mismatches) == (0.01, 3)
    assert load_config(env={}, engine={"verify.sample_rate": 1.0}).verify.sample_rate == 1.0
    with pytest.raises(Exception, match="verify.sample_rate"):
        load_config(env={}, engine={"verify.sample_rate": 1.5})
