"""Layer 2: the self-describing chunk format on disk and on the wire.

A stored chunk is a fixed 128-byte header followed by the payload::

    magic "KVTC" | version u16 | codec u8 | dtype u8 | ndim u8 | flags u8 | 2 pad
    payload_len u64 | payload xxh3-64 u64 | key 16 bytes | shape 8 x u32
    header xxh32 u32 | MAC 32 bytes (flag MAC) or zeros | zero padding to 128 bytes

The payload starts 128 bytes in, so it stays aligned for any dtype. Every
read checks magic, version, key, lengths and both checksums; anything off is
a :class:`CorruptChunk`. Parsing only: nothing read is ever unpickled.

Keyed integrity (:mod:`kvtier.codecs.integrity`): a chunk written by a process
holding the cluster's key has flag ``FLAG_MAC`` and a keyed MAC (AES-256-GMAC: nonce,
tag and the algorithm's name, 32 bytes) of its
first 80 header bytes (everything a reader interprets, the flags and the
payload checksum included) and its payload in bytes 80-112, formerly padding.
Version 1 readers that predate the flag ignore both (the flags byte was
padding they skip), so a chunk with a MAC reads anywhere; a reader with the
key verifies the MAC *instead of* the payload checksum (the MAC covers the
same bytes), and a chunk without one, or with a wrong one, is a
:class:`ForgedChunk` (a :class:`CorruptChunk` when its checksum fails too:
damage, not forgery).

Every format version keeps the magic and the version (u16) in its first six
bytes, whatever follows. A header with our magic and another version is a
:class:`ForeignChunk` (a miss that is left in place: another kvtier release
wrote it), unless it is one of ours with a damaged version field (the header
checksum matches with our version put back), which is corruption. A
well-formed header naming a codec id this release does not know is foreign
too: adding a codec needs no new format version, and so is one with a flag bit
this release does not know.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import xxhash

from kvtier.errors import CorruptChunk, ForeignChunk
from kvtier.keys import KEY_BYTES, ChunkKey

if TYPE_CHECKING:
    from kvtier.codecs.integrity import ChunkMac

MAGIC = b"KVTC"
FORMAT_VERSION = 1
HEADER_SIZE = 128
MAX_DIMS = 8
_FIXED = struct.Struct(f"<4sHBBBB2xQQ{KEY_BYTES}s{MAX_DIMS}I")
_HCRC = struct.Struct("<I")
SIGNED_SIZE = _FIXED.size + _HCRC.size
"""Header bytes a MAC covers (with the payload): everything a reader interprets."""
MAC_SIZE = 32
FLAG_MAC = 1
"""Flags bit: a keyed MAC follows the header checksum (bytes ``SIGNED_SIZE`` on)."""
_KNOWN_FLAGS = FLAG_MAC
_VERSION = struct.Struct("<4sH")  # what every format version starts with

DTYPES: dict[str, tuple[int, int]] = {  # name -> (wire id, item size)
    "float32": (1, 4), "float16": (2, 2), "bfloat16": (3, 2), "uint8": (4, 1),
    "int8": (5, 1), "float64": (6, 8), "float8_e4m3fn": (7, 1), "float8_e5m2": (8, 1),
    "int16": (9, 2), "int32": (10, 4), "int64": (11, 8),
}
_DTYPE_BY_ID = {wire: name for name, (wire, _) in DTYPES.items()}


class Codec(enum.IntEnum):
    """How a payload's bytes encode the tensor (see :mod:`kvtier.codecs.compress`).

    Ids are never reused. A reader meeting an id it does not know (a later
    release's codec) treats the chunk as foreign: a miss left in place.
    """

    RAW = 0
    ZLIB = 1
    ZSTD = 2
    """Lossless: bytes shuffled by significance (all high bytes, then ...), then zstd."""
    LZ4 = 3
    """Lossless: bytes shuffled as for ZSTD, then an lz4 block (faster, larger)."""
    Q8 = 4
    """Lossy: K per channel, V per token, 8-bit min/step quantization, then zstd."""
    Q4 = 5
    """Lossy: as Q8 with 4 bits."""

    @property
    def lossy(self) -> bool:
        """Whether decoding gives other bytes than the engine computed."""
        return self in (Codec.Q8, Codec.Q4)

    @property
    def lossless(self) -> bool:
        """Whether decoding gives back the exact bytes that were encoded."""
        return self not in (Codec.Q8, Codec.Q4)


@dataclass(frozen=True)
class ChunkMeta:
    """What a payload is: tensor dtype and shape, and the codec of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    codec: Codec = Codec.RAW

    @property
    def raw_nbytes(self) -> int:
        """Size of the decoded tensor in bytes."""
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass
class ChunkData:
    """A chunk's payload and meta, as a tier hands it out.

    ``payload`` is a 1-D uint8 array that may be a view of a tier's pooled
    buffer; the holder must call :meth:`release` when done so the buffer can
    be reused (a no-op for tiers that hand out private copies).
    """

    meta: ChunkMeta
    payload: np.ndarray
    _release: Callable[[], None] | None = None

    def release(self) -> None:
        """Give the payload's buffer back to its tier. Idempotent."""
        if self._release is not None:
            fn, self._release = self._release, None
            fn()


def check_meta(meta: ChunkMeta) -> None:
    """Raise ValueError for a meta that cannot be encoded."""
    if meta.dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {meta.dtype!r}")
    if len(meta.shape) > MAX_DIMS or any(d < 0 or d >= 2**32 for d in meta.shape):
        raise ValueError(f"unsupported shape {meta.shape}")


def encode_header(key: ChunkKey, meta: ChunkMeta, payload: np.ndarray | memoryview,
                  mac: ChunkMac | None = None) -> bytes:
    """The 128-byte header for ``payload`` (checksummed here; with ``mac``, signed too:
    call it where the chunk leaves the process, off the engine's thread)."""
    check_meta(meta)
    view = memoryview(payload).cast("B")
    shape = list(meta.shape) + [0] * (MAX_DIMS - len(meta.shape))
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, int(meta.codec), DTYPES[meta.dtype][0],
                        len(meta.shape), FLAG_MAC if mac is not None else 0, view.nbytes,
                        xxhash.xxh3_64_intdigest(view), key, *shape)
    head = fixed + _HCRC.pack(xxhash.xxh32_intdigest(fixed))
    if mac is not None:
        head += mac.sign(head, view)
    return head + bytes(HEADER_SIZE - len(head))


@dataclass(frozen=True)
class Header:
    """A parsed, verified header."""

    meta: ChunkMeta
    payload_len: int
    checksum: int
    mac: bytes | None = None
    """The keyed MAC the writer put in the header (flag ``FLAG_MAC``); None without one."""
    signed: bytes = b""
    """The header bytes the MAC covers (with the payload)."""


def parse_header(key: ChunkKey, buf: bytes | memoryview | np.ndarray) -> Header:
    """Parse and check the header at the start of ``buf``.

    Raises :class:`ForeignChunk` for another format version, :class:`CorruptChunk`
    for anything else that is off.
    """
    view = memoryview(buf).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise CorruptChunk(f"chunk {key.hex()}: {view.nbytes} bytes, shorter than a header")
    fixed = view[:_FIXED.size]
    (hcrc,) = _HCRC.unpack_from(view, _FIXED.size)
    # Version before checksum: another version's header has its own layout,
    # so our checksum says nothing about it.
    magic, version = _VERSION.unpack_from(view)
    if magic != MAGIC:
        raise CorruptChunk(f"chunk {key.hex()}: not a kvtier chunk")
    if version != FORMAT_VERSION and not _own_with_bad_version(fixed, hcrc):
        raise ForeignChunk(f"chunk {key.hex()}: kvtier format v{version}, "
                           f"this release reads v{FORMAT_VERSION}")
    if xxhash.xxh32_intdigest(fixed) != hcrc:
        raise CorruptChunk(f"chunk {key.hex()}: header checksum mismatch")
    magic, version, codec, dtype_id, ndim, flags, plen, csum, hkey, *shape = _FIXED.unpack(fixed)
    if hkey != key:
        raise CorruptChunk(f"chunk {key.hex()}: header names key {hkey.hex()}")
    if dtype_id not in _DTYPE_BY_ID or ndim > MAX_DIMS:
        raise CorruptChunk(f"chunk {key.hex()}: unknown dtype or rank")
    if codec not in Codec._value2member_map_:  # checksum good: a later release's codec
        raise ForeignChunk(f"chunk {key.hex()}: codec id {codec}, unknown to this release")
    if flags & ~_KNOWN_FLAGS:  # checksum good: a later release's flag
        raise ForeignChunk(f"chunk {key.hex()}: header flags {flags:#x}, unknown to this release")
    meta = ChunkMeta(_DTYPE_BY_ID[dtype_id], tuple(shape[:ndim]), Codec(codec))
    if meta.codec is Codec.RAW and plen != meta.raw_nbytes:
        raise CorruptChunk(f"chunk {key.hex()}: payload length {plen} != shape size")
    if flags & FLAG_MAC:
        return Header(meta, plen, csum, bytes(view[SIGNED_SIZE:SIGNED_SIZE + MAC_SIZE]),
                      bytes(view[:SIGNED_SIZE]))
    return Header(meta, plen, csum)


def _own_with_bad_version(fixed: memoryview, hcrc: int) -> bool:
    """A header of ours whose version field alone was damaged: corruption, not another version."""
    ours = bytearray(fixed)
    _VERSION.pack_into(ours, 0, MAGIC, FORMAT_VERSION)
    return xxhash.xxh32_intdigest(bytes(ours)) == hcrc


def verify_payload(key: ChunkKey, header: Header, payload: np.ndarray | memoryview,
                   mac: ChunkMac | None = None) -> None:
    """Raise CorruptChunk unless ``payload`` has the header's length and checksum; with
    ``mac`` (the cluster's key), ForgedChunk unless it also carries a valid MAC."""
    view = memoryview(payload).cast("B")
    if view.nbytes != header.payload_len:
        raise CorruptChunk(f"chunk {key.hex()}: {view.nbytes} payload bytes, "
                           f"header says {header.payload_len}")
    if mac is not None:
        mac.verify(key, header, view)  # a valid MAC covers what the checksum does
    elif xxhash.xxh3_64_intdigest(view) != header.checksum:
        raise CorruptChunk(f"chunk {key.hex()}: payload checksum mismatch")


def checksum_ok(header: Header, payload: memoryview) -> bool:
    """Whether ``payload`` has the header's payload checksum (tells damage from forgery)."""
    return xxhash.xxh3_64_intdigest(payload) == header.checksum


def decode(key: ChunkKey, buf: bytes | bytearray | memoryview | np.ndarray,
           mac: ChunkMac | None = None) -> ChunkData:
    """Header + payload bytes -> ChunkData whose payload is a view of ``buf`` (no copy)."""
    header = parse_header(key, buf)
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    payload = arr[HEADER_SIZE:]
    verify_payload(key, header, payload, mac)
    return ChunkData(header.meta, payload)


def encode(key: ChunkKey, chunk: ChunkData, mac: ChunkMac | None = None
           ) -> list[bytes | memoryview]:
    """Header and payload as two buffers, for writev / pipelined sends without a join."""
    return [encode_header(key, chunk.meta, chunk.payload, mac),
            memoryview(chunk.payload).cast("B")]
