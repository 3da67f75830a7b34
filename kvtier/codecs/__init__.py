"""Layer 2: chunk bytes on the wire and on disk (see :mod:`kvtier.codecs.format`)."""

from kvtier.codecs.compress import check_codec, compress, decompress
from kvtier.codecs.format import (HEADER_SIZE, ChunkData, ChunkMeta, Codec, Header, decode,
                                  encode, encode_header, parse_header, verify_payload)
from kvtier.codecs.integrity import ChunkMac

__all__ = ["HEADER_SIZE", "ChunkData", "ChunkMac", "ChunkMeta", "Codec", "Header", "check_codec",
           "compress", "decode", "decompress", "encode", "encode_header", "parse_header", "verify_payload"]
