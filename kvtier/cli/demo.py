"""``kvtier demo``: what kvtier does, in one table.

Embedded defaults: vLLM (CPU) with the kvtier connector, a memory tier and a
local disk tier, nothing else to start. It asks long-document questions on a
first vLLM instance (cold: the KV is computed and stored), shuts it down,
starts a **new** instance on the same disk folder and asks again (warm: the
prompt's KV comes back from kvtier), then prints TTFT cold vs warm per
document, the tokens served from kvtier, and whether the outputs are
identical (greedy token ids; the largest logprob difference is printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from kvtier.cli.model_build import build_model, make_document
from kvtier.cli.offline import fast_dtype, run_instance


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run both instances; return per-document rows and the setup."""
    model = str(Path(args.model)) if args.model else str(build_model(args.shape))
    folder = Path(args.disk_path or tempfile.mkdtemp(prefix="kvtier-demo-"))
    shutil.rmtree(folder, ignore_errors=True)  # cold must be cold
    docs = [make_document(model, args.tokens, seed=100 + i) for i in range(args.docs)]
    question = make_document(model, 24, seed=999)
    requests = [{"prompt": d + question, "max_tokens": args.max_tokens} for d in docs]
    kvtier = {"tiers": ["memory", "disk"], "disk.path": str(folder),
              "memory.max_bytes": args.memory}
    dtype = fast_dtype() if args.dtype == "auto" else args.dtype
    spec = {"model": model, "kvtier": kvtier, "rounds": [requests], "sequential": True,
            "max_model_len": args.tokens + 1024, "multiprocess": True, "dtype": dtype}
    print(f"[demo] model {model} ({dtype})\n[demo] {args.docs} documents x {args.tokens} tokens; "
          f"kvtier tiers: memory {args.memory} + disk {folder}")
    print("[demo] instance 1 (cold): computing and storing KV ...", flush=True)
    cold = run_instance(spec, log_path=args.log)
    print("[demo] instance 1 shut down; instance 2 (new process, same disk folder) ...",
          flush=True)
    warm = run_instance(spec, log_path=args.log)
    rows = []
    for i, (c, w) in enumerate(zip(cold["rounds"][0], warm["rounds"][0])):
        rows.append({"doc": i, "prompt_tokens": len(requests[i]["prompt"]),
                     "ttft_cold_s": c["ttft_s"], "ttft_warm_s": w["ttft_s"],
                     "speedup": c["ttft_s"] / max(w["ttft_s"], 1e-9),
                     "tokens_from_kvtier": w["num_cached_tokens"],
                     "identical": c["token_ids"] == w["token_ids"],
                     "logprob_max_abs_diff": max((abs(x - y) for x, y in
                                                  zip(c["logprobs"], w["logprobs"])), default=0.0)})
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"model": model, "dtype": dtype, "docs": args.docs, "tokens": args.tokens, "rows": rows,
            "startup_s": [cold["startup_s"], warm["startup_s"]]}


def print_table(res: dict[str, Any]) -> None:
    """The one-glance summary."""
    print()
    print(f"{'doc':>4} {'prompt':>7} {'TTFT cold':>10} {'TTFT warm':>10} {'speedup':>8} "
          f"{'hit tokens':>11} {'same output':>12}")
    for r in res["rows"]:
        print(f"{r['doc']:>4} {r['prompt_tokens']:>7} {r['ttft_cold_s'] * 1e3:>8.0f}ms "
              f"{r['ttft_warm_s'] * 1e3:>8.0f}ms {r['speedup']:>7.1f}x "
              f"{r['tokens_from_kvtier']:>11} {'yes' if r['identical'] else 'NO':>12}")
    med = statistics.median(r["speedup"] for r in res["rows"])
    same = all(r["identical"] for r in res["rows"])
    lp = max(r["logprob_max_abs_diff"] for r in res["rows"])
    print(f"\nA new vLLM instance got each document's KV back from kvtier's disk tier: median "
          f"TTFT speed-up {med:.1f}x; greedy tokens {'identical' if same else 'DIFFERENT'} "
          f"to the cold run; logprobs differ by at most {lp:.2g} (0: bitwise equal; on CPUs "
          f"without bf16 units vLLM's own prefix cache differs from a cold run the same way).")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kvtier demo``."""
    p = subparsers.add_parser("demo", help="cold vs warm TTFT across two vLLM instances")
    p.add_argument("--shape", default="small", help="local model shape to build (small, tiny)")
    p.add_argument("--model", help="a local model directory instead of a built one")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8000, help="tokens per document")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per question")
    p.add_argument("--dtype", default="auto",
                   help="model dtype (auto: bfloat16 where the CPU has bf16 units, else float32)")
    p.add_argument("--memory", default="1GiB", help="memory tier budget")
    p.add_argument("--disk-path", help="disk tier folder (emptied first; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the disk folder afterwards")
    p.add_argument("--log", default="kvtier-demo.log", help="vLLM's log file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0 if all(r["identical"] for r in res["rows"]) else 1
