"""Part 4: long context, one document of 8k to 128k tokens on the tiny model.

One real vLLM server with kvtier (memory tier, budget for the longest document) and
``VLLM_SERVER_DEV_MODE`` (for vLLM's ``/reset_prefix_cache``, which empties vLLM's
own prefix cache and leaves kvtier's). For each length ``L``, one request of one
output token each:

- **cold**: the document the first time (prefill of all ``L`` tokens; kvtier saves it);
- **vLLM hit**: again, from vLLM's own prefix cache (the baseline: nothing loaded);
- **kvtier hit**: vLLM's prefix cache reset, again: every cached token loaded from
  kvtier's memory tier (checked in the answer's ``cached_tokens``). Three times, median.

Reported: the TTFTs, the KV bytes a hit moves, the load rate (those bytes over the time
the worker spent loading them, from kvtier's step trace, ``KVTIER_STEP_TRACE``) beside a
plain memory copy of the same bytes in this process (the floor), and kvtier's hit time
per cached token at each length: flat or falling if nothing in kvtier's part grows faster
than the context (no quadratic step).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.scale.beyond import kv_bytes_per_token
from kvtier.bench.serve.servers import EngineSettings, Servers, make_config
from kvtier.testing.models import build_model, make_document
from kvtier.testing.vllm_cpu import fast_dtype

BLOCK = 128
TRACE_ENV = "KVTIER_STEP_TRACE"  # kvtier.connectors.vllm.trace.ENV (importing it imports vLLM)
LENGTHS = (8192, 32768, 65536, 131072)
QUICK_LENGTHS = (8192, 32768)
TOY_LENGTHS = (1024, 2048)


def run(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    toy = bool(getattr(args, "toy", False))
    lengths = TOY_LENGTHS if toy else QUICK_LENGTHS if quick else LENGTHS
    model = str(build_model("tiny-long"))
    dtype = fast_dtype()
    per_token = kv_bytes_per_token(model, dtype)
    max_len = max(lengths) + BLOCK
    eng = EngineSettings(model=model, max_model_len=max_len,
                         num_gpu_blocks=max_len // BLOCK + 16,
                         kv_budget_bytes=int(max(lengths) * per_token * 1.5), dtype=dtype,
                         max_num_batched_tokens=8192)
    saved = {k: os.environ.get(k) for k in ("VLLM_SERVER_DEV_MODE",
                                            "VLLM_ALLOW_LONG_MAX_MODEL_LEN", TRACE_ENV)}
    points = []
    try:
        with tempfile.TemporaryDirectory(prefix="kvtier-scale-long-") as tmp:
            trace = Path(tmp) / "trace.jsonl"
            os.environ.update(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_LONG_MAX_MODEL_LEN="1",
                              **{TRACE_ENV: str(trace)})
            with Servers(make_config("kvtier-memory", eng, Path(tmp)), eng,
                         Path(tmp) / "server.log", start_timeout_s=900) as srv:
                _complete(srv.base_url, model, make_document(model, 300, seed=1))  # warm
                for n in lengths:
                    points.append(_point(srv.base_url, model, n, per_token, trace))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    per_tok = [p["kvtier_hit_us_per_token"] for p in points]
    return {"long_context_hit_ttft_s": {p["tokens"]: p["kvtier_hit_ttft_s"] for p in points},
            "long_context_speedup_vs_cold": points[-1]["cold_ttft_s"]
            / points[-1]["kvtier_hit_ttft_s"],
            "long_context_load_gb_s": points[-1]["load_gb_s"],
            "long_context_memcpy_gb_s": points[-1]["memcpy_gb_s"],
            "long_context_per_token_growth": per_tok[-1] / per_tok[0],
            "points": points,
            "setup": {"model": "tiny-long", "dtype": dtype, "kv_bytes_per_token": per_token,
                      "lengths": list(lengths), "hits": 3, "quick": quick, "toy": toy,
                      "load": "the worker's start_load time in steps that loaded (step trace)",
                      "max_num_batched_tokens": eng.max_num_batched_tokens,
                      "threads_bind": eng.threads_bind}}


def _point(url: str, model: str, n: int, per_token: int, trace: Path) -> dict[str, Any]:
    prompt = make_document(model, n, seed=n)
    cold, _ = _complete(url, model, prompt)
    vllm_hit, vllm_cached = _complete(url, model, prompt)
    hits, loads = [], []
    for _ in range(3):
        _post(f"{url}/reset_prefix_cache")
        start = trace.stat().st_size if trace.exists() else 0
        ttft, cached = _complete(url, model, prompt)
        if cached < n - 256:  # whole chunks (and blocks) of the document at least
            raise RuntimeError(f"{n} tokens: a kvtier hit of only {cached} cached tokens")
        hits.append(ttft)
        loads.append(_load_s(trace, start))
    hit, load = statistics.median(hits), statistics.median(loads)
    moved = cached * per_token
    return {"tokens": n, "cold_ttft_s": cold, "vllm_hit_ttft_s": vllm_hit,
            "vllm_hit_cached_tokens": vllm_cached, "kvtier_hit_ttft_s": hit,
            "kvtier_cached_tokens": cached, "bytes_moved": moved, "load_s": load,
            "load_gb_s": moved / load / 1e9 if load else None,
            "memcpy_gb_s": _memcpy_gb_s(moved),
            "kvtier_hit_us_per_token": hit / cached * 1e6}


def _load_s(trace: Path, start: int) -> float:
    """Seconds the worker spent in steps that loaded tokens, in the trace from ``start``."""
    if not trace.exists():
        return 0.0
    with open(trace, "rb") as f:
        f.seek(start)
        lines = [json.loads(x) for x in f.read().splitlines() if x.strip()]
    return sum(x["ms"] for x in lines if x["hook"] == "start_load" and x["load_tokens"]) / 1e3


def _memcpy_gb_s(nbytes: int) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # pages mapped
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def _complete(url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds until the one output token, cached prompt tokens)."""
    t = time.perf_counter()
    out = _post(f"{url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1,
                                          "temperature": 0.0})
    dt = time.perf_counter() - t
    details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
    return dt, int(details.get("cached_tokens") or 0)


def _post(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body or {}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else {}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"kvtier bench scale --part long: one document per length, tiny model "
             f"{s['dtype']} ({s['kv_bytes_per_token']} B of KV per token), kvtier memory tier;"
             f" kvtier hit: median of {s['hits']}",
             f"  {'tokens':>7} {'cold s':>8} {'vLLM hit s':>10} {'kvtier hit s':>12} "
             f"{'MiB moved':>10} {'load GB/s':>10} {'memcpy GB/s':>11} {'us/token':>9}"]
    for p in res["points"]:
        lines.append(f"  {p['tokens']:7} {p['cold_ttft_s']:8.2f} {p['vllm_hit_ttft_s']:10.3f} "
                     f"{p['kvtier_hit_ttft_s']:12.3f} {p['bytes_moved'] / 2**20:10.0f} "
                     f"{p['load_gb_s'] or float('nan'):10.2f} {p['memcpy_gb_s']:11.2f} "
                     f"{p['kvtier_hit_us_per_token']:9.2f}")
    lines.append(f"  hit vs cold at the longest: {res['long_context_speedup_vs_cold']:.1f}x; "
                 f"hit time per token, longest / shortest: "
                 f"{res['long_context_per_token_growth']:.2f} (1.0: linear)")
    return "\n".join(lines)
