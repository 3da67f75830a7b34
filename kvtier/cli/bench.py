"""``kvtier bench engine|tiers|codecs|serve|itl|cluster|scale|report``: arguments and printing.

The benchmarks themselves live in :mod:`kvtier.bench`; each runs its baseline
in the same run and reports medians and ratios.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kvtier bench`` and its subcommands."""
    bench = subparsers.add_parser("bench", help="benchmarks (each runs its baseline in the same run)")
    sub = bench.add_subparsers(dest="bench", required=True)
    from kvtier.cli import bench_curves

    for add in (_add_engine, _add_tiers, _add_codecs, _add_layerwise, _add_serve,
                bench_curves.add_itl, _add_cluster, bench_curves.add_scale, _add_report):
        add(sub)


def json_or_table(args: argparse.Namespace, res: dict[str, Any],
                   table: Callable[[dict[str, Any]], None]) -> int:
    """Print a benchmark's result: one JSON object with ``--json``, else its table."""
    if args.json:
        print(json.dumps(res))
    else:
        table(res)
    return 0


# -- engine -------------------------------------------------------------------

def _add_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="store/retrieve bandwidth of the cache engine")
    # The values of kvtier.engine.layout.LayoutKind (not imported here: it needs torch).
    p.add_argument("--layout", default="vllm_cpu", choices=["vllm_cpu", "flash_attn"])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_engine)


def _engine(args: argparse.Namespace) -> int:
    from kvtier.bench import engine

    return json_or_table(args, engine.run(args), _engine_table)


def _engine_table(res: dict[str, Any]) -> None:
    s = res["setup"]
    print(f"kvtier bench engine: {s['layout']}, {s['tokens']} tokens = {s['chunks']} chunks "
          f"({s['bytes'] / 2**20:.0f} MiB), {s['path']}, torch threads {s['torch_threads']}, "
          f"median of {s['repeats']}")
    print(f"  {'':10} {'GB/s':>8} {'ms':>8} {'vs copy':>8}")
    print(f"  {'plain copy':10} {res['copy_gbps']:8.2f} {res['copy_ms']:8.2f} {1:8.2f}")
    for op in ("store", "retrieve"):
        print(f"  {op:10} {res[f'{op}_gbps']:8.2f} {res[f'{op}_ms']:8.2f} "
              f"{res[f'{op}_ratio']:8.2f}")
    print(f"  retrieved KV bitwise equal to stored: {res['bitwise_equal']}")


# -- tiers --------------------------------------------------------------------

def _add_tiers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiers", help="disk and Redis tier throughput vs the raw medium")
    p.add_argument("--chunk-mib", type=float, default=3.0)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--disk-path", default=None, help="folder to benchmark in (default: $TMPDIR)")
    p.add_argument("--fsync", action="store_true", help="fsync every file (raw and tier)")
    p.add_argument("--settle-s", type=float, default=0.2,
                   help="pause after the flush before each disk pass")
    p.add_argument("--cache", choices=["cold", "warm"], default="cold",
                   help="disk reads from the device (cold) or from the page cache (warm)")
    p.add_argument("--redis-url", default=None,
                   help="server to use (default: start a temporary redis-server on 127.0.0.1)")
    p.add_argument("--no-disk", action="store_true")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_tiers)


def _tiers(args: argparse.Namespace) -> int:
    from kvtier.bench import tiers

    return json_or_table(args, tiers.run(args), _tiers_table)


def _tiers_table(res: dict[str, Any]) -> None:
    s = res["setup"]
    print(f"kvtier bench tiers: {s['chunks']} chunks of {s['chunk_bytes'] / 2**20:g} MiB "
          f"({s['chunk_meta']}), one batch, median of {s['repeats']}")
    print(f"  disk: {s['disk_path']} ({s['disk_fs']}); {s['disk_writes']}")
    print(f"  disk reads {s['disk_reads']}")
    print(f"  {'':9} {'raw GB/s':>9} {'tier GB/s':>10} {'tier/raw':>9} {'+MAC GB/s':>10} "
          f"{'MAC/tier':>9}")
    for name in ("disk", "redis"):
        if f"{name}_put_ratio" not in res:
            note = res.get(f"{name}_skipped", f"not run (--no-{name})")
            print(f"  {name:9} skipped: {note}")
            continue
        for op in ("put", "get"):
            print(f"  {name + ' ' + op:9} {res[f'{name}_raw_{op}_gbps']:9.2f} "
                  f"{res[f'{name}_tier_{op}_gbps']:10.2f} {res[f'{name}_{op}_ratio']:9.2f} "
                  f"{res[f'{name}_mac_{op}_gbps']:10.2f} {res[f'{name}_{op}_mac_ratio']:9.2f}")
    print("  +MAC: the same tier with an integrity key (chunks signed on write, MAC verified "
          "on read)")
    if "redis_server" in res:
        print(f"  redis: {res['redis_server']}, {res['redis_client']}")


# -- codecs -------------------------------------------------------------------

def _add_codecs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codecs", help="chunk codecs on real vLLM KV: size, speed, outputs vs raw")
    p.add_argument("--model", default="small", choices=["tiny", "small", "smollm2"],
                   help="local model (kvtier model build); smollm2: real KV, real questions")
    p.add_argument("--codecs", default="zlib,zstd,lz4,q8,q4",
                   help="comma list of raw, zlib, zstd, lz4, q8, q4 (raw always runs)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1100,
                   help="tokens per prompt (whole 256-token chunks hit, the rest is computed)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="encode/decode passes (median)")
    p.add_argument("--quick", action="store_true",
                   help="toy size for CI: tiny model, 3 prompts of 600 tokens, 8 tokens, 2 passes")
    p.add_argument("--work-dir", default=None, help="scratch folder parent (default: $TMPDIR)")
    p.add_argument("--timeout-s", type=float, default=1800, help="bound on each vLLM instance")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_codecs)


def _codecs(args: argparse.Namespace) -> int:
    from kvtier.bench import codecs

    if args.quick:
        args.model, args.prompts, args.prompt_tokens = "tiny", 3, 600
        args.max_tokens, args.repeats = 8, 2
    return json_or_table(args, codecs.run(args), _codecs_table)


def _codecs_table(res: dict[str, Any]) -> None:
    s = res["setup"]
    print(f"kvtier bench codecs: model {s['model']}, {s['prompts']} prompts x "
          f"{s['prompt_tokens']} tokens, {s['max_tokens']} greedy tokens each; "
          f"{s['chunks']} chunks ({s['raw_bytes'] / 2**20:.0f} MiB, {s['chunk_meta']})")
    print(f"  speed: one thread, median of {s['repeats']}; outputs: every request hits its "
          f"whole chunks from disk; baseline: {s['baseline']}")
    print(f"  {'codec':8} {'kind':8} {'ratio':>6} {'enc GB/s':>9} {'dec GB/s':>9} "
          f"{'prefix':>7} {'exact':>6} {'max|dlp|':>9} {'mean|dlp|':>10} {'bitwise':>8} {'hit tok':>8}")
    for r in res["codecs"]:
        kind = "lossless" if r["lossless"] else f"{r['bits']}-bit" if r["bits"] else "noise"
        speed = [f"{x:9.3f}" if x is not None else f"{'-':>9}"
                 for x in (r["encode_gbps"], r["decode_gbps"])]
        print(f"  {r['codec']:8} {kind:8} {r['ratio']:6.2f} {speed[0]} {speed[1]} "
              f"{r['token_agreement']:7.1%} {r.get('exact_match', 0):6.0%} "
              f"{r['max_abs_logprob_diff']:9.2g} {r['mean_abs_logprob_diff']:10.2g} "
              f"{str(r['bitwise_equal']):>8} {r['hit_tokens']:>4}/{s['hit_tokens_expected']}")


# -- cluster ------------------------------------------------------------------

def _add_layerwise(sub: argparse._SubParsersAction) -> None:
    from kvtier.bench import layerwise

    p = sub.add_parser("layerwise", help="layer-wise loads vs the bulk load, in real vLLM",
                       description=layerwise.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 4096-token document, 2 runs each")
    p.add_argument("--doc-tokens", type=int, default=None, help="document length (8192)")
    p.add_argument("--runs", type=int, default=None, help="runs per configuration (3)")
    p.add_argument("--repeats", type=int, default=8, help="hits per run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=lambda args: json_or_table(args, layerwise.run(args),
                                                   lambda r: print(layerwise.table(r))))


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="many instances: KV-aware routing vs round-robin, "
                       "prefill/decode split, peer-to-peer KV transfer")
    p.add_argument("--part", default="routing", choices=["routing", "pd", "transfer", "all"])
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    p.add_argument("--model", help="a local model directory (default: the built tiny model)")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: fast on this CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="logs folder (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cluster)


def _cluster(args: argparse.Namespace) -> int:
    from kvtier.bench.cluster import PARTS

    return parts(args, "kvtier.bench.cluster", PARTS)


def parts(args: argparse.Namespace, package: str, names: tuple[str, ...]) -> int:
    """Run ``--part`` (or all) of a benchmark made of parts; print tables or one JSON object."""
    import importlib

    parts = list(names) if args.part == "all" else [args.part]
    results: dict[str, Any] = {}
    for part in parts:
        module = importlib.import_module(f"{package}.{part}")
        results[part] = module.run(args)
        if not args.json:
            print(module.table(results[part]))
    if args.json:
        if len(parts) > 1:  # the headline numbers at the top, each part's details below
            results = {**{k: v for r in results.values() for k, v in r.items()
                          if isinstance(v, (int, float, bool))}, **results}
        print(json.dumps(results[parts[0]] if len(parts) == 1 else results))
    return 0


# -- serve --------------------------------------------------------------------

def _add_serve(sub: argparse._SubParsersAction) -> None:
    from kvtier.bench.serve import run
    from kvtier.bench.serve.servers import CONFIG_NAMES, DEFAULT_CONFIGS
    from kvtier.bench.serve.workloads import LongDocQA, MultiRoundQA

    p = sub.add_parser("serve", help="serving workloads vs vLLM alone and the peers",
                       description=run.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["long-doc-qa", "multi-round-qa", "redis-hit"],
                   required=True, help="redis-hit: a large Redis-only hit while other "
                   "requests decode, in-step vs background loads vs a codec (own configs)")
    p.add_argument("--configs", default="all",
                   help=f"comma list of {', '.join(CONFIG_NAMES)} (default all: "
                        f"{', '.join(DEFAULT_CONFIGS)}; vllm always)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes (all configurations in under 15 min on 2 cores)")
    p.add_argument("--toy", action="store_true", help="toy sizes (CI: keeps it working)")
    p.add_argument("--model", help="a local model directory (default: the built --shape)")
    p.add_argument("--shape", default="small", help="local model shape to build")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight (default: one per sender: 1 document at a time "
                        "for long-doc-qa is --concurrency 1)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="open loop: Poisson arrivals per second instead of a closed loop")
    p.add_argument("--engine-kv-requests", type=int, default=2,
                   help="engine KV holds this many of the longest requests (default 2)")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="engine KV blocks, exactly")
    p.add_argument("--kv-budget", default="2GiB", help="CPU memory of every KV layer")
    p.add_argument("--dtype", default="auto",
                   help="model dtype (auto: bfloat16 where the CPU has bf16 units, else float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/serve", help="results folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for key, value in {**vars(LongDocQA()), **vars(MultiRoundQA())}.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                       help=f"workload size (default {value}, or --quick's)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from kvtier.bench.serve import analysis, run
    from kvtier.bench.serve.servers import LABELS

    if args.workload == "redis-hit":
        from kvtier.bench.serve import slow_hit
        return json_or_table(args, slow_hit.run(args), lambda r: print(slow_hit.table(r)))
    if args.concurrency is None and args.workload == "long-doc-qa" and not args.request_rate:
        args.concurrency = 1
    res: dict[str, Any] = run.run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print()
        print(analysis.table(res["summary"], LABELS))
        print("\n" + analysis.outputs_note(res["outputs"]))
        peers = analysis.peer_table(res["summary"], LABELS)
        if peers:
            print("\nkvtier against the peers:\n" + peers)
        print(f"\nresults and plot in {args.out}")
    return 0 if all(s["errors"] == 0 for s in res["summary"].values()) else 1


# -- report -------------------------------------------------------------------

def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rerun the benchmarks, rewrite docs/benchmarks.md")
    p.add_argument("--quick", action="store_true", help="serving benchmarks at --quick size")
    p.add_argument("--configs", default="all", help="serving configurations (see bench serve)")
    p.add_argument("--parts", default="all", help="comma-separated parts to rerun (the others "
                   "come from docs/benchmarks.json): long-doc-qa, multi-round-qa, engine, "
                   "tiers, codecs, redis-hit, cluster; none: only rewrite the page")
    p.add_argument("--docs", default="docs", help="folder of benchmarks.md and img/")
    p.add_argument("--scratch", default="bench-out/report", help="per-request results")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from kvtier.bench import report

    print(f"[bench report] wrote {report.run(args)}")
    return 0
