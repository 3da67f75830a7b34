"""Layer 7: the KV-aware router as an OpenAI-compatible proxy (FastAPI + httpx).

``POST /v1/completions`` and ``/v1/chat/completions`` (``stream: true`` passes
the server-sent events through as they come), ``GET /v1/models``,
``/metrics``, ``/health``. Each request: its prompt tokens
(:mod:`kvtier.cluster.tokens`), the controller's lookup, the choice
(:mod:`kvtier.cluster.choice`), then the forward. Visible decisions: one log
line per request, ``kvtier_router_*`` metrics and, for an operator's key or with
``debug_headers`` and only on answers below 400, headers ``x-kvtier-instance``,
``x-kvtier-cached-tokens``, ``x-kvtier-reason``, ``x-kvtier-prompt-tokens`` (as
the router counted them). To anyone else they would say whether another user's
prompt is cached.

Callers (:mod:`kvtier.cluster.router_keys`, checked by the Guard before this app
runs): with keys, ``/metrics`` is for operators (403 otherwise), and a request's
``cache_salt`` is the caller's tenant salt in both the lookup and the body sent
on. The caller's ``Authorization`` never goes to an instance; the router's
``backend_key`` does. Each forwarded request is bounded by
``Router.request_timeout_s`` (504 before the first byte; an ``error`` event in a
stream).

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
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvtier.cluster.router import Backend, NoInstance, Router, describe
from kvtier.cluster.router_keys import Caller, tenant_salt
from kvtier.cluster.tokens import PromptTokens
from kvtier.control.guard import CALLER

log = logging.getLogger("kvtier.router")
_PASS_HEADERS = ("content-type", "accept", "x-request-id")  # never the caller's credentials
ANONYMOUS = Caller("", False)
"""The caller of a router without keys (loopback only)."""


class _Retry(Exception):
    """The attempt failed before any byte reached the client."""


class _Late(Exception):
    """The instance did not answer within ``request_timeout_s`` (nothing sent yet)."""


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def build_router_app(router: Router, tokens: PromptTokens, keyed: bool = False,
                     debug_headers: bool = False) -> FastAPI:
    """The proxy. ``keyed``: the Guard checks API keys (and names the caller);
    ``debug_headers``: every caller gets the ``x-kvtier-*`` headers."""

    def caller(request: Request) -> Caller:
        return getattr(request.state, CALLER, ANONYMOUS)

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
    async def metrics(request: Request) -> Response:
        if keyed and not caller(request).operator:
            return error(403, "/metrics: an operator's key is required", "permission_denied")
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        url = router.models_url()
        if url is None:
            return error(503, "kvtier router: no instance known", "service_unavailable")
        try:
            resp = await router.client.get(f"{url}/v1/models", headers=_headers(router, request),
                                           timeout=10)
        except httpx.HTTPError as e:
            log.warning("/v1/models from %s: %s", url, type(e).__name__)
            return error(502, "kvtier router: no answer from an instance", "bad_gateway")
        return Response(resp.content, resp.status_code, media_type="application/json")

    async def proxy(request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return error(400, f"body: not valid JSON: {e}", "invalid_request_error")
        except ClientDisconnect:  # gone before its body was in: nobody to answer
            return Response(status_code=400)
        who = caller(request)
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            return error(400, "cache_salt: must be a string", "invalid_request_error")
        if keyed:  # the tenant's salt, in the lookup and in the body vLLM gets
            salt = tenant_salt(who, salt)
            body.pop("cache_salt", None)
            if salt is not None:
                body["cache_salt"] = salt
        ids = await asyncio.get_running_loop().run_in_executor(None, tokens.of, path, body)
        model = str(body.get("model", ""))
        hits = None
        if ids is not None and router.policy == "kv":
            hits = await router.lookup(model, ids, salt)
        if ids is not None:
            router.metrics.prompt_tokens.inc(len(ids))
        extra: dict[str, str] = {}
        if router.pd:
            extra = await _prefill(router, request, path, body, ids, hits)
        return await _dispatch(router, request, path, body, ids, hits,
                               "decode" if router.pd else "any", extra,
                               debug_headers or who.operator)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    return app


def _headers(router: Router, request: Request) -> dict[str, str]:
    """What goes to an instance: a few of the caller's headers and the router's key."""
    out = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
    if router.backend_key:
        out["authorization"] = f"Bearer {router.backend_key}"
    return out


async def _dispatch(router: Router, request: Request, path: str, body: dict[str, Any],
                    ids: list[int] | None, hits: dict[str, int] | None, role: str,
                    extra: dict[str, str], show: bool) -> Response:
    """The request on the best instance, the next one after a failure; ``show``: the
    ``x-kvtier-*`` headers go with a successful answer."""
    tried: set[str] = set()
    n = len(ids) if ids is not None else 0
    policy = "least_loaded" if role == "decode" else None
    while True:
        try:
            b, choice = router.pick(role, n, hits, tried, policy)
        except NoInstance as e:
            log.warning("%s %s: %s", request.method, path, e)
            msg = str(e) if show else "no instance available"  # instance URLs: operators'
            return error(503, f"kvtier router: {msg}", "service_unavailable")
        reason = "retry" if tried else ("decode" if role == "decode" else choice.reason)
        tried.add(b.url)
        headers = {"x-kvtier-instance": b.name, "x-kvtier-cached-tokens":
                   str(choice.cached_tokens), "x-kvtier-reason": reason,
                   "x-kvtier-prompt-tokens": str(n) if ids is not None else "unknown", **extra}
        log.info("%s %s", path, describe(b, choice, reason, ids and n, extra))
        try:
            resp = await _attempt(router, b, request, path, body, headers if show else {})
        except _Retry as e:
            router.cool(b, str(e))
            continue
        except _Late:
            log.warning("%s %s: %s gave no answer within %g s", request.method, path, b.name,
                        router.request_timeout_s)
            return error(504, f"kvtier router: no answer within {router.request_timeout_s:g} s",
                         "gateway_timeout")
        router.metrics.requests.labels(b.name, reason).inc()
        if choice.cached_tokens:
            router.metrics.hit_tokens.labels(b.name).inc(choice.cached_tokens)
        return resp


async def _attempt(router: Router, b: Backend, request: Request, path: str,
                   body: dict[str, Any], headers: dict[str, str]) -> Response:
    """One try at ``b``; raises _Retry while nothing has reached the client (_Late when
    ``request_timeout_s`` ran out). ``headers`` go only with an answer below 400."""
    req = router.client.build_request("POST", f"{b.url}{path}", json=body,
                                      headers=_headers(router, request),
                                      timeout=router.timeout())
    t0 = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + router.request_timeout_s
    router.started(b)
    done = True
    resp: httpx.Response | None = None
    try:
        try:
            resp = await _within(deadline, router.client.send(req, stream=True))
            if resp.status_code >= 500:
                raise _Retry(f"HTTP {resp.status_code}")
            if resp.status_code >= 400:
                headers = {}  # an error (vLLM's 401 too) says nothing about the cache
            ctype = resp.headers.get("content-type", "application/json")
            chunks = resp.aiter_raw()
            try:
                first = await _within(deadline, chunks.__anext__())
            except StopAsyncIteration:
                first = b""
            router.metrics.phase.labels("first_byte").observe(time.perf_counter() - t0)
            if not ctype.startswith("text/event-stream"):
                rest = [first]
                while True:
                    try:
                        rest.append(await _within(deadline, chunks.__anext__()))
                    except StopAsyncIteration:
                        break
                return Response(b"".join(rest), resp.status_code, headers=headers,
                                media_type=ctype)
        except httpx.HTTPError as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        done = False  # the stream's generator finishes the request
        return StreamingResponse(_stream(router, b, resp, first, chunks, deadline),
                                 resp.status_code, headers=headers, media_type=ctype)
    finally:
        if done:
            if resp is not None:
                await resp.aclose()
            router.finished(b)


async def _within(deadline: float, step: Any) -> Any:
    """``await step`` by ``deadline`` (loop time); _Late after it (or an httpx read
    timeout: the same bound, per wait)."""
    try:
        return await asyncio.wait_for(step, max(0.0, deadline - asyncio.get_running_loop()
                                                .time()))
    except (asyncio.TimeoutError, httpx.ReadTimeout, httpx.PoolTimeout):
        raise _Late() from None


async def _stream(router: Router, b: Backend, resp: httpx.Response, first: bytes,
                  chunks: AsyncIterator[bytes], deadline: float) -> AsyncIterator[bytes]:
    why = ""
    try:
        if first:
            yield first
        while True:
            try:
                yield await _within(deadline, chunks.__anext__())
            except StopAsyncIteration:
                break
    except _Late:
        why = f"did not finish within {router.request_timeout_s:g} s"
    except httpx.HTTPError as e:
        router.cool(b, f"stream broke: {type(e).__name__}")
        why = f"failed mid-stream ({type(e).__name__})"
    finally:
        await resp.aclose()
        router.finished(b)
    if why:
        err = {"error": {"message": f"kvtier router: the instance {why}; the answer is "
                                    "incomplete", "type": "upstream_error", "code": 502}}
        yield f"\n\ndata: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


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
                                            headers=_headers(router, request),
                                            timeout=router.timeout())
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
