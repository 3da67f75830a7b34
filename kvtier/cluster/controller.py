"""Layer 7: the controller's logic: registrations, the KV events index, lookups.

- **Identities**: an instance's first registration issues it a random
  credential (answered once; the state keeps only its hash). Re-registering,
  heartbeats, snapshots and relayed events for that instance need it: the
  controller token only says "may join". A record changes only by its owner;
  once it expires (``ttl_s`` without a heartbeat) the name is free again.
- **Register / heartbeat**: a record lives while it heartbeats within
  ``ttl_s``; a sweeper drops expired ones and their chunks. A heartbeat for an
  unknown instance is refused (404): the instance registers again.
- **Events**: each message's topic names its instance (the topic it registered,
  by default its id; one no other live instance uses). They come from the
  loopback ZMQ socket, or relayed over HTTP by the instance itself
  (:meth:`relayed`: the topic is the caller's own). Sequence numbers are checked
  per topic: a gap or a smaller number (the engine restarted), a registration,
  the first message this process sees on a topic and ``AllBlocksCleared``
  want a **resync**.
- **Resyncs are pushed**: the controller never dials an address it was told
  about. It asks in the next register/heartbeat answer (``"resync": true``,
  rate-limited: :class:`~kvtier.cluster.resyncs.Resyncs`), and the instance
  posts its snapshot, which replaces what the index holds for it.
- **Lookup**: keys are computed with :class:`~kvtier.keys.ChunkHasher` from the
  namespace fields each instance registered (so salts work), once per
  distinct namespace and block size; an instance's cached prefix is its leading
  held keys. A registration whose fields cannot key a prompt (``key_namespace``
  not ``namespace``'s digest or of another chunk size, a block size that does not
  divide the chunk size) is refused: one bad record would fail every lookup of its
  model.
  Prompts are tokenized only with the controller's own ``--tokenizer``s (a
  registered tokenizer path is loaded only with ``registered_tokenizers``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import threading
import time
from typing import Any, Callable

from kvtier.cluster import models as m
from kvtier.cluster.events import parse_batch
from kvtier.cluster.resyncs import Resyncs
from kvtier.cluster.state import MemoryState, RedisState, digest, owns
from kvtier.keys import ChunkHasher, Namespace
from kvtier.threads import NamedThread

log = logging.getLogger(__name__)
Observer = Callable[[str, str], None]  # (what, label): counts events and resyncs


class Forbidden(Exception):
    """The caller is not the instance it speaks for (403)."""


class Unknown(Exception):
    """The instance is not registered, or expired (404: register again)."""


class TooSoon(Exception):
    """A snapshot pushed again within the rate limit (429)."""


class Controller:
    """State and logic behind the controller's HTTP API (no HTTP here)."""

    def __init__(self, state: MemoryState | RedisState, heartbeat_s: float = 2.0,
                 events_endpoint: str | None = None, tokenizers: dict[str, str] | None = None,
                 observe: Observer | None = None, resync_interval_s: float = 5.0,
                 registered_tokenizers: bool = False) -> None:
        self.state = state
        self.heartbeat_s = heartbeat_s
        self.events_endpoint = events_endpoint
        self.tokenizer_paths = dict(tokenizers or {})
        self.registered_tokenizers = registered_tokenizers
        self._tokenizers: dict[str, Any] = {}
        self.observe = observe or (lambda what, label: None)
        self.resyncs = Resyncs(resync_interval_s)
        self._seq: dict[str, int] = {}
        self._topics: dict[str, m.Register] = {}
        self._hashers: dict[tuple[str, int], ChunkHasher] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [NamedThread(target=self._sweep_loop, name="kvtier-sweep",
                                     daemon=True)]
        for t in self._threads:
            t.start()

    # -- registrations
    def register(self, reg: m.Register, credential: str | None) -> m.Registered:
        """Record ``reg``: a free name gets a new credential (in the answer); a live
        one only for the caller presenting its credential (else :class:`Forbidden`)."""
        if reg.key_namespace is not None:  # lookups key prompts with it: it must work
            ns = Namespace(**reg.key_namespace.model_dump())
            if ns.seed().hex() != reg.namespace:
                raise ValueError(f"key_namespace: its digest {ns.seed().hex()} is not "
                                 f"namespace {reg.namespace}")
            if ns.chunk_size != reg.chunk_size:
                raise ValueError(f"key_namespace: chunk_size {ns.chunk_size} is not chunk_size "
                                 f"{reg.chunk_size}")
        if reg.block_size and reg.chunk_size % reg.block_size:
            raise ValueError(f"block_size: {reg.block_size} does not divide chunk_size "
                             f"{reg.chunk_size}")
        topic = reg.topic or reg.instance
        other = next((r["instance"] for r in self.state.instances()
                      if r.get("topic") == topic and r["instance"] != reg.instance), None)
        if other is not None:
            raise ValueError(f"topic: {topic!r} is the KV events topic of instance {other!r}")
        issued = secrets.token_urlsafe(32)
        outcome = self.state.claim({**reg.model_dump(), "topic": topic},
                                   digest(credential) if credential else None, digest(issued))
        if outcome is None:
            self.observe("register", "forbidden")
            raise Forbidden(f"instance: {reg.instance!r} is registered by another holder: "
                            "present its X-Kvtier-Instance-Token, or wait until it expires "
                            f"({self.state.ttl_s:g} s without a heartbeat)")
        with self._lock:
            self._topics[topic] = reg
            self._seq.pop(topic, None)
        if outcome == "new":
            self.resyncs.forget(reg.instance)
        self.observe("register", "ok")
        log.info("%s registered (model %s, url %s, transfer %s)",
                 reg.instance, reg.model, reg.url, reg.transfer)
        self.want_resync(reg.instance, "register")
        return m.Registered(instance=reg.instance, ttl_s=self.state.ttl_s,
                            heartbeat_s=self.heartbeat_s, events=self.events_endpoint,
                            topic=topic, credential=issued if outcome == "new" else None,
                            resync=self.resyncs.ask(reg.instance))

    def heartbeat(self, instance: str, credential: str | None) -> m.Beat:
        ok = self.state.touch(instance, digest(credential) if credential else None)
        if ok is None:
            self.observe("heartbeat", "forbidden")
            raise Forbidden(f"X-Kvtier-Instance-Token: not the credential of {instance!r}")
        if not ok:
            raise Unknown(f"instance: {instance!r} is not registered (or expired): "
                          "register again")
        return m.Beat(resync=self.resyncs.ask(instance))

    def _owner(self, instance: str, credential: str | None) -> dict[str, Any]:
        """The live record of ``instance`` if ``credential`` is its credential."""
        rec = self.state.get(instance)
        if rec is None:
            raise Unknown(f"instance: {instance!r} is not registered (or expired): "
                          "register again")
        if not owns(rec, digest(credential) if credential else None):
            raise Forbidden(f"X-Kvtier-Instance-Token: not the credential of {instance!r}")
        return rec

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
        if len(payload) > m.MAX_EVENT_BYTES:
            self.observe("event", "oversized")
            return
        with self._lock:
            reg = self._topics.get(topic)
        if reg is None:
            reg = self._find_topic(topic)
            if reg is None:
                self.observe("event", "unknown_topic")
                return
        try:
            change = parse_batch(payload, reg.chunk_size)
        except ValueError:
            self.observe("event", "malformed")
            return
        with self._lock:
            last = self._seq.get(topic)
            self._seq[topic] = seq
        if last is None:  # this process starts following the topic: what came before?
            self.want_resync(reg.instance, "first")
        elif seq != last + 1:
            self.want_resync(reg.instance, "restart" if seq <= last else "gap")
        if change.cleared:
            self.state.clear(reg.instance)
            self.observe("event", "cleared")
            self.want_resync(reg.instance, "cleared")
        for tier, keys in change.removed.items():
            self.state.remove(reg.instance, tier, keys)
            self.observe("event", "removed")
        for tier, keys in change.stored.items():
            self.state.add(reg.instance, tier, keys)
            self.observe("event", "stored")
        if change.ignored:
            self.observe("event", "ignored")

    def relayed(self, push: m.EventsPush, credential: str | None) -> int:
        """Batches an instance's relay forwards: applied under its own topic only."""
        try:
            rec = self._owner(push.instance, credential)
        except Forbidden:
            self.observe("event", "forged")
            raise
        topic = rec.get("topic") or push.instance
        payloads = []
        for i, b in enumerate(push.batches):  # all checked before any is applied
            try:
                payloads.append((b.seq, base64.b64decode(b.payload, validate=True)))
            except binascii.Error:
                self.observe("event", "malformed")
                raise ValueError(f"batches.{i}.payload: not base64") from None
            if len(payloads[-1][1]) > m.MAX_EVENT_BYTES:
                self.observe("event", "oversized")
                raise ValueError(f"batches.{i}.payload: over {m.MAX_EVENT_BYTES} bytes")
        for seq, payload in payloads:
            self.on_message(topic, seq, payload)
        return len(push.batches)

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
    def want_resync(self, instance: str, reason: str) -> None:
        """Ask ``instance`` for its snapshot at its next heartbeat (coalesced)."""
        if self.resyncs.want(instance):
            self.observe("resync", reason)

    def snapshot(self, push: m.SnapshotPush, credential: str | None) -> int:
        """Replace the instance's chunks by the snapshot it pushed; the keys taken."""
        rec = self._owner(push.instance, credential)
        if push.chunk_size != rec["chunk_size"]:
            raise ValueError(f"chunk_size: {push.chunk_size} is not the registered "
                             f"{rec['chunk_size']}")
        if not self.resyncs.take(push.instance):
            self.observe("resync", "too_soon")
            raise TooSoon(f"snapshot: one per {self.resyncs.interval_s / 2:g} s per instance; "
                          "push when a heartbeat answers resync")
        tiers = {t: [bytes.fromhex(k) for k in keys] for t, keys in push.tiers.items()}
        self.state.replace(push.instance, tiers)
        self.observe("resync", "pushed")
        return sum(len(k) for k in tiers.values())

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.state.ttl_s / 4)):
            try:
                for gone in self.state.expire():
                    log.info("%s stopped heartbeating; dropped", gone)
                    self.resyncs.forget(gone)
                    self.observe("expired", "ttl")
            except Exception:  # Redis away: try again next round
                log.warning("sweeping expired instances failed",
                            exc_info=True)

    # -- lookups
    def lookup(self, req: m.Lookup) -> m.LookupResult:
        tokens = req.token_ids if req.token_ids is not None else self._tokenize(req.model,
                                                                                req.prompt or "")
        recs = [r for r in self.state.instances() if r["model"] == req.model]
        kinds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rec in recs:  # instances sharing a namespace and block size share keys
            if rec.get("key_namespace"):
                kinds.setdefault((rec["namespace"], rec.get("block_size") or 0), []).append(rec)
        hits: dict[str, dict[str, int]] = {}
        for group in kinds.values():
            hasher = self._hasher(group[0]).with_salt(req.salt)
            keys = [bytes(k) for k in hasher.keys(tokens)]
            covered = hasher.covered(len(tokens))
            held = self.state.held_many([r["instance"] for r in group], keys)
            for name, got in held.items():
                hits[name] = {t: min(n * hasher.chunk_size, covered) for t, n in got.items()}
        out = []
        for rec in recs:
            hit = dict(hits.get(rec["instance"], {"any": 0}))
            out.append(m.Cached(instance=rec["instance"], url=rec.get("url"),
                                cached_tokens=hit.pop("any"), tiers=hit))
        out.sort(key=lambda c: (-c.cached_tokens, c.instance))
        return m.LookupResult(prompt_tokens=len(tokens), instances=out)

    def locate(self, req: m.Locate) -> m.Located:
        keys = [bytes.fromhex(k) for k in req.keys]
        holders = []
        recs = [r for r in self.state.instances()
                if r["instance"] != req.exclude and r.get("transfer") and keys]
        every = self.state.held_many([r["instance"] for r in recs], keys) if recs else {}
        for rec in recs:
            held = every[rec["instance"]]
            n = held.pop("any")
            if n > 0:
                holders.append(m.Holder(instance=rec["instance"], transfer=rec["transfer"],
                                        chunks=n, tiers={t: c for t, c in held.items() if c}))
        holders.sort(key=lambda h: (-h.chunks, h.instance))
        return m.Located(holders=holders)

    def _hasher(self, rec: dict[str, Any]) -> ChunkHasher:
        """The hasher of ``rec``'s namespace and block size (two instances sharing a
        namespace may have different block sizes: their partial chunks' keys differ)."""
        block = rec.get("block_size") or 0
        kind = (rec["namespace"], block)
        with self._lock:
            hasher = self._hashers.get(kind)
        if hasher is None:
            ns = Namespace(**rec["key_namespace"])
            hasher = ChunkHasher(ns, store_partial=bool(block), granule=block or ns.chunk_size)
            with self._lock:
                self._hashers[kind] = hasher
        return hasher

    def _tokenize(self, model: str, prompt: str) -> list[int]:
        path = self.tokenizer_paths.get(model)
        if not path and self.registered_tokenizers:
            path = next((r.get("tokenizer") for r in self.state.instances()
                         if r["model"] == model and r.get("tokenizer")), None)
        if not path:
            raise ValueError(f"prompt: no tokenizer known for model {model!r}; send token_ids "
                             "or start the controller with --tokenizer MODEL=PATH (the "
                             "tokenizer path an instance registers is not loaded: any "
                             "token holder could name a path on this machine)")
        tok = self._tokenizers.get(path)
        if tok is None:
            from transformers import AutoTokenizer

            tok = self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return list(tok(prompt)["input_ids"])

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.state.close()
