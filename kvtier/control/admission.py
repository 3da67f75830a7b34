"""Layer 7: what ``admit`` checks before a chunk from outside is stored.

A chunk is admitted under a key derived *here*, from the prompt's tokens and
salt with this instance's hasher, so it can only land in this instance's
namespace. Before anything is stored, each chunk must:

- have a valid header (magic, version, header checksum) naming that key: a
  chunk made in another namespace (model, layout, salt, TP rank...) names
  another key and is refused;
- be of this engine's KV dtype and of the chunk shape the layout gives for
  that chunk of the prompt (a partial last chunk has fewer blocks);
- have a payload whose checksum matches and whose decoded size is exactly
  the layout's: a compressed payload is decoded with a bound on its output,
  so a decompression bomb stops at the expected size plus one byte.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from kvtier.codecs import (HEADER_SIZE, ChunkData, ChunkMeta, Codec, decompress, parse_header,
                           verify_payload)
from kvtier.engine.layout import PagedLayout
from kvtier.errors import CorruptChunk
from kvtier.keys import ChunkHasher, ChunkKey


class Refused(ValueError):
    """A chunk that must not be stored; the message names the field and the reason."""


@dataclass(frozen=True)
class ChunkShape:
    """What this instance's chunk number ``index`` of a prompt must look like."""

    meta: ChunkMeta

    @classmethod
    def expected(cls, layout: PagedLayout, hasher: ChunkHasher, index: int,
                 num_tokens: int) -> ChunkShape:
        """Shape of chunk ``index`` of a ``num_tokens`` prompt in ``layout``."""
        tokens = hasher.chunk_tokens(index, num_tokens)
        blocks = -(-tokens // layout.block_size)
        return cls(ChunkMeta(layout.dtype, layout.chunk_shape(blocks)))


def decode_b64(field: str, data: str, max_bytes: int) -> bytes:
    """Strict base64 (no stray characters) of at most ``max_bytes`` decoded bytes."""
    if len(data) > 4 * (-(-max_bytes // 3)):
        raise Refused(f"{field}: larger than a chunk of this instance ({max_bytes} bytes)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(f"{field}: not base64") from None


def admit_chunk(field: str, key: ChunkKey, blob: bytes, want: ChunkShape,
                lossy_ok: bool = False) -> ChunkData:
    """The checked chunk (payload as given: raw or compressed), or :class:`Refused`.
    A chunk in a lossy codec is refused unless ``lossy_ok`` (the caller's ``lossy: true``)."""
    try:
        header = parse_header(key, blob)
    except CorruptChunk as exc:
        reason = str(exc).split(": ", 1)[-1]
        if "names key" in reason:
            reason = "made for another namespace, prompt or chunk (its header names " \
                     "another key)"
        raise Refused(f"{field}: {reason}") from None
    meta = header.meta
    if (meta.dtype, meta.shape) != (want.meta.dtype, want.meta.shape):
        raise Refused(f"{field}: {meta.dtype} {list(meta.shape)} does not match this "
                      f"instance's layout ({want.meta.dtype} {list(want.meta.shape)})")
    if meta.codec.lossy and not lossy_ok:
        raise Refused(f"{field}: encoded with {meta.codec.name.lower()}, a lossy codec (hits "
                      "would differ from the engine's own KV); send lossy: true to accept it")
    payload = np.frombuffer(blob, dtype=np.uint8)[HEADER_SIZE:]
    try:
        verify_payload(key, header, payload)
    except CorruptChunk as exc:
        raise Refused(f"{field}: {str(exc).split(': ', 1)[-1]}") from None
    if meta.codec is not Codec.RAW:
        # Decoded once here, bounded by the header's shape (checked above against the
        # layout): a bomb never expands past it, and garbage is refused now, not at load.
        try:
            decompress(ChunkData(meta, payload))
        except CorruptChunk as exc:
            raise Refused(f"{field}: {str(exc).split(': ', 1)[-1]}") from None
        except (ImportError, ValueError) as exc:
            raise Refused(f"{field}: codec {meta.codec.name.lower()} cannot be decoded "
                          f"here ({exc})") from None
    return ChunkData(meta, payload.copy())
