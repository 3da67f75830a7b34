"""Layer 2: payload codecs (lossless), used by the management API's compress."""

from __future__ import annotations

import zlib

import numpy as np

from kvtier.codecs.format import ChunkData, ChunkMeta, Codec


def compress(chunk: ChunkData, codec: Codec = Codec.ZLIB, level: int = 1) -> ChunkData:
    """A new, private ChunkData with the payload encoded by ``codec``."""
    if chunk.meta.codec is not Codec.RAW:
        raise ValueError(f"chunk is already {chunk.meta.codec.name}")
    if codec is Codec.RAW:
        return ChunkData(chunk.meta, chunk.payload.copy())
    if codec is Codec.ZLIB:
        data = zlib.compress(memoryview(chunk.payload), level)
        meta = ChunkMeta(chunk.meta.dtype, chunk.meta.shape, codec)
        return ChunkData(meta, np.frombuffer(data, dtype=np.uint8))
    raise ValueError(f"unknown codec {codec!r}")


def decompress(chunk: ChunkData) -> ChunkData:
    """A ChunkData with a RAW payload (the same object if it already is RAW)."""
    if chunk.meta.codec is Codec.RAW:
        return chunk
    if chunk.meta.codec is Codec.ZLIB:
        raw = zlib.decompress(memoryview(chunk.payload))
        meta = ChunkMeta(chunk.meta.dtype, chunk.meta.shape, Codec.RAW)
        if len(raw) != meta.raw_nbytes:
            raise ValueError("decompressed size does not match the chunk's shape")
        return ChunkData(meta, np.frombuffer(raw, dtype=np.uint8))
    raise ValueError(f"unknown codec {chunk.meta.codec!r}")
