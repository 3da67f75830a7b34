"""``kvtier bench itl`` and ``kvtier bench scale``: the latency and cost curves'
arguments and printing."""

from __future__ import annotations

import argparse


def add_itl(sub: argparse._SubParsersAction) -> None:
    from kvtier.bench import itl

    p = sub.add_parser("itl", help="inter-token latency under vLLM's own bench serve: vLLM "
                       "alone vs kvtier vs native offloading", description=itl.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 prompts instead of 96")
    p.add_argument("--matrix", action="store_true", help="every shape of the matrix at 2 "
                   "and 4 in flight (--shape, --dtype and --concurrency then unused)")
    p.add_argument("--shape", default="small", help="local model shape (kvtier model build)")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: by the CPU)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    p.add_argument("--configs", type=lambda v: tuple(v.split(",")), default=None,
                   help="comma list (default vllm,kvtier-memory,native; kvtier-unverified: "
                        "the canary off)")
    p.add_argument("--trace", action="store_true",
                   help="kvtier's step timeline (KVTIER_STEP_TRACE): its slowest hooks")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per point (default 3, --quick 2); also reported: the "
                        "median of per-round kvtier/native ratios")
    p.add_argument("--toy", action="store_true",
                   help="one round of 8 prompts (CI: end to end, numbers meaningless)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_itl)


def _itl(args: argparse.Namespace) -> int:
    from kvtier.bench import itl
    from kvtier.cli.bench import json_or_table

    def show(r: dict) -> None:
        print(itl.table(r))
        print("\n".join(itl.threads_note(r.get("points") or [r])))

    return json_or_table(args, itl.run(args), show)


def add_scale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="cost curves as requests, context, data and instances "
                       "grow: scheduler cost per step, the miss path, working sets beyond "
                       "memory, long context, the controller with simulated instances")
    p.add_argument("--part", default="scheduler",
                   choices=["scheduler", "miss", "beyond", "long", "controller", "all"])
    p.add_argument("--quick", action="store_true", help="fewer points and steps")
    p.add_argument("--toy", action="store_true", help="toy sizes, numbers meaningless (CI: "
                   "keeps the serving, long-context and controller parts working)")
    p.add_argument("--block-size", type=int, default=16, help="engine block size (tokens)")
    p.add_argument("--max-resident-tokens", type=int, default=8 << 20,
                   help="skip points whose running requests hold more prompt tokens")
    p.add_argument("--miss-shape", default="small", help="miss part: the model shape")
    p.add_argument("--miss-rounds", type=int, default=None,
                   help="miss part: rounds (default 4, --quick 2); also reported: the median "
                        "of per-round kvtier / vLLM-alone ratios")
    p.add_argument("--beyond-shape", default="small", help="beyond part: the model shape")
    p.add_argument("--instance-chunks", type=int, default=100_000,
                   help="controller part: chunks each simulated instance stores")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_scale)


def _scale(args: argparse.Namespace) -> int:
    from kvtier.bench.scale import PARTS
    from kvtier.cli.bench import parts

    return parts(args, "kvtier.bench.scale", PARTS)
