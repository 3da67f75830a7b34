"""Layer 2: keyed integrity of chunks that leave the process (disk, Redis, the transfer channel).

A chunk's checksums (xxh3, xxh32) catch damage, not forgery: whoever can write
the disk folder or Redis, or runs a peer, can serve any KV that passes them.
With a cluster secret (``integrity.key_file``), every chunk a process writes or
sends carries a keyed MAC of its header and payload (:mod:`kvtier.codecs.format`
says where), and a reader holding the key serves only chunks whose MAC it
verified: a chunk without one, or with a wrong one, is a
:class:`~kvtier.errors.ForgedChunk` (counted ``forged`` by the tiers).

The MAC is AES-256-GMAC (AES-GCM authenticating header and payload, encrypting
nothing) under a fresh random 96-bit nonce per chunk, kept beside the tag: a
Wegman-Carter MAC whose GHASH runs on the CPU's carry-less multiply (tens of
GB/s on one core with VAES, several without), so checking a chunk costs a small
share of reading it. The 32-byte MAC field holds nonce (12), tag (16) and the
algorithm's name (4); a field naming another algorithm is not this key's MAC.
Random nonces are safe for far more chunks than a deployment writes under one
key (collisions become likely only near 2**48 chunks; NIST bounds random nonces
at 2**32 per key). The AES key is derived from the secret (HMAC-SHA256 under a
context string of kvtier's own), so the file may hold any secret of at least
``MIN_KEY_BYTES`` (32), and the same secret used elsewhere gives another key.
It needs the ``cryptography`` package (OpenSSL); a configured key without it
stops start-up (there is no weaker fallback). Readers share the work with one
helper thread per key: the disk tier reads (and checks) the second half of a
batch there, Redis and the transfer channel check half of a batch already
received there.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from kvtier.codecs.format import MAC_SIZE, Header, checksum_ok, verify_payload
from kvtier.config.secrets import MIN_KEY_BYTES
from kvtier.errors import CorruptChunk, ForgedChunk
from kvtier.keys import ChunkKey
from kvtier.threads import pool

CONTEXT = b"kvtier 2026 chunk MAC v2: AES-256-GMAC"
"""Key-derivation context: the MAC key is never the secret itself."""
ALGORITHM = b"GM01"
"""The MAC field's last 4 bytes: AES-256-GMAC, nonce (12 bytes) then tag (16)."""
NONCE, TAG = 12, 16
INSTALL_HINT = "pip install 'kvtier[integrity]' (cryptography)"
T = TypeVar("T")
Unchecked = tuple[ChunkKey, Header, Any]
"""A chunk read whose MAC is still to be checked: key, parsed header, payload (a uint8
array or memoryview)."""
assert NONCE + TAG + len(ALGORITHM) == MAC_SIZE


def import_aes() -> tuple[Any, Any, Any]:
    """``(Cipher, AES, GCM)`` from ``cryptography``; ImportError with the install command
    when it is missing."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError as exc:
        raise ImportError(f"integrity.key_file needs the cryptography package: "
                          f"{INSTALL_HINT} ({exc})") from exc
    return Cipher, algorithms.AES, modes.GCM


class ChunkMac:
    """Signs and verifies chunks with the key derived from the cluster's ``secret``."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"a secret of {len(secret)} bytes; at least {MIN_KEY_BYTES}")
        self._cipher, aes, self._gcm = import_aes()
        self._aes = aes(hmac.new(secret, CONTEXT, hashlib.sha256).digest())
        self._helper: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "<ChunkMac>"  # never the key

    def sign(self, signed: bytes, payload: Any) -> bytes:
        """The 32-byte MAC field for the header bytes ``signed`` followed by ``payload``
        (a fresh nonce, the tag, the algorithm's name)."""
        nonce = os.urandom(NONCE)
        return nonce + self._tag(nonce, signed, payload) + ALGORITHM

    def _tag(self, nonce: bytes, signed: bytes, payload: Any) -> bytes:
        gcm = self._cipher(self._aes, self._gcm(nonce)).encryptor()
        gcm.authenticate_additional_data(signed)
        gcm.authenticate_additional_data(payload)  # large inputs: hashed without a copy
        gcm.finalize()
        return gcm.tag

    def verify(self, key: ChunkKey, header: Header, payload: memoryview) -> None:
        """Return if ``payload`` under ``header`` carries this key's MAC. Else raise
        CorruptChunk when the payload checksum fails too (damage: the MAC cannot tell),
        ForgedChunk when it does not (written without the key, or with another one)."""
        mac = header.mac
        if mac is not None and mac[NONCE + TAG:] == ALGORITHM and hmac.compare_digest(
                self._tag(mac[:NONCE], header.signed, payload), mac[NONCE:NONCE + TAG]):
            return
        if not checksum_ok(header, payload):
            raise CorruptChunk(f"chunk {key.hex()}: payload checksum mismatch")
        what = "carries no MAC" if header.mac is None else "has a MAC this key did not make"
        raise ForgedChunk(f"chunk {key.hex()} {what} (written by a process without this "
                          "cluster's integrity key, or forged)")

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on this key's helper thread (one, started on first use, shared
        by every tier holding the key): the hash runs in OpenSSL without the GIL, so a
        reader's work there overlaps its own. ``fn`` must not wait on the helper itself."""
        with self._lock:
            if self._helper is None:
                self._helper = pool(1, "kvtier-mac")
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
