"""Layer 7: the controller's logic: registrations, the KV events index, lookups.

- **Register / heartbeat**: an instance's record (model, namespace, URLs)
  lives while it heartbeats within ``ttl_s``; a sweeper drops expired ones
  and their chunks. A heartbeat for an unknown instance is refused (404):
  the instance registers again.
- **Events**: each message's topic names its instance (the topic the instance
  registered, by default its id). Sequence numbers are checked per topic: a
  gap (missed messages) or a smaller number (the engine restarted), a
  registration, the first message this process sees on a topic (a restarted
  replica whose Redis state outlived it) and ``AllBlocksCleared`` queue a
  **resync**: the instance's
  management API ``/v1/snapshot`` replaces what the index holds for it (on a
  background thread, bounded: :class:`kvtier.net.http.HttpClient`). Without a
  management API the index follows the events alone.
- **Lookup**: keys are computed with :class:`~kvtier.keys.ChunkHasher` from the
  namespace fields each instance registered (so salts work), once per
  distinct namespace; an instance's cached prefix is its leading held keys.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from kvtier.cluster import models as m
from kvtier.cluster.events import parse_batch
from kvtier.cluster.state import MemoryState, RedisState
from kvtier.keys import ChunkHasher, Namespace
from kvtier.net.http import HttpClient, HttpError, shown_url

log = logging.getLogger(__name__)
MAX_SNAPSHOT = 256 * 1024**2
"""The bound on a snapshot's answer: ~7 million keys (36 bytes each, as hex in JSON)."""
Observer = Callable[[str, str], None]  # (what, label): counts events and resyncs


class Controller:
    """State and logic behind the controller's HTTP API (no HTTP here)."""

    def __init__(self, state: MemoryState | RedisState, heartbeat_s: float = 2.0,
                 events_endpoint: str | None = None, control_token: str = "",
                 timeout_s: float = 5.0, tokenizers: dict[str, str] | None = None,
                 observe: Observer | None = None) -> None:
        self.state = state
        self.heartbeat_s = heartbeat_s
        self.events_endpoint = events_endpoint
        self.control_token = control_token
        self.timeout_s = timeout_s
        self._http = HttpClient(timeout_s, MAX_SNAPSHOT)
        self.tokenizer_paths = dict(tokenizers or {})
        self._tokenizers: dict[str, Any] = {}
        self.observe = observe or (lambda what, label: None)
        self._seq: dict[str, int] = {}
        self._topics: dict[str, m.Register] = {}
        self._hashers: dict[str, ChunkHasher] = {}
        self._lock = threading.Lock()
        self._resyncs: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._resync_loop, name="kvtier-resync",
                                          daemon=True),
                         threading.Thread(target=self._sweep_loop, name="kvtier-sweep",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    # -- registrations
    def register(self, reg: m.Register) -> m.Registered:
        if reg.key_namespace is not None:
            digest = Namespace(**reg.key_namespace.model_dump()).seed().hex()
            if digest != reg.namespace:
                raise ValueError(f"key_namespace: its digest {digest} is not namespace "
                                 f"{reg.namespace}")
        topic = reg.topic or reg.instance
        self.state.put_instance({**reg.model_dump(), "topic": topic})
        with self._lock:
            self._topics[topic] = reg
            self._seq.pop(topic, None)
        self.observe("register", "ok")
        log.info("%s registered (model %s, url %s, transfer %s)",
                 reg.instance, reg.model, reg.url, reg.transfer)
        self.queue_resync(reg.instance, "register")
        return m.Registered(instance=reg.instance, ttl_s=self.state.ttl_s,
                            heartbeat_s=self.heartbeat_s, events=self.events_endpoint,
                            topic=topic)

    def heartbeat(self, instance: str) -> bool:
        return self.state.touch(instance)

    def instances(self) -> list[m.Instance]:
        now = time.time()
        return [m.Instance(age_s=round(now - r["last_seen"], 3),
                           chunks=self.state.counts(r["instance"]),
                           **{k: r.get(k) for k in m.Instance.model_fields
                              if k not in ("age_s", "chunks")})
                for r in sorted(self.state.instances(), key=lambda r: r["instance"])]

    # -- events
    def on_message(self, topic: str, seq: int, payload: bytes) -> None:
        """One published batch (called on the events thread)."""
        with self._lock:
            reg = self._topics.get(topic)
            last = self._seq.get(topic)
            self._seq[topic] = seq
        if reg is None:
            reg = self._find_topic(topic)
            if reg is None:
                self.observe("event", "unknown_topic")
                return
        change = parse_batch(payload, reg.chunk_size)
        if last is None:  # this process starts following the topic: what came before?
            self.queue_resync(reg.instance, "first")
        elif seq != last + 1:
            self.queue_resync(reg.instance, "restart" if seq <= last else "gap")
        if change.cleared:
            self.state.clear(reg.instance)
            self.observe("event", "cleared")
            self.queue_resync(reg.instance, "cleared")
        for tier, keys in change.removed.items():
            self.state.remove(reg.instance, tier, keys)
            self.observe("event", "removed")
        for tier, keys in change.stored.items():
            self.state.add(reg.instance, tier, keys)
            self.observe("event", "stored")
        if change.ignored:
            self.observe("event", "ignored")

    def _find_topic(self, topic: str) -> m.Register | None:
        """A topic registered at another replica (shared state)."""
        for rec in self.state.instances():
            if rec.get("topic") == topic:
                reg = m.Register(**{k: v for k, v in rec.items() if k in m.Register.model_fields})
                with self._lock:
                    self._topics[topic] = reg
                return reg
        return None

    # -- resyncs
    def queue_resync(self, instance: str, reason: str) -> None:
        with self._lock:
            if instance in self._queued:
                return
            self._queued.add(instance)
        self.observe("resync", reason)
        self._resyncs.put(instance)

    def resync(self, instance: str) -> bool:
        """Replace the instance's chunks by its management API's snapshot."""
        rec = next((r for r in self.state.instances() if r["instance"] == instance), None)
        if rec is None or not rec.get("control"):
            return False
        try:
            snap = self._http.request("GET", rec["control"].rstrip("/") + "/v1/snapshot",
                                      token=self.control_token).json()
            tiers = {t: [bytes.fromhex(k) for k in keys] for t, keys in snap["tiers"].items()}
        except (HttpError, ValueError, KeyError, TypeError) as e:
            log.warning("resync of %s from %s failed: %s", instance,
                        shown_url(rec["control"]), e)
            self.observe("resync", "failed")
            return False
        self.state.replace(instance, tiers)
        return True

    def _resync_loop(self) -> None:
        while not self._stop.is_set():
            instance = self._resyncs.get()
            if instance is None:
                return
            with self._lock:
                self._queued.discard(instance)
            try:
                self.resync(instance)
            except Exception:
                log.exception("resync of %s failed", instance)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.state.ttl_s / 4)):
            try:
                for gone in self.state.expire():
                    log.info("%s stopped heartbeating; dropped", gone)
                    self.observe("expired", "ttl")
            except Exception:  # Redis away: try again next round
                log.warning("sweeping expired instances failed",
                            exc_info=True)

    # -- lookups
    def lookup(self, req: m.Lookup) -> m.LookupResult:
        tokens = req.token_ids if req.token_ids is not None else self._tokenize(req.model,
                                                                                req.prompt or "")
        out = []
        keys_of: dict[str, tuple[ChunkHasher, list[bytes]]] = {}
        for rec in self.state.instances():
            if rec["model"] != req.model:
                continue
            hit: dict[str, int] = {"any": 0}
            if rec.get("key_namespace"):
                if rec["namespace"] not in keys_of:
                    hasher = self._hasher(rec).with_salt(req.salt)
                    keys_of[rec["namespace"]] = (hasher, [bytes(k) for k in hasher.keys(tokens)])
                hasher, keys = keys_of[rec["namespace"]]
                held = self.state.held(rec["instance"], keys)
                covered = hasher.covered(len(tokens))
                hit = {t: min(n * hasher.chunk_size, covered) for t, n in held.items()}
            out.append(m.Cached(instance=rec["instance"], url=rec.get("url"),
                                cached_tokens=hit.pop("any"), tiers=hit))
        out.sort(key=lambda c: (-c.cached_tokens, c.instance))
        return m.LookupResult(prompt_tokens=len(tokens), instances=out)

    def locate(self, req: m.Locate) -> m.Located:
        keys = [bytes.fromhex(k) for k in req.keys]
        holders = []
        for rec in self.state.instances():
            if rec["instance"] == req.exclude or not rec.get("transfer") or not keys:
                continue
            held = self.state.held(rec["instance"], keys)
            n = held.pop("any")
            if n > 0:
                holders.append(m.Holder(instance=rec["instance"], transfer=rec["transfer"],
                                        chunks=n, tiers={t: c for t, c in held.items() if c}))
        holders.sort(key=lambda h: (-h.chunks, h.instance))
        return m.Located(holders=holders)

    def _hasher(self, rec: dict[str, Any]) -> ChunkHasher:
        with self._lock:
            hasher = self._hashers.get(rec["namespace"])
        if hasher is None:
            ns = Namespace(**rec["key_namespace"])
            block = rec.get("block_size") or 0
            hasher = ChunkHasher(ns, store_partial=bool(block), granule=block or ns.chunk_size)
            with self._lock:
                self._hashers[rec["namespace"]] = hasher
        return hasher

    def _tokenize(self, model: str, prompt: str) -> list[int]:
        path = self.tokenizer_paths.get(model) or next(
            (r.get("tokenizer") for r in self.state.instances()
             if r["model"] == model and r.get("tokenizer")), None)
        if not path:
            raise ValueError(f"prompt: no tokenizer known for model {model!r}; send token_ids "
                             "or start the controller with --tokenizer MODEL=PATH")
        tok = self._tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            tok = self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return list(tok(prompt)["input_ids"])

    def close(self) -> None:
        self._stop.set()
        self._resyncs.put(None)
        for t in self._threads:
            t.join(5)
        self._http.close()
        self.state.close()
