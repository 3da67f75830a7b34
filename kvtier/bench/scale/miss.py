"""Part 2: the miss path, a workload with no reuse at all, kvtier on defaults vs vLLM alone.

Two real vLLM servers on 127.0.0.1, the same engine settings and thread pinning
(:mod:`kvtier.bench.serve.servers`): ``vllm`` (vLLM alone, its prefix cache on) and
``kvtier-memory`` (kvtier's connector on its defaults, memory tier). Both stay up; the
load is vLLM's own ``bench serve`` (``vllm.benchmarks.serve``, random dataset: prompts
of random token ids, none shared) sent to one server at a time, alternating, round
after round, each round with new prompts (its own seed) that both servers get. Every
prompt misses kvtier and is saved by it: what is measured is what the save path costs a
server that never gets a hit. Reported per configuration: the median over rounds of
request throughput, ITL p99, TTFT p50 and TPOT p99, and kvtier's ratios to vLLM alone.
Goal: throughput ratio >= 0.98, ITL p99 ratio <= 1.02.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvtier.bench.itl import RUN_BENCH
from kvtier.bench.serve.servers import EngineSettings, Servers, make_config, start_all
from kvtier.testing.models import build_model
from kvtier.testing.vllm_cpu import fast_dtype

BLOCK = 128
CONFIGS = ("vllm", "kvtier-memory")
METRICS = {"throughput": "request_throughput", "itl_p99_ms": "p99_itl_ms",
           "itl_p50_ms": "median_itl_ms", "ttft_p50_ms": "median_ttft_ms",
           "tpot_p99_ms": "p99_tpot_ms"}


def run(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    toy = bool(getattr(args, "toy", False))
    shape = "tiny" if toy else getattr(args, "miss_shape", None) or "small"
    rounds = 1 if toy else getattr(args, "miss_rounds", None) or (2 if quick else 4)
    prompts, input_len, output_len, concurrency = (
        (4, 256, 8, 2) if toy else ((32 if quick else 64), 1024, 128, 8))
    model = str(build_model(shape))
    max_len = input_len + output_len + BLOCK
    eng = EngineSettings(model=model, max_model_len=max_len,
                         num_gpu_blocks=concurrency * (max_len // BLOCK) + 1,
                         kv_budget_bytes=2 << 30, dtype=fast_dtype())
    with tempfile.TemporaryDirectory(prefix="kvtier-scale-miss-") as tmp:
        out = Path(tmp)
        servers = [Servers(make_config(n, eng, out), eng, out / f"server-{n}.log")
                   for n in CONFIGS]
        errors = start_all(servers)
        if errors:
            raise errors[0]
        try:
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in CONFIGS}
            for r in range(rounds):
                order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]  # neither always goes first
                for srv in sorted(servers, key=lambda s: order.index(s.cfg.name)):
                    runs[srv.cfg.name].append(_bench(srv, model, out, seed=1000 + r,
                                                     prompts=prompts, input_len=input_len,
                                                     output_len=output_len,
                                                     concurrency=concurrency))
        finally:
            for srv in servers:
                srv.__exit__()
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k in METRICS} for n in CONFIGS}
    kv, base = med["kvtier-memory"], med["vllm"]
    # Round by round (both servers on the round's prompts, back to back), then the median:
    # a round slow for both alike cancels out; the spread says what one round can move.
    pairs = {k: sorted(a[k] / b[k] for a, b in zip(runs["kvtier-memory"], runs["vllm"]))
             for k in ("throughput", "itl_p99_ms")}
    return {"miss_path_throughput_ratio": kv["throughput"] / base["throughput"],
            "miss_path_itl_p99_ratio": kv["itl_p99_ms"] / base["itl_p99_ms"],
            "miss_path_ttft_p50_ratio": kv["ttft_p50_ms"] / base["ttft_p50_ms"],
            "miss_path_paired_throughput_ratio": statistics.median(pairs["throughput"]),
            "miss_path_paired_itl_p99_ratio": statistics.median(pairs["itl_p99_ms"]),
            "paired_ratios": pairs,
            "medians": med, "rounds": runs,
            "setup": {"shape": shape, "dtype": eng.dtype, "rounds": rounds, "prompts": prompts,
                      "input_tokens": input_len, "output_tokens": output_len,
                      "concurrency": concurrency, "engine_kv_blocks": eng.num_gpu_blocks,
                      "threads_bind": eng.threads_bind, "quick": quick, "toy": toy,
                      "client": "vllm.benchmarks.serve, random dataset, ignore_eos"}}


def _bench(srv: Servers, model: str, out: Path, seed: int, prompts: int, input_len: int,
           output_len: int, concurrency: int) -> dict[str, float]:
    name = f"{srv.cfg.name}-{seed}.json"
    cmd = [sys.executable, "-c", RUN_BENCH, "--backend", "vllm", "--base-url", srv.base_url,
           "--model", model, "--dataset-name", "random", "--random-input-len", str(input_len),
           "--random-output-len", str(output_len), "--random-range-ratio", "0",
           "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
           "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out),
           "--result-filename", name, "--disable-tqdm"]
    with open(out / f"client-{name}.log", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc:
        raise RuntimeError(f"vLLM's bench serve against {srv.cfg.name} exited with {rc}: "
                           + (out / f"client-{name}.log").read_text()[-2000:])
    res = json.loads((out / name).read_text())
    if res.get("failed") or res.get("completed") != prompts:
        raise RuntimeError(f"{srv.cfg.name}: {res.get('failed')} of {prompts} requests failed")
    return {k: float(res[v]) for k, v in METRICS.items()}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"kvtier bench scale --part miss: no reuse ({s['client']}), {s['shape']} model "
             f"{s['dtype']}, {s['prompts']} prompts of {s['input_tokens']} tokens, "
             f"{s['output_tokens']} out, {s['concurrency']} in flight; median of "
             f"{s['rounds']} alternating rounds",
             f"  {'config':>14} {'req/s':>7} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9} "
             f"{'TPOT p99':>9}"]
    for name, m in res["medians"].items():
        lines.append(f"  {name:>14} {m['throughput']:7.3f} {m['itl_p50_ms']:8.1f} "
                     f"{m['itl_p99_ms']:8.1f} {m['ttft_p50_ms']:9.1f} {m['tpot_p99_ms']:9.1f}")
    lines.append(f"  kvtier / vLLM alone: throughput {res['miss_path_throughput_ratio']:.3f}x "
                 f"(goal >= 0.98), ITL p99 {res['miss_path_itl_p99_ratio']:.3f}x (goal <= 1.02)")
    if "paired_ratios" in res:
        pr = res["paired_ratios"]
        lines.append(f"  round by round (median, range): throughput "
                     f"{res['miss_path_paired_throughput_ratio']:.3f}x "
                     f"({pr['throughput'][0]:.3f}-{pr['throughput'][-1]:.3f}), ITL p99 "
                     f"{res['miss_path_paired_itl_p99_ratio']:.3f}x "
                     f"({pr['itl_p99_ms'][0]:.3f}-{pr['itl_p99_ms'][-1]:.3f})")
    return "\n".join(lines)
