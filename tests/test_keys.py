"""Chunk keys: deterministic across processes, separated by every namespace field."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from kvtier.keys import ChunkHasher, Namespace

NS = Namespace(model_id="m", layout="vllm_cpu:L4:H2:D64:B128:bfloat16", chunk_size=4)


def test_chained_keys_name_the_whole_prefix() -> None:
    h = ChunkHasher(NS)
    a = h.keys(list(range(12)))
    b = h.keys([99] + list(range(1, 12)))
    assert len(a) == 3 and len(set(a)) == 3
    assert all(x != y for x, y in zip(a, b))  # changing token 0 changes every later key
    assert h.keys(list(range(8))) == a[:2]  # a prefix gives a prefix of keys


def test_partial_chunk_only_when_enabled() -> None:
    assert len(ChunkHasher(NS).keys(list(range(10)))) == 2
    with_tail = ChunkHasher(NS, store_partial=True).keys(list(range(10)))
    assert len(with_tail) == 3 and with_tail[:2] == ChunkHasher(NS).keys(list(range(10)))


def test_partial_chunk_covers_whole_granules_and_equals_the_sub_key() -> None:
    h = ChunkHasher(NS, store_partial=True, granule=2)  # chunk 4: granules of 2 tokens
    tokens = list(range(11))  # 2 full chunks + 3 tokens: the tail keeps 2 of them
    keys = h.keys(tokens)
    assert len(keys) == 3 and h.covered(11) == 10 and h.chunk_tokens(2, 11) == 2
    assert keys[2] == h.sub_key(keys, tokens, 2, 2)
    assert keys[2] == h.keys(tokens[:10])[2] == h.keys(tokens[:10] + [77])[2]
    assert len(h.keys(tokens[:9])) == 2  # a 1-token tail is less than a granule
    longer = tokens[:10] + [5, 6, 7]  # a longer prompt: its chunk 2 is full...
    assert h.keys(longer)[2] != keys[2]
    assert h.sub_key(h.keys(longer), longer, 2, 2) == keys[2]  # ...and its head is the tail


@pytest.mark.parametrize("granule", [0, 3, -2])
def test_granule_must_divide_the_chunk_size(granule: int) -> None:
    with pytest.raises(ValueError, match="granule"):
        ChunkHasher(NS, store_partial=True, granule=granule)


@pytest.mark.parametrize("field,value", [
    ("model_id", "other"), ("layout", "flash_attn:L4:H2:D64:B16:bfloat16"), ("chunk_size", 8),
    ("tp_rank", 1), ("tp_size", 2), ("salt", "tenant-b"), ("hash_version", 1),
    ("hash_algorithm", "blake3"), ("pp_size", 2), ("layer_start", 2), ("lora", "adapter"),
    ("page_format", "cpu_attn:amx"), ("codec_class", "q8"), ("cache_salt", "tenant-b"),
])
def test_every_namespace_field_separates_keys(field: str, value: object) -> None:
    other = dataclasses.replace(NS, **{field: value})
    tokens = list(range(16))
    assert not set(ChunkHasher(NS).keys(tokens)) & set(ChunkHasher(other).keys(tokens))


def test_with_salt() -> None:
    assert NS.with_salt(None) is NS and NS.with_salt("") is NS
    assert NS.with_salt("t").cache_salt == "t"


def test_a_requests_salt_combines_with_the_instance_salt() -> None:
    """Two deployments with different salts sharing tiers never meet through a request
    that carries the same cache_salt (the request's salt used to replace the instance's)."""
    a = dataclasses.replace(NS, salt="deployment-a").with_salt("tenant")
    b = dataclasses.replace(NS, salt="deployment-b").with_salt("tenant")
    assert (a.salt, a.cache_salt) == ("deployment-a", "tenant")
    assert a.seed() != b.seed()
    assert dataclasses.replace(NS, salt="x").with_inputs("t", "lora").salt == "x"
    # A request without a salt is not the tenant "" of another deployment either.
    assert dataclasses.replace(NS, salt="a").seed() != dataclasses.replace(NS, salt="b").seed()


def test_bad_tokens_rejected() -> None:
    with pytest.raises(ValueError, match="token ids"):
        ChunkHasher(NS).keys([-1, 2, 3, 4])


def test_same_keys_in_processes_with_different_hash_seeds() -> None:
    code = ("import json;from kvtier.keys import ChunkHasher, Namespace;"
            "ns=Namespace('m','layout',4,salt='s');"
            "print(json.dumps([k.hex() for k in ChunkHasher(ns).keys(list(range(40)))]))")
    outs = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        outs.append(json.loads(res.stdout))
    here = [k.hex() for k in ChunkHasher(Namespace("m", "layout", 4, salt="s")).keys(range(40))]
    assert outs[0] == outs[1] == outs[2] == here
