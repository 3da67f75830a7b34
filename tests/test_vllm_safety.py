"""Never wrong KV, in real vLLM: inputs beyond the tokens, shards, honest promises, failed loads.

What a hit must equal is vLLM's own prefix-cache hit of the same length (see
tests/test_vllm.py's docstring); a miss must equal a cold run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtier.keys import ChunkHasher
from kvtier.testing.vllm_cpu import key_namespace
from kvtier.testing.models import build_lora
from tests.vllm_run import CHUNK, doc, kvtier_cfg, model, own_hit, req, run, same_output  # noqa: F401

pytestmark = pytest.mark.vllm



@pytest.fixture(scope="module")
def adapters(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Two copies of one random adapter under different names and folders, and another."""
    root = tmp_path_factory.mktemp("loras")
    a = str(build_lora(model, root / "a", seed=1, scale=3.0))
    a_copy = str(build_lora(model, root / "copy-of-a", seed=1, scale=3.0))
    b = str(build_lora(model, root / "b", seed=2, scale=3.0))
    return {"a": {"name": "a", "id": 1, "path": a},
            "a-copy": {"name": "renamed", "id": 2, "path": a_copy},
            "b": {"name": "b", "id": 3, "path": b}}


def test_a_lora_request_never_gets_the_base_models_kv(model: str, tmp_path: Path,
                                                      adapters: dict[str, dict]) -> None:
    prompt, lora = doc(model, 21), adapters["a"]
    lora_spec = {"max_lora_rank": 8}
    cold = run(model, [[req(prompt)], [req(prompt, lora=lora)]], None, prefix_caching=False,
               **lora_spec)
    assert cold[0][0]["token_ids"] != cold[1][0]["token_ids"], "the adapter must matter"
    # An adapter's first request bypasses kvtier while its files are hashed off the
    # scheduler thread (kvtier.connectors.vllm.lora): one short request of another
    # prompt per adapter first, so the rounds below see their identities known.
    other = doc(model, 99, 300)
    prime = [[req(other, lora=adapters[n], max_tokens=1)] for n in ("a", "a-copy", "b")]
    warm = run(model, prime + [[req(prompt)], [req(prompt, lora=lora)], [req(prompt, lora=lora)],
                               [req(prompt, lora=adapters["a-copy"])],
                               [req(prompt, lora=adapters["b"])]],
               kvtier_cfg(tmp_path, ["memory"]), prefix_caching=False, **lora_spec)[len(prime):]
    hits = [r[0]["num_cached_tokens"] for r in warm]
    # base stores; the adapter misses the base's KV, then hits its own; the same
    # adapter under another name and folder shares it; another adapter does not.
    assert hits == [0, 0, 4 * CHUNK, 4 * CHUNK, 0]
    assert same_output(warm[1][0], cold[1][0])
    ref = own_hit(model, prompt, 4 * CHUNK, lora=lora, **lora_spec)
    assert same_output(warm[2][0], ref) and same_output(warm[3][0], ref)


TP2 = {"multiprocess": True, "tensor_parallel_size": 2,
       "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


def test_tensor_parallel_instances_share_a_folder_each_rank_its_own_shard(
        model: str, tmp_path: Path) -> None:
    prompt = doc(model, 22)
    cfg = kvtier_cfg(tmp_path, ["memory", "disk"])
    (first,), = run(model, [[req(prompt)]], cfg, **TP2)
    (second,), = run(model, [[req(prompt)]], cfg, **TP2)
    assert first["num_cached_tokens"] == 0 and second["num_cached_tokens"] == 4 * CHUNK
    assert same_output(second, own_hit(model, prompt, 4 * CHUNK, **TP2))
    # Each rank's shard is a file of its own; one TP=1 instance finds none of them.
    assert len(list((tmp_path / "chunks").rglob("*.kvc"))) == 2 * 4
    (single,), = run(model, [[req(prompt)]], cfg)
    assert single["num_cached_tokens"] == 0


def test_a_failed_load_never_stores_chunks_computed_without_its_kv(model: str,
                                                                   tmp_path: Path) -> None:
    """The step that loads a prefix also computes the rest of the prompt; when a
    promised chunk fails to load, that rest sits on KV that was not there and must
    not be stored. A later instance gets the chunks vLLM recomputed, bitwise."""
    document = doc(model, 23)
    cfg = kvtier_cfg(tmp_path, ["disk"], model_id="failed-load")
    run(model, [[req(document[:600])]], cfg)  # chunks 0 and 1 on disk
    keys = ChunkHasher(key_namespace(model, {"model_id": "failed-load"})).keys(document)
    (f,) = (tmp_path / "chunks").rglob(f"{keys[1].hex()}.kvc")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # chunk 1 is promised, then fails its checksum
    f.write_bytes(bytes(data))
    run(model, [[req(document)]], cfg)  # loads chunk 0, recomputes 1-3, stores them
    (third,), = run(model, [[req(document)]], cfg)
    assert third["num_cached_tokens"] == 4 * CHUNK
    assert same_output(third, own_hit(model, document, 4 * CHUNK))


def test_chunks_memory_cannot_take_are_never_promised(model: str, tmp_path: Path) -> None:
    """A prompt larger than the memory tier: only what memory holds is promised
    (a 1 MiB tier holds 2 chunks of this model), and those hits are exact."""
    document = doc(model, 24)
    cfg = kvtier_cfg(tmp_path, ["memory"], **{"memory.max_bytes": "1MiB"})
    out = run(model, [[req(document)], [req(document)]], cfg, prefix_caching=False)
    assert out[1][0]["num_cached_tokens"] == 2 * CHUNK
    assert same_output(out[1][0], own_hit(model, document, 2 * CHUNK, first=document[:600]))
