"""Layer 3: how the Redis tier lays a chunk out in Redis values.

A chunk is stored as the codecs layer frames it (128-byte header, then the
payload) under ``<prefix><hex key>``. A chunk larger than ``max_value_bytes``
is split: the head value holds the header and the first bytes of the payload;
``<head>:1``, ``<head>:2``... hold the rest. A reader computes the number of
parts from the payload length in the header and the writer's part size from
the head's length, so instances configured with different sizes agree.
"""

from __future__ import annotations

import numpy as np

from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMac, parse_header, verify_payload
from kvtier.codecs.format import Header
from kvtier.errors import CorruptChunk
from kvtier.keys import KEY_BYTES, ChunkKey

MIN_VALUE = 1024
"""Smallest ``max_value_bytes`` the config allows: a shorter head of a split chunk is bad."""
PART_TTL_MARGIN_S = 60
"""Parts outlive their head by this much, so a head never expires before its parts."""
_TTL_SLOP_MS = 5000  # a head and its parts get their expiries one round trip apart


def same_write(head_pttl: object, part_pttl: object) -> bool:
    """Whether a part's expiry (PTTL, ms; -1 none) is what the head's writer gives its
    parts once the head is written: none when the head has none, else the head's plus
    :data:`PART_TTL_MARGIN_S`. A part still on its orphan expiry belongs to a write in
    progress (or to a writer that died), not to this head.
    """
    if not isinstance(head_pttl, int) or not isinstance(part_pttl, int):
        return False
    if head_pttl < 0:
        return part_pttl < 0
    return abs(part_pttl - head_pttl - PART_TTL_MARGIN_S * 1000) <= _TTL_SLOP_MS


class ValueLayout:
    """Names and values of chunks under ``prefix``, split at ``max_value_bytes``; with
    ``mac`` (the cluster's integrity key), chunks are verified against their MAC."""

    def __init__(self, prefix: bytes, max_value_bytes: int, mac: ChunkMac | None = None) -> None:
        self.prefix = prefix
        self.mac = mac
        self.max_value = max_value_bytes
        self.first = max_value_bytes - HEADER_SIZE  # payload bytes in the head value

    def head(self, key: ChunkKey) -> bytes:
        """Name of a chunk's head value."""
        return self.prefix + key.hex().encode()

    @staticmethod
    def part(head: bytes, i: int) -> bytes:
        """Name of part ``i`` (from 1) of the chunk whose head is ``head``."""
        return head + b":%d" % i

    def split(self, header: bytes, payload: memoryview) -> list[list[bytes | memoryview]]:
        """The buffers of the head value, then of each part (views, not copies)."""
        out: list[list[bytes | memoryview]] = [[header, payload[:self.first]]]
        m = self.max_value
        out += [[payload[start:start + m]] for start in range(self.first, payload.nbytes, m)]
        return out

    def parse_head(self, key: ChunkKey, value: bytes, check: bool = True
                   ) -> tuple[Header, ChunkData | None]:
        """The header of a head value, and the whole chunk when it is not split (its
        payload verified unless ``check`` is False: the caller checks the MAC).

        Raises CorruptChunk for a value that cannot be this chunk's head.
        """
        header = parse_header(key, value)
        rest = header.payload_len - (len(value) - HEADER_SIZE)
        if rest < 0 or (rest > 0 and len(value) < MIN_VALUE):
            raise CorruptChunk(f"chunk {key.hex()}: head value of {len(value)} bytes")
        if rest:
            return header, None
        payload = np.frombuffer(value, dtype=np.uint8, offset=HEADER_SIZE)
        if check:
            verify_payload(key, header, payload, self.mac)
        return header, ChunkData(header.meta, payload)

    @staticmethod
    def num_parts(header: Header, head: bytes) -> int:
        """How many parts follow ``head`` (the writer's part size is the head's length)."""
        return -(-(header.payload_len - len(head) + HEADER_SIZE) // len(head))

    def join(self, key: ChunkKey, header: Header, head: bytes, parts: list[bytes]) -> ChunkData:
        """The chunk from its head and parts, copied once into one buffer and verified."""
        m, pos = len(head), len(head) - HEADER_SIZE
        payload = np.empty(header.payload_len, dtype=np.uint8)
        payload[:pos] = np.frombuffer(head, dtype=np.uint8, offset=HEADER_SIZE)
        for p in parts:
            if len(p) != min(m, header.payload_len - pos):
                raise CorruptChunk(f"chunk {key.hex()}: part of {len(p)} bytes")
            payload[pos:pos + len(p)] = np.frombuffer(p, dtype=np.uint8)
            pos += len(p)
        verify_payload(key, header, payload, self.mac)
        return ChunkData(header.meta, payload)

    def scan_pattern(self) -> bytes:
        """SCAN pattern of every head value under the prefix (parts do not match)."""
        return _glob_escape(self.prefix) + b"?" * (2 * KEY_BYTES)

    def key_of(self, name: bytes) -> ChunkKey | None:
        """The key of a head value's name, or None for a name that is not one."""
        try:
            return ChunkKey(bytes.fromhex(name[len(self.prefix):].decode("ascii")))
        except ValueError:
            return None  # same prefix and length, not hex: not one of ours


def _glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob characters, so a prefix matches only itself."""
    out = bytearray()
    for c in raw:
        if c in b"*?[]\\":
            out += b"\\"
        out.append(c)
    return bytes(out)
