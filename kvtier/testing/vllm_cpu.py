"""What every vLLM-CPU run here shares, so runs that are compared are set up alike.

- :func:`fast_dtype`: the model dtype that runs fast on this CPU;
- :func:`vllm_env`: threads pinned the same way in every run, engine KV size;
- :func:`memory_utilization`: a ``gpu_memory_utilization`` that fits what a run needs;
- :func:`key_namespace`: the key namespace an instance stores under.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.keys import Namespace

GiB = 1 << 30


def fast_dtype() -> str:
    """The model dtype that runs fast on this machine's CPU.

    bfloat16 where the CPU has bf16 matrix units (AVX512-BF16, AMX); float32
    elsewhere: on an AVX2-only CPU torch runs bf16 matmuls about 80x slower
    than float32 (0.9 vs 72 GFLOP/s measured on 2 cores), which would make
    every prefill, not the KV layer, the story of a benchmark.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "bfloat16"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def vllm_env(multiprocess: bool = False, kv_space_gib: int = 1) -> dict[str, str]:
    """Environment for a comparable vLLM-CPU run (threads pinned the same way in every run)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def node_memory_bytes(node: int = 0) -> int:
    """Total memory of NUMA node ``node`` as vLLM-CPU sees it (whole machine without NUMA)."""
    try:
        with open(f"/sys/devices/system/node/node{node}/meminfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "MemTotal:":
                    return int(parts[3]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_utilization(model: str | os.PathLike[str], kv_space_gib: float = 1.0,
                       slack_gib: float = 1.5) -> float:
    """A ``gpu_memory_utilization`` that covers what a run needs, and no more.

    vLLM-CPU refuses to start when that share of NUMA node 0's memory is not
    free (vLLM's default asks for 90%); after heavy disk I/O the page cache
    alone can make that fail. A run needs the weights, its engine KV and some
    working memory, so that share is asked for (at least 5%, at most 90%).
    """
    weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    need = weights + kv_space_gib * GiB + slack_gib * GiB
    return round(min(0.9, max(0.05, need / node_memory_bytes())), 3)


def key_namespace(model: str | os.PathLike[str], kvtier: dict | None = None,
                  dtype: str = "bfloat16", **engine: object) -> Namespace:
    """The key namespace (shard 0) a vLLM instance of ``model`` with kvtier's extra
    config ``kvtier`` stores under, computed here as the connector computes it (from
    vLLM's own engine config: model config digest, attention ISA, ...), so a test or a
    tool can name the chunks an instance wrote. Imports vLLM (seconds, once)."""
    import json

    return _key_namespace(str(model), json.dumps(kvtier or {}, sort_keys=True), dtype,
                          json.dumps(engine, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _key_namespace(model: str, kvtier: str, dtype: str, engine: str) -> Namespace:
    import json

    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from kvtier.config import load_config
    from kvtier.connectors.vllm.keys import all_shards, shard_namespace

    extra = json.loads(kvtier)
    args = EngineArgs(model=model, dtype=dtype, enforce_eager=True,
                      kv_transfer_config=KVTransferConfig(
                          kv_connector="KvtierConnector",
                          kv_connector_module_path="kvtier.connectors.vllm",
                          kv_role="kv_both", kv_connector_extra_config=extra),
                      **json.loads(engine))
    vllm_config = args.create_engine_config()
    return shard_namespace(vllm_config, load_config(engine=extra), all_shards(vllm_config)[0])
