"""The ``kvtier bench scale`` section of ``docs/benchmarks.md``: each part's goal and
measured figure, its table, and the cost curves as plots (``docs/img/scale-*.png``, log
axes where the quantity spans decades)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kvtier.bench.scale import PARTS

GOALS = {
    "scheduler": ("connector time per step at 256 running requests: at or below native, "
                  "under 1 ms", lambda r: f"kvtier {r['scheduler_us_per_step_kvtier']:.0f} us, "
                  f"native {r['scheduler_us_per_step_native']:.0f} us "
                  f"({r['scheduler_ratio_vs_native']:.2f}x) at "
                  f"{r['scheduler_headline']['prompt_tokens']}-token prompts"),
    "miss": ("no reuse: throughput >= 0.98x vLLM alone, ITL p99 <= 1.02x",
             lambda r: f"throughput {r['miss_path_throughput_ratio']:.3f}x, ITL p99 "
                       f"{r['miss_path_itl_p99_ratio']:.3f}x" + (
                           f" (round by round: {r['miss_path_paired_throughput_ratio']:.3f}x, "
                           f"{r['miss_path_paired_itl_p99_ratio']:.3f}x)"
                           if "miss_path_paired_throughput_ratio" in r else "")),
    "beyond": ("working set 3x the CPU budget: native's TTFT p50 / kvtier's >= 2",
               lambda r: f"{r['beyond_memory_ttft_ratio_vs_native']:.2f}x (memory+disk)"
                         + (f", {r['beyond_memory_ttft_ratio_vs_native_redis']:.2f}x "
                            "(memory+Redis)" if "beyond_memory_ttft_ratio_vs_native_redis"
                            in r else "")),
    "long": ("long context: no step in kvtier's part grows faster than the context",
             lambda r: f"hit time per cached token, longest / shortest document: "
                       f"{r['long_context_per_token_growth']:.2f}; hit "
                       f"{r['long_context_speedup_vs_cold']:.0f}x faster than cold"),
    "controller": ("lookup p99 under 5 ms at 64 instances x 100k chunks; ingest keeps up "
                   "with 64 instances storing 1 GB/s each",
                   lambda r: f"lookup p99 {r['controller_lookup_p99_ms']:.2f} ms "
                             f"({r['setup']['headline_instances']} instances), ingest "
                             f"{r['controller_ingest_chunks_per_s']:,.0f} chunks/s = "
                             f"{r['controller_ingest_vs_goal']:.0f}x the goal's "
                             f"{r['controller_ingest_goal_chunks_per_s']:,.0f}"),
}


def section(res: dict[str, Any], cmd: str, docs: Path = Path("docs")) -> list[str]:
    """The section (its first line the heading); plots written into ``docs/img``."""
    if any(p in res for p in PARTS):  # --part all: each part's result under its name
        results = {p: res[p] for p in PARTS if p in res}
    else:
        only = _only(res)
        results = {only: res} if only else {}
    out = [f"## Cost curves (`{cmd}`)", "",
           "What kvtier costs as requests, context length, instances and data grow, each "
           "part beside its baseline in the same run. Goals and what was measured:", "",
           "| part | goal | measured |", "|---|---|---|"]
    for part, r in results.items():
        goal, got = GOALS[part]
        out.append(f"| {part} | {goal} | {got(r)} |")
    out.append("")
    for part, r in results.items():
        module = importlib.import_module(f"kvtier.bench.scale.{part}")
        out += ["```", module.table(r), "```", ""]
        image = _plot(part, r, docs / "img")
        if image:
            out += [f"![{part}](img/{image})", ""]
    return out


def _only(res: dict[str, Any]) -> str | None:
    """The part a single part's result is of (``--part X --json`` prints it bare)."""
    keys = {"scheduler": "scheduler_us_per_step_kvtier", "miss": "miss_path_throughput_ratio",
            "beyond": "beyond_memory_ttft_ratio_vs_native", "long": "long_context_load_gb_s",
            "controller": "controller_lookup_p99_ms"}
    return next((p for p, k in keys.items() if k in res), None)


def _plot(part: str, r: dict[str, Any], img: Path) -> str | None:
    """The part's curve as ``scale-PART.png`` in ``img`` (None: a part with no curve)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if part == "scheduler":
        for n in sorted({p["running"] for p in r["points"]}):
            pts = [p for p in r["points"] if p["running"] == n]
            x = [p["prompt_tokens"] for p in pts]
            line, = ax.plot(x, [p["kvtier_us"] for p in pts], "o-", label=f"kvtier, {n} running")
            ax.plot(x, [p["native_us"] for p in pts], "s--", color=line.get_color(),
                    label=f"native, {n} running")
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens",
               ylabel="connector us per engine step")
    elif part == "controller":
        for backend in ("memory", "redis"):
            pts = [p for p in r["points"] if p["backend"] == backend]
            if pts:
                x = [p["instances"] for p in pts]
                line, = ax.plot(x, [p["lookup_p99_ms"] for p in pts], "o-",
                                label=f"lookup p99, index in {backend}")
                ax.plot(x, [p["health_p99_ms"] for p in pts], ":", color=line.get_color(),
                        label=f"HTTP floor p99 ({backend} run)")
        ax.set(xscale="log", yscale="log", xlabel="simulated instances", ylabel="ms")
    elif part == "long":
        x = [p["tokens"] for p in r["points"]]
        for key, label in (("cold_ttft_s", "cold (prefill)"),
                           ("vllm_hit_ttft_s", "vLLM's own hit"),
                           ("kvtier_hit_ttft_s", "kvtier hit (memory tier)")):
            ax.plot(x, [p[key] for p in r["points"]], "o-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="document tokens", ylabel="TTFT (s)")
    else:
        plt.close(fig)
        return None
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    img.mkdir(parents=True, exist_ok=True)
    name = f"scale-{part}.png"
    fig.savefig(img / name, dpi=110)
    plt.close(fig)
    return name
