"""Layer 2: chunk bytes on the wire and on disk (see :mod:`kvtier.codecs.format`)."""

from kvtier.codecs.compress import compress, decompress
from kvtier.codecs.format import (HEADER_SIZE, ChunkData, ChunkMeta, Codec, Header, decode,
                                  encode, encode_header, parse_header, verify_payload)

__all__ = ["HEADER_SIZE", "ChunkData", "ChunkMeta", "Codec", "Header", "compress", "decode",
           "decompress", "encode", "encode_header", "parse_header", "verify_payload"]
