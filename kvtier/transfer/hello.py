"""Layer 3: the transfer channel's opening: TLS (when configured), then HELLO.

HELLO is a challenge-response on the transfer token, four messages (op HELLO)::

    client -> server   client nonce (32 bytes) | u16 length | namespace digest
    server -> client   server nonce (32 bytes)
    client -> server   HMAC-SHA256(token, "kvtier-transfer-v2 client" | cn | sn | namespace)
    server -> client   status OK and HMAC-SHA256(token, "... server" | cn | sn | namespace),
                       or a refusal (BAD_TOKEN, NAMESPACE_MISMATCH) and a UTF-8 message

Proofs are compared in constant time (``hmac.compare_digest``). A sniffer of a
plain connection sees nonces and MACs, never the token; a recorded proof
replayed fails against the server's fresh nonce; and the client learns that
the server holds the token too (a stand-in server cannot pass the last step).
The server answers the first message of another protocol version with
BAD_VERSION, and a plain client of a TLS-only server with TLS_REQUIRED (in
clear, so its error says so) before closing.

The whole opening, TLS handshake included, finishes within one
:class:`Deadline` (``transfer.timeout_s``) however the bytes trickle in: a
client that sends one byte a second is cut when it runs out, not per byte.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from typing import Callable

from kvtier.transfer.wire import (FRAME, MAGIC, MAX_HELLO, VERSION, Op, Refused, Status,
                                  WireError, frame)

NONCE = 32
PROOF = 32
_U16 = struct.Struct("<H")
_LABEL = b"kvtier-transfer-v2 "


class Closed(WireError):
    """The other side closed the connection during the opening."""


class Deadline:
    """One bound for a series of socket waits (``seconds`` from now, in total)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; WireError once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise WireError(f"the opening (TLS and HELLO) took over {self.seconds:g}s")
        return left

    def arm(self, sock: socket.socket) -> None:
        """Bound the next wait on ``sock`` by what is left."""
        sock.settimeout(self.left())


def recv_by(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    """``n`` bytes, all of them before ``deadline`` (WireError if closed or late)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        deadline.arm(sock)
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise WireError(f"the opening (TLS and HELLO) took over {deadline.seconds:g}s") \
                from None
        if k == 0:
            raise Closed("connection closed during the opening")
        got += k
    return bytes(buf)


def send_by(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    deadline.arm(sock)
    sock.sendall(data)


def read_hello(sock: socket.socket, deadline: Deadline) -> tuple[int, int, bytes]:
    """(version, status, body) of the next HELLO message. The version is returned, not
    checked: the caller answers another version with a clear refusal."""
    magic, version, op, status, body_len = FRAME.unpack(recv_by(sock, FRAME.size, deadline))
    if magic != MAGIC:
        raise WireError("not a kvtier transfer frame")
    if version != VERSION:  # its body read if small, so a refusal is not lost to a reset
        if body_len <= MAX_HELLO:
            recv_by(sock, body_len, deadline)
        return version, status, b""
    if op != Op.HELLO:
        raise WireError(f"op {op} during HELLO")
    if body_len > MAX_HELLO:
        raise WireError(f"HELLO of {body_len} bytes, over the bound of {MAX_HELLO}")
    return version, status, recv_by(sock, body_len, deadline)


def proof(token: bytes, side: bytes, cn: bytes, sn: bytes, namespace: bytes) -> bytes:
    """The HMAC-SHA256 proof of ``side`` (b"client" / b"server") for one opening."""
    return hmac.new(token, _LABEL + side + cn + sn + namespace, hashlib.sha256).digest()


def open_body(cn: bytes, namespace: str) -> bytes:
    ns = namespace.encode()
    return cn + _U16.pack(len(ns)) + ns


def parse_open(body: bytes) -> tuple[bytes, bytes]:
    """(client nonce, namespace bytes) of the client's first HELLO."""
    if len(body) < NONCE + 2:
        raise WireError("hello: too short")
    (nl,) = _U16.unpack_from(body, NONCE)
    if NONCE + 2 + nl != len(body):
        raise WireError("hello: lengths do not add up")
    return body[:NONCE], body[NONCE + 2:]


def refuse(sock: socket.socket, status: Status, message: str, deadline: Deadline) -> None:
    """Send a refusal (best effort: the connection is closed next either way)."""
    body = message.encode()
    try:
        send_by(sock, frame(Op.HELLO, len(body), status) + body, deadline)
    except (OSError, WireError):
        pass


# -- client ---------------------------------------------------------------------


def client_hello(sock: socket.socket, token: str, namespace: str, deadline: Deadline) -> None:
    """Open an authenticated session on ``sock``; Refused or WireError if not."""
    cn = os.urandom(NONCE)
    send_by(sock, frame(Op.HELLO, NONCE + 2 + len(namespace.encode()))
            + open_body(cn, namespace), deadline)
    sn = _answer(sock, deadline)
    if len(sn) != NONCE:
        raise WireError(f"hello: a server nonce of {len(sn)} bytes")
    ns, key = namespace.encode(), token.encode()
    send_by(sock, frame(Op.HELLO, PROOF) + proof(key, b"client", cn, sn, ns), deadline)
    theirs = _answer(sock, deadline)
    if not hmac.compare_digest(theirs, proof(key, b"server", cn, sn, ns)):
        raise WireError("the transfer server could not prove it holds the transfer token "
                        "(a server of another cluster, or a stand-in)")


def _answer(sock: socket.socket, deadline: Deadline) -> bytes:
    try:
        version, status, body = read_hello(sock, deadline)
    except Closed:
        raise WireError("the transfer server closed the connection during HELLO (it may "
                        "speak TLS only: set tls.ca_file; or it refused this client)") from None
    if version != VERSION:
        raise WireError(f"the transfer server speaks kvtier transfer protocol v{version}, "
                        f"this release speaks v{VERSION}: run the same kvtier release on both")
    if status != Status.OK:
        raise Refused(status, body.decode(errors="replace"))
    return body


# -- server ---------------------------------------------------------------------


def server_hello(sock: socket.socket, token: bytes,
                 check: Callable[[str], tuple[Status, str] | None],
                 deadline: Deadline) -> str | None:
    """Run the server's side; the client's namespace ("" = presence only), or None once
    refused (the refusal sent). ``check(namespace)`` may refuse a namespace."""
    version, _, body = read_hello(sock, deadline)
    if version != VERSION:
        refuse(sock, Status.BAD_VERSION, f"this transfer server speaks kvtier transfer "
               f"protocol v{VERSION}, the client v{version}: run the same kvtier release on "
               "both", deadline)
        return None
    cn, ns = parse_open(body)
    sn = os.urandom(NONCE)
    send_by(sock, frame(Op.HELLO, NONCE) + sn, deadline)
    version, _, theirs = read_hello(sock, deadline)
    if version != VERSION or len(theirs) != PROOF:
        raise WireError("hello: a malformed proof")
    if not hmac.compare_digest(theirs, proof(token, b"client", cn, sn, ns)):
        refuse(sock, Status.BAD_TOKEN, "wrong transfer token", deadline)
        return None
    try:
        namespace = ns.decode()
    except UnicodeDecodeError:
        raise WireError("hello: the namespace is not UTF-8") from None
    why = check(namespace)
    if why is not None:
        refuse(sock, why[0], why[1], deadline)
        return None
    send_by(sock, frame(Op.HELLO, PROOF) + proof(token, b"server", cn, sn, ns), deadline)
    return namespace


def plain_client(sock: socket.socket, deadline: Deadline) -> bool:
    """Whether a client of a TLS-only server opened in clear (its first byte is a
    kvtier frame's, not a TLS record's). Peeks; consumes nothing."""
    deadline.arm(sock)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        raise WireError(f"the opening (TLS and HELLO) took over {deadline.seconds:g}s") from None
    return first == MAGIC[:1]


def tls_accept(sock: socket.socket, ctx: ssl.SSLContext, deadline: Deadline
               ) -> ssl.SSLSocket:
    """The TLS handshake of an accepted connection, within ``deadline`` (OSError if it
    fails: a plain client, a certificate of another CA, none under mutual TLS)."""
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        deadline.arm(tls)
        tls.do_handshake()
    except BaseException:
        tls.close()  # the raw socket was detached into it
        raise
    return tls


def tls_connect(sock: socket.socket, ctx: ssl.SSLContext, host: str, deadline: Deadline
                ) -> ssl.SSLSocket:
    """The client's TLS handshake, the server's certificate checked for ``host``."""
    tls = ctx.wrap_socket(sock, server_hostname=host.strip("[]"),
                          do_handshake_on_connect=False)
    try:
        deadline.arm(tls)
        tls.do_handshake()
    except ssl.SSLError as exc:
        tls.close()
        raise WireError(f"TLS handshake with the transfer server {host} failed: {exc}") from None
    except BaseException:
        tls.close()
        raise
    return tls
