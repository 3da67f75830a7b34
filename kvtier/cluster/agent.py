"""Layer 7: an instance's side of the controller: register, heartbeat, push snapshots.

One daemon thread per instance (:class:`Registrar`). Every call has a bounded
timeout (:class:`kvtier.net.http.HttpClient`, TLS against the cluster's CA when
configured) and nothing on the engine's path waits on it: a controller that is
down, slow or restarted only delays this thread.

- **Credential**: the first registration's answer carries this instance's
  credential; every later call presents it (``X-Kvtier-Instance-Token``) beside
  the controller token. A heartbeat answered 404 (the controller forgot the
  instance: it restarted, or the instance was quiet past the TTL) means
  "register again"; the controller then issues a new credential, which
  replaces the old one. A 403 (another holder has the name, or the credential
  is no longer the name's) and failed calls are retried with a doubling
  backoff from ``FIRST_BACKOFF_S`` up to ``max_backoff_s``, jittered
  (:class:`kvtier.net.backoff.Backoff`).
- **Resyncs**: when an answer says ``"resync": true`` the registrar posts the
  engine's snapshot (``snapshot()``: the management API's ``/v1/snapshot``
  content) to ``/v1/snapshot``; one that fails to arrive is posted again after
  the next successful call.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from kvtier.net.backoff import Backoff
from kvtier.net.http import HttpClient, HttpError, StatusError, shown_url
from kvtier.net.tls import TlsFiles
from kvtier.threads import NamedThread

log = logging.getLogger(__name__)
FIRST_BACKOFF_S = 0.5
MAX_ANSWER = 1024**2
"""The bound on the controller's answer (a registration's is a few hundred bytes)."""
CREDENTIAL = "X-Kvtier-Instance-Token"
Snapshot = Callable[[], dict[str, Any]]


class Registrar:
    """Keeps ``body`` registered at ``url`` while the process lives (or until :meth:`close`)."""

    def __init__(self, url: str, body: dict[str, Any], token: str = "",
                 heartbeat_s: float = 2.0, timeout_s: float = 2.0,
                 max_backoff_s: float = 10.0, snapshot: Snapshot | None = None,
                 tls: TlsFiles | None = None, snapshot_timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.body = body
        self.instance = str(body["instance"])
        self.token = token
        self.credential = ""
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self.max_backoff_s = max_backoff_s
        self.snapshot = snapshot
        self.backoff = Backoff(FIRST_BACKOFF_S, max_backoff_s)
        self.registered = threading.Event()
        self.registrations = 0
        self.snapshots = 0
        self._owed = False  # a snapshot the controller asked for and has not got
        self._shown = shown_url(self.url)  # for logs: no credentials
        self._http = HttpClient(timeout_s, MAX_ANSWER, tls=tls)
        self._stop = threading.Event()
        self._thread = NamedThread(target=self._run, name="kvtier-registrar", daemon=True)
        self._thread.start()

    def reregister(self, body: dict[str, Any]) -> None:
        """Register ``body`` (same instance) in place of the registered one, at the next
        heartbeat (with this instance's credential, as any registration after the first)."""
        self.body = {**body, "instance": self.instance}
        self.registered.clear()

    def post(self, path: str, body: dict[str, Any], timeout_s: float | None = None
             ) -> dict[str, Any]:
        """A call to the controller with the token and this instance's credential."""
        resp = self._http.request("POST", f"{self.url}{path}", token=self.token,
                                  json_body=body, timeout_s=timeout_s,
                                  headers={CREDENTIAL: self.credential} if self.credential
                                  else None)
        return json.loads(resp.body or b"{}")

    def _once(self) -> None:
        if not self.registered.is_set():
            out = self.post("/v1/register", self.body)
            if out.get("credential"):
                self.credential = str(out["credential"])
            self.registered.set()
            self.registrations += 1
            log.info("kvtier: registered at the controller %s as %s (events %s, topic %s)",
                     self._shown, self.instance, out.get("events"), out.get("topic"))
        else:
            out = self.post("/v1/heartbeat", {"instance": self.instance})
        self._owed = self._owed or bool(out.get("resync"))
        if self._owed and self.snapshot is not None:
            self._push()

    def _push(self) -> None:
        try:
            self.post("/v1/snapshot", {"instance": self.instance, **self.snapshot()},
                      self.snapshot_timeout_s)  # type: ignore[misc]
            self.snapshots += 1
            self._owed = False
        except StatusError as e:
            self._owed = e.status >= 500  # 429: not now (it asks again); 4xx: will not take it
            log.warning("kvtier: the controller %s refused the snapshot: %s", self._shown,
                        e.body[:300].decode(errors="replace") or e.reason)
        except HttpError as e:
            log.warning("kvtier: pushing the snapshot to %s failed (%s); again after the "
                        "next heartbeat", self._shown, e)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
                self.backoff.succeeded()
                wait = self.heartbeat_s
            except StatusError as e:  # a redirect too: it is not followed
                if e.status == 404:
                    log.info("kvtier: the controller forgot %s; registering again",
                             self.instance)
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
        self._thread.join(self.timeout_s + self.snapshot_timeout_s + 1)
        self._http.close()
