"""Layer 7: an instance's side of the controller: register, heartbeat, register again.

One daemon thread per instance (:class:`Registrar`). Every call has a bounded
timeout (:class:`kvtier.net.http.HttpClient`) and nothing on the engine's path
waits on it: a controller that is down, slow or restarted only delays this
thread. A heartbeat answered 404 (the controller forgot the instance: it
restarted, or the instance was quiet past the TTL) or a failed call means
"register again", retried with a doubling backoff from ``FIRST_BACKOFF_S`` up
to ``max_backoff_s``, jittered (:class:`kvtier.net.backoff.Backoff`).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kvtier.net.backoff import Backoff
from kvtier.net.http import HttpClient, HttpError, StatusError, shown_url

log = logging.getLogger(__name__)
FIRST_BACKOFF_S = 0.5
MAX_ANSWER = 1024**2
"""The bound on the controller's answer (a registration's is a few hundred bytes)."""


class Registrar:
    """Keeps ``body`` registered at ``url`` while the process lives (or until :meth:`close`)."""

    def __init__(self, url: str, body: dict[str, Any], token: str = "",
                 heartbeat_s: float = 2.0, timeout_s: float = 2.0,
                 max_backoff_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.body = body
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.backoff = Backoff(FIRST_BACKOFF_S, max_backoff_s)
        self.registered = threading.Event()
        self.registrations = 0
        self._shown = shown_url(self.url)  # for logs: no credentials
        self._http = HttpClient(timeout_s, MAX_ANSWER)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-registrar", daemon=True)
        self._thread.start()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._http.request("POST", f"{self.url}{path}", token=self.token, json_body=body)
        return json.loads(resp.body or b"{}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    out = self._post("/v1/register", self.body)
                    self.registered.set()
                    self.registrations += 1
                    log.info("kvtier: registered at the controller %s as %s (events %s, "
                             "topic %s)", self._shown, self.body["instance"], out.get("events"),
                             out.get("topic"))
                else:
                    self._post("/v1/heartbeat", {"instance": self.body["instance"]})
                self.backoff.succeeded()
                wait = self.heartbeat_s
            except StatusError as e:  # a redirect too: it is not followed
                if e.status == 404:
                    log.info("kvtier: the controller forgot %s; registering again",
                             self.body["instance"])
                    self.registered.clear()
                    wait = 0.0
                else:
                    detail = e.body[:300].decode(errors="replace") or e.reason
                    log.warning("kvtier: controller %s answered %s: %s", self._shown, e.status,
                                detail)
                    self.registered.clear()
                    wait = self.backoff.failed()
            except (HttpError, ValueError) as e:  # down, slow, or not a controller
                if self.registered.is_set():
                    log.info("kvtier: controller %s unreachable (%s); will register again",
                             self._shown, e)
                self.registered.clear()
                wait = self.backoff.failed()
            self._stop.wait(wait)

    def close(self) -> None:
        """Stop registering (the controller forgets this instance after its TTL)."""
        self._stop.set()
        self._thread.join(self.timeout_s + 1)
        self._http.close()
