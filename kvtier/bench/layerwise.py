"""``kvtier bench layerwise``: layer-wise loads (``layerwise: true``) against the
bulk load, in real vLLM on this CPU.

Setup: the small local model (24 layers) in real vLLM, one process per run
(threads pinned alike, ``VLLM_CPU_OMP_THREADS_BIND`` from kvtier's test
settings), vLLM's own prefix cache off so every repeat of the document is a
kvtier memory-tier hit. A run stores one document (round 0), then asks it
again ``--repeats`` times, one token each: each repeat's TTFT is one engine
step that loads the whole hit (``doc_tokens - 1``) and computes the last token.
Configurations alternate run by run (bulk, layer-wise, bulk, ...) so drift in
the machine hits both alike; vLLM with no cache (a cold prefill of the same
document) is measured in the same run as the scale. Reports each
configuration's median hit TTFT, the workers' seconds spent copying per hit,
and the ratio layer-wise / bulk (below 1: layer-wise faster).

    kvtier bench layerwise [--quick] [--json]

The accelerator side (copies queued on a CUDA side stream) is measured by
``benchmarks/device_transfer.py`` on a GPU machine; its last result is kept
in ``docs/device/`` and shown beside this one on the report page.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from kvtier.testing.models import build_model, make_document
from kvtier.testing.offline import run_instance
from kvtier.testing.vllm_cpu import fast_dtype

BLOCK = 128


def one_run(model: str, doc: list[int], repeats: int, layerwise: bool | None,
            scratch: Path) -> dict[str, Any]:
    req = {"prompt": doc, "max_tokens": 1}
    kvtier = None if layerwise is None else {
        "tiers": ["memory"], "memory.max_bytes": "1GiB", "layerwise": layerwise}
    out = run_instance({"model": model, "dtype": fast_dtype(), "kvtier": kvtier,
                        "rounds": [[req]] * (repeats + 1), "prefix_caching": False,
                        "max_model_len": -(-(len(doc) + 64) // BLOCK) * BLOCK,
                        "kv_space_gib": 2}, log_path=str(scratch / "vllm.log"))
    hits = [r[0] for r in out["rounds"][1:]]
    if layerwise is not None:
        assert all(h["num_cached_tokens"] == len(doc) - 1 for h in hits), "not a full hit"
    totals = out.get("kvtier_worker") or {}
    return {"ttft_ms": [h["ttft_s"] * 1e3 for h in hits],
            "load_ms_per_hit": totals.get("load_seconds", 0) * 1e3 / repeats,
            "layers_moved": totals.get("layerwise_layers", 0)}


def run(args: Any) -> dict[str, Any]:
    """Alternating runs of both configurations, then vLLM alone; returns the summary."""
    doc_tokens = args.doc_tokens or (4096 if args.quick else 8192)
    runs = args.runs or (2 if args.quick else 3)
    model = str(build_model("small"))
    doc = make_document(model, doc_tokens, seed=7)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-layerwise-"))
    results: dict[str, list[dict[str, Any]]] = {"bulk": [], "layerwise": []}
    for _ in range(runs):
        for name in results:
            results[name].append(one_run(model, doc, args.repeats, name == "layerwise",
                                         scratch))
    cold = one_run(model, doc, 2, None, scratch)  # vLLM alone: every repeat a prefill
    rows = {}
    for name, rs in results.items():
        rows[name] = {"ttft_p50_ms": statistics.median(t for r in rs for t in r["ttft_ms"]),
                      "load_ms_per_hit": statistics.median(r["load_ms_per_hit"] for r in rs),
                      "layers_moved": sum(r["layers_moved"] for r in rs)}
    return {"setup": {"model": "small-v1 (24 layers, 2 KV heads x 64)", "dtype": fast_dtype(),
                      "doc_tokens": doc_tokens, "runs": runs, "repeats": args.repeats},
            "configs": rows, "vllm_cold_ttft_p50_ms": statistics.median(cold["ttft_ms"]),
            "layerwise_vs_bulk_ttft": rows["layerwise"]["ttft_p50_ms"]
            / rows["bulk"]["ttft_p50_ms"]}


def table(res: dict[str, Any]) -> str:
    lines = ["| configuration | hit TTFT p50 | copying per hit (workers) |", "| --- | --- | --- |"]
    for name, r in res["configs"].items():
        lines.append(f"| {name} | {r['ttft_p50_ms']:.1f} ms | {r['load_ms_per_hit']:.1f} ms |")
    lines.append(f"| vLLM alone (cold prefill) | {res['vllm_cold_ttft_p50_ms']:.0f} ms | |")
    return "\n".join(lines) + (f"\n\nlayer-wise / bulk hit TTFT: "
                               f"{res['layerwise_vs_bulk_ttft']:.3f}x")
