"""Layer 0: configuration of kvtier across instances: registration with a cluster
controller (``controller``), the transfer channel each instance serves
(``transfer``) and the peer tier that reads from other instances (``peer``).
Loaded with the rest by :mod:`kvtier.config`; the checks that span sections or read
a token file are :func:`validate_cluster` and :func:`validate_controller`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from kvtier.config.fields import Addresses, Flag, Int, Name, Number, Secret, Section, Size, Url
from kvtier.config.secrets import read_token, token_env
from kvtier.config.values import host_port, is_loopback
from kvtier.errors import ConfigError


class ControllerConfig(Section):
    """Registration with a cluster controller (``kvtier controller``, ``kvtier.cluster``)."""

    section_key: ClassVar[str] = "controller."
    url: Url = ""
    """The controller's base URL; "" leaves registration off."""
    token: Secret = Field("", repr=False)
    """The controller's bearer token; prefer ``token_file`` or ``KVTIER_CONTROLLER__TOKEN``."""
    token_file: Name = ""
    """A file holding the controller's token."""
    instance_id: Name = ""
    """This instance's name at the controller ("": host:pid); its KV events topic too."""
    instance_url: Url = ""
    """The ``vllm serve`` base URL advertised to routers."""
    heartbeat_s: Number = Field(2.0, gt=0)
    """Heartbeat period."""
    timeout_s: Number = Field(2.0, gt=0)
    """Bound on each call to the controller (made on a background thread)."""
    relay_events: Flag = False
    """Relay this instance's KV events to the controller over HTTP (its credential, TLS):
    the relay binds vLLM's ``--kv-events-config`` endpoint, which must then be
    ``tcp://127.0.0.1:PORT``. For instances on another host than the controller, whose
    events socket listens on loopback only."""

    def resolve_token(self) -> str:
        """The configured token (``token`` or the file ``token_file``); "" if none."""
        return read_token("controller", self.token, self.token_file)


class TransferConfig(Section):
    """The chunk transfer server inside each engine worker (other instances' peer tiers
    read this instance's chunks through it)."""

    section_key: ClassVar[str] = "transfer."
    host: Name = "127.0.0.1"
    """Address to bind. Anything but loopback needs a token, and TLS (``tls``) unless
    ``tls.insecure``."""
    advertise: Name = ""
    """``host:port`` other instances dial (registered with the controller); "" is
    ``host:port``, which a wildcard ``host`` (0.0.0.0, ::) cannot give."""
    port: Int = Field(0, ge=0, le=65535)
    """TCP port; 0 leaves the server off."""
    token: Secret = Field("", repr=False)
    """Shared secret every connection presents (servers check it, peer tiers send it).
    Prefer ``token_file`` or the environment variable ``KVTIER_TRANSFER__TOKEN``."""
    token_file: Name = ""
    """A file holding the shared secret."""
    timeout_s: Number = Field(5.0, gt=0)
    """Bound on each socket wait once a request has started (both sides), and on a
    connection's whole opening (TLS handshake and HELLO together)."""
    idle_timeout_s: Number = Field(120.0, gt=0)
    """An idle pooled connection is closed by the server after this long."""
    max_batch_bytes: Size = Field(256 * 1024**2, ge=1024**2)
    """Largest message body: a GET answer stops before it and the rest is asked again."""
    max_connections: Int = Field(32, ge=1)
    """Connections served at once; more are refused."""
    max_connections_per_client: Int = Field(8, ge=1)
    """Connections served at once to one client address (so one client cannot take every
    slot); more are refused."""

    def resolve_token(self) -> str:
        """The configured token (``token`` or the file ``token_file``); "" if none."""
        return read_token("transfer", self.token, self.token_file)

    @property
    def address(self) -> str:
        """``host:port`` as other instances reach this one ("" when off)."""
        if not self.port:
            return ""
        if self.advertise:
            return self.advertise
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class PeerConfig(Section):
    """The read-only ``peer`` tier: chunks other instances hold, fetched over their
    transfer servers (token: ``transfer.token``)."""

    section_key: ClassVar[str] = "peer."
    peers: Addresses = Field(default_factory=list)
    """Static list of transfer servers, ``"host:port"``."""
    controller_url: Url = ""
    """Or: ask the controller's ``POST /v1/locate`` which instance holds what."""
    controller_token: Secret = Field("", repr=False)
    """Bearer token of ``controller_url`` (default: ``controller.token``)."""
    instance_id: Name = ""
    """This instance's id at the controller (excluded from its answers)."""
    timeout_s: Number = Field(2.0, gt=0)
    """Bound on each socket wait of a chunk read."""
    contains_timeout_s: Number = Field(0.2, gt=0)
    """Bound on each wait of a presence check or a locate call (they run on every
    scheduler lookup)."""
    backoff_s: Number = Field(5.0, ge=0)
    """A peer (or the controller) that failed is not asked for this long."""
    cache_s: Number = Field(0.5, ge=0)
    """How long a presence / locate answer is reused."""
    max_connections: Int = Field(4, ge=1)
    """Pooled connections per peer."""


def parse_address(key: str, value: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ConfigError naming ``key`` otherwise."""
    try:
        return host_port(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def validate_cluster(transfer: TransferConfig, peer: PeerConfig, peer_tier: bool) -> None:
    """The checks across keys; ``peer_tier``: whether ``tiers`` lists ``peer``."""
    token = transfer.resolve_token()  # an unreadable token file stops start-up here
    if transfer.port and not token and not is_loopback(transfer.host):
        raise ConfigError("transfer.host", f"{transfer.host} is reachable from other machines: "
                          f"set transfer.token, transfer.token_file or {token_env('transfer')} "
                          "(anyone who reaches the port could read the cache), or bind "
                          "127.0.0.1")
    if peer_tier and not peer.peers and not peer.controller_url:
        raise ConfigError("peer.peers", "the peer tier is enabled: list peers "
                          "(['host:port', ...]) or set controller.url (or peer.controller_url)")


def validate_controller(c: ControllerConfig) -> None:
    """A registration's token file must be readable (at start-up, not on the first call)."""
    if c.url:
        c.resolve_token()


def peer_from_controller(controller: ControllerConfig, peer: PeerConfig) -> None:
    """The peer tier asks the controller this instance registers with, unless
    ``peer.controller_url`` names another; its id there is excluded from answers."""
    if peer.controller_url or not controller.url:
        return
    peer.controller_url = controller.url
    if not peer.controller_token:
        peer.controller_token = controller.resolve_token()
    if not peer.instance_id:
        peer.instance_id = controller.instance_id
