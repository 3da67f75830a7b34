"""Layer 1: token ids -> chunk keys.

A chunk key is a chained hash: ``key[i] = H(key[i-1] || tokens of chunk i)``,
so a key names a chunk *and* everything before it. The chain is seeded by a
:class:`Namespace` digest, so any difference in model, KV layout, the engine's
page format, chunk size, hash version, tensor-parallel rank, pipeline stage,
LoRA adapter, codec class or tenant salts gives disjoint keys.

Keys never depend on Python's ``hash()`` or PYTHONHASHSEED: the same tokens
give the same keys in every process, on every machine.
"""

from __future__ import annotations

import json
import sys
from array import array
from dataclasses import asdict, dataclass, replace
from typing import NewType, Sequence

import numpy as np
import xxhash

ChunkKey = NewType("ChunkKey", bytes)
"""16 bytes of xxh3-128; ``key.hex()`` is its printable form."""

HASH_ALGORITHM = "xxh3_128"
HASH_VERSION = 2
"""2: the namespace gained page_format, codec_class and cache_salt (keys of 1 never match)."""
KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two chunks with equal tokens to be the same KV."""

    model_id: str
    layout: str
    """KV layout signature: layers, KV heads, head dim, dtype, paged layout."""
    chunk_size: int
    tp_rank: int = 0
    """This shard's tensor-parallel rank: each rank's KV heads are its own chunks."""
    tp_size: int = 1
    salt: str = ""
    """The instance's salt (``salt`` in kvtier's config): deployments with different
    salts never share KV, whatever their requests say."""
    pp_size: int = 1
    layer_start: int = 0
    """First layer of this pipeline stage (the layout gives the stage's layer count)."""
    lora: str = ""
    """Identity of the LoRA adapter (a digest of its files), "" for the base model."""
    page_format: str = ""
    """How the engine packs a page beyond the layout signature (vLLM-CPU: the attention
    ISA whose kernel writes the pages, e.g. ``amx`` or ``vec``)."""
    codec_class: str = "lossless"
    """``lossless``, or the lossy codecs this instance opted in to (``q8``): lossy KV is
    never keyed like the engine's own."""
    cache_salt: str = ""
    """The request's tenant salt (vLLM's ``cache_salt``), combined with ``salt``."""
    hash_algorithm: str = HASH_ALGORITHM
    hash_version: int = HASH_VERSION

    def with_salt(self, cache_salt: str | None) -> Namespace:
        """The same namespace for a request's tenant salt (the instance salt stays)."""
        return self.with_inputs(cache_salt, self.lora or None)

    def with_inputs(self, cache_salt: str | None, lora: str | None) -> Namespace:
        """The same namespace for a request's tenant salt and LoRA adapter; the
        instance's ``salt`` is kept, so two deployments never meet through a request."""
        cache_salt, lora = cache_salt or "", lora or ""
        if cache_salt == self.cache_salt and lora == self.lora:
            return self
        return replace(self, cache_salt=cache_salt, lora=lora)

    def seed(self) -> ChunkKey:
        """Digest of every field, canonically encoded (sorted JSON)."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return ChunkKey(xxhash.xxh3_128_digest(blob.encode("utf-8")))


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Little-endian uint32 bytes of the token ids: the hashed representation.

    A list (what vLLM holds) goes through ``array('I')``, about 4x faster than numpy's
    conversion of Python ints (it runs on vLLM's scheduler thread for every new prompt)."""
    if not isinstance(token_ids, np.ndarray) and _U32 is not None:
        try:
            packed = array(_U32, token_ids)
        except (OverflowError, TypeError):  # out of range or not ints: numpy says which
            pass
        else:
            if sys.byteorder == "big":
                packed.byteswap()
            return packed.tobytes()
    arr = np.asarray(token_ids)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False).tobytes()


_U32 = next((code for code in "IL" if array(code).itemsize == 4), None)


def _link(prev: ChunkKey, data: bytes) -> ChunkKey:
    """One step of the chain: the key of ``data`` (token bytes) after key ``prev``."""
    return ChunkKey(xxhash.xxh3_128_digest(prev + data))


class ChunkHasher:
    """Turns a prompt's token ids into the keys of its chunks.

    With ``store_partial`` the prompt's last, partial chunk gets a key too,
    over its whole ``granule``-token pieces (the engine's block size: an
    engine can only take KV back in whole blocks). Keys of the first ``n``
    tokens of a chunk (:meth:`sub_key`) are the same hash over fewer tokens,
    so a prompt that shares only the first blocks of another's last chunk
    finds them.
    """

    def __init__(self, namespace: Namespace, store_partial: bool = False,
                 granule: int = 1) -> None:
        if namespace.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {namespace.chunk_size}")
        if granule <= 0 or namespace.chunk_size % granule:
            raise ValueError(f"granule {granule} must divide chunk_size {namespace.chunk_size}")
        self.namespace = namespace
        self.chunk_size = namespace.chunk_size
        self.store_partial = store_partial
        self.granule = granule
        self._seed = namespace.seed()

    def adopt(self, namespace: Namespace) -> None:
        """Hash under ``namespace`` from now on, in place (every holder of this hasher: the
        management API, admissions, snapshots), e.g. the scheduler's namespace that a
        worker computed differently. Same chunk size only: the chunking is not changed."""
        if namespace.chunk_size != self.chunk_size:
            raise ValueError(f"chunk_size {namespace.chunk_size} is not this hasher's "
                             f"{self.chunk_size}")
        self._seed, self.namespace = namespace.seed(), namespace

    def with_salt(self, salt: str | None) -> ChunkHasher:
        """The same hasher for another tenant."""
        return self.with_inputs(salt, None)

    def with_inputs(self, salt: str | None, lora: str | None) -> ChunkHasher:
        """The same hasher for a request's tenant salt and LoRA adapter identity."""
        ns = self.namespace.with_inputs(salt, lora)
        return self if ns is self.namespace else ChunkHasher(ns, self.store_partial, self.granule)

    def covered(self, num_tokens: int) -> int:
        """Tokens of a ``num_tokens`` prompt that its keys cover."""
        full, rest = divmod(num_tokens, self.chunk_size)
        tail = rest - rest % self.granule if self.store_partial else 0
        return full * self.chunk_size + tail

    def num_chunks(self, num_tokens: int) -> int:
        """How many keys :meth:`keys` returns for ``num_tokens`` tokens."""
        return -(-self.covered(num_tokens) // self.chunk_size)

    def keys(self, token_ids: Sequence[int] | np.ndarray) -> list[ChunkKey]:
        """Keys of the prompt's chunks, in order (full chunks; the partial tail if enabled)."""
        data = token_bytes(token_ids)
        end = 4 * self.covered(len(data) // 4)
        step = 4 * self.chunk_size
        keys: list[ChunkKey] = []
        prev = self._seed
        for start in range(0, end, step):
            prev = _link(prev, data[start:min(start + step, end)])
            keys.append(prev)
        return keys

    def sub_key(self, keys: Sequence[ChunkKey], token_ids: Sequence[int], index: int,
                num_tokens: int) -> ChunkKey:
        """Key of the first ``num_tokens`` tokens of chunk ``index``, given the keys before it."""
        if not 0 < num_tokens <= self.chunk_size:
            raise ValueError(f"num_tokens {num_tokens} not in (0, {self.chunk_size}]")
        start = index * self.chunk_size
        if start + num_tokens > len(token_ids):
            raise ValueError(f"chunk {index} has fewer than {num_tokens} tokens")
        prev = keys[index - 1] if index else self._seed
        return _link(prev, token_bytes(token_ids[start:start + num_tokens]))

    def chunk_tokens(self, index: int, num_tokens: int) -> int:
        """Number of tokens chunk ``index`` covers in a prompt of ``num_tokens`` tokens."""
        return min(self.chunk_size, self.covered(num_tokens) - index * self.chunk_size)
