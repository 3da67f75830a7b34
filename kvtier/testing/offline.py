"""Run one vLLM instance (offline ``LLM``) on a list of prompts, in its own process.

Tests, the demo and benchmarks need *new* vLLM instances (a new process is
what a restart or a second instance really is), so :func:`run_instance`
starts ``python -m kvtier.testing.offline`` with a JSON spec on stdin and reads a
JSON result from its last stdout line.

Spec keys: ``model`` (dir), ``kvtier`` (connector extra config, or null for
plain vLLM), ``rounds`` (list of rounds; each a list of requests
``{"prompt": [ids], "max_tokens": n, "salt": str|null, "stop_at_eos": bool}``; with
``stop_at_eos`` a real model's answer ends at its end-of-turn token), ``sequential``
(one request at a time, so TTFT is per request), ``max_model_len``,
``num_gpu_blocks`` (caps vLLM's own KV, so its prefix cache overflows),
``prefix_caching`` (vLLM's own, default true), ``multiprocess`` (vLLM's
default two-process mode; default false: one process, faster start),
``dtype`` (default bfloat16), ``kv_transfer`` (optional full ``KVTransferConfig`` dict for a non-kvtier
connector, e.g. a peer system; used only when ``kvtier`` is null),
``gpu_memory_utilization`` (default: what the run needs, see
:func:`~kvtier.testing.vllm_cpu.memory_utilization`), ``tensor_parallel_size``
(needs ``multiprocess`` and a ``VLLM_CPU_OMP_THREADS_BIND`` with one group per
rank in ``env``), ``max_lora_rank`` (turns LoRA on; a request's ``lora`` is
``{"name", "id", "path"}``), ``actions`` (``{"<round>": [action, ...]}``: run
before that round, in order, or after the last one for ``"<number of rounds>"``;
their results are the result's ``actions``):

- ``"perturb_weights"``: scale every layer's input norm by 1.25 in place
  (``LLM.apply_model``; one-process mode), as a weight update in an RL loop
  or a hot swap changes the weights under the same model name;
- ``"reset_connector"``: ``LLM.reset_prefix_cache(reset_connector=True)``
  (vLLM's own prefix cache and the KV connector's), its return value.

With ``on_progress``, the child reports each request as it starts and ends
(lines starting with ``PROGRESS`` on its stdout), so a caller can show progress
during minutes-long prefills.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from kvtier.testing.procs import last_json_line
from kvtier.testing.vllm_cpu import memory_utilization, vllm_env

KV_CONNECTOR = "KvtierConnector"
KV_CONNECTOR_MODULE = "kvtier.connectors.vllm"


PROGRESS = "KVTIER-PROGRESS "


def run_instance(spec: dict[str, Any], timeout_s: float = 600, log_path: str | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Start a fresh vLLM process for ``spec``; return its result dict.

    ``on_progress`` gets ``{"event": "start"|"done", "round", "index", ...}``
    for each request as the child runs it (from a reader of the child's stdout).
    """
    env = vllm_env(bool(spec.get("multiprocess")), int(spec.get("kv_space_gib", 1)))
    env.update(spec.get("env", {}))
    spec = {**spec, "progress": on_progress is not None}
    with (open(log_path, "ab") if log_path else tempfile.TemporaryFile()) as err:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.testing.offline"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
        killer = threading.Timer(timeout_s, proc.kill)  # bounded, even if the child hangs
        killer.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            lines = []
            for line in proc.stdout:
                if line.startswith(PROGRESS) and on_progress is not None:
                    on_progress(json.loads(line[len(PROGRESS):]))
                else:
                    lines.append(line)
            rc = proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result = last_json_line("".join(lines))
        if rc != 0 or result is None:
            if log_path:
                tail = f"(see {log_path})"
            else:
                err.seek(0)
                tail = err.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"vLLM instance failed (exit {rc}): {tail}")
    return result


def _progress(enabled: bool, **event: Any) -> None:
    if enabled:
        sys.stdout.write(PROGRESS + json.dumps(event) + "\n")
        sys.stdout.flush()


def _generate(llm: Any, requests: list[dict[str, Any]], sequential: bool, round_: int = 0,
              progress: bool = False) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def prompt(r: dict[str, Any]) -> Any:
        p = TokensPrompt(prompt_token_ids=r["prompt"])
        if r.get("salt"):
            p["cache_salt"] = r["salt"]
        return p

    def params(r: dict[str, Any]) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=r.get("max_tokens", 8), logprobs=1,
                              ignore_eos=not r.get("stop_at_eos", False))

    def lora(r: dict[str, Any]) -> Any:
        from vllm.lora.request import LoRARequest

        spec = r.get("lora")
        return LoRARequest(spec["name"], spec["id"], spec["path"]) if spec else None

    batches = [[r] for r in requests] if sequential else [requests]
    results = []
    for n, batch in enumerate(batches):
        _progress(progress, event="start", round=round_, index=n, requests=len(batch),
                  prompt_tokens=sum(len(r["prompt"]) for r in batch))
        t0 = time.perf_counter()
        loras = [lora(r) for r in batch]
        outs = llm.generate([prompt(r) for r in batch], [params(r) for r in batch],
                            use_tqdm=False, lora_request=loras if any(loras) else None)
        wall = time.perf_counter() - t0
        for out in outs:
            comp = out.outputs[0]
            lps = [lp[tok].logprob for tok, lp in zip(comp.token_ids, comp.logprobs or [])]
            m = out.metrics
            ttft = getattr(m, "first_token_latency", 0.0) if m is not None else 0.0
            results.append({"token_ids": list(comp.token_ids), "logprobs": lps,
                            "num_cached_tokens": out.num_cached_tokens or 0,
                            "ttft_s": ttft or wall, "wall_s": wall,
                            # engine-core clock (one clock in one-process mode)
                            "first_token_ts": getattr(m, "first_token_ts", None),
                            "last_token_ts": getattr(m, "last_token_ts", None)})
        _progress(progress, event="done", round=round_, index=n, wall_s=wall,
                  cached_tokens=sum(r["num_cached_tokens"] for r in results[-len(batch):]))
    return results


def _perturb_weights(llm: Any) -> int:
    """Scale every layer's input norm by 1.25, in place (it feeds q, k and v, so every
    layer's K and V change); returns how many were scaled. Not the projections
    themselves: vLLM-CPU repacks linear weights at load, so those would not change."""
    def scale(model: Any) -> int:
        import torch

        with torch.no_grad():
            params = [p for name, p in model.named_parameters()
                      if name.endswith("input_layernorm.weight")]
            for p in params:
                p.mul_(1.25)
        return len(params)
    return sum(llm.apply_model(scale))


def _act(llm: Any, action: str) -> Any:
    if action == "perturb_weights":
        return _perturb_weights(llm)
    if action == "reset_connector":
        return llm.reset_prefix_cache(reset_connector=True)
    raise ValueError(f"unknown action {action!r}")


def _worker_connector() -> Any:
    """This process's kvtier worker connector (one-process mode), or None."""
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return get_kv_transfer_group()
    except Exception:  # no connector here (vLLM alone, or workers in other processes)
        return None


def _worker_totals() -> dict[str, float] | None:
    """kvtier's counters since start in this process's worker (one-process mode only)."""
    stats = getattr(_worker_connector(), "_stats", None)
    return dict(getattr(stats, "totals", {})) if stats is not None else None


def _worker_namespace() -> dict[str, Any] | None:
    """The key namespace of this process's worker (one-process mode only): what a
    tool needs to write chunks this instance would read."""
    import dataclasses

    engine = getattr(getattr(_worker_connector(), "worker", None), "engine", None)
    return dataclasses.asdict(engine.hasher.namespace) if engine is not None else None


def _main() -> int:
    spec = json.loads(sys.stdin.read())
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = dict(model=spec["model"], dtype=spec.get("dtype", "bfloat16"),
                                  enforce_eager=True,
                                  max_model_len=spec.get("max_model_len", 4096),
                                  enable_prefix_caching=spec.get("prefix_caching", True),
                                  disable_log_stats=False, seed=0,
                                  gpu_memory_utilization=spec.get("gpu_memory_utilization")
                                  or memory_utilization(spec["model"],
                                                        spec.get("kv_space_gib", 1)))
    if spec.get("num_gpu_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_gpu_blocks"]
    if spec.get("tensor_parallel_size"):
        kwargs["tensor_parallel_size"] = spec["tensor_parallel_size"]
    if spec.get("max_lora_rank"):
        kwargs.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=2)
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
    rounds, acted = [], {}
    for i in range(len(spec["rounds"]) + 1):
        actions = spec.get("actions", {}).get(str(i), [])
        if actions:
            acted[str(i)] = [_act(llm, a) for a in actions]
        if i < len(spec["rounds"]):
            rounds.append(_generate(llm, spec["rounds"][i], spec.get("sequential", False), i,
                                    spec.get("progress", False)))
    result = {"startup_s": startup, "rounds": rounds, "kvtier_worker": _worker_totals(),
              "kvtier_namespace": _worker_namespace(), "actions": acted}
    del llm  # shuts the engine (and the connector's background writers) down
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
