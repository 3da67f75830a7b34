"""Sections of ``docs/benchmarks.md`` for the codec, async-load and cluster
benchmarks (each ``(result, command) -> lines``, the first line its heading)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtier.bench.serve import slow_hit


def codecs(res: dict[str, Any], cmd: str) -> list[str]:
    s = res["setup"]
    out = [
        f"## Codecs on real vLLM KV (`{cmd}`)",
        "",
        f"Model `{s['model']}`: {s['prompts']} prompts x {s['prompt_tokens']} tokens, "
        f"{s['chunks']} chunks ({s['raw_bytes'] / 2**20:.0f} MiB, {s['chunk_meta']}) captured "
        "from a real vLLM run through the disk tier. Speed: one thread, median of "
        f"{s['repeats']}. Outputs: every prompt served again as a hit of its whole chunks, "
        f"encoded with each codec, {s['max_tokens']} greedy tokens, against {s['baseline']}. "
        "`raw+1ulp` flips the last bit of about half the values, at random: the agreement "
        "any lossy codec is measured against.",
        "",
        "| codec | kind | ratio | encode GB/s | decode GB/s | answer prefix = raw | "
        "max abs logprob diff | mean | hit tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["codecs"]:
        kind = "lossless" if r["lossless"] else f"{r['bits']}-bit" if r["bits"] else "noise"
        enc, dec = (f"{x:.3f}" if x is not None else "-"
                    for x in (r["encode_gbps"], r["decode_gbps"]))
        out.append(f"| {r['codec']} | {kind} | {r['ratio']:.2f}x | {enc} | {dec} | "
                   f"{r['token_agreement']:.1%} | {r['max_abs_logprob_diff']:.2g} | "
                   f"{r['mean_abs_logprob_diff']:.2g} | {r['hit_tokens']}/"
                   f"{s['hit_tokens_expected']} |")
    out += ["", "Goals: lossless >= 1.4x smaller than raw; 8-bit >= 2x with >= 99% "
            "greedy token agreement."]
    noise = next((r for r in res["codecs"] if r["codec"] == "raw+1ulp"), None)
    q8 = next((r for r in res["codecs"] if r["codec"] == "q8"), None)
    if noise is not None and noise["token_agreement"] < 0.99 and s.get("stop_at_eos"):
        out += ["", f"A trained model (answers end at its end of turn), and still: one flipped "
                f"last bit in about half the values leaves {noise['token_agreement']:.1%} of "
                "each greedy answer (its prefix) equal to raw's. Its greedy answers are this "
                "sensitive to any change of their KV, so that is the most any lossy codec can "
                "show here, and the 99% goal is out of reach of every lossy codec on this model"
                + (f"; q8 keeps {q8['token_agreement']:.1%}, "
                   f"{q8['token_agreement'] / noise['token_agreement']:.0%} of it." if q8 and
                   noise["token_agreement"] else ".")]
    elif noise is not None and noise["token_agreement"] < 0.99:
        out += ["", f"These models have random weights: their greedy choices sit on near-ties, "
                f"and one flipped last bit per value already leaves only "
                f"{noise['token_agreement']:.1%} of each greedy answer (its prefix) equal to raw's. Token "
                "agreement here cannot tell a good lossy codec from a bad one (a lossy codec "
                "at the noise row's level is as good as this model can show); the lossless "
                "rows are bitwise equal, and the ratio and speed columns hold for any weights. "
                "The agreement goal needs a trained model."]
    return out + [""]


def redis_hit(res: dict[str, Any], cmd: str) -> list[str]:
    s = res["setup"]
    return [
        f"## A large Redis hit while others decode (`{cmd}`)",
        "",
        f"Model `{Path(s['model']).name}` ({s['dtype']}), vLLM threads on cores "
        f"{s['threads_bind']}, tiers {', '.join(s['tiers'])}, engine KV {s['engine_kv_blocks']} blocks. "
        f"Per configuration a first server stores a {s['doc_tokens']}-token document in Redis "
        "and stops; a fresh server (memory tier empty) runs "
        f"{s['decoders']} streaming decoders ({s['decode_tokens']} tokens each) alone, then "
        "again while the document arrives as a Redis-only hit. `in-step` is "
        "`async_loads: false` (the read inside the engine step).",
        "",
        slow_hit.table(res),
        "",
        "Goals: decoders' ITL p99 during the hit within 1.2x of the same run without it; a "
        "hit's TTFT with a codec lower than without.",
        "",
    ]


DEVICE_RESULT = Path("device") / "device_transfer-h200.json"
"""The GPU check's result (``benchmarks/device_transfer.py``), relative to the docs folder."""


def layerwise(res: dict[str, Any], cmd: str, docs: Path = Path("docs")) -> list[str]:
    """The CPU run, then the GPU check's result kept in ``docs`` (the report's
    ``--docs``; an installed package has no repository to look in), if it is there."""
    from kvtier.bench import layerwise as lw

    s = res["setup"]
    out = [
        f"## Layer-wise loads (`{cmd}`)",
        "",
        f"Model {s['model']}, {s['dtype']}, real vLLM on the CPU with its own prefix cache "
        f"off: a {s['doc_tokens']}-token document stored once, then asked again "
        f"{s['repeats']} times per run ({s['runs']} runs per configuration, alternating): each "
        "hit is one engine step that loads the document's KV and computes its last token. "
        "`bulk` copies every layer before the forward pass (the default); `layerwise` copies "
        "each layer in vLLM's `wait_for_layer_load`, right before its attention.",
        "",
        lw.table(res),
        "",
        "On this CPU the copy and the forward pass share the same cores: moving the copy "
        "into the forward pass overlaps nothing and adds a kernel call per layer, so "
        "`layerwise` stays off by default.",
        "",
    ]
    device = docs / DEVICE_RESULT
    if device.is_file():
        d = json.loads(device.read_text())
        sp, st, su = d["speed"], d["step"], d["setup"]
        out += [
            f"On a GPU ({d['device']}, torch {d['torch']}; `python benchmarks/device_transfer.py`"
            f", no vLLM: KV in vLLM's flash-attention layout, {su['layers']} layers, "
            f"{su['heads']} KV heads x {su['head_dim']}, bf16, {su['tokens']} tokens = "
            f"{sp['bytes'] / 2**30:.1f} GiB; median of {su['reps']}), kvtier's copies were "
            f"bitwise exact in bf16/fp16/fp32, bulk and layer-wise, and:",
            "",
            "| copy | store (GPU to memory tier, until published) | load (memory tier to GPU) |",
            "| --- | --- | --- |",
            f"| memory tier pinned (kvtier on CUDA) | {sp['pinned']['store_gbps']:.1f} GB/s "
            f"(the step pays {sp['pinned']['store_compute_stream_ms']:.1f} ms of "
            f"{sp['pinned']['store_ms']:.1f}) | {sp['pinned']['load_gbps']:.1f} GB/s |",
            f"| memory tier pageable | {sp['pageable']['store_gbps']:.1f} GB/s | "
            f"{sp['pageable']['load_gbps']:.1f} GB/s |",
            f"| before: strided host views, layer by layer | | "
            f"{sp['load_strided_before']['load_gbps']:.1f} GB/s |",
            "",
            "The step pays the gather into a device staging copy; the copy to the pinned "
            "memory tier runs on a side stream and the chunks are published once it is done. "
            "One step that loads, or saves, that much KV while computing `new` tokens "
            "(synthetic forward: per layer the model's MLP on the new tokens and a read of "
            "the layer's KV):",
            "",
            "| new tokens | forward alone | bulk load + forward | layer-wise | layer-wise / bulk "
            "| save waiting for the copy | save overlapped | overlapped / waiting |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for new, r in st.items():
            save = (f" {r['save_waiting_ms']:.1f} ms | {r['save_overlapped_ms']:.1f} ms | "
                    f"{r['save_overlapped_vs_waiting']:.2f}x |" if "save_waiting_ms" in r
                    else " | | |")
            out.append(f"| {new} | {r['forward_ms']:.1f} ms | {r['bulk_ms']:.1f} ms | "
                       f"{r['layerwise_ms']:.1f} ms | {r['layerwise_vs_bulk']:.2f}x |" + save)
        faster = all(r["layerwise_vs_bulk"] < 1 for r in st.values())
        out += ["", "There the copies run on the GPU's copy engines while its cores compute: "
                "layer-wise loads (a side stream, one 2-d DMA per layer, each layer's compute "
                "waiting only for its own copy) were "
                + ("faster at every size: turn `layerwise` on for GPU engines." if faster else
                   "not faster at every size.")
                + " These runs are not inside vLLM (no vLLM build for that GPU here).", ""]
    return out


def cluster(res: dict[str, Any], cmd: str) -> list[str]:
    out = [f"## Many instances (`{cmd}`)", ""]
    if "routing" in res:
        r = res["routing"]
        s = r["setup"]
        out += [
            f"**Routing.** Two instances ({Path(s['model']).name}, {s['dtype']}, "
            f"{s['kvtier']}), a controller, and the router with each policy; "
            f"{s['workload']} with {s['requests']} requests "
            f"({', '.join(f'{k}={v}' for k, v in s['settings'].items())}), "
            f"{s['concurrency']} users at once.",
            "",
            "| policy | hit rate | TTFT p50 | TTFT p90 | QPS |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("round_robin", "round-robin"), ("kv", "KV-aware router")):
            p = r["summary"][name]
            out.append(f"| {label} | {p['hit_rate']:.1%} | {p['ttft_p50_s'] * 1e3:.0f} ms | "
                       f"{p['ttft_p90_s'] * 1e3:.0f} ms | {p['qps']:.2f} |")
        ratio = r["router_hit_rate"] / r["roundrobin_hit_rate"] if r["roundrobin_hit_rate"] else 0
        out += ["", f"Hit rate router / round-robin: {ratio:.2f}x (goal >= 1.5x).", ""]
    if "pd" in res:
        r = res["pd"]
        s = r["setup"]
        out += [
            f"**Prefill-decode split.** {s['longs']} prompts of {s['long_tokens']} tokens "
            f"arrive every {s['interval_s']} s while {s['decoders']} requests decode "
            f"({s['decode_tokens']} tokens each): one instance on cores 0-1 against a "
            "producer on core 0 and a consumer on core 1 (transfer channel).",
            "",
            "| setup | ITL p50 | ITL p99 | ITL p99.9 | ITL max | TTFT p50 | TTFT p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, label in (("single", "one instance"), ("pd", "producer + consumer")):
            out.append(f"| {label} | " + " | ".join(
                _ms(r.get(f"{name}_{k}")) for k in ("itl_p50_ms", "itl_p99_ms", "itl_p999_ms",
                                                    "itl_max_ms", "ttft_p50_ms",
                                                    "ttft_p99_ms")) + " |")
        gbps, ratio = r.get("pd_transfer_gbps"), r.get("itl_p99_single_over_pd")
        out += ["", f"ITL p99 one instance / PD: {f'{ratio:.2f}x' if ratio else '-'} (goal >= "
                f"2x). Long prompts' greedy outputs equal: {r['long_outputs_equal']}/"
                f"{s['longs']}. Transfer per request: "
                + (f"{gbps:.3f} GB/s." if gbps else "n/a."), ""]
    if "transfer" in res:
        r = res["transfer"]
        s = r["setup"]
        out += [
            f"**Transfer channel.** {s['chunks']} chunks of {s['chunk_bytes'] / 2**20:.0f} MiB "
            f"from another process over 127.0.0.1, median of {s['repeats']}, alternating with "
            "a plain TCP read of the same bytes.",
            "",
            "| | GB/s |",
            "|---|---|",
            f"| raw loopback TCP | {r['loopback_tcp_gbps']:.2f} |",
            f"| transfer channel (checked chunks) | {r['transfer_gbps']:.2f} |",
            *([f"| over TLS | {r['transfer_tls_gbps']:.2f} |"] if "transfer_tls_gbps" in r
              else []),
            *([f"| signed (cluster key: MAC on every chunk) | {r['transfer_signed_gbps']:.2f} "
               f"({r['signed_vs_plain']:.2f}x unsigned) |"] if "transfer_signed_gbps" in r
              else []),
            f"| through the store (into memory slots) | {r['store_gbps']:.2f} |",
            "",
            f"Transfer / raw TCP: {r['transfer_vs_loopback']:.2f}x (goal >= 0.7x). Presence "
            f"check p50 {r['contains_ms_p50']:.2f} ms.",
            "",
        ]
    return out


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "-"
