"""Layer 7: the controller's HTTP API (FastAPI), behind the management API's Guard.

    POST /v1/register    an instance announces itself (again: with its credential)
    POST /v1/heartbeat   {"instance"}; 404: unknown, register again; 403: not its credential
    POST /v1/snapshot    an instance's keys per tier, when an answer said "resync"
    POST /v1/events      KV event batches an instance relays (applied under its own topic)
    POST /v1/lookup      {"model", "prompt" | "token_ids", "salt"?} -> cached prefix per instance
    POST /v1/locate      {"keys", "exclude"?} -> holders of the leading keys (the peer tier's call)
    GET  /v1/instances   the live instances and how many chunks each holds per tier
    GET  /metrics        Prometheus text
    GET  /health         liveness (no token)

With a token every path but ``/health`` needs ``Authorization: Bearer`` (the
same :class:`~kvtier.control.guard.Guard` as the management API: constant-time
compare, bounded bodies: ``max_body_bytes``, except ``/v1/snapshot``'s
``max_snapshot_bytes``). The controller token only lets a caller join: what
speaks for a registered instance also needs that instance's credential in
``X-Kvtier-Instance-Token`` (403 otherwise). Bad input answers 400
``{"error": "<field>: <problem>"}``. With TLS files uvicorn serves https only;
with a CA it asks every client for a certificate signed by it (mutual TLS).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtier.cluster import models as m
from kvtier.cluster.controller import Controller, Forbidden, TooSoon, Unknown
from kvtier.control.app import _first_error
from kvtier.control.guard import Guard
from kvtier.control.protocol import header_deadline
from kvtier.net.tls import TlsFiles, uvicorn_options

_OPS = frozenset({"register", "heartbeat", "snapshot", "events", "lookup", "locate", "instances",
                  "metrics", "health"})
CREDENTIAL = "X-Kvtier-Instance-Token"
MAX_BODY = 4 << 20
"""The bound on a request body (a relayed events POST is the largest but one)."""
MAX_SNAPSHOT = 256 << 20
"""The bound on a pushed snapshot: ~7 million keys (36 bytes each, as hex in JSON)."""


class ControllerMetrics:
    """The controller's Prometheus registry (requests, events, resyncs, instances)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kvtier_controller_requests_total", "Requests answered.",
                                ["op", "code"], registry=self.registry)
        self.duration = Histogram("kvtier_controller_request_duration_seconds",
                                  "Time to answer a request.", ["op"], registry=self.registry,
                                  buckets=(.001, .005, .02, .1, .5, 2))
        self.things = Counter("kvtier_controller_events_total", "Registrations, KV event "
                              "batches applied, resyncs and expiries, by kind.",
                              ["what", "label"], registry=self.registry)
        self.instances = Gauge("kvtier_controller_instances", "Live instances.",
                               registry=self.registry)
        self.chunks = Gauge("kvtier_controller_indexed_chunks", "Chunks indexed, per tier.",
                            ["tier"], registry=self.registry)

    @staticmethod
    def label(path: str) -> str:
        """A bounded label for a path (unknown paths are all ``other``)."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return name if name in _OPS else "other"

    def observe(self, op: str, code: int, seconds: float) -> None:
        """The Guard's hook: one answered request."""
        self.requests.labels(op, str(code)).inc()
        self.duration.labels(op).observe(seconds)

    def count(self, what: str, label: str) -> None:
        self.things.labels(what, label).inc()


def build_app(ctl: Controller, metrics: ControllerMetrics) -> FastAPI:
    app = FastAPI(title="kvtier controller", version="1",
                  description="Which kvtier instance holds which chunks; KV-aware lookups.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _first_error(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(ValueError)
    async def _bad(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    for kind, code in ((Forbidden, 403), (Unknown, 404), (TooSoon, 429)):
        async def _refused(request: Request, exc: Exception, code: int = code) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=code)
        app.add_exception_handler(kind, _refused)

    cred = Header(None, alias=CREDENTIAL, max_length=256)

    async def off_loop(fn: Any, *args: Any) -> Any:  # Redis calls never block the loop
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @app.get("/health", response_model=m.Ok)
    async def health() -> m.Ok:
        return m.Ok()

    @app.post("/v1/register", response_model=m.Registered)
    async def register(body: m.Register, token: str | None = cred) -> m.Registered:
        return await off_loop(ctl.register, body, token)

    @app.post("/v1/heartbeat", response_model=m.Beat)
    async def heartbeat(body: m.InstanceRef, token: str | None = cred) -> m.Beat:
        return await off_loop(ctl.heartbeat, body.instance, token)

    @app.post("/v1/snapshot", response_model=m.Ok)
    async def snapshot(body: m.SnapshotPush, token: str | None = cred) -> m.Ok:
        await off_loop(ctl.snapshot, body, token)
        return m.Ok()

    @app.post("/v1/events", response_model=m.Ok)
    async def events(body: m.EventsPush, token: str | None = cred) -> m.Ok:
        await off_loop(ctl.relayed, body, token)
        return m.Ok()

    @app.post("/v1/lookup", response_model=m.LookupResult)
    async def lookup(body: m.Lookup) -> m.LookupResult:
        return await off_loop(ctl.lookup, body)

    @app.post("/v1/locate", response_model=m.Located)
    async def locate(body: m.Locate) -> m.Located:
        return await off_loop(ctl.locate, body)

    @app.get("/v1/instances", response_model=m.Instances)
    async def instances() -> m.Instances:
        return m.Instances(instances=await off_loop(ctl.instances))

    @app.get("/metrics")
    async def prometheus() -> Response:
        def scrape() -> bytes:
            live = ctl.instances()
            metrics.instances.set(len(live))
            totals: dict[str, int] = {}
            for inst in live:
                for tier, n in inst.chunks.items():
                    totals[tier] = totals.get(tier, 0) + n
            for tier, n in totals.items():
                metrics.chunks.labels(tier).set(n)
            return generate_latest(metrics.registry)
        return Response(await off_loop(scrape), media_type=CONTENT_TYPE_LATEST)

    return app


class _ByPath:
    """Two guards over one app: ``/v1/snapshot`` gets the larger body bound."""

    def __init__(self, small: Guard, large: Guard) -> None:
        self.small, self.large = small, large

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        guard = self.large if scope.get("path") == "/v1/snapshot" else self.small
        await guard(scope, receive, send)


def serve(ctl: Controller, metrics: ControllerMetrics, host: str, port: int, token: str,
          max_body_bytes: int = MAX_BODY, timeout_s: float = 30.0,
          tls: TlsFiles | None = None, max_snapshot_bytes: int = MAX_SNAPSHOT,
          max_concurrency: int = 256) -> uvicorn.Server:
    """A uvicorn server for the controller (call ``.run()``; blocks until stopped): each
    request's headers and body within ``timeout_s``, at most ``max_concurrency``
    connections (503 past them)."""
    app = build_app(ctl, metrics)
    guarded = _ByPath(*(Guard(app, token, n, timeout_s, metrics, metrics.label)  # type: ignore
                        for n in (max_body_bytes, max_snapshot_bytes)))
    config = uvicorn.Config(guarded, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_keep_alive=5, server_header=False,
                            limit_concurrency=max_concurrency,
                            http=header_deadline(timeout_s),
                            **uvicorn_options(tls or TlsFiles()))  # type: ignore[arg-type]
    return uvicorn.Server(config)

