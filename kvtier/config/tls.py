"""Layer 0: the ``tls`` section: one certificate, key and CA for every surface of an
instance (management API, transfer channel; and as a client: the controller, peers),
and the rule that a surface off loopback speaks TLS unless explicitly waived."""

from __future__ import annotations

from typing import ClassVar

from kvtier.config.fields import Flag, Name, Section
from kvtier.config.values import is_loopback
from kvtier.errors import ConfigError
from kvtier.net.tls import TlsError, TlsFiles


class TlsConfig(Section):
    """TLS of this instance's network surfaces (``kvtier.net.tls``)."""

    section_key: ClassVar[str] = "tls."
    cert_file: Name = ""
    """PEM certificate this instance presents (servers, and clients with mutual TLS); with
    it, the management API and the transfer server speak only TLS."""
    key_file: Name = ""
    """The certificate's private key (PEM)."""
    ca_file: Name = ""
    """The cluster's CA (PEM): peers', the controller's and clients' certificates are
    checked against it. "" checks servers against the system's CAs and asks clients for
    no certificate."""
    client_auth: Flag = True
    """With ``ca_file``: servers refuse clients without a certificate signed by it
    (mutual TLS)."""
    insecure: Flag = False
    """Serve off loopback without TLS (tokens and KV cross the network in clear). Off
    loopback, a surface without TLS is refused at start-up unless this is true."""

    def files(self) -> TlsFiles:
        return TlsFiles(self.cert_file, self.key_file, self.ca_file, self.client_auth)

    def check(self) -> None:
        """The files exist, parse and fit together (ConfigError naming the key)."""
        try:
            self.files().check(self.section_key)
        except TlsError as e:
            raise ConfigError(e.key, e.problem) from None


def require_tls(key: str, host: str, files: TlsFiles, insecure: bool,
                waiver: str = "tls.insecure: true") -> None:
    """Refuse (ConfigError naming ``key``) to serve on a non-loopback ``host`` without
    TLS, unless ``insecure`` (spelled ``waiver`` in the message) waives it."""
    if files.serving or insecure or is_loopback(host):
        return
    fix = ("give --tls-cert and --tls-key (and --tls-ca for mutual TLS)" if waiver.startswith("--")
           else "set tls.cert_file and tls.key_file (and tls.ca_file for mutual TLS)")
    raise ConfigError(key, f"{host} is reachable from other machines and TLS is off: {fix}, "
                      f"or bind 127.0.0.1, or accept tokens and KV in clear with {waiver}")


def is_wildcard(host: str) -> bool:
    """Whether ``host`` binds every address (0.0.0.0, ::, ""): not an address to give out."""
    return host.strip("[]") in ("", "0.0.0.0", "::")
