"""Layer 7: an instance's side of the controller: register, heartbeat, register again.

One daemon thread per instance (:class:`Registrar`). Every call has a bounded
timeout and nothing on the engine's path waits on it: a controller that is
down, slow or restarted only delays this thread. A heartbeat answered 404
(the controller forgot the instance: it restarted, or the instance was quiet
past the TTL) or a failed call means "register again", retried with a
doubling backoff (up to ``max_backoff_s``, jittered).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


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
        self.registered = threading.Event()
        self.registrations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-registrar", daemon=True)
        self._thread.start()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read() or b"{}")

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    out = self._post("/v1/register", self.body)
                    self.registered.set()
                    self.registrations += 1
                    log.info("kvtier: registered at the controller %s as %s (events %s, "
                             "topic %s)", self.url, self.body["instance"], out.get("events"),
                             out.get("topic"))
                else:
                    self._post("/v1/heartbeat", {"instance": self.body["instance"]})
                backoff = 0.5
                wait = self.heartbeat_s
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    log.info("kvtier: the controller forgot %s; registering again",
                             self.body["instance"])
                    self.registered.clear()
                    wait = 0.0
                else:
                    detail = e.read()[:300].decode(errors="replace")
                    log.warning("kvtier: controller %s answered %s: %s", self.url, e.code, detail)
                    self.registered.clear()
                    wait, backoff = self._backoff(backoff)
            except (OSError, ValueError) as e:  # down, slow, or not a controller
                if self.registered.is_set():
                    log.info("kvtier: controller %s unreachable (%s); will register again",
                             self.url, e)
                self.registered.clear()
                wait, backoff = self._backoff(backoff)
            self._stop.wait(wait)

    def _backoff(self, backoff: float) -> tuple[float, float]:
        return backoff * random.uniform(0.8, 1.2), min(backoff * 2, self.max_backoff_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 1)
