"""Part 5: the controller fed by many simulated instances, index in memory and in Redis.

A real ``kvtier controller`` process on 127.0.0.1 (``--ttl-s 3600``: the simulated
instances register once and do not heartbeat during the run). ``N`` instances register
over its HTTP API, each with its own credential, and publish on their own ZMQ PUB
socket to its real KV events socket, in vLLM's wire format (``(topic, seq, payload)``,
a msgpack ``KVEventBatch``), one ``BlockStored`` event of 32 chunk keys per batch: one
8k-token prefix saved per engine step. Each instance stores ``chunks`` keys: random
keys, plus the real keys of the documents it holds (instance ``i`` holds document
``i mod D`` whole and document ``i+1 mod D`` up to its middle), so lookups are real
prompts with real answers.

Measured, per backend and ``N``:

- **ingest**: every batch sent as fast as the publishers can, chunks per second until
  the controller's ``/v1/instances`` counts all of them (none may be lost); the
  publishers' own sending rate beside it (both share this machine's cores).
- **memory per million chunks**: the controller's RSS growth (memory index) or Redis'
  ``used_memory`` growth, over the chunks ingested.
- **lookup**: ``POST /v1/lookup`` of an 8k-token document by token ids, one client on a
  kept-alive connection: p50 and p99; beside it, the baseline ``GET /health`` on the
  same connection (the HTTP floor), and every answer checked.
- **router decision** (at the largest ``N``): kvtier's ``Router`` in this process with
  every instance as a backend: the controller lookup plus the choice, p50/p99; beside
  it the choice alone (``least_loaded``, what routing costs without the index).

The ingest goal is stated in chunks: an instance storing 1 GB/s of KV of Llama-3.1-8B
(32 layers, 8 KV heads x 128, bf16: 32 MiB per 256-token chunk) stores 29.8 chunks/s,
two events each when every chunk reaches memory and disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq

from kvtier.keys import ChunkHasher, Namespace
from kvtier.testing.cluster import KvtierProcess, controller
from kvtier.testing.redis_proc import RedisProcess

logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call otherwise

TOKEN = "kvtier-bench-scale"
NS = Namespace("sim", "vllm_cpu:L4:H2:D64:B128:bfloat16", 256)
HASHER = ChunkHasher(NS, store_partial=False, granule=256)
DOC_TOKENS, DOCS, PER_BATCH = 8192, 16, 32
CHUNK_BYTES_8B = 32 * 8 * 128 * 2 * 2 * 256  # Llama-3.1-8B bf16, one 256-token chunk
GOAL_INSTANCES, GOAL_BYTES_S, EVENTS_PER_CHUNK = 64, 1e9, 2


def run(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    toy = bool(getattr(args, "toy", False))
    chunks = 2000 if toy else int(getattr(args, "instance_chunks", None) or 100_000)
    plan = ([("memory", (8,)), ("redis", (8,))] if toy else
            [("memory", (8, 64)), ("redis", (64,))] if quick else
            [("memory", (8, 64, 256)), ("redis", (8, 64))])
    lookups = 20 if toy else 400
    points = []
    with tempfile.TemporaryDirectory(prefix="kvtier-scale-ctl-") as tmp:
        for backend, sizes in plan:
            for n in sizes:
                points.append(_point(Path(tmp), backend, n, chunks, lookups,
                                     router=n == max(sizes) and backend == "memory"))
    goal = GOAL_INSTANCES * GOAL_BYTES_S / CHUNK_BYTES_8B * EVENTS_PER_CHUNK
    head = 8 if toy else 64
    at = next(p for p in points if p["backend"] == "memory" and p["instances"] == head)
    red = next((p for p in points if p["backend"] == "redis" and p["instances"] == head), None)
    rt = next(p for p in points if "router" in p)
    return {"controller_lookup_p99_ms": at["lookup_p99_ms"],
            "controller_lookup_p50_ms": at["lookup_p50_ms"],
            "controller_lookup_p99_ms_redis": red["lookup_p99_ms"] if red else None,
            "controller_ingest_chunks_per_s": at["ingest_chunks_per_s"],
            "controller_ingest_goal_chunks_per_s": goal,
            "controller_ingest_vs_goal": at["ingest_chunks_per_s"] / goal,
            "controller_bytes_per_million_chunks": at["bytes_per_million_chunks"],
            "router_decision_p99_ms": rt["router"]["decision_p99_ms"],
            "router_instances": rt["instances"],
            "points": points,
            "setup": {"chunks_per_instance": chunks, "lookups": lookups, "quick": quick,
                      "toy": toy, "headline_instances": head,
                      "doc_tokens": DOC_TOKENS, "keys_per_batch": PER_BATCH,
                      "goal": f"{GOAL_INSTANCES} instances x {GOAL_BYTES_S / 1e9:g} GB/s of "
                              f"Llama-3.1-8B KV ({CHUNK_BYTES_8B >> 20} MiB per chunk), "
                              f"{EVENTS_PER_CHUNK} events per chunk"}}


def _docs() -> list[tuple[list[int], list[bytes]]]:
    rng = random.Random(7)
    out = []
    for _ in range(DOCS):
        tokens = [rng.randrange(1, 30000) for _ in range(DOC_TOKENS)]
        out.append((tokens, [bytes(k) for k in HASHER.keys(tokens)]))
    return out


def _instance_keys(i: int, chunks: int, docs: list[tuple[list[int], list[bytes]]]
                   ) -> list[bytes]:
    held = docs[i % DOCS][1] + docs[(i + 1) % DOCS][1][:DOC_TOKENS // 256 // 2]
    blob = random.Random(i).randbytes(16 * max(0, chunks - len(held)))
    return held + [blob[j:j + 16] for j in range(0, len(blob), 16)]


def _register(ctl: KvtierProcess, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        name = f"sim-{i:03d}"
        status, got, _ = ctl.call("/v1/register", {
            "instance": name, "url": f"http://127.0.0.1:{20000 + i}", "model": "sim",
            "namespace": NS.seed().hex(), "key_namespace": dataclasses.asdict(NS),
            "layout": NS.layout, "chunk_size": 256, "block_size": 0, "tiers": ["memory"]})
        if status != 200:
            raise RuntimeError(f"registering {name}: {status} {got}")
        out.append((name, got["credential"]))
    return out


def _batch(keys: list[bytes]) -> bytes:
    return msgspec.msgpack.encode([time.time(), [{
        "type": "BlockStored", "block_hashes": keys, "parent_block_hash": None,
        "token_ids": [], "block_size": 256, "lora_id": None, "medium": "CPU",
        "lora_name": None}], None])


def _counted(http: httpx.Client, url: str) -> dict[str, int]:
    got = http.get(f"{url}/v1/instances").json()["instances"]
    return {i["instance"]: sum(i["chunks"].values()) for i in got}


def _point(tmp: Path, backend: str, n: int, chunks: int, lookups: int, router: bool
           ) -> dict[str, Any]:
    redis = RedisProcess(tmp / f"redis-{n}") if backend == "redis" else None
    if redis:
        redis.start()
    ctl = controller(tmp / f"controller-{backend}-{n}.log", TOKEN,
                     redis_url=redis.url if redis else "", ttl_s=3600.0)
    ctl.start()
    http = httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120.0,
                        trust_env=False)
    zctx = zmq.Context()
    try:
        docs = _docs()
        names = _register(ctl, n)
        socks = []
        for name, _ in names:
            s = zctx.socket(zmq.PUB)
            s.setsockopt(zmq.SNDHWM, 0)  # never dropped here: the run waits for every one
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ctl.events)
            socks.append(s)
        seq = [0] * n
        _warm(http, ctl.url, names, socks, seq, docs)  # subscriptions arrived: none lost
        before = _used(ctl, redis)
        batches = [[_batch(keys[j:j + PER_BATCH]) for j in range(0, len(keys), PER_BATCH)]
                   for keys in (_instance_keys(i, chunks, docs)[1:] for i in range(n))]
        want = n * chunks
        t0 = time.perf_counter()
        for j in range(max(len(b) for b in batches)):  # interleaved, as a cluster sends
            for i, b in enumerate(batches):
                if j < len(b):
                    socks[i].send_multipart((names[i][0].encode(), seq[i].to_bytes(8, "big"),
                                             b[j]))
                    seq[i] += 1
        sent_s = time.perf_counter() - t0
        del batches
        have, deadline = 0, time.monotonic() + 600
        while have < want and time.monotonic() < deadline:
            time.sleep(0.05)
            have = sum(_counted(http, ctl.url).values())
        ingest_s = time.perf_counter() - t0
        if have != want:
            raise RuntimeError(f"{backend}, {n} instances: the index holds {have} of "
                               f"{want} chunks sent")
        used = _used(ctl, redis) - before
        point: dict[str, Any] = {
            "backend": backend, "instances": n, "chunks": want,
            "ingest_chunks_per_s": want / ingest_s, "ingest_s": ingest_s,
            "publish_chunks_per_s": want / sent_s,
            "bytes_per_million_chunks": used / want * 1e6,
            **_lookups(http, ctl.url, docs, n, lookups)}
        if router:
            point["router"] = asyncio.run(_router(ctl.url, n, docs, lookups))
        return point
    finally:
        zctx.destroy(linger=0)
        http.close()
        ctl.stop()
        if redis:
            redis.close()


def _warm(http: httpx.Client, url: str, names: list[tuple[str, str]], socks: list[Any],
          seq: list[int], docs: list[tuple[list[int], list[bytes]]]) -> None:
    """Each instance's first key, sent until the controller holds it (a PUB socket drops
    what it sends before the controller's subscription reaches it)."""
    deadline = time.monotonic() + 60
    while True:
        got = _counted(http, url)
        late = [i for i, (name, _) in enumerate(names) if not got.get(name)]
        if not late:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(late)} simulated instances never reached the "
                               "controller's events socket")
        for i in late:
            first = docs[i % DOCS][1][:1]
            socks[i].send_multipart((names[i][0].encode(), seq[i].to_bytes(8, "big"),
                                     _batch(first)))
            seq[i] += 1
        time.sleep(0.2)


def _used(ctl: KvtierProcess, redis: RedisProcess | None) -> int:
    """Bytes the index takes now: Redis' used_memory, or the controller's RSS."""
    if redis is not None:
        import redis as redis_py

        r = redis_py.Redis.from_url(redis.url)
        try:
            return int(r.info("memory")["used_memory"])
        finally:
            r.close()
    assert ctl.proc is not None
    status = Path(f"/proc/{ctl.proc.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _lookups(http: httpx.Client, url: str, docs: list[tuple[list[int], list[bytes]]], n: int,
             count: int) -> dict[str, Any]:
    lat, floor = [], []
    for j in range(count + 10):
        d = j % min(n, DOCS)  # a document some instance holds whole
        t = time.perf_counter()
        got = http.post(f"{url}/v1/lookup", json={"model": "sim", "token_ids": docs[d][0]})
        dt = time.perf_counter() - t
        got.raise_for_status()
        hits = {i["instance"]: i["cached_tokens"] for i in got.json()["instances"]}
        whole = [name for name, c in hits.items() if c == DOC_TOKENS]
        if len(hits) != n or whole != [f"sim-{i:03d}" for i in range(n) if i % DOCS == d]:
            raise RuntimeError(f"lookup of document {d}: a wrong answer {sorted(whole)}")
        t = time.perf_counter()
        http.get(f"{url}/health").raise_for_status()
        if j >= 10:  # the first ones warm the connection and the hasher
            lat.append(dt * 1e3)
            floor.append((time.perf_counter() - t) * 1e3)
    return {"lookup_p50_ms": statistics.median(lat), "lookup_p99_ms": _pct(lat, 0.99),
            "health_p50_ms": statistics.median(floor), "health_p99_ms": _pct(floor, 0.99)}


async def _router(url: str, n: int, docs: list[tuple[list[int], list[bytes]]], count: int
                  ) -> dict[str, Any]:
    from kvtier.cluster.router import Router

    router = Router([f"http://127.0.0.1:{20000 + i}" for i in range(n)], controller=url,
                    controller_token=TOKEN, lookup_timeout_s=30.0)
    try:
        full, alone = [], []
        for j in range(count + 10):
            ids = docs[j % min(n, DOCS)][0]
            t = time.perf_counter()
            hits = await router.lookup("sim", ids, None)
            b, c = router.pick("any", len(ids), hits, set())
            dt = time.perf_counter() - t
            if c.cached_tokens != DOC_TOKENS:
                raise RuntimeError(f"the router chose {b.name} holding {c.cached_tokens}")
            t = time.perf_counter()
            router.pick("any", len(ids), None, set(), policy="least_loaded")
            if j >= 10:
                full.append(dt * 1e3)
                alone.append((time.perf_counter() - t) * 1e3)
        return {"decision_p50_ms": statistics.median(full), "decision_p99_ms": _pct(full, 0.99),
                "choice_only_p50_ms": statistics.median(alone),
                "choice_only_p99_ms": _pct(alone, 0.99)}
    finally:
        await router.close()


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"kvtier bench scale --part controller: {s['chunks_per_instance']} chunks per "
             f"simulated instance, {s['keys_per_batch']} keys per event batch, "
             f"{s['lookups']} lookups of {s['doc_tokens']}-token documents",
             f"  {'index':>6} {'inst':>5} {'ingest chunks/s':>16} {'(sent/s)':>10} "
             f"{'B/M chunks':>11} {'lookup p50/p99 ms':>18} {'health p50/p99 ms':>18}"]
    for p in res["points"]:
        lines.append(f"  {p['backend']:>6} {p['instances']:5} {p['ingest_chunks_per_s']:16,.0f} "
                     f"{p['publish_chunks_per_s']:10,.0f} "
                     f"{p['bytes_per_million_chunks'] / 1e6:9.0f}MB "
                     f"{p['lookup_p50_ms']:8.2f} / {p['lookup_p99_ms']:<7.2f} "
                     f"{p['health_p50_ms']:8.2f} / {p['health_p99_ms']:.2f}")
        if "router" in p:
            r = p["router"]
            lines.append(f"  router at {p['instances']} instances: lookup + choice p50/p99 "
                         f"{r['decision_p50_ms']:.2f} / {r['decision_p99_ms']:.2f} ms; choice "
                         f"alone {r['choice_only_p50_ms']:.3f} / {r['choice_only_p99_ms']:.3f} ms")
    lines.append(f"  ingest goal ({s['goal']}): {res['controller_ingest_goal_chunks_per_s']:,.0f} "
                 f"chunks/s; measured {res['controller_ingest_chunks_per_s']:,.0f} "
                 f"({res['controller_ingest_vs_goal']:.0f}x)")
    return "\n".join(lines)
