"""Prefill/decode disaggregation against one instance with the same cores.

- ``single``: one ``vllm serve`` with kvtier (memory tier), threads on cores 0-1;
  every request goes to it.
- ``pd``: a producer (``kv_producer``, transfer server on) on core 0 and a
  consumer (``kv_consumer``, peer tier pointing at the producer) on core 1.
  Each request is first sent to the producer with ``max_tokens=1`` (its
  prompt's chunks are computed and kept there), then streamed from the
  consumer, which loads those chunks over the transfer channel and decodes.

The load: a few decoders keep short requests streaming back to back while
long prompts arrive at a fixed interval; their prefills are what disturbs the
decoders' tokens on one instance. Measured over every streamed token gap of
every request: inter-token latency p50/p99; TTFT of the long prompts (for pd:
from the producer call's start); and the consumer's kvtier load rate
(``vllm:kvtier_loaded_bytes_total`` over ``load_seconds_total``, the engine
step's part, and over ``async_wait_seconds_total``, what requests waited for
their KV in the background, the fetch from the producer included).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.serve.client import _events, warm_up
from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers
from kvtier.testing.models import build_model, make_document
from kvtier.testing.procs import free_port


def _kv(role: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": role, "kv_connector_extra_config": {"memory.max_bytes": "1GiB", **extra}}


def run_pd(quick: bool) -> dict[str, Any]:
    """``pd_itl_p99_ms`` and ``single_itl_p99_ms`` (and TTFT, load rate, agreement)."""
    model = str(build_model("small"))
    # Long prompts arrive slower than one core prefills them (else the producer's queue,
    # not the split, sets TTFT): ~2.5 s per 1024 tokens on one core of this machine.
    sizes = dict(long_tokens=1024 if quick else 2048, longs=4 if quick else 6,
                 interval_s=4.0 if quick else 8.0, decoders=3, short_tokens=96,
                 decode_tokens=48)  # more tokens per decoder dilute the stalls under p99
    longs = [make_document(model, sizes["long_tokens"], 9000 + i) for i in range(sizes["longs"])]
    out: dict[str, Any] = {"setup": {"model": "small-v1", **sizes}}
    eng = dict(model=model, max_model_len=sizes["long_tokens"] + 512, num_gpu_blocks=160,
               kv_budget_bytes=1 << 30)
    root = Path(tempfile.mkdtemp(prefix="kvtier-pd-"))
    with Servers(ServeConfig("kvtier-memory", sys.executable, _kv("kv_both", {"tiers": ["memory"]})),
                 EngineSettings(threads_bind="0-1", **eng), root / "single.log") as single:
        warm_up(single.base_url, model, make_document(model, 200, 7))
        res = asyncio.run(_drive(model, None, single.base_url, longs, sizes))
    out["single"] = res
    port = free_port()
    producer_cfg = ServeConfig("kvtier-memory", sys.executable,
                               _kv("kv_producer", {"tiers": ["memory"], "transfer.port": port}))
    consumer_cfg = ServeConfig("kvtier-memory", sys.executable, _kv("kv_consumer", {
        "tiers": ["memory", "peer"], "peer.peers": [f"127.0.0.1:{port}"]}))
    with Servers(producer_cfg, EngineSettings(threads_bind="0", **eng),
                 root / "producer.log") as producer, \
            Servers(consumer_cfg, EngineSettings(threads_bind="1", **eng),
                    root / "consumer.log") as consumer:
        for url in (producer.base_url, consumer.base_url):
            warm_up(url, model, make_document(model, 200, 7))
        before = _load_counters(consumer.base_url)
        res = asyncio.run(_drive(model, producer.base_url, consumer.base_url, longs, sizes))
        after = _load_counters(consumer.base_url)
    loaded, seconds, waited = (a - b for a, b in zip(after, before))
    res["consumer_loaded_bytes"] = loaded
    res["load_bytes_per_long_request"] = loaded / max(1, sizes["longs"])
    # In the engine step (sync loads: fetch + scatter; async loads: the scatter only) ...
    res["consumer_step_load_gbps"] = loaded / seconds / 1e9 if seconds else None
    # ... and what a request waited for its KV in the background (async loads), fetch
    # from the producer included: the transfer rate a request sees.
    res["consumer_async_wait_s"] = waited
    res["consumer_request_gbps"] = loaded / waited / 1e9 if waited else None
    out["pd"] = res
    for name in ("itl_p50_ms", "itl_p99_ms", "itl_p999_ms", "itl_max_ms", "ttft_p50_ms",
                 "ttft_p99_ms"):
        out[f"pd_{name}"], out[f"single_{name}"] = out["pd"][name], out["single"][name]
    single, split = out["single_itl_p99_ms"], out["pd_itl_p99_ms"]
    out["itl_p99_single_over_pd"] = single / split if single and split else None
    out["long_outputs_equal"] = sum(bool(a) and a == b for a, b in zip(
        out["single"]["long_tokens"], out["pd"]["long_tokens"]))  # two failures are not equal
    out["pd_transfer_gbps"] = res["consumer_request_gbps"] or res["consumer_step_load_gbps"]
    out["log_dir"] = str(root)
    return out


async def _drive(model: str, producer: str | None, url: str, longs: list[list[int]],
                 sizes: dict[str, Any]) -> dict[str, Any]:
    """Decoders stream back to back while the long prompts arrive; returns the statistics."""
    import aiohttp

    gaps: list[float] = []
    ttfts: list[float] = []
    prefills: list[float] = []  # pd: the producer call of each long prompt
    long_tokens: list[list[int]] = [[] for _ in longs]
    errors: list[str] = []
    done = asyncio.Event()
    shorts = [make_document(model, sizes["short_tokens"], 100_000 + i) for i in range(90)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        async def one(prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
            t0 = time.perf_counter()
            if producer is not None:  # prefill there; its chunks stay for the consumer
                await _post(session, f"{producer}/v1/completions", model, prompt, 1)
            t1 = time.perf_counter()
            times, tokens = await _stream(session, url, model, prompt, max_tokens)
            if not times:
                raise RuntimeError("no token streamed")
            gaps.extend(np.diff(times).tolist())
            return times[0] - t0, t1 - t0, tokens

        async def decoder(d: int) -> None:
            i = 0
            while not done.is_set():
                prompt = shorts[(d + i * sizes["decoders"]) % len(shorts)]
                try:
                    await one(prompt, sizes["decode_tokens"])
                except Exception as exc:  # counted, never fatal
                    errors.append(f"{type(exc).__name__}: {exc}")
                i += 1

        async def long_request(j: int) -> None:
            await asyncio.sleep(1.0 + j * sizes["interval_s"])
            try:
                ttft, prefill, long_tokens[j] = await one(longs[j], 16)
                ttfts.append(ttft)
                prefills.append(prefill)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        decoders = [asyncio.create_task(decoder(d)) for d in range(sizes["decoders"])]
        await asyncio.gather(*(long_request(j) for j in range(len(longs))))
        done.set()
        await asyncio.gather(*decoders)
    q = lambda v, p: float(np.quantile(v, p) * 1e3) if v else None  # noqa: E731
    return {"itl_p50_ms": q(gaps, 0.5), "itl_p99_ms": q(gaps, 0.99),
            "itl_p999_ms": q(gaps, 0.999), "itl_max_ms": q(gaps, 1.0), "ttft_p50_ms": q(ttfts, 0.5),
            "ttft_p99_ms": q(ttfts, 0.99), "producer_call_p50_ms": q(prefills, 0.5),
            "ttft_after_producer_p50_ms": q([t - p for t, p in zip(ttfts, prefills)], 0.5),
            "token_gaps": len(gaps), "errors": errors,
            "long_tokens": long_tokens}


async def _post(session: Any, url: str, model: str, prompt: list[int], max_tokens: int) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"prefill: HTTP {resp.status}")
        await resp.read()


async def _stream(session: Any, base_url: str, model: str, prompt: list[int],
                  max_tokens: int) -> tuple[list[float], list[int]]:
    """Arrival time of every streamed token, and the tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    times: list[float] = []
    tokens: list[int] = []
    async with session.post(f"{base_url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for event in _events(resp):
            now = time.perf_counter()
            for choice in event.get("choices") or []:
                new = choice.get("token_ids") or []
                times += [now] * min(1, len(new))
                tokens += new
    return times, tokens


def _load_counters(base_url: str) -> tuple[float, float, float]:
    """(kvtier loaded bytes, load seconds, async wait seconds) so far, from /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    total = {"vllm:kvtier_loaded_bytes_total": 0.0, "vllm:kvtier_load_seconds_total": 0.0,
             "vllm:kvtier_async_wait_seconds_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in total:
            total[name] += float(line.rsplit(" ", 1)[1])
    return (total["vllm:kvtier_loaded_bytes_total"], total["vllm:kvtier_load_seconds_total"],
            total["vllm:kvtier_async_wait_seconds_total"])


if __name__ == "__main__":
    print(json.dumps(run_pd("--quick" in sys.argv)))


def run(args: Any) -> dict[str, Any]:
    """``kvtier bench cluster --part pd``."""
    return run_pd(bool(args.quick))


def table(res: dict[str, Any]) -> str:
    rows = [f"{'setup':<22} {'ITL p50':>8} {'ITL p99':>8} {'p99.9':>8} {'max':>8} "
            f"{'TTFT p50':>9} {'TTFT p99':>9}"]
    for name, label in (("single", "one instance, 2 cores"), ("pd", "producer + consumer")):
        rows.append(f"{label:<22} " + " ".join(
            _num(res.get(f"{name}_{k}"), w) for k, w in (
                ("itl_p50_ms", 8), ("itl_p99_ms", 8), ("itl_p999_ms", 8), ("itl_max_ms", 8),
                ("ttft_p50_ms", 9), ("ttft_p99_ms", 9))))
    gbps, ratio = res.get("pd_transfer_gbps"), res.get("itl_p99_single_over_pd")
    rows.append(f"ITL p99 one instance / PD: {f'{ratio:.2f}x' if ratio else '-'} (goal >= 2x); "
                f"long outputs equal: {res['long_outputs_equal']}/{res['setup']['longs']}; "
                + (f"transfer per request: {gbps:.3f} GB/s" if gbps else "transfer: n/a"))
    return "\n".join(rows)


def _num(value: float | None, width: int) -> str:
    return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"
