"""An OpenAI-compatible async client that drives one server through a workload.

Each sender (a document, a conversation) sends its turns in order, each after
its previous answer plus the workload's think time. ``concurrency`` caps the
requests in flight (closed loop; waiting senders queue first in, first out, so
senders are served round-robin); ``request_rate`` instead releases turns at
seeded Poisson arrival times (open loop), never before the sender is ready.

Every request streams (``stream: true``, usage in the last event) and records
TTFT (first generated token), the mean inter-token latency of its later
tokens, the cached prompt tokens vLLM reports (``prompt_tokens_details``), and
the generated token ids and logprobs for the output check.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kvtier.bench.serve.workloads import Turn, Workload


@dataclass
class Result:
    """What one request did (times in seconds, from the run's start)."""

    user: int
    round: int
    prompt_tokens: int
    sent_s: float
    ttft_s: float
    itl_s: float | None  # mean gap between generated tokens after the first
    latency_s: float
    cached_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


async def run_workload(base_url: str, model: str, workload: Workload, concurrency: int | None,
                       request_rate: float | None = None, seed: int = 0,
                       on_done: Callable[[Result], None] | None = None,
                       timeout_s: float = 600.0) -> tuple[list[Result], float]:
    """Drive the workload; return every request's result and the wall time of the run."""
    import aiohttp

    limit = asyncio.Semaphore(concurrency or len(workload.users))
    arrivals = _arrivals(workload, request_rate, seed)
    results: list[Result] = []
    t0 = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def sender(turns: list[Turn]) -> None:
            for i, turn in enumerate(turns):
                if i and workload.think_time_s:
                    await asyncio.sleep(workload.think_time_s)
                wait = arrivals.get((turn.user, turn.round), 0.0) - (time.perf_counter() - t0)
                if wait > 0:
                    await asyncio.sleep(wait)
                async with limit:
                    res = await _one(session, f"{base_url}/v1/completions", model, turn, t0)
                results.append(res)
                if on_done is not None:
                    on_done(res)

        await asyncio.gather(*(sender(turns) for turns in workload.users))
    return results, time.perf_counter() - t0


def warm_up(base_url: str, model: str, prompt: list[int], timeout_s: float = 120.0) -> None:
    """One short untimed request, so first-call costs (compilation, allocation) of a fresh
    server land outside the measured run."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        resp.read()


def _arrivals(workload: Workload, rate: float | None, seed: int) -> dict[tuple[int, int], float]:
    """Poisson arrival offsets per (user, round), in round-robin order; {} = closed loop."""
    if not rate:
        return {}
    rng = random.Random(seed)
    order = sorted((t.round, t.user) for turns in workload.users for t in turns)
    out, now = {}, 0.0
    for rnd, user in order:
        out[(user, rnd)] = now
        now += rng.expovariate(rate)
    return out


async def _one(session: Any, url: str, model: str, turn: Turn, t0: float) -> Result:
    body = {"model": model, "prompt": turn.prompt, "max_tokens": turn.max_tokens,
            "temperature": 0.0, "ignore_eos": not turn.stop_at_eos, "logprobs": 1,
            "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    tokens: list[int] = []
    logprobs: list[float] = []
    cached = 0
    error = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for event in _events(resp):
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    new = choice.get("token_ids") or []
                    if new:
                        first = first if first is not None else now
                        last = now
                        tokens.extend(new)
                        logprobs.extend((choice.get("logprobs") or {}).get("token_logprobs")
                                        or [])
                usage = event.get("usage") or {}
                cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                          or cached)
    except Exception as exc:  # recorded and counted, never fatal to the run
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    ttft = (first if first is not None else end) - sent
    itl = (last - first) / (len(tokens) - 1) if first is not None and len(tokens) > 1 else None
    return Result(turn.user, turn.round, len(turn.prompt), sent - t0, ttft, itl, end - sent,
                  int(cached), tokens, logprobs, error)


async def _events(resp: Any) -> Any:
    """Server-sent events of a streaming completion, as dicts.

    Lines are split here, not by aiohttp's line reader: the first event
    carries the prompt's token ids and can be longer than its 64 KiB limit.
    """
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
