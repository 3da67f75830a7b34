"""Layer 7: the management API as a FastAPI application.

    POST /v1/{lookup,admit,evict,move,clear,pin,unpin,compress,decompress}  JSON -> JSON
    GET  /v1/status      usage and counters of every tier
    GET  /health         liveness (the one path that needs no token)
    GET  /metrics        Prometheus text (kvtier's own registry)
    GET  /openapi.json, /docs

Operations run on a small pool of threads of their own (``control.workers``);
a request waits at most ``control.request_timeout_s`` for a free thread
(else 503) and for its result (else 504). The event loop never runs an
operation, so a slow disk never stops the server answering ``/health``.
Bad input answers 400 ``{"error": "<field>: <problem>"}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtier.control import models as m
from kvtier.control.api import CacheAPI
from kvtier.control.metrics import ControlMetrics
from kvtier.threads import pool

log = logging.getLogger(__name__)
T = TypeVar("T")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": m.Error, "description": text} for code, text in (
        (400, "bad input; the error names the field"), (401, "no valid bearer token"),
        (413, "body too large"), (503, "no worker free in time"), (504, "operation timed out"))}


class OpRunner:
    """Runs operations on ``workers`` threads; at most that many are ever in flight,
    and a caller waits at most ``timeout_s`` for a thread and again for the result."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.pool = pool(workers, "kvtier-control-op")
        self.timeout_s = timeout_s
        self._slots: asyncio.Semaphore | None = None
        self._workers = workers

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._slots is None:  # made in the server's own event loop
            self._slots = asyncio.Semaphore(self._workers)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(503, "server: every worker is busy; try again") from None
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        fut.add_done_callback(lambda _: slots.release())  # the thread is free only now
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, "server: the operation did not finish in time") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_app(api: CacheAPI, metrics: ControlMetrics, runner: OpRunner) -> FastAPI:
    """The FastAPI application serving ``api`` (wrap it in :class:`~kvtier.control.guard.Guard`)."""
    bearer = HTTPBearer(auto_error=False, description="control.token")  # documents; Guard checks
    app = FastAPI(title="kvtier management API", version="1",
                  description="Cached KV of one kvtier instance, by prompt or by chunk key.",
                  responses=_ERRORS)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _first_error(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own and routing's 404/405
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(ValueError)
    async def _bad(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/health", response_model=m.Health)
    async def health() -> m.Health:
        return m.Health()

    auth = [Depends(bearer)]

    @app.get("/metrics", dependencies=auth, response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        text = await runner.run(generate_latest, metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", dependencies=auth, response_model=m.Status)
    async def status() -> m.Status:
        return await runner.run(api.status)

    @app.get("/v1/snapshot", dependencies=auth, response_model=m.Snapshot)
    async def snapshot() -> m.Snapshot:
        return await runner.run(api.snapshot)

    def op(name: str, body: type, result: type, fn: Callable[[Any], Any],
           optional: bool = False) -> None:
        async def endpoint(req: Any) -> Any:
            return await runner.run(fn, req)

        if optional:
            endpoint.__defaults__ = (body(),)

        endpoint.__annotations__ = {"req": body, "return": result}
        app.post(f"/v1/{name}", dependencies=auth, response_model=result, name=name,
                 summary=(fn.__doc__ or "").split("\n")[0])(endpoint)

    op("lookup", m.Chunks, m.LookupResult, api.lookup)
    op("admit", m.AdmitRequest, m.Admitted, api.admit)
    op("evict", m.InTier, m.Removed, api.evict)
    op("move", m.MoveRequest, m.Moved, api.move)
    op("clear", m.ClearRequest, m.Removed, api.clear, optional=True)  # no body: every tier
    op("resume", m.ResumeRequest, m.Resumed, api.resume, optional=True)  # no body: every tier
    op("pin", m.PinRequest, m.Pinned, api.pin)
    op("unpin", m.Chunks, m.Unpinned, api.unpin)
    op("compress", m.CompressRequest, m.Recoded, api.compress)
    op("decompress", m.RecodeRequest, m.Recoded, api.decompress)
    _openapi_without_422(app)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """Bad input is a 400 here (see ``_invalid``), not FastAPI's 422: say so in the schema."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = make()
            for item in spec.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema or make()

    app.openapi = openapi  # type: ignore[method-assign]


def _first_error(exc: RequestValidationError) -> str:
    """``<field>: <problem>`` of the first validation error (never the input's value)."""
    errors = exc.errors()
    if not errors:
        return "body: invalid"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) if loc else "body"
    if err.get("type") == "json_invalid":
        field = "body"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{field}: {msg}"
