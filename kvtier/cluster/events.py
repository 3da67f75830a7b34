"""Layer 7: following instances' KV events (vLLM's ZMQ publisher) without importing vLLM.

vLLM's publisher sends ``(topic, seq, payload)`` multipart messages: ``seq`` an
8-byte big-endian counter per publisher (it restarts at 0 when the engine
restarts), ``payload`` a msgpack ``KVEventBatch``: ``[ts, [event, ...], dp_rank]``,
each event a map tagged ``type``: ``BlockStored`` (``block_hashes``,
``block_size``, ``medium``...), ``BlockRemoved`` (``block_hashes``, ``medium``),
``AllBlocksCleared``. kvtier's events carry its tier as the medium (``CPU`` =
memory, ``DISK``, ``REDIS``) and one 16-byte chunk key per block.

The controller binds one SUB socket, on loopback unless explicitly waived (vLLM's
publisher has no authentication: whoever reaches the socket can write any
topic); instances on its host connect their vLLM to it (``--kv-events-config``
with a host:port endpoint) and publish under their own topic, which names the
instance; instances elsewhere relay over HTTP (:mod:`kvtier.cluster.relay`).
A message over ``max_bytes`` (``zmq.MAXMSGSIZE``) makes libzmq drop its
sender's connection; the socket goes on serving the others. A :class:`EventFollower` runs one daemon
thread that hands each message to a callback; the callback never blocks on
the network (resyncs are queued elsewhere).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import zmq

from kvtier.keys import KEY_BYTES
from kvtier.threads import NamedThread

log = logging.getLogger(__name__)

TIER_OF_MEDIUM = {"CPU": "memory", "DISK": "disk", "REDIS": "redis"}


@dataclass
class Change:
    """What one batch does to an instance's chunks."""

    stored: dict[str, list[bytes]] = field(default_factory=dict)
    removed: dict[str, list[bytes]] = field(default_factory=dict)
    cleared: bool = False
    ignored: int = 0
    """Events that are not kvtier's (vLLM's own prefix cache) or not understood."""


def parse_batch(payload: bytes, chunk_size: int) -> Change:
    """The kvtier changes in one msgpack KVEventBatch. Events of vLLM's own prefix
    cache (another medium, another block size or hash length) are counted as ignored.
    Raises ValueError for a payload that is not a batch at all."""
    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise ValueError(f"not a msgpack KV event batch: {e}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch: expected [ts, events, ...]")
    out = Change()
    for ev in batch[1]:
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind == "AllBlocksCleared":
            out.cleared = True
            out.stored.clear()
            out.removed.clear()
            continue
        tier = TIER_OF_MEDIUM.get(ev.get("medium") or "") if isinstance(ev, dict) else None
        hashes = ev.get("block_hashes") if isinstance(ev, dict) else None
        if tier is None or not isinstance(hashes, list) or \
                not all(isinstance(h, bytes) and len(h) == KEY_BYTES for h in hashes):
            out.ignored += 1
            continue
        if kind == "BlockStored" and ev.get("block_size") == chunk_size:
            out.stored.setdefault(tier, []).extend(hashes)
        elif kind == "BlockRemoved":
            out.removed.setdefault(tier, []).extend(hashes)
        else:
            out.ignored += 1
    return out


OnMessage = Callable[[str, int, bytes], None]


def bound_sub(endpoint: str, max_bytes: int, what: str) -> tuple[zmq.Context, zmq.Socket]:
    """A SUB socket bound at ``endpoint``, subscribed to everything, refusing messages over
    ``max_bytes`` (libzmq drops the sender's connection); OSError naming ``what``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        sock.close()
        ctx.term()
        raise OSError(f"cannot bind {what} at {endpoint}: {e}") from None
    return ctx, sock


class EventFollower:
    """A bound ZMQ SUB socket and the thread reading it."""

    def __init__(self, endpoint: str, on_message: OnMessage, max_bytes: int = 1 << 20) -> None:
        self.ctx, self.sock = bound_sub(endpoint, max_bytes, "the KV events endpoint")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.on_message = on_message
        self._stop = threading.Event()
        self._thread = NamedThread(target=self._run, name="kvtier-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.sock.poll(200):
                    continue
                frames = self.sock.recv_multipart()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                log.exception("KV events socket failed")
                continue
            if len(frames) != 3 or len(frames[1]) != 8:
                log.debug("skipped a message of %d frames", len(frames))
                continue
            topic, seq, payload = frames
            try:
                self.on_message(topic.decode("utf-8", "replace"), int.from_bytes(seq, "big"),
                                payload)
            except Exception:  # one bad message never stops the thread
                log.exception("a KV event batch could not be applied")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()

