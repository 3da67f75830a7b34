"""The controller's index answers a lookup from each instance's leading held chunks,
looking only as far as the prefix goes (memory) or in two round trips for all instances
(a real redis-server): the same answer as checking every key of every tier."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.cluster.state import MemoryState, RedisState
from kvtier.testing.redis_proc import RedisProcess
from tests.redis_server import require_redis

KEYS = [bytes([i]) * 16 for i in range(12)]
TIERS = ("disk", "memory", "redis")
held_sets = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.dictionaries(
    st.sampled_from(TIERS), st.sets(st.sampled_from(KEYS)), max_size=3), max_size=3)


def leading(held: list[list[bool]], tiers: list[str]) -> dict[str, int]:
    """The reference: per tier (and ``"any"``) how many of the first keys are held
    without a gap, every key of every tier checked."""
    out: dict[str, int] = {}
    n = len(held[0]) if held else 0
    for name, row in zip(tiers, held):
        out[name] = next((i for i, h in enumerate(row) if not h), n)
    out["any"] = next((i for i in range(n) if not any(row[i] for row in held)), n)
    return out


def every_key(chunks: dict[str, set[bytes]], keys: list[bytes]) -> dict[str, int]:
    names = sorted(chunks)
    return leading([[k in chunks[t] for k in keys] for t in names], names) if names \
        else {"any": 0}


def fill(state: MemoryState | RedisState, held: dict[str, dict[str, set[bytes]]]) -> None:
    for inst in ("a", "b", "c"):
        assert state.claim({"instance": inst}, "cred", "cred") in ("new", "kept")
        state.clear(inst)
        for tier, keys in held.get(inst, {}).items():
            state.add(inst, tier, keys)


@pytest.fixture(scope="module")
def redis_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisState]:
    require_redis()
    server = RedisProcess(Path(tmp_path_factory.mktemp("redis")) / "redis")
    server.start()
    state = RedisState(server.url, ttl_s=3600.0)
    yield state
    state.close()
    server.close()


@settings(max_examples=200, deadline=None)
@given(held=held_sets, n=st.integers(0, len(KEYS)))
def test_memory_lookups_stop_at_the_prefix_and_agree_with_every_key(
        held: dict[str, dict[str, set[bytes]]], n: int) -> None:
    state = MemoryState(ttl_s=3600.0)
    fill(state, held)
    got = state.held_many(["a", "b", "c", "unknown"], KEYS[:n])
    for inst in ("a", "b", "c"):
        want = every_key({t: k for t, k in held.get(inst, {}).items() if k}, KEYS[:n])
        assert {t: v for t, v in got[inst].items() if v or t == "any"} == \
            {t: v for t, v in want.items() if v or t == "any"}, inst
    assert got["unknown"] == {"any": 0}


@settings(max_examples=60, deadline=None)
@given(held=held_sets, n=st.integers(0, len(KEYS)))
def test_redis_lookups_of_every_instance_agree_with_every_key(
        redis_state: RedisState, held: dict[str, dict[str, set[bytes]]], n: int) -> None:
    fill(redis_state, held)
    got = redis_state.held_many(["a", "b", "c"], KEYS[:n])
    for inst in ("a", "b", "c"):
        want = every_key({t: k for t, k in held.get(inst, {}).items() if k}, KEYS[:n])
        assert {t: v for t, v in got[inst].items() if v or t == "any"} == \
            {t: v for t, v in want.items() if v or t == "any"}, inst
