"""Layer 7: the router's state: instances, their load, the controller, the choice.

Instances come from ``--instance`` (and ``--prefill`` / ``--decode`` in PD
mode) and from the controller's registrations (``/v1/instances``, polled;
those with a ``url``). Each has a count of requests in flight through this
router and, after a failure, a cooldown during which it is not chosen. The
controller is asked ``/v1/lookup`` with a bounded timeout; when it fails the
router routes by load and does not ask again for ``controller_backoff_s``
(so a dead controller costs no request a timeout). Calls to the controller go
through :func:`kvtier.net.http.arequest` (bounded, no redirect followed) on a
client of their own; forwarding requests to instances does not (that is a
streaming proxy on ``Router.client``, see :mod:`kvtier.cluster.router_app`).
Both clients come from :func:`kvtier.net.http.async_client`: no redirect
followed, nothing from the environment, https checked against the router's
``--tls-ca`` and its certificate presented (mutual TLS). Instances get the
router's own ``backend_key`` (their ``vllm serve --api-key``), never the
caller's credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvtier.cluster.choice import Candidate, Choice, choose
from kvtier.config.values import is_loopback
from kvtier.net.backoff import Backoff
from kvtier.net.http import HttpError, arequest, async_client
from kvtier.net.tls import TlsFiles

log = logging.getLogger("kvtier.router")
MAX_CONTROLLER_ANSWER = 4 * 1024**2
"""The bound on a lookup's or an instance list's answer (one line per instance)."""


@dataclass
class Backend:
    url: str
    name: str
    role: str = "any"  # "any", "prefill", "decode"
    static: bool = True
    inflight: int = 0
    cool_until: float = 0.0


class NoInstance(RuntimeError):
    """Every instance of the pool is down or cooling down."""


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvtier_router_requests_total", "Requests routed, by instance "
                                "and reason (cache_hit, least_loaded, round_robin, retry, "
                                "prefill, decode).", ["instance", "reason"], registry=r)
        self.hit_tokens = Counter("kvtier_router_hit_tokens_total", "Prompt tokens the chosen "
                                  "instance held by the controller's lookup.", ["instance"],
                                  registry=r)
        self.prompt_tokens = Counter("kvtier_router_prompt_tokens_total", "Prompt tokens of "
                                     "routed requests (when known).", registry=r)
        self.failures = Counter("kvtier_router_instance_failures_total", "Failed attempts "
                                "(connection error or 5xx), by instance.", ["instance"],
                                registry=r)
        self.lookups = Counter("kvtier_router_lookups_total", "Controller lookups, by outcome.",
                               ["outcome"], registry=r)
        self.inflight = Gauge("kvtier_router_inflight", "Requests in flight, by instance.",
                              ["instance"], registry=r)
        self.phase = Histogram("kvtier_router_phase_seconds", "Time of each phase (lookup, "
                               "prefill, first byte).", ["phase"], registry=r,
                               buckets=(.005, .02, .1, .5, 1, 2, 5, 10, 30, 120))
        self.answers = Counter("kvtier_router_http_requests_total", "Requests answered by "
                               "the router, by path and status (401/408/413 included).",
                               ["op", "code"], registry=r)

    @staticmethod
    def label(path: str) -> str:
        """A bounded label for a path (unknown paths are all ``other``)."""
        return path if path in _PATHS else "other"

    def observe(self, op: str, code: int, seconds: float) -> None:
        """The Guard's hook: one answered request."""
        self.answers.labels(op, str(code)).inc()


_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                    "/health"})


def norm(url: str) -> str:
    return url.rstrip("/")


class Router:
    """Instances, load, controller lookups, and the choice among them."""

    def __init__(self, instances: list[str], controller: str = "", controller_token: str = "",
                 prefill: list[str] | None = None, decode: list[str] | None = None,
                 policy: str = "kv", alpha: float = 0.5, lookup_timeout_s: float = 0.5,
                 cooldown_s: float = 10.0, controller_backoff_s: float = 2.0,
                 discover_s: float = 2.0, tls: TlsFiles | None = None, backend_key: str = "",
                 request_timeout_s: float = 600.0, plain_discovered: bool | None = None
                 ) -> None:
        self.backends: dict[str, Backend] = {}
        # A registration names where users' prompts go: with the cluster's CA, an
        # instance found through the controller must prove it holds a certificate of it
        # (https), unless it is on loopback or the operator waived TLS.
        self.plain_discovered = not (tls is not None and tls.dialing) \
            if plain_discovered is None else plain_discovered
        self._refused: set[str] = set()
        for role, urls in (("any", instances), ("prefill", prefill or []),
                           ("decode", decode or [])):
            for u in urls:
                self.backends[norm(u)] = Backend(norm(u), norm(u), role)
        self.pd = bool(prefill or decode)
        self.controller = norm(controller) if controller else ""
        self.controller_token = controller_token
        self.policy, self.alpha = policy, alpha
        self.lookup_timeout_s, self.cooldown_s = lookup_timeout_s, cooldown_s
        self.controller_backoff_s, self.discover_s = controller_backoff_s, discover_s
        # Fixed and unjittered: --controller-backoff means "route by load for that long".
        self._controller = Backoff(controller_backoff_s, controller_backoff_s, jitter=0.0)
        self.turn = 0
        self.metrics = RouterMetrics()
        self.backend_key = backend_key
        self.request_timeout_s = request_timeout_s
        self.client = async_client(max_connections=512, tls=tls)
        # The controller's calls (see the module docstring); as many connections as the
        # forwarding client, so concurrent lookups never wait for one.
        self.ctl_client = async_client(max_connections=512, tls=tls)

    def timeout(self) -> httpx.Timeout:
        """The httpx timeout of a forwarded request (each wait; the whole is bounded too)."""
        return httpx.Timeout(self.request_timeout_s, connect=min(3.0, self.request_timeout_s))

    # -- controller
    async def lookup(self, model: str, ids: list[int], salt: str | None) -> dict[str, int] | None:
        """Cached tokens per instance URL, or None (no controller, or it failed)."""
        if not self.controller or not self._controller.ready():
            self.metrics.lookups.labels("skipped").inc()
            return None
        t0 = time.perf_counter()
        try:
            out = (await arequest(self.ctl_client, "POST", f"{self.controller}/v1/lookup",
                                  json_body={"model": model, "token_ids": ids, "salt": salt},
                                  token=self.controller_token, timeout_s=self.lookup_timeout_s,
                                  max_bytes=MAX_CONTROLLER_ANSWER)).json()
            hits = {norm(i["url"]): int(i["cached_tokens"]) for i in out["instances"]
                    if i.get("url")}
            names = {norm(i["url"]): i["instance"] for i in out["instances"] if i.get("url")}
        except (HttpError, ValueError, KeyError, TypeError) as e:
            wait = self._controller.failed()
            self.metrics.lookups.labels("failed").inc()
            log.warning("controller lookup failed (%s: %s); routing by load "
                        "for %.0f s", type(e).__name__, e, wait)
            return None
        self._controller.succeeded()
        self.metrics.phase.labels("lookup").observe(time.perf_counter() - t0)
        self.metrics.lookups.labels("ok").inc()
        for url, name in names.items():
            if url in self.backends:
                self.backends[url].name = name
        return hits

    async def discover_loop(self) -> None:
        """Follow the controller's registrations (instances with a URL join the pool)."""
        while self.controller and not self.pd:
            try:
                resp = await arequest(self.ctl_client, "GET", f"{self.controller}/v1/instances",
                                      token=self.controller_token, timeout_s=2.0,
                                      max_bytes=MAX_CONTROLLER_ANSWER)
                seen = {norm(i["url"]): i["instance"] for i in resp.json()["instances"]
                        if i.get("url")}
                for url, name in list(seen.items()):
                    if url not in self.backends and not self._may_join(url, name):
                        del seen[url]
                        continue
                    if url not in self.backends:
                        log.info("%s (%s) joins from the controller", name, url)
                        self.backends[url] = Backend(url, name, static=False)
                    self.backends[url].name = name
                for url, b in list(self.backends.items()):
                    if not b.static and url not in seen and not b.inflight:
                        log.info("%s left the controller", b.name)
                        del self.backends[url]
            except (HttpError, ValueError, KeyError, TypeError):
                pass  # keep what we know
            await asyncio.sleep(self.discover_s)

    def _may_join(self, url: str, name: str) -> bool:
        """Whether a discovered instance URL may receive users' prompts."""
        parts = urlsplit(url)
        if self.plain_discovered or parts.scheme == "https" or \
                is_loopback(parts.hostname or ""):
            return True
        if url not in self._refused:
            self._refused.add(url)
            log.warning("%s registered %s: plain http off loopback, not routed to (with "
                        "--tls-ca, instances found through the controller need https; "
                        "--insecure-no-tls waives it)", name, url)
        return False

    # -- choice
    def pool(self, role: str, exclude: set[str]) -> list[Backend]:
        now = time.monotonic()
        return [b for b in self.backends.values()
                if b.role == role and b.url not in exclude and b.cool_until <= now]

    def pick(self, role: str, prompt_tokens: int, hits: dict[str, int] | None,
             exclude: set[str], policy: str | None = None) -> tuple[Backend, Choice]:
        pool = self.pool(role, exclude)
        if not pool:
            tried = ", ".join(sorted(exclude)) or "none"
            raise NoInstance(f"no {'' if role == 'any' else role + ' '}instance available "
                             f"(tried: {tried}; others down or cooling down)")
        hits = hits or {}
        cands = [Candidate(b.url, b.inflight, hits.get(b.url, 0)) for b in pool]
        self.turn += 1
        c = choose(cands, prompt_tokens, self.alpha, policy or self.policy, self.turn)
        return self.backends[c.name], c

    def cool(self, b: Backend, why: str) -> None:
        b.cool_until = time.monotonic() + self.cooldown_s
        self.metrics.failures.labels(b.name).inc()
        log.warning("%s failed (%s); out for %.0f s", b.name, why,
                    self.cooldown_s)

    def started(self, b: Backend) -> None:
        b.inflight += 1
        self.metrics.inflight.labels(b.name).set(b.inflight)

    def finished(self, b: Backend) -> None:
        b.inflight = max(0, b.inflight - 1)
        self.metrics.inflight.labels(b.name).set(b.inflight)

    def models_url(self) -> str | None:
        now = time.monotonic()
        for b in sorted(self.backends.values(), key=lambda b: b.cool_until > now):
            return b.url
        return None

    async def close(self) -> None:
        await self.client.aclose()
        await self.ctl_client.aclose()


def describe(b: Backend, c: Choice, reason: str, prompt_tokens: int | None,
             extra: dict[str, Any]) -> str:
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return (f"-> {b.name} ({reason}, cached {c.cached_tokens}/{prompt_tokens or '?'} tokens, "
            f"inflight {b.inflight}) {more}").rstrip()
