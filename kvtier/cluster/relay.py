"""Layer 7: relays an instance's KV events to the controller over HTTP (``controller.relay_events``).

vLLM's ZMQ publisher has no authentication, so the controller's events socket
binds loopback only. An instance on another host runs this relay instead: it
binds a loopback SUB socket at the endpoint vLLM's ``--kv-events-config``
publishes to (a ``tcp://127.0.0.1:PORT`` endpoint: vLLM connects its PUB to it)
and forwards the batches, a few at a time, to the controller's
``POST /v1/events`` with the instance's credential (through the
:class:`~kvtier.cluster.agent.Registrar`, TLS as configured). The controller
applies them under this instance's own topic only.

Bounded: messages over :data:`~kvtier.cluster.models.MAX_EVENT_BYTES` are
refused by the socket (``zmq.MAXMSGSIZE``: the publisher is disconnected and
reconnects), at most ``MAX_BATCHES`` per call, and a call that fails is dropped
(the controller sees the sequence gap and asks for a snapshot).
"""

from __future__ import annotations

import base64
import logging
import threading
import time

import zmq

from kvtier.cluster.agent import Registrar
from kvtier.cluster.events import bound_sub
from kvtier.cluster.models import MAX_EVENT_BYTES
from kvtier.net.http import HttpError
from kvtier.threads import NamedThread

log = logging.getLogger(__name__)
MAX_BATCHES = 64
MAX_POST_BYTES = 2 << 20
"""A call carries batches up to about this much base64 (under the controller's body bound)."""
LINGER_S = 0.05
"""How long the relay waits for more batches before it posts what it has."""


def loopback_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is ``tcp://<loopback>:<port>``; ValueError naming the problem."""
    import ipaddress

    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        ok = endpoint.startswith("tcp://") and bool(sep) and port.isdigit() and \
            ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"controller.relay_events: the KV events endpoint {endpoint!r} must be "
                         "tcp://127.0.0.1:PORT (the relay binds it; vLLM connects to it)")
    return endpoint


class EventRelay:
    """A loopback SUB socket and the thread forwarding its batches."""

    def __init__(self, endpoint: str, registrar: Registrar) -> None:
        self.registrar = registrar
        self.forwarded = 0
        self.dropped = 0
        self.ctx, self.sock = bound_sub(loopback_endpoint(endpoint), MAX_EVENT_BYTES,
                                        "the KV events relay")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._stop = threading.Event()
        self._thread = NamedThread(target=self._run, name="kvtier-relay", daemon=True)
        self._thread.start()

    def _collect(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        size = 0
        deadline = time.monotonic() + LINGER_S
        while len(out) < MAX_BATCHES and size < MAX_POST_BYTES and not self._stop.is_set():
            wait_ms = 200 if not out else max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(wait_ms):
                if out:
                    break
                continue
            frames = self.sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.dropped += 1
                continue
            payload = base64.b64encode(frames[2]).decode()
            size += len(payload)
            out.append({"seq": int.from_bytes(frames[1], "big"), "payload": payload})
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self._collect()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                log.exception("the KV events relay socket failed")
                continue
            if not batches:
                continue
            if not self.registrar.registered.is_set():
                self.dropped += len(batches)  # the snapshot at registration covers them
                continue
            try:
                self.registrar.post("/v1/events", {"instance": self.registrar.instance,
                                                   "batches": batches})
                self.forwarded += len(batches)
            except HttpError as e:  # the gap it leaves makes the controller ask a snapshot
                self.dropped += len(batches)
                log.warning("kvtier: relaying %d KV event batches failed: %s", len(batches), e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()
