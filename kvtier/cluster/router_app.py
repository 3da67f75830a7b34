"""Layer 7: the KV-aware router as an OpenAI-compatible proxy (FastAPI + httpx).

``POST /v1/completions`` and ``/v1/chat/completions`` (``stream: true`` passes
the server-sent events through as they come), ``GET /v1/models``,
``/metrics``, ``/health``. Each request: its prompt tokens
(:mod:`kvtier.cluster.tokens`), the controller's lookup, the choice
(:mod:`kvtier.cluster.choice`), then the forward. Visible decisions: headers
``x-kvtier-instance``, ``x-kvtier-cached-tokens``, ``x-kvtier-reason``,
``x-kvtier-prompt-tokens`` (as the router counted them), one
log line per request, ``kvtier_router_*`` metrics.

Failures: an instance that refuses the connection or answers 5xx before any
byte reached the client is out for a cooldown and the request goes to the
next choice; with none left the answer is 503 with an OpenAI-style error. A
stream that breaks after bytes went out ends with an ``error`` event and
``[DONE]``.

PD mode (``--prefill``/``--decode``): the request goes first to a prefill
instance with ``max_tokens: 1`` (not streamed), then unchanged to the least
loaded decode instance, which finds the prompt's KV through kvtier (the
peer tier); a failed prefill only means the decode instance computes it.
Headers ``x-kvtier-prefill-instance`` and ``x-kvtier-prefill-ms`` report it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvtier.cluster.router import Backend, NoInstance, Router, describe
from kvtier.cluster.tokens import PromptTokens

log = logging.getLogger("kvtier.router")
_PASS_HEADERS = ("authorization", "content-type", "accept", "x-request-id")


class _Retry(Exception):
    """The attempt failed before any byte reached the client."""


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def build_router_app(router: Router, tokens: PromptTokens) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        discover = asyncio.create_task(router.discover_loop())
        yield
        discover.cancel()
        await router.close()

    app = FastAPI(title="kvtier router", version="1", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "instances": len(router.backends)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        url = router.models_url()
        if url is None:
            return error(503, "kvtier router: no instance known", "service_unavailable")
        try:
            resp = await router.client.get(f"{url}/v1/models", headers=_headers(request),
                                           timeout=10)
        except httpx.HTTPError as e:
            return error(502, f"kvtier router: {url}: {type(e).__name__}", "bad_gateway")
        return Response(resp.content, resp.status_code, media_type="application/json")

    async def proxy(request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return error(400, f"body: not valid JSON: {e}", "invalid_request_error")
        ids = await asyncio.get_running_loop().run_in_executor(None, tokens.of, path, body)
        model = str(body.get("model", ""))
        hits = None
        if ids is not None and router.policy == "kv":
            hits = await router.lookup(model, ids, body.get("cache_salt"))
        if ids is not None:
            router.metrics.prompt_tokens.inc(len(ids))
        extra: dict[str, str] = {}
        if router.pd:
            extra = await _prefill(router, request, path, body, ids, hits)
        return await _dispatch(router, request, path, body, ids, hits,
                               "decode" if router.pd else "any", extra)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    return app


def _headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}


async def _dispatch(router: Router, request: Request, path: str, body: dict[str, Any],
                    ids: list[int] | None, hits: dict[str, int] | None, role: str,
                    extra: dict[str, str]) -> Response:
    tried: set[str] = set()
    n = len(ids) if ids is not None else 0
    policy = "least_loaded" if role == "decode" else None
    while True:
        try:
            b, choice = router.pick(role, n, hits, tried, policy)
        except NoInstance as e:
            log.warning("%s %s: %s", request.method, path, e)
            return error(503, f"kvtier router: {e}", "service_unavailable")
        reason = "retry" if tried else ("decode" if role == "decode" else choice.reason)
        tried.add(b.url)
        headers = {"x-kvtier-instance": b.name, "x-kvtier-cached-tokens":
                   str(choice.cached_tokens), "x-kvtier-reason": reason,
                   "x-kvtier-prompt-tokens": str(n) if ids is not None else "unknown", **extra}
        log.info("%s %s", path, describe(b, choice, reason, ids and n, extra))
        try:
            resp = await _attempt(router, b, request, path, body, headers)
        except _Retry as e:
            router.cool(b, str(e))
            continue
        router.metrics.requests.labels(b.name, reason).inc()
        if choice.cached_tokens:
            router.metrics.hit_tokens.labels(b.name).inc(choice.cached_tokens)
        return resp


async def _attempt(router: Router, b: Backend, request: Request, path: str,
                   body: dict[str, Any], headers: dict[str, str]) -> Response:
    """One try at ``b``; raises _Retry while nothing has reached the client."""
    req = router.client.build_request("POST", f"{b.url}{path}", json=body,
                                      headers=_headers(request))
    t0 = time.perf_counter()
    router.started(b)
    done = True
    try:
        try:
            resp = await router.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        if resp.status_code >= 500:
            await resp.aclose()
            raise _Retry(f"HTTP {resp.status_code}")
        ctype = resp.headers.get("content-type", "application/json")
        chunks = resp.aiter_raw()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except httpx.HTTPError as e:
            await resp.aclose()
            raise _Retry(f"{type(e).__name__} before the first byte") from None
        router.metrics.phase.labels("first_byte").observe(time.perf_counter() - t0)
        if not ctype.startswith("text/event-stream"):
            try:
                rest = b"".join([c async for c in chunks])
            except httpx.HTTPError as e:
                raise _Retry(f"{type(e).__name__} in the body") from None
            finally:
                await resp.aclose()
            return Response(first + rest, resp.status_code, headers=headers, media_type=ctype)
        done = False  # the stream's generator finishes the request
        return StreamingResponse(_stream(router, b, resp, first, chunks), resp.status_code,
                                 headers=headers, media_type=ctype)
    finally:
        if done:
            router.finished(b)


async def _stream(router: Router, b: Backend, resp: httpx.Response, first: bytes,
                  chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    except httpx.HTTPError as e:
        router.cool(b, f"stream broke: {type(e).__name__}")
        err = {"error": {"message": f"kvtier router: instance {b.name} failed mid-stream "
                                    f"({type(e).__name__}); the answer is incomplete",
                         "type": "upstream_error", "code": 502}}
        yield f"\n\ndata: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
    finally:
        await resp.aclose()
        router.finished(b)


async def _prefill(router: Router, request: Request, path: str, body: dict[str, Any],
                   ids: list[int] | None, hits: dict[str, int] | None) -> dict[str, str]:
    """PD mode's first phase: the prompt on a prefill instance, one token out."""
    short = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    short.update(max_tokens=1, stream=False)
    if "max_completion_tokens" in short:
        short["max_completion_tokens"] = 1
    tried: set[str] = set()
    while True:
        try:
            b, choice = router.pick("prefill", len(ids or ()), hits, tried)
        except NoInstance as e:
            log.warning("prefill skipped: %s", e)
            return {"x-kvtier-prefill-instance": "none"}
        tried.add(b.url)
        t0 = time.perf_counter()
        router.started(b)
        try:
            resp = await router.client.post(f"{b.url}{path}", json=short,
                                            headers=_headers(request))
            if resp.status_code >= 500:
                raise httpx.HTTPStatusError(f"HTTP {resp.status_code}", request=resp.request,
                                            response=resp)
        except httpx.HTTPError as e:
            router.cool(b, f"prefill: {type(e).__name__}")
            continue
        finally:
            router.finished(b)
        ms = (time.perf_counter() - t0) * 1000
        router.metrics.phase.labels("prefill").observe(ms / 1000)
        router.metrics.requests.labels(b.name, "prefill").inc()
        return {"x-kvtier-prefill-instance": b.name, "x-kvtier-prefill-ms": f"{ms:.1f}",
                "x-kvtier-prefill-cached-tokens": str(choice.cached_tokens)}
