"""Run one vLLM instance (offline ``LLM``) on a list of prompts, in its own process.

Tests, the demo and benchmarks need *new* vLLM instances (a new process is
what a restart or a second instance really is), so :func:`run_instance`
starts ``python -m kvtier.cli.offline`` with a JSON spec on stdin and reads a
JSON result from its last stdout line.

Spec keys: ``model`` (dir), ``kvtier`` (connector extra config, or null for
plain vLLM), ``rounds`` (list of rounds; each a list of requests
``{"prompt": [ids], "max_tokens": n, "salt": str|null}``), ``sequential``
(one request at a time, so TTFT is per request), ``max_model_len``,
``num_gpu_blocks`` (caps vLLM's own KV, so its prefix cache overflows),
``prefix_caching`` (vLLM's own, default true), ``multiprocess`` (vLLM's
default two-process mode; default false: one process, faster start),
``dtype`` (default bfloat16), ``kv_transfer`` (optional full ``KVTransferConfig`` dict for a non-kvtier
connector, e.g. a peer system; used only when ``kvtier`` is null).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from kvtier.cli import last_json_line

KV_CONNECTOR = "KvtierConnector"
KV_CONNECTOR_MODULE = "kvtier.connectors.vllm"


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


def run_instance(spec: dict[str, Any], timeout_s: float = 600, log_path: str | None = None
                 ) -> dict[str, Any]:
    """Start a fresh vLLM process for ``spec``; return its result dict."""
    env = vllm_env(bool(spec.get("multiprocess")), int(spec.get("kv_space_gib", 1)))
    env.update(spec.get("env", {}))
    stderr = open(log_path, "ab") if log_path else subprocess.PIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "kvtier.cli.offline"], input=json.dumps(spec),
                              stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                              timeout=timeout_s)
    finally:
        if log_path:
            stderr.close()
    result = last_json_line(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or "")[-4000:] if not log_path else f"(see {log_path})"
        raise RuntimeError(f"vLLM instance failed (exit {proc.returncode}): {tail}")
    return result


def _generate(llm: Any, requests: list[dict[str, Any]], sequential: bool) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def prompt(r: dict[str, Any]) -> Any:
        p = TokensPrompt(prompt_token_ids=r["prompt"])
        if r.get("salt"):
            p["cache_salt"] = r["salt"]
        return p

    def params(r: dict[str, Any]) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=r.get("max_tokens", 8), logprobs=1,
                              ignore_eos=True)

    batches = [[r] for r in requests] if sequential else [requests]
    results = []
    for batch in batches:
        t0 = time.perf_counter()
        outs = llm.generate([prompt(r) for r in batch], [params(r) for r in batch],
                            use_tqdm=False)
        wall = time.perf_counter() - t0
        for out in outs:
            comp = out.outputs[0]
            lps = [lp[tok].logprob for tok, lp in zip(comp.token_ids, comp.logprobs or [])]
            m = out.metrics
            ttft = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
            results.append({"token_ids": list(comp.token_ids), "logprobs": lps,
                            "num_cached_tokens": out.num_cached_tokens or 0,
                            "ttft_s": ttft or wall, "wall_s": wall})
    return results


def _main() -> int:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(model=spec["model"], dtype=spec.get("dtype", "bfloat16"),
                                  enforce_eager=True,
                                  max_model_len=spec.get("max_model_len", 4096),
                                  enable_prefix_caching=spec.get("prefix_caching", True),
                                  disable_log_stats=False, seed=0)
    if spec.get("num_gpu_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_gpu_blocks"]
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if spec.get("kvtier") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector=KV_CONNECTOR, kv_connector_module_path=KV_CONNECTOR_MODULE,
            kv_role="kv_both", kv_connector_extra_config=spec["kvtier"])
    elif spec.get("kv_transfer") is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**spec["kv_transfer"])
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    rounds = [_generate(llm, reqs, spec.get("sequential", False)) for reqs in spec["rounds"]]
    result = {"startup_s": startup, "rounds": rounds}
    del llm  # shuts the engine (and the connector's background writers) down
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
