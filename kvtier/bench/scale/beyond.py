"""Part 3: a working set beyond memory, kvtier memory+disk (and memory+Redis) vs vLLM's
native offloading with the same CPU bytes.

long-doc-qa (:mod:`kvtier.bench.serve`): ``D`` documents asked in rounds, every document
once per round, in the same order, one request at a time: a document comes back after
all the others. The CPU budget (kvtier's memory tier, native's CPU tier) holds a third
of the documents' KV; the engine's own KV holds two requests. So by the time a document
comes back, native's CPU tier has dropped it (LRU) and vLLM recomputes it; kvtier's
memory tier dropped it too, but its disk (or Redis) tier still holds it and reads it
back. Same engine settings, pinning and workload for every configuration, vLLM alone
first (every configuration's greedy outputs are compared with its). TTFT p50 over the
rounds after the first; goal: native's TTFT p50 / kvtier's >= 2.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kvtier.bench.serve import analysis
from kvtier.bench.serve.run import BLOCK, run_config
from kvtier.bench.serve.servers import EngineSettings, make_config
from kvtier.bench.serve.workloads import LongDocQA
from kvtier.testing.models import build_model
from kvtier.testing.vllm_cpu import fast_dtype

CONFIGS = ("vllm", "native", "kvtier-disk", "kvtier-redis")
TIMES_MEMORY = 3  # the documents' KV over the CPU budget


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """KV bytes one token takes in every layer (keys and values)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    width = 4 if dtype == "float32" else 2
    return cfg["num_hidden_layers"] * kv_heads * head * 2 * width


def run(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    toy = bool(getattr(args, "toy", False))
    shape = "tiny" if toy else getattr(args, "beyond_shape", None) or "small"
    docs, doc_tokens, questions = ((6, 1024, 2) if toy else (12, 2000, 2) if quick
                                   else (15, 4000, 3))
    model = str(build_model(shape))
    dtype = fast_dtype()
    per_doc = kv_bytes_per_token(model, dtype) * doc_tokens
    budget = docs * per_doc // TIMES_MEMORY
    workload = LongDocQA(docs=docs, doc_tokens=doc_tokens, questions=questions,
                         max_tokens=8).build(model, seed=0)
    max_len = -(-(workload.max_prompt_tokens + 64) // BLOCK) * BLOCK
    eng = EngineSettings(model=model, max_model_len=max_len,
                         num_gpu_blocks=2 * (max_len // BLOCK) + 1, kv_budget_bytes=budget,
                         dtype=dtype)
    names = list(CONFIGS[:3] if quick or toy else CONFIGS)
    opts = SimpleNamespace(json=bool(getattr(args, "json", False)), concurrency=1,
                           request_rate=None, seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-scale-beyond-"))
    summary: dict[str, dict[str, Any]] = {}
    try:
        results: dict[str, Any] = {}
        for name in names:
            results[name], summary[name] = run_config(opts, make_config(name, eng, scratch),
                                                      eng, workload, scratch)
            if name != "vllm":
                summary[name].update(analysis.compare_outputs(results[name], results["vllm"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ttft = {n: s["ttft_p50_s"] for n, s in summary.items()}
    out = {"beyond_memory_ttft_ratio_vs_native": ttft["native"] / ttft["kvtier-disk"],
           "beyond_memory_ttft_ratio_vs_vllm": ttft["vllm"] / ttft["kvtier-disk"],
           "summary": summary,
           "setup": {"shape": shape, "dtype": dtype, "docs": docs, "doc_tokens": doc_tokens,
                     "questions": questions, "kv_budget_bytes": budget,
                     "doc_kv_bytes": per_doc, "working_set_over_budget": docs * per_doc / budget,
                     "engine_kv_blocks": eng.num_gpu_blocks, "threads_bind": eng.threads_bind,
                     "configs": names, "quick": quick, "toy": toy}}
    if "kvtier-redis" in ttft:
        out["beyond_memory_ttft_ratio_vs_native_redis"] = ttft["native"] / ttft["kvtier-redis"]
    return out


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"kvtier bench scale --part beyond: long-doc-qa, {s['docs']} documents of "
             f"{s['doc_tokens']} tokens ({s['doc_kv_bytes'] / 2**20:.0f} MiB of KV each) x "
             f"{s['questions']} rounds, {s['shape']} model {s['dtype']}; CPU budget "
             f"{s['kv_budget_bytes'] / 2**20:.0f} MiB (the documents are "
             f"{s['working_set_over_budget']:.1f}x it)",
             f"  {'config':>12} {'TTFT p50 ms':>12} {'hit rate':>9} {'req/s':>7} "
             f"{'same output':>12}"]
    for name, m in res["summary"].items():
        same = (f"{m['outputs_identical']}/{m['outputs_compared']}" if "outputs_compared" in m
                else "-")
        lines.append(f"  {name:>12} {m['ttft_p50_s'] * 1e3:12.0f} {m['hit_rate']:9.1%} "
                     f"{m['qps']:7.3f} {same:>12}")
    lines.append(f"  native TTFT p50 / kvtier memory+disk: "
                 f"{res['beyond_memory_ttft_ratio_vs_native']:.2f}x (goal >= 2)"
                 + (f"; / memory+Redis: {res['beyond_memory_ttft_ratio_vs_native_redis']:.2f}x"
                    if "beyond_memory_ttft_ratio_vs_native_redis" in res else ""))
    return "\n".join(lines)
