"""Layer 6: a LoRA adapter's identity (a digest of its files), hashed off the scheduler thread.

An adapter can be gigabytes; reading it on vLLM's scheduler thread would stall every
running request. The scheduler only stats the adapter's files (names, sizes,
modification times: its *stamp*); the bytes are hashed once per (path, stamp) on
the ``kvtier-lora`` thread. Until that digest is known the request bypasses kvtier
(no load, no save: a miss, never wrong KV); a changed file is a new stamp, so a
changed adapter is hashed again and never matches the old one.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import xxhash

from kvtier.threads import pool

log = logging.getLogger("kvtier.vllm")

# Adapter-config fields that name the base model's location, not what the adapter computes.
_LORA_CONFIG_IGNORED = ("base_model_name_or_path", "revision")
_MAX_LORAS = 256  # (path, stamp) entries kept; bounded
PENDING = "pending"
""":meth:`LoraIdentities.identity`'s answer while the adapter is being hashed."""

Stamp = tuple[tuple[str, int, int], ...]


def adapter_stamp(path: str) -> Stamp | None:
    """The adapter folder's files as (relative name, size, mtime ns), sorted; metadata
    only, no byte read. None if it cannot be listed or holds no file."""
    root = Path(path)
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        stamp = tuple((str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
                      for p in files for st in (p.stat(),))
    except OSError:
        return None
    return stamp or None


def hash_adapter(path: str, stamp: Stamp) -> str | None:
    """Digest of the adapter's content as ``stamp`` lists it (names, sizes, bytes; the
    config without the fields that only locate the base model), or None if unreadable."""
    root = Path(path)
    h = xxhash.xxh3_128()
    try:
        for rel, size, _ in stamp:
            p = root / rel
            if p.name == "adapter_config.json":
                conf = json.loads(p.read_text())
                for k in _LORA_CONFIG_IGNORED:
                    conf.pop(k, None)
                h.update(f"{rel}\0".encode() + json.dumps(conf, sort_keys=True).encode())
                continue
            h.update(f"{rel}\0{size}\0".encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    except (OSError, ValueError):
        return None
    return h.hexdigest()


def lora_identity(path: str) -> str | None:
    """Digest of a LoRA adapter folder's content, read on the caller's thread (None if
    it cannot be read, or changed while it was read)."""
    stamp = adapter_stamp(path)
    if stamp is None:
        return None
    digest = hash_adapter(path, stamp)
    return digest if adapter_stamp(path) == stamp else None


class LoraIdentities:
    """Adapter identities for the scheduler: known at once, or hashed in the background.

    :meth:`identity` never reads an adapter's bytes: it answers the digest of the
    adapter's current stamp, None (unreadable), or :data:`PENDING` after handing the
    hashing to the ``kvtier-lora`` thread (once per path and stamp)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, Stamp], str | None] = {}
        self._pending: set[tuple[str, Stamp]] = set()
        self._pool = pool(1, "kvtier-lora")
        self._idle = threading.Condition(self._lock)

    def identity(self, path: str) -> str | None:
        """The adapter's digest, None if it cannot be read, or :data:`PENDING`."""
        stamp = adapter_stamp(path)
        if stamp is None:
            return None
        entry = (path, stamp)
        with self._lock:
            if entry in self._known:
                return self._known[entry]
            if entry in self._pending:
                return PENDING
            self._pending.add(entry)
        try:
            self._pool.submit(self._hash, entry)
        except RuntimeError:  # closed
            with self._lock:
                self._pending.discard(entry)
            return None
        return PENDING

    def _hash(self, entry: tuple[str, Stamp]) -> None:
        path, stamp = entry
        digest = hash_adapter(path, stamp)
        if digest is None:
            log.warning("kvtier: LoRA adapter %s could not be read; its requests bypass "
                        "kvtier", path)
        elif adapter_stamp(path) != stamp:
            digest = None  # changed while read: this stamp is gone; the next one is hashed anew
        with self._lock:
            self._pending.discard(entry)
            if len(self._known) >= _MAX_LORAS:
                self._known.clear()
            self._known[entry] = digest
            self._idle.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Wait until nothing is being hashed (tests, shutdown); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout_s)

    def close(self) -> None:
        """Stop the hashing thread (a hash in progress finishes in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
