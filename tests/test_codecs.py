"""Chunk format: self-describing header, checksums, corruption detected, no pickle."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.codecs import (HEADER_SIZE, ChunkData, ChunkMeta, Codec, compress, decode,
                           decompress, encode)
from kvtier.errors import CorruptChunk, ForeignChunk
from tests.tier_conformance import as_version

KEY = bytes(range(16))


def blob(meta: ChunkMeta, payload: np.ndarray) -> bytes:
    return b"".join(bytes(b) for b in encode(KEY, ChunkData(meta, payload)))


def sample() -> tuple[ChunkMeta, np.ndarray]:
    payload = np.random.default_rng(0).integers(0, 256, 2 * 3 * 4 * 2, dtype=np.uint8)
    return ChunkMeta("bfloat16", (2, 3, 4)), payload


def test_round_trip_is_zero_copy_view() -> None:
    meta, payload = sample()
    data = bytearray(blob(meta, payload))
    out = decode(KEY, data)
    assert out.meta == meta and np.array_equal(out.payload, payload)
    data[HEADER_SIZE] ^= 0  # a view of the buffer, not a copy
    assert np.shares_memory(out.payload, np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize("offset", [0, 5, 20, 40, HEADER_SIZE, HEADER_SIZE + 7, -1])
def test_any_flipped_byte_is_detected(offset: int) -> None:
    meta, payload = sample()
    data = bytearray(blob(meta, payload))
    data[offset] ^= 0xFF
    with pytest.raises(CorruptChunk):
        decode(KEY, data)


def test_wrong_key_truncated_and_garbage() -> None:
    meta, payload = sample()
    data = blob(meta, payload)
    with pytest.raises(CorruptChunk, match="names key"):
        decode(bytes(16), data)
    with pytest.raises(CorruptChunk):
        decode(KEY, data[:-1])
    with pytest.raises(CorruptChunk, match="shorter than a header"):
        decode(KEY, b"hello")
    with pytest.raises(CorruptChunk):
        decode(KEY, bytes(HEADER_SIZE + 48))


def test_unsupported_meta_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode(KEY, ChunkData(ChunkMeta("complex64", (1,)), np.zeros(8, np.uint8)))


def test_zlib_codec_is_lossless() -> None:
    meta = ChunkMeta("float32", (256,))
    payload = np.zeros(1024, dtype=np.uint8)
    c = compress(ChunkData(meta, payload))
    assert c.meta.codec is Codec.ZLIB and c.payload.nbytes < payload.nbytes
    back = decode(KEY, blob(c.meta, c.payload))
    assert np.array_equal(decompress(back).payload, payload)


def test_another_format_version_is_foreign_not_corrupt() -> None:
    meta, payload = sample()
    data = blob(meta, payload)
    newer = as_version(data[:HEADER_SIZE], 2) + data[HEADER_SIZE:]
    with pytest.raises(ForeignChunk, match="v2"):
        decode(KEY, newer)
    assert as_version(data[:HEADER_SIZE], 1) == data[:HEADER_SIZE]  # the helper is exact


@pytest.mark.parametrize("offset", [4, 5])
def test_damaged_version_field_is_corruption_not_another_version(offset: int) -> None:
    meta, payload = sample()
    data = bytearray(blob(meta, payload))
    data[offset] ^= 0x02  # our header, version bits flipped, checksum left as written
    with pytest.raises(CorruptChunk) as err:
        decode(KEY, data)
    assert not isinstance(err.value, ForeignChunk)
    data[0] ^= 0xFF  # not even our magic: corrupt
    with pytest.raises(CorruptChunk, match="not a kvtier chunk"):
        decode(KEY, data)
