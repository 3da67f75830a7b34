"""Layer 7: the controller's requests and responses, as pydantic models.

``/v1/locate``'s shape is a fixed contract: the peer tier (``kvtier/tiers/peer/tier.py``)
calls it. Unknown fields are errors (400 naming them), like the management API.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvtier.control.models import MAX_KEYS, MAX_TOKENS, HexKey, TokenId

Name = Annotated[str, Field(min_length=1, max_length=256)]
Url = Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
HostPort = Annotated[str, Field(pattern=r"^[^\s:]+:[0-9]{1,5}$|^\[[0-9a-fA-F:]+\]:[0-9]{1,5}$",
                                max_length=300, description="host:port")]


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
    control: Optional[Url] = Field(None, description="management API URL (for resyncs)")
    transfer: Optional[HostPort] = None
    topic: Optional[str] = Field(None, max_length=256,
                                 description="its KV events topic (default: the instance id)")
    tokenizer: Optional[str] = Field(None, max_length=4096, description="a local tokenizer path")


class InstanceRef(_Strict):
    instance: Name


class Registered(BaseModel):
    instance: str
    ttl_s: float
    heartbeat_s: float
    events: Optional[str] = Field(None, description="where to publish KV events (ZMQ)")
    topic: str


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
