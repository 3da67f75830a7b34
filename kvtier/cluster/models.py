"""Layer 7: the controller's requests and responses, as pydantic models.

``/v1/locate``'s shape is a fixed contract: the peer tier (``kvtier/tiers/peer/tier.py``)
calls it. Unknown fields are errors (400 naming them), like the management API.
Addresses an instance registers are checked for form (:func:`check_url`,
:func:`check_host_port`): other instances and routers dial them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from kvtier.control.models import MAX_KEYS, MAX_TOKENS, HexKey, TokenId

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PATH = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")


def check_host(host: str) -> str:
    """``host`` if an IP literal or a DNS name; ValueError naming the problem otherwise."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not host or len(host) > 253 or not all(_LABEL.match(x) for x in host.rstrip(".").split(".")):
        raise ValueError(f"host {host[:80]!r} is neither an IP address nor a DNS name")
    return host


def check_url(url: str) -> str:
    """``url`` if http(s)://host[:port][/path] with no user, password, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r}: only http:// and https:// URLs")
    if "@" in parts.netloc:
        raise ValueError("a user or password in the URL is not accepted")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("a query or fragment in the URL is not accepted")
    if port == 0 or not _PATH.match(parts.path):
        raise ValueError("port or path not acceptable")
    check_host(parts.hostname or "")
    return url


def check_host_port(value: str) -> str:
    """``value`` if ``host:port`` (``[v6]:port``) with a valid host and a port 1-65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port with a port in 1-65535")
    if host.startswith("["):
        if not host.endswith("]") or ipaddress.ip_address(host[1:-1]).version != 6:
            raise ValueError("expected [IPv6]:port")
    else:
        check_host(host)
    return value


MAX_EVENT_BYTES = 1 << 20
"""The largest KV event batch accepted (ZMQ message or relayed)."""
MAX_EVENT_B64 = (MAX_EVENT_BYTES + 2) // 3 * 4
Name = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
TierName = Annotated[str, Field(max_length=32, pattern=r"^[a-z][a-z0-9_]*$",
                                description="a kvtier tier's name (memory, disk, redis, peer)")]
"""No separator in it: the Redis index keys an instance's set ``chunks:<instance>:<tier>``,
so a tier named ``x:memory`` would write into instance ``<instance>:x``'s set."""
Url = Annotated[str, Field(max_length=2048), AfterValidator(check_url)]
HostPort = Annotated[str, Field(max_length=300, description="host:port"),
                     AfterValidator(check_host_port)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeyNamespace(_Strict):
    """The fields of the instance's :class:`kvtier.keys.Namespace` (shard 0), so the
    controller computes the very keys the instance stores under (and other tenants')."""

    model_id: str = Field(max_length=4096)
    layout: str = Field(max_length=256)
    chunk_size: int = Field(gt=0, le=1 << 20)
    tp_rank: int = Field(0, ge=0)
    tp_size: int = Field(1, ge=1)
    salt: str = Field("", max_length=1024)
    pp_size: int = Field(1, ge=1)
    layer_start: int = Field(0, ge=0)
    lora: str = Field("", max_length=256)
    page_format: str = Field("", max_length=64)
    codec_class: str = Field("lossless", max_length=64)
    cache_salt: str = Field("", max_length=1024)
    hash_algorithm: str = Field("xxh3_128", max_length=32)
    hash_version: int = 2


class Register(_Strict):
    """An instance announcing itself (again: a re-register replaces its record)."""

    instance: Name
    url: Optional[Url] = Field(None, description="vllm serve base URL")
    model: Name = Field(description="served model name")
    namespace: str = Field(pattern="^[0-9a-f]{32}$", description="hex digest of the Namespace")
    key_namespace: Optional[KeyNamespace] = Field(
        None, description="the Namespace's fields: needed to answer /v1/lookup by tokens")
    layout: str = Field(max_length=256)
    chunk_size: int = Field(gt=0, le=1 << 20)
    block_size: int = Field(0, ge=0, description="engine block size (partial chunks); 0: none")
    tiers: list[Annotated[str, Field(max_length=32)]] = Field(max_length=8)
    control: Optional[Url] = Field(None, description="management API URL (shown; never dialed)")
    transfer: Optional[HostPort] = None
    topic: Optional[str] = Field(None, max_length=256,
                                 description="its KV events topic (default: the instance id)")
    tokenizer: Optional[str] = Field(None, max_length=4096, description="a local tokenizer "
                                     "path (loaded only with --registered-tokenizers)")


class InstanceRef(_Strict):
    instance: Name


class Registered(BaseModel):
    instance: str
    ttl_s: float
    heartbeat_s: float
    events: Optional[str] = Field(None, description="where to publish KV events (ZMQ)")
    topic: str
    credential: Optional[str] = Field(
        None, description="this instance's credential, issued at its first registration "
        "and given only then: present it as X-Kvtier-Instance-Token from now on")
    resync: bool = Field(False, description="POST /v1/snapshot: the controller wants it")


class Beat(BaseModel):
    """A heartbeat's answer."""

    status: str = "ok"
    resync: bool = Field(False, description="POST /v1/snapshot: the controller wants it")


class SnapshotPush(_Strict):
    """An instance's every key per tier (its management API's ``/v1/snapshot``)."""

    instance: Name
    namespace: str = Field(max_length=256)
    chunk_size: int = Field(gt=0, le=1 << 20)
    tiers: dict[TierName, list[HexKey]] = Field(max_length=8)


class EventBatch(_Strict):
    seq: int = Field(ge=0, lt=1 << 64)
    payload: str = Field(max_length=MAX_EVENT_B64, description="base64 msgpack KVEventBatch")


class EventsPush(_Strict):
    """KV event batches an instance's relay forwards (its topic is its own)."""

    instance: Name
    batches: list[EventBatch] = Field(max_length=256)


class Instance(BaseModel):
    instance: str
    url: Optional[str]
    model: str
    namespace: str
    layout: str
    chunk_size: int
    tiers: list[str]
    control: Optional[str]
    transfer: Optional[str]
    topic: str
    age_s: float = Field(description="seconds since its last heartbeat")
    chunks: dict[str, int] = Field(default_factory=dict, description="chunks indexed per tier")


class Instances(BaseModel):
    instances: list[Instance]


class Lookup(_Strict):
    """Which instance holds how much of a prompt."""

    model: Name
    prompt: Optional[str] = Field(None, max_length=MAX_TOKENS)
    token_ids: Optional[list[TokenId]] = Field(None, max_length=MAX_TOKENS)
    salt: Optional[str] = Field(None, max_length=1024)

    @model_validator(mode="after")
    def _one_prompt(self) -> Lookup:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give either 'prompt' (a string) or 'token_ids'")
        return self


class Cached(BaseModel):
    instance: str
    url: Optional[str]
    cached_tokens: int = Field(description="longest prefix held in any tier, in tokens")
    tiers: dict[str, int] = Field(description="prefix held in each tier, in tokens")


class LookupResult(BaseModel):
    prompt_tokens: int
    instances: list[Cached] = Field(description="every live instance of the model, best first")


class Locate(_Strict):
    keys: list[HexKey] = Field(max_length=MAX_KEYS)
    exclude: Optional[str] = Field(None, max_length=256)


class Holder(BaseModel):
    instance: str
    transfer: str
    chunks: int = Field(description="number of leading keys it holds (any tier)")
    tiers: dict[str, int] = Field(description="leading keys held in each tier")


class Located(BaseModel):
    holders: list[Holder]


class Ok(BaseModel):
    status: str = "ok"
