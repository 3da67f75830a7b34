"""Layer 2: keyed integrity of chunks that leave the process (disk, Redis, the transfer channel).

A chunk's checksums (xxh3, xxh32) catch damage, not forgery: whoever can write
the disk folder or Redis, or runs a peer, can serve any KV that passes them.
With a cluster secret (``integrity.key_file``), every chunk a process writes or
sends carries a keyed BLAKE3 MAC of its header and payload
(:mod:`kvtier.codecs.format` says where), and a reader holding the key serves
only chunks whose MAC it verified: a chunk without one, or with a wrong one,
is a :class:`~kvtier.errors.ForgedChunk` (counted ``forged`` by the tiers).

The MAC key is derived from the secret (BLAKE3's key derivation, under a
context string of kvtier's own), so the file may hold any secret of at least
``MIN_KEY_BYTES`` (32), and the same secret used elsewhere gives another key.
BLAKE3 releases the GIL and hashes at several GB/s; it is the only MAC kvtier
uses (no weaker fallback: a configured key without the ``blake3`` package
stops start-up). Readers keep its cost off their I/O: one helper thread per
key checks a chunk's MAC while the reader reads the next file (disk), or
checks half of a batch already received (Redis, the transfer channel).
"""

from __future__ import annotations

import hmac
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from kvtier.codecs.format import Header, checksum_ok, verify_payload
from kvtier.config.secrets import MIN_KEY_BYTES
from kvtier.errors import CorruptChunk, ForgedChunk
from kvtier.keys import ChunkKey

CONTEXT = "kvtier 2025 chunk MAC v1"
"""BLAKE3 key-derivation context: the MAC key is never the secret itself."""
INSTALL_HINT = "pip install 'kvtier[integrity]' (blake3; vLLM installs it too)"
T = TypeVar("T")
Unchecked = tuple[ChunkKey, Header, Any]
"""A chunk read whose MAC is still to be checked: key, parsed header, payload (a uint8
array or memoryview)."""


def import_blake3() -> Any:
    """The ``blake3`` module; ImportError with the install command when it is missing."""
    try:
        import blake3
    except ImportError as exc:
        raise ImportError(f"integrity.key_file needs the blake3 package: {INSTALL_HINT} "
                          f"({exc})") from exc
    return blake3


class ChunkMac:
    """Signs and verifies chunks with the key derived from the cluster's ``secret``."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"a secret of {len(secret)} bytes; at least {MIN_KEY_BYTES}")
        self._blake3 = import_blake3().blake3
        self._key = self._blake3(secret, derive_key_context=CONTEXT).digest()
        self._helper: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "<ChunkMac>"  # never the key

    def sign(self, signed: bytes, payload: memoryview) -> bytes:
        """The 32-byte MAC of the header bytes ``signed`` followed by ``payload``."""
        h = self._blake3(signed, key=self._key)
        h.update(payload)  # large inputs: the GIL is released while hashing
        return h.digest()

    def verify(self, key: ChunkKey, header: Header, payload: memoryview) -> None:
        """Return if ``payload`` under ``header`` carries this key's MAC. Else raise
        CorruptChunk when the payload checksum fails too (damage: the MAC cannot tell),
        ForgedChunk when it does not (written without the key, or with another one)."""
        if header.mac is not None and hmac.compare_digest(self.sign(header.signed, payload),
                                                          header.mac):
            return
        if not checksum_ok(header, payload):
            raise CorruptChunk(f"chunk {key.hex()}: payload checksum mismatch")
        what = "carries no MAC" if header.mac is None else "has a MAC this key did not make"
        raise ForgedChunk(f"chunk {key.hex()} {what} (written by a process without this "
                          "cluster's integrity key, or forged)")

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on this key's helper thread (one, started on first use, shared
        by every tier holding the key): BLAKE3 releases the GIL, so a reader checks one
        chunk there while it reads the next. ``fn`` must not wait on the helper itself."""
        with self._lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="kvtier-mac")
            helper = self._helper
        try:
            return helper.submit(fn, *args)
        except RuntimeError:  # the interpreter is exiting: no new threads; run it here
            done: Future[T] = Future()
            done.set_result(fn(*args))
            return done

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``fn`` of every item, every other one on the helper thread, the rest on this one
        (a batch already in memory hashes on two cores)."""
        if len(items) < 2:
            return [fn(x) for x in items]
        helped = {i: self.submit(fn, x) for i, x in enumerate(items) if i % 2}
        out = {i: fn(x) for i, x in enumerate(items) if not i % 2}
        out.update((i, future.result()) for i, future in helped.items())
        return [out[i] for i in range(len(items))]

    def check_all(self, chunks: Sequence[Unchecked]) -> list[CorruptChunk | None]:
        """Check chunks already in memory (length and MAC), half on the helper thread:
        per chunk None (valid) or why it is not."""
        return self.map(self._check, chunks)

    def _check(self, chunk: Unchecked) -> CorruptChunk | None:
        try:
            verify_payload(*chunk, mac=self)
        except CorruptChunk as exc:  # ForgedChunk included
            return exc
        return None

    def close(self) -> None:
        """Stop the helper thread (after what was submitted). Idempotent."""
        with self._lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=False)
