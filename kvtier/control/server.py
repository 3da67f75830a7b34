"""Layer 7: the management API served by uvicorn on a background thread.

:class:`ControlServer` runs uvicorn's event loop on one daemon thread of the
process it is started in (vLLM's worker); operations run on the app's own
small thread pool. Nothing here is ever called from the engine's thread, and
nothing the engine does waits on it. uvicorn answers 503 past
``max_concurrency`` connections; its access log is off (paths only reach the
debug log, and no header ever does).
"""

from __future__ import annotations

import logging
import time

import uvicorn

from kvtier.config import ControlConfig, ConfigError, is_loopback, require_tls
from kvtier.net.tls import TlsFiles, uvicorn_options
from kvtier.control.api import CacheAPI
from kvtier.control.app import OpRunner, build_app
from kvtier.control.guard import Guard
from kvtier.control.protocol import header_deadline
from kvtier.control.metrics import ControlMetrics
from kvtier.threads import NamedThread

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0


class ControlServer:
    """A running management API for ``api``; :meth:`close` stops it.

    With ``tls`` serving it speaks only https (mutual TLS when ``tls`` has a CA and
    ``client_auth``). Raises :class:`~kvtier.errors.ConfigError` (saying why)
    instead of serving on a non-loopback host without a token, or without TLS
    unless ``insecure`` waives it, and ``OSError`` when the port is taken.
    """

    def __init__(self, api: CacheAPI, cfg: ControlConfig | None = None,
                 port: int | None = None, tls: TlsFiles | None = None,
                 insecure: bool = False) -> None:
        cfg = cfg or ControlConfig()
        tls = tls or TlsFiles()
        token = cfg.resolve_token()
        if not token and not is_loopback(cfg.host):
            raise ConfigError("control.host", f"refusing to serve the management API on "
                              f"{cfg.host} without control.token or control.token_file")
        require_tls("control.host", cfg.host, tls, insecure)
        self.scheme = "https" if tls.serving else "http"
        self.api = api
        self.metrics = ControlMetrics(api)
        self.runner = OpRunner(cfg.workers, cfg.request_timeout_s)
        app = Guard(build_app(api, self.metrics, self.runner), token, cfg.max_body_bytes,
                    cfg.request_timeout_s, self.metrics)
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port if port is None else port,
                                log_level="warning", access_log=False, lifespan="off",
                                limit_concurrency=cfg.max_concurrency,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5,
                                h11_max_incomplete_event_size=64 * 1024,
                                server_header=False, proxy_headers=False,
                                http=header_deadline(cfg.request_timeout_s),
                                **uvicorn_options(tls))
        self._server = uvicorn.Server(config)
        self._thread = NamedThread(target=self._server.run, name="kvtier-control",
                                   daemon=True)
        self._thread.start()
        self._wait_started()
        sock = self._server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]

    def _wait_started(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():  # uvicorn exits its thread if it cannot bind
                self.runner.close()
                raise OSError(f"management API could not listen on {self._server.config.host}:"
                              f"{self._server.config.port} (taken?)")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"management API not up in {_START_TIMEOUT_S} s")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving (bounded) and release the port."""
        self._server.should_exit = True
        self._thread.join(10)
        self.runner.close()
        self.api.close()
