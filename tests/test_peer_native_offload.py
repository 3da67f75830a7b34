"""vLLM's native ``OffloadingConnector`` runs here through the CPU copy shim.

One vLLM instance (one process, tiny model) with the connector and
:mod:`kvtier.bench.peers.vllm_native_cpu`'s spec; vLLM's own KV is capped at 24
blocks, so four ~1100-token prompts evict the first one from vLLM's prefix
cache and its repeat can only hit the offloaded copy. The repeat's greedy
output and logprobs must be bitwise equal to its cold first pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.testing.models import build_model, make_document
from kvtier.testing.offline import run_instance

pytestmark = pytest.mark.vllm

BLOCK = 128
NATIVE_OFFLOAD = {
    "kv_connector": "OffloadingConnector",
    "kv_role": "kv_both",
    "kv_connector_extra_config": {
        "spec_name": "CPUCopyOffloadingSpec",
        "spec_module_path": "kvtier.bench.peers.vllm_native_cpu",
        "cpu_bytes_to_use": 64 << 20,
    },
}


def test_native_offload_hits_after_eviction_bitwise_equal() -> None:
    model = str(build_model("tiny"))
    docs = [make_document(model, 1100, seed) for seed in (11, 12, 13, 14)]
    rounds: list[list[dict[str, Any]]] = [[{"prompt": d, "max_tokens": 8}]
                                          for d in docs + docs[:1]]
    result = run_instance({"model": model, "kvtier": None, "kv_transfer": NATIVE_OFFLOAD,
                           "rounds": rounds, "num_gpu_blocks": 24, "max_model_len": 2048,
                           "env": {"VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                   "VLLM_CPU_KVCACHE_SPACE": "1"}})
    outs = [r[0] for r in result["rounds"]]
    assert [o["num_cached_tokens"] for o in outs[:4]] == [0, 0, 0, 0]
    # Every whole block of the prompt (1100 // 128 = 8) comes back from the offload.
    assert outs[4]["num_cached_tokens"] == (1100 // BLOCK) * BLOCK
    assert outs[4]["token_ids"] == outs[0]["token_ids"]
    assert outs[4]["logprobs"] == outs[0]["logprobs"]
