"""Part 1: the connector's scheduler-side cost per engine step, kvtier beside vLLM native.

At each point (running requests ``R``, prompt length ``L``) vLLM's own scheduler
(:mod:`kvtier.bench.scale.engine`) runs ``R`` requests of ``L`` distinct tokens to
steady state, then every measured step one request finishes and a new one of ``L``
tokens arrives (looked up, allocated, prefilled in 8192-token chunks beside the others'
decodes): the continuous batch of a busy server. What is measured is the time spent
inside the connector's methods per step (median over the steps), for kvtier's
``KvtierConnector`` and for vLLM's ``OffloadingConnector`` (CPU spec, scheduler side
only), same points, same process, alternating. Prompts share nothing (every lookup is
a miss that still keys the whole prompt). No model runs; vLLM's block hashing is
vLLM's own work and is not counted for either.
"""

from __future__ import annotations

import gc
import random
import statistics
from typing import Any

from kvtier.bench.scale.engine import KVTIER, NATIVE, TimedScheduler, vllm_config

RUNNING = (1, 16, 64, 256)
LENGTHS = (1024, 8192, 32768, 131072)
QUICK_RUNNING = (1, 16, 256)
QUICK_LENGTHS = (1024, 8192)
HEADLINE = 256


def run(args: Any) -> dict[str, Any]:
    """Per point kvtier's and native's connector microseconds per step and their ratio;
    ``scheduler_us_per_step_kvtier`` / ``_native`` at 256 running requests (the longest
    prompt measured there)."""
    quick = bool(getattr(args, "quick", False))
    running = QUICK_RUNNING if quick else RUNNING
    lengths = QUICK_LENGTHS if quick else LENGTHS
    steps = 8 if quick else 24
    max_tokens = int(getattr(args, "max_resident_tokens", None) or 8 << 20)
    block = int(getattr(args, "block_size", None) or 16)
    configs = {name: vllm_config(conn, block, max(lengths) + 4096, max(running) + 8)
               for name, conn in (("kvtier", KVTIER), ("native", NATIVE))}
    points, skipped = [], []
    for n in running:
        for length in lengths:
            if n * length > max_tokens:
                skipped.append({"running": n, "prompt_tokens": length})
                continue
            point: dict[str, Any] = {"running": n, "prompt_tokens": length}
            for name in ("native", "kvtier"):
                per_step, vllm_step = _measure(configs[name], n, length, steps, block)
                point[f"{name}_us"] = statistics.median(per_step) * 1e6
                point[f"{name}_vllm_step_us"] = statistics.median(vllm_step) * 1e6
            point["ratio"] = point["kvtier_us"] / point["native_us"]
            points.append(point)
    at = [p for p in points if p["running"] == HEADLINE] or [points[-1]]
    head = at[-1]
    return {"scheduler_us_per_step_kvtier": head["kvtier_us"],
            "scheduler_us_per_step_native": head["native_us"],
            "scheduler_ratio_vs_native": head["kvtier_us"] / head["native_us"],
            "scheduler_headline": {"running": head["running"],
                                   "prompt_tokens": head["prompt_tokens"]},
            "scheduler_max_ratio_vs_native": max(p["ratio"] for p in points),
            "points": points, "skipped": skipped,
            "setup": {"block_size": block, "steps": steps, "max_resident_tokens": max_tokens,
                      "quick": quick, "statistic": "median of the measured steps"}}


def _measure(vc: Any, n: int, length: int, steps: int, block: int
             ) -> tuple[list[float], list[float]]:
    rng = random.Random(n * 1_000_003 + length)
    extra = steps + 64  # decode tokens per request over the run, and the newcomers
    blocks = (n + steps + 4) * (-(-(length + extra) // block) + 2)
    eng = TimedScheduler(vc, blocks)
    try:
        serial = 0

        def prompt() -> list[int]:
            return [rng.randrange(1, 30000) for _ in range(length)]

        live = []
        for _ in range(n):
            live.append(f"r{serial}")
            eng.add(live[-1], prompt())
            serial += 1
        while eng.step()[2] or eng.sched.waiting:  # to steady state: all decoding
            pass
        eng.step()
        per_step, vllm_step = [], []
        gc.collect()
        for _ in range(steps):
            eng.finish(live.pop(0))
            live.append(f"r{serial}")
            eng.add(live[-1], prompt())
            serial += 1
            conn_s, all_s, _ = eng.step()
            per_step.append(conn_s)
            vllm_step.append(all_s)
        return per_step, vllm_step
    finally:
        eng.close()


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"kvtier bench scale --part scheduler: connector time per engine step (median of "
             f"{s['steps']} steps; block {s['block_size']}; one request finishes and one "
             f"arrives each step)",
             f"  {'running':>7} {'prompt':>7} {'kvtier us':>10} {'native us':>10} "
             f"{'ratio':>6} {'vLLM schedule+update us (kvtier/native)':>40}"]
    for p in res["points"]:
        lines.append(f"  {p['running']:7} {p['prompt_tokens']:7} {p['kvtier_us']:10.0f} "
                     f"{p['native_us']:10.0f} {p['ratio']:6.2f} "
                     f"{p['kvtier_vllm_step_us']:24.0f} / {p['native_vllm_step_us']:.0f}")
    for p in res["skipped"]:
        lines.append(f"  {p['running']:7} {p['prompt_tokens']:7} skipped (over "
                     f"--max-resident-tokens {s['max_resident_tokens']})")
    h = res["scheduler_headline"]
    lines.append(f"  at {h['running']} running, {h['prompt_tokens']} tokens: kvtier "
                 f"{res['scheduler_us_per_step_kvtier']:.0f} us, native "
                 f"{res['scheduler_us_per_step_native']:.0f} us per step")
    return "\n".join(lines)
