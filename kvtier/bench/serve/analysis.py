"""Summaries, ratios, plots and tables of ``kvtier bench serve`` runs.

Which requests count: in long-doc-qa the first round is the warm-up that
computes every document once (reported apart as ``cold_ttft_p50_s``); the
later rounds are measured. In multi-round-qa every turn is measured. QPS is
measured requests per second of the span from the first measured request's
send to the last one's answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from kvtier.bench.serve.client import Result

BASELINE = "vllm"


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measured(workload: str, results: Sequence[Result]) -> list[Result]:
    """The requests a summary counts (see the module docstring)."""
    if workload == "long-doc-qa":
        return [r for r in results if r.round > 0]
    return list(results)


def summarize(workload: str, results: Sequence[Result]) -> dict[str, Any]:
    """TTFT, ITL, QPS and hit rate of one configuration's run."""
    ok = [r for r in results if r.error is None]
    meas = measured(workload, ok)
    ttft = [r.ttft_s for r in meas]
    itl = [r.itl_s for r in meas if r.itl_s is not None]
    span = (max(r.sent_s + r.latency_s for r in meas) - min(r.sent_s for r in meas)
            if meas else float("nan"))
    cold = [r.ttft_s for r in ok if r.round == 0]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "ttft_p50_s": quantile(ttft, 0.5), "ttft_p90_s": quantile(ttft, 0.9),
            "itl_p50_s": quantile(itl, 0.5), "qps": len(meas) / span if meas else 0.0,
            "hit_rate": (sum(r.cached_tokens for r in meas)
                         / max(1, sum(r.prompt_tokens for r in meas))),
            "cold_ttft_p50_s": quantile(cold, 0.5)}


def compare_outputs(results: Sequence[Result], baseline: Sequence[Result]) -> dict[str, Any]:
    """Greedy outputs against the baseline's, request by request."""
    base = {(r.user, r.round): r for r in baseline if r.error is None}
    same, diffs, n, differ = 0, [0.0], 0, []
    for r in results:
        b = base.get((r.user, r.round))
        if b is None or r.error is not None:
            continue
        n += 1
        if r.token_ids == b.token_ids:
            same += 1
        else:
            differ.append([r.user, r.round])
        diffs += [abs(x - y) for x, y in zip(r.logprobs, b.logprobs)]
    return {"outputs_compared": n, "outputs_identical": same, "outputs_differ": sorted(differ),
            "logprob_max_abs_diff": max(diffs)}


def layers_agree(results: dict[str, Sequence[Result]]) -> dict[str, Any]:
    """Where some KV layer's output differs from vLLM alone's: do the KV layers
    (every configuration but the baseline) give the same tokens as one another?

    Every KV layer agreeing token for token where they all part from vLLM alone
    points at the engine (the same prompt's KV computed in another prefill
    split rounds differently in bfloat16), not at one layer's data path. Where
    they split, ``splits`` gives the groups of configurations with equal tokens
    and whether every KV layer had the same number of cached tokens.
    """
    ok = {n: {(r.user, r.round): r for r in rs if r.error is None} for n, rs in results.items()}
    base = ok.get(BASELINE, {})
    layers = {n: got for n, got in ok.items() if n != BASELINE}
    differ = sorted({k for got in layers.values() for k, r in got.items()
                     if k in base and r.token_ids != base[k].token_ids})
    splits = []
    for k in differ:
        if len({tuple(got[k].token_ids) if k in got else None for got in layers.values()}) == 1:
            continue  # every KV layer has the same tokens
        groups: dict[tuple[int, ...], list[str]] = {}
        for n, got in ok.items():
            if k in got:
                groups.setdefault(tuple(got[k].token_ids), []).append(n)
        cached = {got[k].cached_tokens for got in layers.values() if k in got}
        splits.append({"request": list(k), "groups": list(groups.values()),
                       "same_cached_tokens": len(cached) == 1})
    return {"requests_differing_from_vllm": [list(k) for k in differ],
            "layers_identical_on_them": len(differ) - len(splits), "splits": splits,
            "layers": list(layers)}


def add_ratios(summary: dict[str, dict[str, Any]]) -> None:
    """Speed-ups of every configuration against vLLM alone and the two peers, in place."""
    for ref in (BASELINE, "native", "lmcache"):
        if ref not in summary:
            continue
        r = summary[ref]
        for s in summary.values():
            s[f"ttft_p50_speedup_vs_{ref}"] = _ratio(r["ttft_p50_s"], s["ttft_p50_s"])
            s[f"qps_ratio_vs_{ref}"] = _ratio(s["qps"], r["qps"])
    if BASELINE in summary:
        bound = summary[BASELINE]["ttft_p90_s"]
        for s in summary.values():
            s["latency_bound_s"] = bound
            s["within_latency_bound"] = bool(s["ttft_p90_s"] <= bound * 1.0001)


def _ratio(num: float, den: float) -> float:
    return num / den if den and den == den and num == num else float("nan")


def table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """A Markdown table of one workload's configurations."""
    head = ("| configuration | TTFT p50 | TTFT p90 | ITL p50 | QPS | hit rate | "
            "TTFT p50 speed-up vs vLLM | QPS vs vLLM | outputs = vLLM |")
    rows = [head, "|" + "---|" * 9]
    for name, s in summary.items():
        same = (f"{s['outputs_identical']}/{s['outputs_compared']}"
                if "outputs_compared" in s else "(baseline)")
        rows.append(f"| {labels.get(name, name)} | {_ms(s['ttft_p50_s'])} | "
                    f"{_ms(s['ttft_p90_s'])} | {_ms(s['itl_p50_s'])} | {s['qps']:.3f} | "
                    f"{s['hit_rate']:.1%} | {_x(s.get('ttft_p50_speedup_vs_vllm'))} | "
                    f"{_x(s.get('qps_ratio_vs_vllm'))} | {same} |")
    return "\n".join(rows)


def peer_table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """kvtier's TTFT p50 speed-up against each peer (ratio > 1: kvtier is faster)."""
    refs = [r for r in ("native", "lmcache") if r in summary]
    ours = [n for n in summary if n.startswith("kvtier")]
    if not refs or not ours:
        return ""
    rows = ["| kvtier configuration | " + " | ".join(f"vs {labels[r]}" for r in refs) + " |",
            "|---|" + "---|" * len(refs)]
    for n in ours:
        rows.append(f"| {labels[n]} | " + " | ".join(
            f"TTFT p50 {_x(summary[n][f'ttft_p50_speedup_vs_{r}'])}, "
            f"QPS {_x(summary[n][f'qps_ratio_vs_{r}'])}" for r in refs) + " |")
    return "\n".join(rows)


def outputs_note(outputs: dict[str, Any] | None) -> str:
    """Sentences on the requests whose greedy output differs from vLLM alone's."""
    if not outputs:
        return ""
    differ = outputs["requests_differing_from_vllm"]
    if not differ:
        return "Every configuration's greedy outputs equal vLLM alone's, token for token."
    which = ", ".join(f"user {u} turn {r}" for u, r in differ)
    note = f"Greedy outputs that differ from vLLM alone's: {which}."
    if len(outputs["layers"]) < 2:
        return note
    n, same = len(differ), outputs["layers_identical_on_them"]
    if same:
        note += (f" On {'each' if same == n else f'{same} of these {n}'}, every KV layer "
                 f"({', '.join(outputs['layers'])}) gives the same tokens as the others: the "
                 "difference comes from the engine, not from one layer (the same prompt's KV "
                 "computed in another prefill split, a longer cached prefix, rounds "
                 "differently in bfloat16, and a near-tie in greedy decoding flips).")
    for sp in outputs.get("splits", []):
        u, r = sp["request"]
        groups = " | ".join(", ".join(g) for g in sp["groups"])
        note += f" On user {u} turn {r} the runs split ({groups})"
        if sp["same_cached_tokens"]:
            note += (" although every KV layer served the same number of cached tokens: the "
                     "split follows the run, not the KV (with several requests in flight, a "
                     "request's decode steps share batches with different requests from run "
                     "to run, and bfloat16 rounding can depend on the batch).")
        else:
            note += ", with different numbers of cached tokens."
    return note


def _ms(s: float | None) -> str:
    return "-" if s is None or s != s else f"{s * 1e3:.0f} ms"


def _x(r: float | None) -> str:
    return "-" if r is None or r != r else f"{r:.2f}x"


def plot(workload: str, results: dict[str, list[Result]], summary: dict[str, dict[str, Any]],
         labels: dict[str, str], path: Path) -> Path:
    """One PNG: TTFT CDF, QPS bars and hit-rate bars of every configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_qps, ax_hit) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, res in results.items():
        xs = sorted(r.ttft_s for r in measured(workload, res) if r.error is None)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax_cdf.step(xs, ys, where="post", label=labels.get(name, name))
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("TTFT (s, log scale)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title(f"{workload}: TTFT CDF")
    ax_cdf.legend(fontsize=7, loc="lower right")
    names = list(summary)
    ax_qps.bar(names, [summary[n]["qps"] for n in names], color="tab:blue")
    ax_qps.set_title("QPS (higher is better)")
    ax_hit.bar(names, [summary[n]["hit_rate"] * 100 for n in names], color="tab:green")
    ax_hit.set_title("prompt tokens served from cache (%)")
    ax_hit.set_ylim(0, 100)
    for ax in (ax_qps, ax_hit):
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

