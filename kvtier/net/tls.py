"""Layer 0: TLS for every network surface (``ssl`` contexts from a certificate, a key and a CA).

One set of files per process (:class:`TlsFiles`): the certificate and key this
process presents (as a server, and as a client where mutual TLS is on) and the
CA that signs the cluster's certificates (servers check clients' certificates
against it, clients check servers'). Made once at start-up, so a missing or
mismatched file stops start-up with an error naming it, not the first call.

- :func:`server_context`: TLS 1.2 or later; with a CA and ``client_auth`` a
  client without a certificate signed by it is refused in the handshake.
- :func:`client_context`: verifies the server's certificate and host name
  against the CA (or the system's CAs when none is given); presents this
  process's certificate when it has one.
- :func:`uvicorn_options`: the same for uvicorn's ``ssl_*`` settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


FLAGS = {"cert_file": "--tls-cert", "key_file": "--tls-key", "ca_file": "--tls-ca"}
"""The command-line spelling of each file (``kvtier controller``, ``router``, ``ctl``)."""


class TlsError(ValueError):
    """A TLS file that is missing, unreadable or does not fit (``key``: which one)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: ``cert_file`` + ``key_file`` (this process), ``ca_file`` (the cluster's
    CA); ``client_auth``: servers ask clients for a certificate signed by ``ca_file``."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_auth: bool = True

    @property
    def serving(self) -> bool:
        """Whether servers of this process speak TLS (a certificate is configured)."""
        return bool(self.cert_file)

    @property
    def dialing(self) -> bool:
        """Whether clients of this process speak TLS to the cluster's surfaces."""
        return bool(self.cert_file or self.ca_file)

    @property
    def mutual(self) -> bool:
        """Whether servers require clients' certificates."""
        return bool(self.serving and self.ca_file and self.client_auth)

    def check(self, prefix: str = "tls.") -> None:
        """Raise :class:`TlsError` unless the files exist, parse and fit together."""
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsError(prefix + ("key_file" if self.cert_file else "cert_file"),
                           "a certificate and its key go together: set both")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise TlsError(prefix + name, f"{path} is not a readable file")
        if self.serving:
            server_context(self, prefix)
        if self.dialing:
            client_context(self, prefix)

    def check_flags(self) -> None:
        """:meth:`check`, the error naming the command-line flag (``--tls-cert``, ...)."""
        try:
            self.check("")
        except TlsError as e:
            raise TlsError(FLAGS.get(e.key, e.key), e.problem) from None


def server_context(files: TlsFiles, prefix: str = "tls.") -> ssl.SSLContext:
    """A server-side context for ``files`` (which must have a certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, files, prefix)
    if files.mutual:
        _load_ca(ctx, files, prefix)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(files: TlsFiles, prefix: str = "tls.") -> ssl.SSLContext:
    """A client-side context: the server's certificate and name checked against
    ``ca_file`` (system CAs without one); this process's certificate presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.ca_file:
        _load_ca(ctx, files, prefix)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if files.cert_file:
        _load_chain(ctx, files, prefix)
    return ctx


def uvicorn_options(files: TlsFiles) -> dict[str, object]:
    """uvicorn ``Config`` keywords serving ``files`` ({} when TLS is off)."""
    if not files.serving:
        return {}
    out: dict[str, object] = {"ssl_certfile": files.cert_file, "ssl_keyfile": files.key_file}
    if files.mutual:
        out.update(ssl_ca_certs=files.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles, prefix: str) -> None:
    try:
        ctx.load_cert_chain(files.cert_file, files.key_file)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(prefix + "cert_file", f"{files.cert_file} with key {files.key_file}: "
                       f"not a PEM certificate and its private key ({e})") from None


def _load_ca(ctx: ssl.SSLContext, files: TlsFiles, prefix: str) -> None:
    try:
        ctx.load_verify_locations(cafile=files.ca_file)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(prefix + "ca_file", f"{files.ca_file}: not a PEM CA certificate "
                       f"({e})") from None
