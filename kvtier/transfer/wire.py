"""Layer 3: the transfer channel's framing (instance to instance, over TCP or TLS).

Every message, both ways, is a 16-byte frame header and a body::

    magic "KVTX" | version u8 | op u8 | status u16 | body_len u64

A request is answered by one message with the same op. Ops:

- HELLO: the opening, a challenge-response on the transfer token in four
  messages (the token never crosses the wire; :mod:`kvtier.transfer.hello`):
  the client's nonce and namespace digest (hex, "" = presence checks only),
  the server's nonce, the client's proof (HMAC-SHA256), the server's status
  and its own proof (or a refusal: status and a UTF-8 message).
- CONTAINS: u32 n, n 16-byte keys (n <= ``MAX_KEYS``: one presence check per
  key and tier, no reads). Answer: u32 leading count, bitmap of n bits.
- GET: u32 n, n keys. Answer: per key a u64 entry length then the entry:
  0 = miss, ``LATER`` = not sent (over the batch size, or past the
  ``GET_KEYS`` keys one answer examines: ask again), otherwise a chunk in
  kvtier's chunk format (128-byte header + payload, as the disk tier stores
  it), verified by the reader before use (with the cluster's integrity key:
  its MAC too, signed by the server as it sends the chunk).

Version 2 (this one) replaced version 1's HELLO, which carried the token in
clear; a frame of another version is refused with a message naming both.
Sizes are checked before anything is allocated: a body over the receiver's
bound, a key count over ``MAX_KEYS`` or an entry longer than the rest of its
body is a :class:`WireError` and the connection is dropped. Parsing only;
nothing is unpickled. Over TLS (an ``ssl.SSLSocket``, which has no
``sendmsg``/``MSG_WAITALL``) the same messages go through the TLS record
layer: a GET answer's small headers are coalesced, payloads sent from their
buffers.
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
import threading
from typing import Callable, Sequence, cast

import numpy as np

from kvtier.codecs import ChunkMac
from kvtier.codecs.format import HEADER_SIZE, ChunkData, Header, parse_header, verify_payload
from kvtier.errors import CorruptChunk, KvtierError
from kvtier.keys import KEY_BYTES, ChunkKey

MAGIC = b"KVTX"
VERSION = 2
FRAME = struct.Struct("<4sBBHQ")
MAX_KEYS = 65536
GET_KEYS = 4096
"""Keys one GET answer examines (memory references, lower tiers' reads); the rest: LATER."""
MAX_HELLO = 4096
LATER = 2**64 - 1
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_ZERO, _LATER = _U64.pack(0), _U64.pack(LATER)
_IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)
_COALESCE = 64 * 1024  # over TLS, buffers smaller than this are joined before sending


class Op(enum.IntEnum):
    HELLO = 1
    CONTAINS = 2
    GET = 3


class Status(enum.IntEnum):
    OK = 0
    BAD_TOKEN = 1
    NAMESPACE_MISMATCH = 2
    NAMESPACE_REQUIRED = 3
    BAD_REQUEST = 4
    TOO_LARGE = 5
    BAD_VERSION = 6
    BUSY = 7
    TLS_REQUIRED = 8


class WireError(KvtierError):
    """The peer broke the protocol (bad magic, sizes, lengths): drop the connection."""


class Refused(KvtierError):
    """The server answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        name = Status(status).name if status in Status._value2member_map_ else str(status)
        super().__init__(f"transfer server refused: {name}: {message}")
        self.status = status


def frame(op: int, body_len: int, status: int = Status.OK) -> bytes:
    return FRAME.pack(MAGIC, VERSION, op, status, body_len)


def parse_frame(buf: bytes, max_body: int) -> tuple[int, int, int]:
    """(op, status, body_len) of a frame header; WireError before any allocation."""
    magic, version, op, status, body_len = FRAME.unpack(buf)
    if magic != MAGIC:
        raise WireError("not a kvtier transfer frame")
    if version != VERSION:
        raise WireError(f"the other side speaks kvtier transfer protocol v{version}, this "
                        f"release speaks v{VERSION}: run the same kvtier release on both")
    if body_len > max_body:
        raise WireError(f"message of {body_len} bytes, over the bound of {max_body}")
    return op, status, body_len


def keys_body(keys: Sequence[ChunkKey]) -> bytes:
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{len(keys)} keys in one message, at most {MAX_KEYS}")
    return _U32.pack(len(keys)) + b"".join(keys)


def parse_keys(body: bytes) -> list[ChunkKey]:
    if len(body) < 4:
        raise WireError("key list: too short")
    (n,) = _U32.unpack_from(body, 0)
    if n > MAX_KEYS or len(body) != 4 + n * KEY_BYTES:
        raise WireError(f"key list: {n} keys in {len(body)} bytes")
    return [ChunkKey(body[4 + i * KEY_BYTES:4 + (i + 1) * KEY_BYTES]) for i in range(n)]


def contains_body(present: Sequence[bool]) -> bytes:
    lead = next((i for i, p in enumerate(present) if not p), len(present))
    bits = np.packbits(np.asarray(present, dtype=bool), bitorder="little")
    return _U32.pack(lead) + bits.tobytes()


def parse_contains(body: bytes, n: int) -> list[bool]:
    if len(body) != 4 + (n + 7) // 8:
        raise WireError(f"contains answer: {len(body)} bytes for {n} keys")
    bits = np.unpackbits(np.frombuffer(body, np.uint8, offset=4), bitorder="little")[:n]
    return [bool(b) for b in bits]


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound every send and receive on ``sock`` by ``seconds``, in the kernel.

    The socket stays blocking (SO_SNDTIMEO / SO_RCVTIMEO instead of Python's
    timeout): a batch then goes out in one ``sendmsg`` and a payload comes in
    with one ``recv_into(MSG_WAITALL)``, each releasing the GIL once, rather
    than one short call per socket-buffer's worth, each taking the GIL back
    from the engine's thread. A wait past the bound raises an OSError. A TLS
    socket gets Python's timeout instead (its reads go through OpenSSL).
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6) or (0 if sec else 1)  # 0/0 would mean "never"
    tv = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


def sendmsg_all(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send every buffer in order with ``sendmsg`` (scatter-gather: nothing is joined);
    over TLS, small buffers are joined and large ones sent from where they are."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    if isinstance(sock, ssl.SSLSocket):
        return _send_tls(sock, views)
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while sent:
            if sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def _send_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> None:
    small = bytearray()
    for view in views:
        if view.nbytes < _COALESCE:
            small += view
            continue
        if small:
            sock.sendall(small)
            small.clear()
        sock.sendall(view)
    if small:
        sock.sendall(small)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; WireError if the peer closes first."""
    got = 0
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    while got < view.nbytes:
        n = sock.recv_into(view[got:], view.nbytes - got, flags)
        if n == 0:
            raise WireError("connection closed mid-message")
        got += n


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def read_message(sock: socket.socket, op: int, max_body: int) -> tuple[int, bytes]:
    """(status, body) of the answer to ``op``; the body read whole (small messages only)."""
    got, status, body_len = parse_frame(recv_exact(sock, FRAME.size), max_body)
    if got != op:
        raise WireError(f"answer to op {op} came as op {got}")
    return status, recv_exact(sock, body_len)


def get_answer_buffers(heads: Sequence[bytes | None],
                       payloads: Sequence[memoryview | None], later: int) -> list:
    """The buffers of a GET answer (frame first): per key a length then header and payload;
    keys from index ``later`` on are marked LATER. Lengths and headers between payloads
    are joined into one buffer (a 65,536-key answer is a few buffers, not 65,536)."""
    parts: list = []
    small = bytearray()
    total = 8 * len(heads)
    for head, payload in zip(heads[:later], payloads[:later]):
        if head is None or payload is None:
            small += _ZERO
        else:
            small += _U64.pack(HEADER_SIZE + payload.nbytes)
            small += head
            parts += [bytes(small), payload]
            small.clear()
            total += HEADER_SIZE + payload.nbytes
    small += _LATER * (len(heads) - min(later, len(heads)))
    if small:
        parts.append(bytes(small))
    return [frame(Op.GET, total)] + parts


def read_chunks(sock: socket.socket, keys: Sequence[ChunkKey], body_len: int,
                take: Callable[[int], np.ndarray], give: Callable[[np.ndarray], None],
                max_chunk: int, mac: ChunkMac | None = None
                ) -> tuple[list[ChunkData | None], list[int], list[CorruptChunk]]:
    """Read a GET answer's body: (chunks, indexes sent LATER, why each bad chunk failed).

    The body (its size already checked against the receiver's bound by
    :func:`parse_frame`) arrives in one ``recv_into(MSG_WAITALL)`` into
    ``take(body_len)``: one GIL release for the whole batch, not three per
    chunk, which matters when the engine's thread holds the GIL between its
    ops. Each entry is then checked in memory: length within the body and
    ``max_chunk``, header (key, lengths, header checksum), payload checksum or,
    with ``mac``, the chunk's MAC (a ForgedChunk without a valid one; half of
    the batch on the key's helper thread); a chunk that fails is a miss. The
    chunks are views of the buffer, which
    goes back through ``give`` once every one of them is released. Framing
    errors raise WireError.
    """
    buf = take(body_len)
    recv_into(sock, memoryview(buf))
    out: list[ChunkData | None] = [None] * len(keys)
    later: list[int] = []
    bad: list[CorruptChunk] = []
    signed: list[tuple[int, Header]] = []  # with a MAC: checked once the body is framed
    pos = 0
    for i, key in enumerate(keys):
        if body_len - pos < 8:
            raise WireError("GET answer shorter than its entries")
        (n,) = _U64.unpack_from(buf, pos)
        pos += 8
        if n == LATER:
            later.append(i)
            continue
        if n == 0:
            continue
        if n > body_len - pos or n < HEADER_SIZE or n - HEADER_SIZE > max_chunk:
            raise WireError(f"GET entry of {n} bytes ({body_len - pos} left, "
                            f"chunks <= {max_chunk})")
        entry, pos = buf[pos:pos + n], pos + n
        try:
            header = parse_header(key, entry[:HEADER_SIZE])
            if mac is None:
                verify_payload(key, header, entry[HEADER_SIZE:])
        except CorruptChunk as exc:
            bad.append(exc)
            continue
        out[i] = ChunkData(header.meta, entry[HEADER_SIZE:])
        signed.append((i, header))
    if pos != body_len:
        raise WireError(f"GET answer has {body_len - pos} bytes after its entries")
    if mac is not None:
        why = mac.check_all([(keys[i], h, cast(ChunkData, out[i]).payload) for i, h in signed])
        for (i, _), exc in zip(signed, why):
            if exc is not None:
                out[i] = None
                bad.append(exc)
    shared = _SharedBuffer(buf, give, sum(c is not None for c in out))
    for chunk in out:
        if chunk is not None:
            chunk._release = shared.release
    return out, later, bad


class _SharedBuffer:
    """One received body under several chunks: given back when the last is released."""

    def __init__(self, buf: np.ndarray, give: Callable[[np.ndarray], None], users: int) -> None:
        self.buf, self.give, self.users = buf, give, users
        self._lock = threading.Lock()
        if not users:
            give(buf)

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.give(self.buf)
