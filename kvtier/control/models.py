"""Layer 7: the management API's requests and responses, as pydantic models.

They are the API's contract: FastAPI validates every body against them (a bad
field answers 400 naming it) and publishes them at ``/openapi.json``, which the
fuzz test drives requests from. Field names are those the README documents.

Chunks are named by a prompt (``tokens``, with an optional tenant ``salt``),
hashed with the hasher the engine uses (so every key input the engine folds
in applies here too), or by hex ``keys``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvtier.keys import KEY_BYTES

MAX_TOKENS = 1 << 22
"""Tokens in one request: far beyond any context window, far below a memory problem."""
MAX_KEYS = 1 << 16

TokenId = Annotated[int, Field(ge=0, lt=2**32)]
HexKey = Annotated[str, Field(pattern=f"^[0-9a-fA-F]{{{2 * KEY_BYTES}}}$",
                              description=f"a chunk key: {2 * KEY_BYTES} hex digits")]
TierField = Annotated[Optional[str], Field(
    default=None, max_length=64, description="a tier name (see /v1/status); none: every tier")]


class Codec(str, enum.Enum):
    """Codecs ``compress`` can apply: lossless ones, and lossy ones on request."""

    ZSTD = "zstd"
    LZ4 = "lz4"
    ZLIB = "zlib"
    Q8 = "q8"
    """lossy: needs ``lossy: true``"""
    Q4 = "q4"
    """lossy: needs ``lossy: true``"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Chunks(_Strict):
    """Which chunks: a prompt's (``tokens`` + ``salt``) or explicit ``keys``."""

    tokens: Optional[list[TokenId]] = Field(None, max_length=MAX_TOKENS)
    salt: Optional[str] = Field(None, max_length=1024, description="tenant salt (cache_salt)")
    keys: Optional[list[HexKey]] = Field(None, max_length=MAX_KEYS)

    @model_validator(mode="after")
    def _one_address(self) -> Chunks:
        if (self.tokens is None) == (self.keys is None):
            raise ValueError("give either 'tokens' (with an optional 'salt') or 'keys'")
        if self.keys is not None and self.salt is not None:
            raise ValueError("'salt' applies to 'tokens' only")
        return self


class InTier(Chunks):
    """Chunks, optionally in one tier."""

    tier: TierField


class MoveRequest(Chunks):
    """Move chunks between two tiers."""

    from_: str = Field(alias="from", max_length=64)
    to: str = Field(max_length=64)
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PinRequest(Chunks):
    """Pin memory-tier chunks, for ever or for ``ttl_s`` seconds."""

    ttl_s: Optional[float] = Field(None, gt=0, le=10 * 365 * 86400,
                                   description="release the pin by itself after this long")


class RecodeRequest(Chunks):
    """Re-encode the chunks of one tier."""

    tier: str = Field(max_length=64)


class CompressRequest(RecodeRequest):
    """Compress the chunks of one tier (lossless by default)."""

    codec: Codec = Codec.ZSTD
    lossy: bool = Field(False, description="accept a lossy codec (q8, q4): outputs change")


class ClearRequest(_Strict):
    """Empty one tier, or every tier."""

    tier: TierField


class ResumeRequest(_Strict):
    """Put a tier the canary took out of service back in service, or every such tier."""

    tier: TierField


class AdmitChunk(_Strict):
    """One encoded chunk (128-byte header + payload, as the disk tier writes it)."""

    index: int = Field(ge=0, lt=MAX_KEYS, description="which chunk of the prompt")
    data: str = Field(description="the encoded chunk, base64")


class AdmitRequest(_Strict):
    """Chunks of a prompt computed elsewhere. Keys are derived here from ``tokens`` and
    ``salt``, so a chunk can only land under this instance's own namespace."""

    tokens: list[TokenId] = Field(max_length=MAX_TOKENS)
    salt: Optional[str] = Field(None, max_length=1024)
    chunks: list[AdmitChunk] = Field(min_length=1, max_length=4096)
    tier: TierField
    lossy: bool = Field(False, description="accept chunks in a lossy codec (q8, q4): this "
                        "instance then serves lossy KV for them")


# -- responses -------------------------------------------------------------------


class LookupResult(BaseModel):
    """How much of a prompt is cached, and where each chunk lives."""

    chunks: int
    keys: list[str]
    tiers: dict[str, list[bool]]
    hit_chunks: int
    hit_tokens: Optional[int] = Field(description="by tokens: what a load would give the "
                                                  "engine; by keys: null")
    hit_keys: Optional[list[str]] = None


class Removed(BaseModel):
    """Copies deleted."""

    removed: int


class Moved(BaseModel):
    """Chunks moved."""

    moved: int


class Pinned(BaseModel):
    """Chunks found in memory and pinned."""

    pinned: int
    expires_in_s: Optional[float] = None


class Unpinned(BaseModel):
    """Pins released (one per key pinned through this API)."""

    unpinned: int
    ok: bool = True


class Recoded(BaseModel):
    """Chunks re-encoded."""

    recoded: int


class Resumed(BaseModel):
    """Tiers put back in service (those that were out of it)."""

    resumed: list[str]


class Admitted(BaseModel):
    """Chunks the store holds afterwards."""

    admitted: int


class TierStatus(BaseModel):
    """Usage and counters of one tier."""

    used_bytes: int
    capacity_bytes: int
    num_chunks: int
    puts: int
    put_bytes: int
    hits: int
    misses: int
    get_bytes: int
    evictions: int
    corrupt: int
    errors: int
    dropped: int
    foreign: int = Field(0, description="chunks of another format version (misses, kept)")
    forged: int = Field(0, description="chunks without a valid MAC under the cluster's "
                        "integrity key (misses, deleted)")
    write_queue: Optional[int] = Field(None, description="chunks waiting for its writer")


class Status(BaseModel):
    """The instance's namespace and every tier's state."""

    namespace: str
    chunk_size: int
    pinned_chunks: int
    tiers: dict[str, TierStatus]
    out_of_service: list[str] = Field(default_factory=list, description="tiers the canary "
                                      "took out of service (not read) until resumed")
    verify_checks: int = Field(0, description="stored copies the canary compared")
    verify_mismatches: dict[str, int] = Field(default_factory=dict, description="per tier: "
                                              "copies that were not the engine's KV")


class Snapshot(BaseModel):
    """Every chunk each tier holds now (hex keys): a KV-event consumer that missed
    events resyncs from this, then follows the stream again."""

    namespace: str
    chunk_size: int
    tiers: dict[str, list[str]]


class Health(BaseModel):
    """Liveness."""

    status: str = "ok"


class Error(BaseModel):
    """Why a request failed: ``<field>: <problem>``."""

    error: str
