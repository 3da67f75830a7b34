"""``kvtier bench serve --workload redis-hit``: a large hit from Redis while others decode.

Setup (printed with the results): a real redis-server and real ``vllm serve``
processes on 127.0.0.1, kvtier with tiers ``[memory, redis]``. For each
configuration, a first server stores a long document's KV in Redis (with the
configuration's Redis codec) and is stopped; a fresh server (its memory tier
empty, so the document is a Redis-only hit) then runs, in the same run:

1. *without the hit*: ``decoders`` streaming requests (short prompts, many
   output tokens) alone: their inter-token latencies are the baseline;
2. *with the hit*: the same decoders again (other prompts) and, once they
   decode, the long document: its TTFT, and the decoders' inter-token
   latencies while it arrives.

Configurations: the hit loaded inside the engine step (``async_loads: false``,
what kvtier did before), loaded in the background (the default), and in the
background with the zstd codec on Redis; and, as the floor, vLLM alone with
the document in its own prefix cache (computed once on the same server: no
byte moves, yet the hit's step still stalls the decoders on a CPU engine).
Reported per configuration: the hit's TTFT and cached tokens, decoders' ITL
p50/p99 with and without the hit and their ratio (goal: p99 within 1.2x),
and the p99 against the floor's.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.bench.serve.analysis import quantile
from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers
from kvtier.config import parse_size
from kvtier.testing.models import build_model, make_document
from kvtier.testing.redis_proc import RedisProcess, command
from kvtier.testing.vllm_cpu import fast_dtype

# (name, async_loads, Redis codec); async_loads None: vLLM alone, the document a hit
# in its own prefix cache (computed once on the same server): what any hit costs
# the decoders when no byte moves, the floor for kvtier's rows.
CONFIGS = (("vllm-own-hit", None, ""), ("in-step", False, "raw"), ("async", True, "raw"),
           ("async+zstd", True, "zstd"))
SIZES = {"full": dict(doc_tokens=8000, decoders=2, decode_tokens=96),
         "quick": dict(doc_tokens=4000, decoders=2, decode_tokens=64),
         "toy": dict(doc_tokens=700, decoders=1, decode_tokens=8)}
BLOCK = 128


def run(args: Any) -> dict[str, Any]:
    """Every configuration, each on fresh servers; returns the summary."""
    size = SIZES["toy" if args.toy else "quick" if args.quick else "full"]
    model = str(Path(args.model)) if args.model else str(build_model(args.shape))
    doc = make_document(model, size["doc_tokens"], seed=args.seed + 4242)
    max_len = -(-(size["doc_tokens"] + 256) // BLOCK) * BLOCK
    blocks = 2 * max_len // BLOCK + size["decoders"] * 4 + 1
    eng = EngineSettings(model=model, max_model_len=max_len, num_gpu_blocks=blocks,
                         kv_budget_bytes=parse_size("--kv-budget", args.kv_budget),
                         dtype=fast_dtype() if args.dtype == "auto" else args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-bench-hit-"))
    rows = []
    try:
        with RedisProcess(scratch / "redis") as redis:
            for name, async_loads, codec in CONFIGS:
                rows.append(_one_config(args, name, async_loads, codec, eng, doc, size,
                                        redis, out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    setup = {"model": model, "dtype": eng.dtype, "doc_tokens": len(doc), **size,
             "threads_bind": eng.threads_bind, "engine_kv_blocks": blocks,
             "tiers": ["memory", "redis"]}
    floor = next((r["itl_p99_ms"] for r in rows if r["async_loads"] is None), None)
    for r in rows:
        r["itl_p99_vs_own_hit"] = r["itl_p99_ms"] / floor if floor else None
    res = {"setup": setup, "configs": rows}
    (out / "results-redis-hit.json").write_text(json.dumps(res, indent=1))
    return res


def _one_config(args: Any, name: str, async_loads: bool | None, codec: str,
                eng: EngineSettings, doc: list[int], size: dict[str, int], redis: RedisProcess,
                out: Path) -> dict[str, Any]:
    command(redis.port, "FLUSHALL")
    stored = 0
    if async_loads is None:
        cfg = ServeConfig("vllm", sys.executable)
    else:
        extra = {"tiers": ["memory", "redis"], "redis.url": redis.url, "redis.codec": codec,
                 "memory.max_bytes": eng.kv_budget_bytes, "async_loads": async_loads}
        cfg = ServeConfig("kvtier-memory", sys.executable,
                          {"kv_connector": "KvtierConnector",
                           "kv_connector_module_path": "kvtier.connectors.vllm",
                           "kv_role": "kv_both", "kv_connector_extra_config": extra})
        _say(args, f"[{name}] storing a {len(doc)}-token document in Redis ({codec}) ...")
        with Servers(cfg, eng, out / f"server-redis-hit-{name}-fill.log") as srv:
            _post(srv.base_url, eng.model, doc, 1)
            stored = _wait_stable(redis.port)
        _say(args, f"[{name}] {stored} Redis keys; fresh server, decoders without then with "
                   f"the hit ...")
    with Servers(cfg, eng, out / f"server-redis-hit-{name}.log") as srv:
        if async_loads is None:
            _say(args, f"[{name}] the document into vLLM's own prefix cache, then decoders "
                       "without and with it ...")
            _post(srv.base_url, eng.model, doc, 1)
        _post(srv.base_url, eng.model, make_document(eng.model, 200, seed=7_777_777), 2)
        base = asyncio.run(_phase(srv.base_url, eng.model, size, None, args.seed))
        hit = asyncio.run(_phase(srv.base_url, eng.model, size, doc, args.seed + 1))
    row = {"config": name, "async_loads": async_loads, "codec": codec or None,
           "redis_keys": stored, "hit_ttft_ms": hit["hit_ttft_s"] * 1e3,
           "hit_cached_tokens": hit["hit_cached"],
           "itl_p50_ms": quantile(hit["itls"], 0.5) * 1e3,
           "itl_p99_ms": quantile(hit["itls"], 0.99) * 1e3,
           "itl_max_ms": max(hit["itls"]) * 1e3,
           "itl_p50_ms_no_hit": quantile(base["itls"], 0.5) * 1e3,
           "itl_p99_ms_no_hit": quantile(base["itls"], 0.99) * 1e3}
    row["itl_p99_ratio"] = row["itl_p99_ms"] / row["itl_p99_ms_no_hit"]
    _say(args, f"[{name}] hit TTFT {row['hit_ttft_ms']:.0f} ms ({row['hit_cached_tokens']} "
               f"cached), decoders' ITL p99 {row['itl_p99_ms']:.0f} ms vs "
               f"{row['itl_p99_ms_no_hit']:.0f} ms without the hit")
    return row


async def _phase(base_url: str, model: str, size: dict[str, int], doc: list[int] | None,
                 seed: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        prompts = [make_document(model, 64, seed=seed * 100 + i)
                   for i in range(size["decoders"])]
        decoders = [asyncio.create_task(_stream(session, base_url, model, p,
                                                size["decode_tokens"])) for p in prompts]
        hit_ttft, hit_cached = 0.0, 0
        if doc is not None:
            await asyncio.sleep(0.5)  # the decoders are decoding by now
            times, hit_cached = await _stream(session, base_url, model, doc, 2)
            hit_ttft = times[0]
        itls = []
        for task in decoders:
            times, _ = await task
            itls += [b - a for a, b in zip(times, times[1:])]
    return {"itls": itls, "hit_ttft_s": hit_ttft, "hit_cached": hit_cached}


async def _stream(session: Any, base_url: str, model: str, prompt: list[int],
                  max_tokens: int) -> tuple[list[float], int]:
    """Arrival times (from sending) of each streamed event with tokens; cached tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    cached = 0
    async with session.post(f"{base_url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if any(c.get("text") is not None for c in event.get("choices") or []):
                times.append(time.perf_counter() - t0)
            usage = event.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached
    return times, int(cached)


def _post(base_url: str, model: str, prompt: list[int], max_tokens: int) -> None:
    import urllib.request

    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=600).close()


def _wait_stable(port: int, timeout_s: float = 120.0) -> int:
    """Redis's key count once the background writers have stopped adding keys."""
    last, since, t0 = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        reply = command(port, "DBSIZE")
        n = int(reply[1:].split(b"\r\n")[0]) if reply.startswith(b":") else -1
        if n != last:
            last, since = n, time.monotonic()
        elif n > 0 and time.monotonic() - since > 2.0:
            return n
        time.sleep(0.25)
    return last


def _say(args: Any, msg: str) -> None:
    print(f"[bench serve] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)


def table(res: dict[str, Any]) -> str:
    """Markdown table of a run."""
    lines = ["| configuration | hit TTFT (ms) | cached tokens | decoders' ITL p99 with hit "
             "(ms) | without (ms) | ratio | vs vLLM's own hit | ITL max with hit (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["configs"]:
        floor = r.get("itl_p99_vs_own_hit")
        lines.append(f"| {r['config']} | {r['hit_ttft_ms']:.0f} | {r['hit_cached_tokens']} | "
                     f"{r['itl_p99_ms']:.0f} | {r['itl_p99_ms_no_hit']:.0f} | "
                     f"{r['itl_p99_ratio']:.2f}x | {f'{floor:.2f}x' if floor else '-'} | "
                     f"{r['itl_max_ms']:.0f} |")
    return "\n".join(lines)
