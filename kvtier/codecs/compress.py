"""Layer 2: payload codecs behind one interface: :func:`compress` and :func:`decompress`.

A chunk's header records its codec, dtype and shape, so any reader decodes
any chunk whatever codec it is configured to write. Which codec to choose:

| codec | kind | what | on real KV (``kvtier bench codecs``) |
|---|---|---|---|
| RAW | lossless | the engine's bytes | 1x, no work |
| ZLIB | lossless | zlib level 1 (the first release's codec) | ~1.3x, slow |
| ZSTD | lossless | byte shuffle + zstd level 1 | ~1.5x |
| LZ4 | lossless | byte shuffle + lz4 block | ~1.2x, fastest |
| Q8 | lossy | 8-bit K per channel / V per token + zstd | ~2x |
| Q4 | lossy | 4-bit, same groups | ~4x |

Decoders never allocate more than the header's shape says (``meta.raw_nbytes``);
bytes that do not decode to exactly that are :class:`CorruptChunk`.
"""

from __future__ import annotations

import numpy as np

from kvtier.codecs import lossless, quant
from kvtier.codecs.format import DTYPES, ChunkData, ChunkMeta, Codec
from kvtier.errors import CorruptChunk

_BITS = {Codec.Q8: 8, Codec.Q4: 4}


def check_codec(codec: Codec, meta: ChunkMeta) -> None:
    """Raise ValueError if ``codec`` cannot encode chunks like ``meta`` (lossy codecs
    understand one layout only: see :mod:`kvtier.codecs.quant`)."""
    if codec in _BITS:
        quant.check_layout(meta.dtype, meta.shape)


def compress(chunk: ChunkData, codec: Codec = Codec.ZLIB, level: int = 1) -> ChunkData:
    """A new, private ChunkData with the RAW payload of ``chunk`` encoded by ``codec``.

    ``level`` applies to ZLIB only. Raises ValueError for a chunk the codec
    cannot encode (a layout a lossy codec does not understand, non-finite values).
    """
    if chunk.meta.codec is not Codec.RAW:
        raise ValueError(f"chunk is already {chunk.meta.codec.name}")
    payload, meta = chunk.payload, chunk.meta
    if codec is Codec.RAW:
        return ChunkData(meta, payload.copy())
    item = DTYPES[meta.dtype][1]
    if codec is Codec.ZLIB:
        data = lossless.zlib_compress(payload, level)
    elif codec is Codec.ZSTD:
        data = lossless.zstd_compress(lossless.shuffle(payload, item))
    elif codec is Codec.LZ4:
        data = lossless.lz4_compress(lossless.shuffle(payload, item))
    elif codec in _BITS:
        data = lossless.zstd_compress(quant.quantize(payload, meta.dtype, meta.shape,
                                                     _BITS[codec]))
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return ChunkData(ChunkMeta(meta.dtype, meta.shape, codec), data)


def decompress(chunk: ChunkData) -> ChunkData:
    """A ChunkData with a RAW payload (the same object if it already is RAW).

    Raises :class:`CorruptChunk` when the payload does not decode to exactly
    the header's shape; never allocates more than that shape's size.
    """
    meta = chunk.meta
    if meta.codec is Codec.RAW:
        return chunk
    nbytes, item, data = meta.raw_nbytes, DTYPES[meta.dtype][1], chunk.payload
    if meta.codec is Codec.ZLIB:
        raw = lossless.zlib_decompress(data, nbytes)
    elif meta.codec is Codec.ZSTD:
        raw = lossless.unshuffle(lossless.zstd_decompress(data, nbytes), item)
    elif meta.codec is Codec.LZ4:
        raw = lossless.unshuffle(lossless.lz4_decompress(data, nbytes), item)
    elif meta.codec in _BITS:
        raw = _dequantize(data, meta, _BITS[meta.codec])
    else:
        raise ValueError(f"unknown codec {meta.codec!r}")
    return ChunkData(ChunkMeta(meta.dtype, meta.shape, Codec.RAW), raw)


def _dequantize(data: np.ndarray, meta: ChunkMeta, bits: int) -> np.ndarray:
    try:
        quant.check_layout(meta.dtype, meta.shape)
    except ValueError as exc:  # a checksummed header no encoder writes
        raise CorruptChunk(f"{meta.codec.name} chunk of a layout it cannot hold: {exc}") from None
    codes = lossless.zstd_decompress(data, quant.quantized_nbytes(meta.shape, bits))
    return quant.dequantize(codes, meta.dtype, meta.shape, bits)
