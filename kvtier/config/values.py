"""Layer 0: single configuration values: the closed sets (tiers, write policy, codecs)
and parsing of sizes, enums, hosts and URLs. No I/O (tokens: :mod:`kvtier.config.secrets`)."""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kvtier.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


class TierName(str, enum.Enum):
    """The tiers kvtier knows, fastest first."""

    MEMORY = "memory"
    DISK = "disk"
    REDIS = "redis"
    PEER = "peer"
    """Read-only: chunks other instances hold, over their transfer servers."""


class WritePolicy(str, enum.Enum):
    """How stores reach the tiers below memory."""

    WRITE_THROUGH = "write_through"
    """Every chunk stored in memory is also written below, in the background."""
    WRITE_BACK = "write_back"
    """Chunks go below only when memory evicts them (demotion)."""


class CodecName(str, enum.Enum):
    """How a lower tier encodes the chunks it stores (``kvtier.codecs.compress``).

    Any reader decodes any chunk (the codec is in each chunk's header); this
    only chooses what a tier writes. The memory tier always holds raw chunks.
    """

    RAW = "raw"
    """The engine's bytes as they are."""
    ZLIB = "zlib"
    """zlib level 1, lossless (slow; kept for chunks the first release wrote)."""
    ZSTD = "zstd"
    """Byte shuffle + zstd, lossless: ~1.5x smaller on real KV. Needs zstandard."""
    LZ4 = "lz4"
    """Byte shuffle + lz4, lossless: ~1.2x, the fastest. Needs lz4."""
    Q8 = "q8"
    """Lossy, opt-in: 8-bit K per channel / V per token + zstd: ~2x. vLLM CPU layout only."""
    Q4 = "q4"
    """Lossy, opt-in: 4 bits, as q8: ~4x. vLLM CPU layout only."""

    @property
    def lossless(self) -> bool:
        """Whether a chunk read back is bitwise the chunk written."""
        return self not in (CodecName.Q8, CodecName.Q4)


# The module each codec needs beyond kvtier's core dependencies (pip extra "codecs").
CODEC_MODULES = {CodecName.ZSTD: "zstandard", CodecName.LZ4: "lz4",
                 CodecName.Q8: "zstandard", CodecName.Q4: "zstandard"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
               "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
               "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def size_bytes(value: Any) -> int:
    """``4096``, ``"4KiB"``, ``"2 GB"`` -> bytes; ValueError (naming no key) otherwise."""
    if isinstance(value, bool):  # YAML's "yes" / "true": not a size
        raise ValueError(f"expected a size in bytes, got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 4096 or '2GiB', got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def parse_size(key: str, value: Any) -> int:
    """``4096``, ``"4KiB"``, ``"2 GB"`` -> bytes; ConfigError naming ``key`` otherwise."""
    try:
        return size_bytes(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def enum_member(cls: type[E], value: Any) -> E:
    """The member of ``cls`` named by ``value`` (case-insensitive); ValueError otherwise."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).strip().lower())
    except ValueError:
        names = ", ".join(str(m.value) for m in cls)
        raise ValueError(f"unknown value {value!r} (known: {names})") from None


def host_port(value: Any) -> tuple[str, int]:
    """``"host:port"`` -> (host, port) (brackets of ``[::1]`` dropped); ValueError otherwise."""
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'host:port', got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return host.strip().lower() == "localhost"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for log lines and error messages
    (``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:  # not parsable as a URL: show nothing of it
        return "<unparsable url>"
