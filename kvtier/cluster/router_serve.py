"""Layer 7: the router's server: what it refuses to start with, and the uvicorn server
(API keys, bounds, TLS) around :func:`kvtier.cluster.router_app.build_router_app`.

Refused at start-up (:class:`~kvtier.errors.ConfigError` naming the flag):

- a non-loopback ``host`` without API keys (anyone who reaches it could use the
  instances and read what the router says about their caches);
- a non-loopback ``host`` without TLS unless ``--insecure-no-tls`` (keys and
  prompts would cross the network in clear);
- TLS files that are missing or do not fit together, and bounds that are not > 0.

Bounds: the :class:`~kvtier.control.guard.Guard` answers a request without a valid
key 401 (before its body is read), a body over ``max_body_bytes`` 413 (a
``Content-Length`` over it unread), a body read that waits over ``body_timeout_s``
or a body not in ``body_timeout_s`` after the request began 408. uvicorn answers 503
past ``max_concurrency`` requests at once; each forwarded request is bounded by the
router's ``request_timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import uvicorn

from kvtier.cluster.router import Router
from kvtier.cluster.router_app import build_router_app
from kvtier.cluster.router_keys import Caller
from kvtier.cluster.tokens import PromptTokens
from kvtier.config import ConfigError, is_loopback, require_tls
from kvtier.control.guard import Guard
from kvtier.control.protocol import header_deadline
from kvtier.net.tls import TlsError, TlsFiles, uvicorn_options


@dataclass
class RouterServing:
    """How the router serves (the ``kvtier router`` flags that are not about routing)."""

    host: str = "127.0.0.1"
    port: int = 8000
    keys: dict[str, Caller] = field(default_factory=dict)
    tls: TlsFiles = field(default_factory=TlsFiles)
    insecure_no_tls: bool = False
    debug_headers: bool = False
    max_body_bytes: int = 16 * 1024**2
    body_timeout_s: float = 30.0
    max_concurrency: int = 1024

    def check(self) -> None:
        """ConfigError (naming the flag) for a configuration the router will not serve."""
        try:
            self.tls.check_flags()
        except TlsError as e:
            raise ConfigError(e.key, e.problem) from None
        require_tls("--host", self.host, self.tls, self.insecure_no_tls,
                    waiver="--insecure-no-tls")
        if not self.keys and not is_loopback(self.host):
            raise ConfigError("--api-key-file", f"{self.host} is reachable from other "
                              "machines and the router has no API keys: give "
                              "--api-key-file (or KVTIER_ROUTER__API_KEY), or bind 127.0.0.1")
        for name in ("max_body_bytes", "body_timeout_s", "max_concurrency"):
            if not getattr(self, name) > 0:
                raise ConfigError("--" + name.replace("_", "-"), "must be > 0")

    @property
    def scheme(self) -> str:
        return "https" if self.tls.serving else "http"


def router_server(router: Router, tokens: PromptTokens, serving: RouterServing
                  ) -> uvicorn.Server:
    """The router's uvicorn server (``.run()`` blocks); ConfigError as :meth:`check`."""
    serving.check()
    app = build_router_app(router, tokens, keyed=bool(serving.keys),
                           debug_headers=serving.debug_headers)
    guarded = Guard(app, "", serving.max_body_bytes, serving.body_timeout_s,
                    router.metrics, router.metrics.label,  # type: ignore[arg-type]
                    keys=serving.keys, body_deadline_s=serving.body_timeout_s)
    config = uvicorn.Config(guarded, host=serving.host, port=serving.port,
                            log_level="warning", access_log=False, timeout_keep_alive=30,
                            limit_concurrency=serving.max_concurrency, server_header=False,
                            http=header_deadline(serving.body_timeout_s),
                            **uvicorn_options(serving.tls))  # type: ignore[arg-type]
    return uvicorn.Server(config)
