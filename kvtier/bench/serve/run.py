"""``kvtier bench serve``: serving workloads on real ``vllm serve``, kvtier beside its peers.

Setup (printed with the results): every configuration of
:mod:`kvtier.bench.serve.servers` is a fresh vLLM OpenAI server on 127.0.0.1 with
the same engine settings (threads pinned alike, the same engine KV capped so
its own prefix cache overflows, greedy decoding) and the same CPU memory
budget for its KV layer; vLLM alone runs first in the same run, as the
baseline. The async client of :mod:`kvtier.bench.serve.client` drives each one
through the same requests (:mod:`kvtier.bench.serve.workloads`); every
configuration's greedy tokens are compared with vLLM alone's.

    kvtier bench serve --workload long-doc-qa --quick
    kvtier bench serve --workload multi-round-qa --configs vllm,kvtier-memory --json

Writes ``results-<workload>.json`` (every request) and ``<workload>.png``
(TTFT CDF, QPS, hit rate) into ``--out``; ``--json`` prints the summary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.bench.peers.lmcache import lmcache_available
from kvtier.bench.serve import analysis
from kvtier.bench.serve.client import Result, run_workload, warm_up
from kvtier.bench.serve.servers import (CONFIG_NAMES, DEFAULT_CONFIGS, LABELS, EngineSettings,
                                        Servers, make_config)
from kvtier.bench.serve.workloads import LongDocQA, MultiRoundQA, Workload
from kvtier.config import parse_size
from kvtier.testing.models import PRETRAINED, build_model, make_document
from kvtier.testing.vllm_cpu import fast_dtype

log = logging.getLogger("kvtier.bench.serve")
BLOCK = 128  # vLLM's CPU KV block size

# --quick: the same shape of workload, small enough for 15 minutes on 2 cores (measured
# with all five configurations: long-doc-qa ~5.5 min, multi-round-qa ~8.5 min).
QUICK = {"long-doc-qa": dict(docs=4, doc_tokens=3000, questions=2),
         "multi-round-qa": dict(users=4, rounds=5, system_tokens=600, context_tokens=1000,
                                turn_tokens=128, answer_tokens=64, max_tokens=16,
                                think_time_s=0.5)}
TOY = {"long-doc-qa": dict(docs=3, doc_tokens=600, questions=2, max_tokens=4),
       "multi-round-qa": dict(users=2, rounds=2, system_tokens=300, context_tokens=300,
                              turn_tokens=64, answer_tokens=32, max_tokens=4, think_time_s=0.0)}


def build_workload(args: Any, model: str) -> Workload:
    """The workload of the run, from its defaults, ``--quick``/``--toy`` and size options."""
    cls = LongDocQA if args.workload == "long-doc-qa" else MultiRoundQA
    sizes = dict(QUICK[args.workload] if args.quick else {})
    sizes.update(TOY[args.workload] if args.toy else {})
    for key in vars(cls()):
        value = getattr(args, key, None)
        if value is not None:
            sizes[key] = value
    if cls is LongDocQA:
        real = not args.model and args.shape in PRETRAINED  # real documents and questions
        return replace(cls(), **sizes).build(model, args.seed, real=real)
    if not args.model and args.shape in PRETRAINED:
        raise ValueError(f"--workload {args.workload} has no real-model version; "
                         f"--shape {args.shape} runs long-doc-qa")
    return replace(cls(), **sizes).build(model, args.seed)


def engine_settings(args: Any, model: str, workload: Workload) -> EngineSettings:
    """Engine settings shared by every configuration."""
    longest = workload.max_prompt_tokens + 64
    max_len = -(-longest // BLOCK) * BLOCK
    # vLLM keeps one block back (its null block): + 1.
    blocks = args.num_gpu_blocks or args.engine_kv_requests * (max_len // BLOCK) + 1
    if (blocks - 1) * BLOCK < max_len:
        raise ValueError(f"--num-gpu-blocks {blocks} holds {(blocks - 1) * BLOCK} tokens, "
                         f"fewer than the longest request ({max_len})")
    dtype = fast_dtype() if args.dtype == "auto" else args.dtype
    return EngineSettings(model=model, max_model_len=max_len, num_gpu_blocks=blocks,
                          kv_budget_bytes=parse_size("--kv-budget", args.kv_budget), dtype=dtype)


def config_names(spec: str) -> list[str]:
    """The configurations to run, vLLM alone first (every ratio is against it).

    ``all`` leaves LMCache out, with a note, when its venv is missing; naming
    it explicitly then fails with the set-up hint instead.
    """
    if spec == "all":
        names = list(DEFAULT_CONFIGS)
        if not lmcache_available():
            print("[bench serve] LMCache left out: its venv is missing "
                  "(scripts/setup_peer_lmcache.sh makes it)", file=sys.stderr)
            names.remove("lmcache")
        return names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in CONFIG_NAMES:
            raise ValueError(f"unknown configuration {n!r} in --configs; "
                             f"choose from {', '.join(CONFIG_NAMES)}")
    return sorted(set(names) | {"vllm"}, key=CONFIG_NAMES.index)


def run(args: Any) -> dict[str, Any]:
    """Run every configuration; return the summary (and write results and the plot)."""
    model = str(Path(args.model)) if args.model else str(build_model(args.shape))
    workload = build_workload(args, model)
    eng = engine_settings(args, model, workload)
    names = config_names(args.configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-bench-serve-"))
    setup = {"workload": workload.name, "settings": workload.settings,
             "requests": workload.num_requests, "model": model,
             "max_model_len": eng.max_model_len, "engine_kv_blocks": eng.num_gpu_blocks,
             "engine_kv_tokens": eng.num_gpu_blocks * BLOCK,
             "kv_budget_bytes": eng.kv_budget_bytes, "dtype": eng.dtype, "threads_bind": eng.threads_bind,
             "concurrency": args.concurrency, "request_rate": args.request_rate,
             "configs": {n: LABELS[n] for n in names}}
    _say(args, f"{workload.name}: {workload.num_requests} requests, longest prompt "
               f"{workload.max_prompt_tokens} tokens; engine KV {eng.num_gpu_blocks * BLOCK} "
               f"tokens; KV layer budget {eng.kv_budget_bytes / 2**30:.1f} GiB; "
               f"configs: {', '.join(names)}")
    results: dict[str, list[Result]] = {}
    summary: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            cfg = make_config(name, eng, scratch)
            results[name], summary[name] = run_config(args, cfg, eng, workload, out)
            if name != "vllm":
                summary[name].update(analysis.compare_outputs(results[name], results["vllm"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    analysis.add_ratios(summary)
    outputs = analysis.layers_agree(results)
    (out / f"results-{workload.name}.json").write_text(json.dumps(
        {"setup": setup, "summary": summary, "outputs": outputs,
         "requests": {n: [r.to_json() for r in rs] for n, rs in results.items()}}))
    analysis.plot(workload.name, results, summary, LABELS, out / f"{workload.name}.png")
    return {"setup": setup, "summary": summary, "outputs": outputs}


def run_config(args: Any, cfg: Any, eng: EngineSettings, workload: Workload,
                out: Path) -> tuple[list[Result], dict[str, Any]]:
    _say(args, f"[{cfg.name}] starting {cfg.label} ...")
    with Servers(cfg, eng, out / f"server-{workload.name}-{cfg.name}.log") as srv:
        _say(args, f"[{cfg.name}] ready in {srv.startup_s:.0f} s; sending requests")
        warm_up(srv.base_url, eng.model, make_document(eng.model, 200, seed=7_777_777))
        bar = _progress(args, workload.num_requests, cfg.name)
        t0 = time.perf_counter()
        results, wall = asyncio.run(run_workload(
            srv.base_url, eng.model, workload, args.concurrency, args.request_rate, args.seed,
            on_done=lambda r: bar.update(1) if bar is not None else None))
        if bar is not None:
            bar.close()
        run_s = time.perf_counter() - t0
        counters = kvtier_counters(srv.base_url) if cfg.name.startswith("kvtier") else {}
    summary = analysis.summarize(workload.name, results)
    summary.update(wall_s=wall, startup_s=srv.startup_s, run_s=run_s, **counters)
    _say(args, f"[{cfg.name}] TTFT p50 {summary['ttft_p50_s'] * 1e3:.0f} ms, "
               f"QPS {summary['qps']:.3f}, hit rate {summary['hit_rate']:.1%}, "
               f"errors {summary['errors']}")
    return results, summary


CANARY_COUNTERS = ("verify_sampled", "verify_checks", "verify_mismatches")


def kvtier_counters(base_url: str) -> dict[str, float]:
    """The canary's counters from vLLM's ``/metrics`` (kvtier's connector metrics, summed
    over labels): how many hits it served cold and checked in this run."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("vllm:kvtier_")
        if name in CANARY_COUNTERS:
            out[name] = out.get(name, 0.0) + sum(s.value for s in family.samples
                                                 if s.name.endswith("_total"))
    return out


def _progress(args: Any, total: int, name: str) -> Any:
    if args.json:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=name, unit="req", file=sys.stderr, leave=False)


def _say(args: Any, msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)
