"""``kvtier demo``: cold vs warm TTFT across two vLLM instances (see :mod:`kvtier.bench.demo`)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

from kvtier.bench import demo


class _Progress:
    """One line per document as it starts and ends, and the elapsed time while it runs."""

    def __init__(self, docs: int, every_s: float = 15.0) -> None:
        self.docs, self.every_s = docs, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, instance: str, event: dict[str, Any]) -> None:
        what = f"[demo] {instance}: document {event['index'] + 1}/{self.docs}"
        if event["event"] == "start":
            print(f"{what}: {event['prompt_tokens']} prompt tokens ...", flush=True)
            self._start_ticker(what)
        else:
            self._stop_ticker()
            computed = "" if instance == "cold" else f", {event['cached_tokens']} from kvtier"
            print(f"{what}: done in {event['wall_s']:.1f} s{computed}", flush=True)

    def _start_ticker(self, what: str) -> None:
        self._stop = threading.Event()
        t0 = time.monotonic()

        def tick() -> None:
            while not self._stop.wait(self.every_s):
                print(f"{what}: {time.monotonic() - t0:.0f} s", flush=True)
        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def _stop_ticker(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


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
    for r in res["rows"]:
        if "question" in r:
            print(f"\ndoc {r['doc']}: {r['document']} ({r['prompt_tokens']} tokens) -- "
                  f"{r['question']}")
            print(f"  cold ({r['ttft_cold_s'] * 1e3:>6.0f} ms): {_one_line(r['answer_cold'])}")
            print(f"  warm ({r['ttft_warm_s'] * 1e3:>6.0f} ms): {_one_line(r['answer_warm'])}")
    print(f"\nA new vLLM instance got each document's KV back from kvtier's disk tier: median "
          f"TTFT speed-up {med:.1f}x; greedy tokens {'identical' if same else 'DIFFERENT'} "
          f"to the cold run; logprobs differ by at most {lp:.2g} (0: bitwise equal).")
    if not same:
        print("A hit computes the question's tokens against stored KV, a cold run in one step "
              "with the document: the sums round differently, so a near-tie between two tokens "
              "can flip (vLLM's own prefix cache flips it the same way).")


def _one_line(text: str, width: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``kvtier demo``."""
    p = subparsers.add_parser("demo", help="cold vs warm TTFT across two vLLM instances")
    p.add_argument("--shape", default="smollm2",
                   help="local model to build: smollm2 (real: answers you can read), or a "
                        "random-weight shape (small, tiny: made-up documents)")
    p.add_argument("--model", help="a local model directory instead of a built one")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8000,
                   help="tokens per made-up document (random-weight shapes)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per question (default: 48 real, 16 random)")
    p.add_argument("--dtype", default="auto",
                   help="model dtype (auto: bfloat16 where the CPU has bf16 units, else float32)")
    p.add_argument("--memory", default="1GiB", help="memory tier budget")
    p.add_argument("--disk-path", help="disk tier folder (emptied first; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the disk folder afterwards")
    p.add_argument("--log", default="kvtier-demo.log", help="vLLM's log file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = sys.stderr if args.json else sys.stdout

    def say(msg: str) -> None:
        print(f"[demo] {msg}", file=out, flush=True)
    res = demo.run(args, say, None if args.json else _Progress(args.docs))
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0 if all(r["identical"] for r in res["rows"]) else 1
