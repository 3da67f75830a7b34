"""The sections of kvtier's configuration: one dataclass per component.

Loaded and validated by :func:`kvtier.config.load_config`; each component receives
only its own section.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from kvtier.config.cluster import ControllerConfig, PeerConfig, TransferConfig
from kvtier.config.values import CodecName, TierName, WritePolicy, read_token
from kvtier.errors import ConfigError


@dataclass
class MemoryConfig:
    """The in-process memory tier: one pooled buffer, LRU."""

    max_bytes: int = 2 * 1024**3


@dataclass
class DiskConfig:
    """A folder of chunk files, local or shared between instances."""

    path: str = "~/.cache/kvtier/chunks"
    max_bytes: int = 20 * 1024**3
    write_queue: int = 256
    """Chunks waiting to be written; when full, new writes are dropped and counted."""
    fsync: bool = False
    """fsync each chunk file before its rename (durable across power loss, slower)."""
    read_pool_bytes: int = 256 * 1024**2
    """Released read buffers kept for reuse, so reads skip page faults; 0 keeps none."""
    codec: CodecName = CodecName.RAW
    """How chunks are encoded in files (see :class:`CodecName`); encoding runs on the
    writer threads, decoding on reads. q8 / q4 change outputs: opt in knowingly."""


@dataclass
class RedisConfig:
    """A Redis / Valkey server or cluster shared by many instances."""

    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    cluster: bool = False
    key_prefix: str = "kvtier:"
    ttl_s: int = 0
    """Expiry of stored chunks in seconds; 0 keeps them until Redis evicts them."""
    timeout_s: float = 1.0
    """Bound on every socket wait of reads, writes and management calls."""
    contains_timeout_s: float = 0.2
    """Bound on the socket waits of presence checks (asked on every scheduler lookup),
    so a hung server costs a lookup at most this."""
    max_value_bytes: int = 4 * 1024**2
    """Chunks above this are split over several Redis values."""
    orphan_part_ttl_s: int = 300
    """Parts of a split chunk are written with this expiry, lifted (or set to the chunk's
    ttl) once their head is written: parts whose writer died first are reclaimed."""
    write_queue: int = 256
    reconnect_backoff_s: float = 1.0
    """After a failure the server is not asked for this long, doubling on each failed
    retry up to ``reconnect_backoff_max_s`` (jittered); a success resets it."""
    reconnect_backoff_max_s: float = 30.0
    codec: CodecName = CodecName.RAW
    """How chunks are encoded in Redis values (see :class:`CodecName`)."""


@dataclass
class ControlConfig:
    """The management HTTP API (``kvtier.control``) inside the engine worker."""

    port: int = 0
    """TCP port on ``host``; 0 leaves the API off. Worker rank r listens on port + r."""
    host: str = "127.0.0.1"
    """Address to bind. Anything but a loopback address needs ``token`` or ``token_file``."""
    token: str = field(default="", repr=False)
    """Bearer token all but ``/health`` need ("": none). vLLM logs its extra config: prefer
    ``token_file`` or ``KVTIER_CONTROL__TOKEN``."""
    token_file: str = ""
    """A file holding the bearer token (surrounding whitespace ignored)."""
    max_body_bytes: int = 64 * 1024**2
    """Largest request body (admit carries whole chunks, base64); larger answers 413."""
    max_concurrency: int = 16
    """Connections and requests served at once; more are answered 503."""
    workers: int = 2
    """Threads that run operations on the store (the engine thread never waits on them)."""
    request_timeout_s: float = 30.0
    """Bound on each wait: for a body (408), a free worker (503), the operation (504)."""

    def resolve_token(self) -> str:
        """The configured token (from ``token`` or the file ``token_file``); "" if none."""
        return read_token("control", self.token, self.token_file)


@dataclass
class KvtierConfig:
    """All of kvtier's settings; see README "Configuration"."""

    chunk_size: int = 256
    store_partial_chunks: bool = True
    """Also store a prompt's last, partial chunk, in whole engine blocks (lookups then
    find the first blocks of a chunk where two prompts part)."""
    tiers: list[TierName] = field(default_factory=lambda: [TierName.MEMORY])
    write_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    model_id: str = ""
    """Overrides the engine's model name in the key namespace (e.g. a stable id)."""
    salt: str = ""
    async_loads: bool = True
    """A hit that is not all in the memory tier loads in the background (vLLM's
    asynchronous load API): the engine keeps running other requests meanwhile."""
    load_timeout_s: float = 10.0
    """An asynchronous load still running after this long is cut short: what has
    not arrived is recomputed."""
    prefetch: bool = True
    """Promote a new request's hit from lower tiers into memory before it is scheduled."""
    layerwise: bool = False
    """Move the loads done in the engine step one layer at a time, inside the
    forward pass (vLLM's ``wait_for_layer_load``), instead of all layers before
    it. Faster on a CUDA engine, slower on the CPU (see README)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)

    def check_block_size(self, block_size: int) -> None:
        """Raise unless chunks are whole engine blocks."""
        if block_size <= 0 or self.chunk_size % block_size:
            raise ConfigError("chunk_size", f"{self.chunk_size} is not a multiple of the "
                              f"engine's KV block size {block_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (enums as strings), loadable again by :func:`load_config`."""
        def conv(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, list):
                return [conv(x) for x in v]
            return v
        return {k: ({kk: conv(vv) for kk, vv in v.items()} if isinstance(v, dict) else conv(v))
                for k, v in dataclasses.asdict(self).items()}
