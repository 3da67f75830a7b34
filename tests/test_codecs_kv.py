"""Chunk codecs: lossless round trips bitwise, lossy ones within their documented bound,
layouts refused rather than guessed, and bad payloads a CorruptChunk, never a crash
or a large allocation."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvtier.codecs import (ChunkData, ChunkMeta, Codec, check_codec, compress, decode, decompress,
                           encode)
from kvtier.codecs import lossless, quant
from kvtier.codecs.format import encode_header
from kvtier.errors import CorruptChunk, ForeignChunk

KEY = bytes(range(16))
LOSSLESS = [Codec.ZLIB, Codec.ZSTD, Codec.LZ4]
LOSSY = {Codec.Q8: 8, Codec.Q4: 4}
DTYPES = ["bfloat16", "float16", "float32"]


def kv(shape: tuple[int, ...], dtype: str, seed: int = 0) -> ChunkData:
    """KV-like values: per-channel offsets and scales, a few large outliers."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape).astype(np.float32) * rng.uniform(0.1, 20, shape[-1])
    x += rng.normal(0, 5, shape[-1])
    x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 500))] *= 8
    return ChunkData(ChunkMeta(dtype, shape), quant.from_f32(x, dtype))


def wire(chunk: ChunkData) -> ChunkData:
    """Through the chunk format and back, as a tier would store it."""
    return decode(KEY, b"".join(bytes(b) for b in encode(KEY, chunk)))


@pytest.mark.parametrize("codec", LOSSLESS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 7), (2, 4, 2, 128, 128), (1, 1, 3, 5, 6)])
def test_lossless_round_trip_is_bitwise(codec: Codec, dtype: str, shape: tuple[int, ...]) -> None:
    raw = kv(shape, dtype)
    enc = compress(raw, codec)
    assert enc.meta.codec is codec and enc.meta.shape == shape
    back = decompress(wire(enc))
    assert back.meta == raw.meta and bytes(back.payload) == bytes(raw.payload)


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_odd_byte_counts_and_empty(codec: Codec) -> None:
    for payload in (np.arange(13, dtype=np.uint8), np.zeros(0, np.uint8)):
        raw = ChunkData(ChunkMeta("uint8", (payload.size,)), payload)
        assert bytes(decompress(wire(compress(raw, codec))).payload) == bytes(payload)


def test_shuffled_zstd_beats_plain_zstd_on_kv_like_bf16() -> None:
    raw = kv((2, 4, 2, 128, 128), "bfloat16")
    plain = lossless.zstd_compress(raw.payload).nbytes
    assert compress(raw, Codec.ZSTD).payload.nbytes < plain


@pytest.mark.parametrize("codec", list(LOSSY))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4), (2, 3, 2, 5, 12), (2, 4, 2, 128, 128)])
def test_lossy_round_trip_is_within_the_documented_bound(codec: Codec, dtype: str,
                                                         shape: tuple[int, ...]) -> None:
    raw = kv(shape, dtype, seed=1)
    back = decompress(wire(compress(raw, codec)))
    assert back.meta == raw.meta
    x = quant.to_f32(raw.payload, dtype).reshape(*shape[:4], 2, shape[4] // 2)
    y = quant.to_f32(back.payload, dtype).reshape(x.shape)
    bits = LOSSY[codec]
    for part, axis in ((0, 3), (1, 4)):  # K: per channel over tokens; V: per token
        xs, ys = x[..., part, :], y[..., part, :]
        lo, hi = xs.min(axis, keepdims=True), xs.max(axis, keepdims=True)
        assert (np.abs(ys - xs) <= quant.error_bound(lo, hi, xs, bits, dtype)).all()


@pytest.mark.parametrize("codec", list(LOSSY))
def test_lossy_constant_groups_and_ratio(codec: Codec) -> None:
    shape = (2, 4, 2, 128, 128)
    const = ChunkData(ChunkMeta("bfloat16", shape), quant.from_f32(np.full(shape, 3.5), "bfloat16"))
    assert bytes(decompress(compress(const, codec)).payload) == bytes(const.payload)
    raw = kv(shape, "bfloat16")
    ratio = raw.payload.nbytes / compress(raw, codec).payload.nbytes
    assert ratio > {Codec.Q8: 1.9, Codec.Q4: 3.6}[codec]


@pytest.mark.parametrize("meta", [ChunkMeta("bfloat16", (2, 4, 2, 128)),  # not the CPU layout
                                  ChunkMeta("bfloat16", (2, 4, 2, 2, 128, 64)),  # flash_attn
                                  ChunkMeta("bfloat16", (1, 1, 1, 4, 6)),  # odd head_dim
                                  ChunkMeta("uint8", (1, 1, 1, 4, 8)),
                                  ChunkMeta("int8", (1, 1, 1, 4, 8))])
def test_lossy_codecs_refuse_layouts_they_do_not_understand(meta: ChunkMeta) -> None:
    chunk = ChunkData(meta, np.zeros(meta.raw_nbytes, np.uint8))
    for codec in LOSSY:
        with pytest.raises(ValueError, match="lossy codecs"):
            check_codec(codec, meta)
        with pytest.raises(ValueError, match="lossy codecs"):
            compress(chunk, codec)
    for codec in LOSSLESS:
        check_codec(codec, meta)  # lossless codecs take anything


def test_lossy_codecs_refuse_non_finite_values() -> None:
    shape = (1, 1, 1, 4, 8)
    x = np.zeros(shape, np.float32)
    x[0, 0, 0, 1, 2] = np.inf
    chunk = ChunkData(ChunkMeta("float32", shape), quant.from_f32(x, "float32"))
    with pytest.raises(ValueError, match="finite"):
        compress(chunk, Codec.Q8)


# -- bad payloads: a CorruptChunk, bounded by the header's shape -----------------------

def _with_payload(codec: Codec, meta: ChunkMeta, data: bytes) -> ChunkData:
    """A checksummed chunk carrying ``data`` as its payload (what a crafted file holds)."""
    payload = np.frombuffer(data, dtype=np.uint8)
    return wire(ChunkData(ChunkMeta(meta.dtype, meta.shape, codec), payload))


def _bombs(codec: Codec, n: int) -> list[bytes]:
    big = bytes(64 * 1024**2)  # decodes to far more than the header's n bytes
    if codec is Codec.ZLIB:
        return [zlib.compress(big), zlib.compress(bytes(n - 1)), zlib.compress(bytes(n)) + b"x"]
    if codec is Codec.LZ4:
        return [bytes(lossless.lz4_compress(np.frombuffer(big, np.uint8))),
                bytes(lossless.lz4_compress(np.zeros(n - 1, np.uint8)))]
    frames = [bytes(lossless.zstd_compress(np.frombuffer(big, np.uint8)))]
    import zstandard
    frames.append(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(n)))
    return frames


@pytest.mark.parametrize("codec", LOSSLESS + list(LOSSY))
def test_garbage_truncated_and_oversized_payloads_are_corrupt(codec: Codec) -> None:
    meta = ChunkMeta("bfloat16", (1, 2, 2, 8, 8))
    good = bytes(compress(kv(meta.shape, meta.dtype), codec).payload)
    bad = [b"", b"\x00" * 7, good[: len(good) // 2], bytes(range(256)) * 4,
           *_bombs(codec, meta.raw_nbytes)]
    for data in bad:
        with pytest.raises(CorruptChunk):
            decompress(_with_payload(codec, meta, data))


def test_an_unknown_codec_id_is_foreign_not_corrupt() -> None:
    meta = ChunkMeta("uint8", (4,))
    head = bytearray(encode_header(KEY, meta, np.zeros(4, np.uint8)))
    head[6] = 200  # codec byte; the checksum is recomputed as a later release would write it
    import struct

    import xxhash
    struct.pack_into("<I", head, 76, xxhash.xxh32_intdigest(bytes(head[:76])))
    with pytest.raises(ForeignChunk, match="codec id 200"):
        decode(KEY, bytes(head) + bytes(4))


def test_codec_config_keys() -> None:
    from kvtier.config import CodecName, load_config
    from kvtier.errors import ConfigError
    from kvtier.store.build import codec

    cfg = load_config(env={}, engine={"disk.codec": "ZSTD", "redis": {"codec": "q8"}})
    assert cfg.disk.codec is CodecName.ZSTD and cfg.redis.codec is CodecName.Q8
    assert codec(cfg.disk.codec) is Codec.ZSTD and not cfg.redis.codec.lossless
    assert load_config(env={}).disk.codec is CodecName.RAW
    assert load_config(env={}, engine={}).to_dict()["disk"]["codec"] == "raw"
    assert load_config(env={"KVTIER_DISK__CODEC": "lz4"}).disk.codec is CodecName.LZ4
    with pytest.raises(ConfigError, match="disk.codec.*unknown value 'brotli'"):
        load_config(env={}, engine={"disk.codec": "brotli"})
    with pytest.raises(ConfigError, match="memory.codec"):  # memory always holds raw chunks
        load_config(env={}, engine={"memory.codec": "zstd"})
    assert {c.value for c in CodecName} == {c.name.lower() for c in Codec}


def test_a_store_refuses_lossy_chunks_it_did_not_opt_in_to(tmp_path) -> None:
    """One process with disk.codec q8 on a shared folder must not make raw / zstd
    readers serve lossy KV: they count it foreign and leave it; a q8 reader reads it."""
    from kvtier.config import DiskConfig
    from kvtier.store import ChunkStore
    from kvtier.tiers.disk import DiskTier

    chunk = kv((1, 2, 2, 16, 128), "bfloat16")
    writer = DiskTier(DiskConfig(path=str(tmp_path)))
    writer.put_many([(KEY, compress(chunk, Codec.Q8))])
    for codec, served in ((Codec.RAW, False), (Codec.ZSTD, False), (Codec.Q8, True)):
        tier = DiskTier(DiskConfig(path=str(tmp_path)))
        store = ChunkStore([tier], codecs=[codec])
        (got,) = store.get_many([KEY])
        assert (got is not None) is served, codec
        if got is not None:
            assert got.meta.codec is Codec.RAW
            got.release()
        assert tier.stats.foreign == (0 if served else 1) and tier.stats.corrupt == 0
        assert tier.contains_many([KEY]) == [True]  # left in place for who opted in
        store.close()
    writer.close()
