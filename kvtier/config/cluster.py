"""Layer 0: configuration of kvtier across instances: registration with a cluster
controller (``controller``), the transfer channel each instance serves
(``transfer``) and the peer tier that reads from other instances (``peer``). Validated here; loaded with the rest by :mod:`kvtier.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from kvtier.config.values import is_loopback, read_token
from kvtier.errors import ConfigError

TOKEN_ENV = "KVTIER_TRANSFER_TOKEN"


@dataclass
class ControllerConfig:
    """Registration with a cluster controller (``kvtier controller``, ``kvtier.cluster``)."""

    url: str = ""  # the controller's base URL; "" leaves registration off
    token: str = field(default="", repr=False)  # prefer token_file / KVTIER_CONTROLLER__TOKEN
    token_file: str = ""
    instance_id: str = ""  # name at the controller ("": host:pid); its KV events topic too
    instance_url: str = ""  # the ``vllm serve`` base URL advertised to routers
    heartbeat_s: float = 2.0
    timeout_s: float = 2.0  # bound on each call to the controller (on a background thread)

    def resolve_token(self) -> str:
        """The configured token (``token`` or the file ``token_file``); "" if none."""
        return read_token("controller", self.token, self.token_file)


@dataclass
class TransferConfig:
    """The chunk transfer server inside each engine worker (other instances' peer tiers
    read this instance's chunks through it)."""

    host: str = "127.0.0.1"
    """Address to bind and to advertise. Anything but loopback needs a token."""
    port: int = 0
    """TCP port; 0 leaves the server off."""
    token: str = field(default="", repr=False)
    """Shared secret every connection presents (servers check it, peer tiers send it).
    Prefer ``token_file`` or the environment variable ``KVTIER_TRANSFER_TOKEN``."""
    token_file: str = ""
    timeout_s: float = 5.0
    """Bound on each socket wait once a request has started (both sides)."""
    idle_timeout_s: float = 120.0
    """An idle pooled connection is closed by the server after this long."""
    max_batch_bytes: int = 256 * 1024**2
    """Largest message body: a GET answer stops before it and the rest is asked again."""
    max_connections: int = 32
    """Connections served at once; more are refused."""

    def resolve_token(self) -> str:
        """The token from ``token`` (or ``$KVTIER_TRANSFER_TOKEN``, copied there by
        :func:`kvtier.config.load_config`) or ``token_file``; "" if none."""
        return read_token("transfer", self.token, self.token_file)

    def take_env_token(self, env: Mapping[str, str]) -> None:
        """Use ``$KVTIER_TRANSFER_TOKEN`` when neither token nor token_file is set."""
        if not self.token and not self.token_file:
            self.token = env.get(TOKEN_ENV, "").strip()

    @property
    def address(self) -> str:
        """``host:port`` as other instances reach this one ("" when off)."""
        return f"{self.host}:{self.port}" if self.port else ""


@dataclass
class PeerConfig:
    """The read-only ``peer`` tier: chunks other instances hold, fetched over their
    transfer servers (token: ``transfer.token``)."""

    peers: list[str] = field(default_factory=list)
    """Static list of transfer servers, ``"host:port"``."""
    controller_url: str = ""
    """Or: ask the controller's ``POST /v1/locate`` which instance holds what."""
    controller_token: str = field(default="", repr=False)
    instance_id: str = ""
    """This instance's id at the controller (excluded from its answers)."""
    timeout_s: float = 2.0
    """Bound on each socket wait of a chunk read."""
    contains_timeout_s: float = 0.2
    """Bound on each wait of a presence check or a locate call (they run on every
    scheduler lookup)."""
    backoff_s: float = 5.0
    """A peer (or the controller) that failed is not asked for this long."""
    cache_s: float = 0.5
    """How long a presence / locate answer is reused."""
    max_connections: int = 4
    """Pooled connections per peer."""


def parse_address(key: str, value: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ConfigError naming ``key`` otherwise."""
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected 'host:port', got {value!r}")
    return host.strip("[]"), int(port)


def validate_cluster(transfer: TransferConfig, peer: PeerConfig, peer_tier: bool) -> None:
    """Check both sections; ``peer_tier``: whether ``tiers`` lists ``peer``."""
    if not 0 <= transfer.port <= 65535:
        raise ConfigError("transfer.port", f"must be a TCP port or 0, got {transfer.port}")
    for key, value in (("transfer.timeout_s", transfer.timeout_s),
                       ("transfer.idle_timeout_s", transfer.idle_timeout_s),
                       ("peer.timeout_s", peer.timeout_s),
                       ("peer.contains_timeout_s", peer.contains_timeout_s)):
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    for key, value, low in (("transfer.max_batch_bytes", transfer.max_batch_bytes, 1024**2),
                            ("transfer.max_connections", transfer.max_connections, 1),
                            ("peer.max_connections", peer.max_connections, 1)):
        if value < low:
            raise ConfigError(key, f"must be >= {low}, got {value}")
    if peer.backoff_s < 0 or peer.cache_s < 0:
        raise ConfigError("peer.backoff_s" if peer.backoff_s < 0 else "peer.cache_s",
                          "must be >= 0")
    token = transfer.resolve_token()  # an unreadable token file stops start-up here
    if transfer.port and not token and not is_loopback(transfer.host):
        raise ConfigError("transfer.host", f"{transfer.host} is reachable from other machines: "
                          "set transfer.token, transfer.token_file or KVTIER_TRANSFER_TOKEN "
                          "(anyone who reaches the port could read the cache), or bind "
                          "127.0.0.1")
    for i, p in enumerate(peer.peers):
        parse_address(f"peer.peers[{i}]", p)
    url = peer.controller_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError("peer.controller_url", f"expected an http(s):// URL, got {url!r}")
    if peer_tier and not peer.peers and not url:
        raise ConfigError("peer.peers", "the peer tier is enabled: list peers "
                          "(['host:port', ...]) or set controller.url (or peer.controller_url)")


def validate_controller(c: ControllerConfig) -> None:
    if min(c.heartbeat_s, c.timeout_s) <= 0:
        raise ConfigError("controller.heartbeat_s" if c.heartbeat_s <= 0
                          else "controller.timeout_s", "must be positive")
    for key, url in (("url", c.url), ("instance_url", c.instance_url)):
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"controller.{key}", "must be an http:// or https:// URL")
    if c.url:
        c.resolve_token()  # a token file that cannot be read stops start-up here


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
