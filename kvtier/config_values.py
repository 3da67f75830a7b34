"""Layer 0: parsing single configuration values (sizes, enums, hosts, URLs), no I/O."""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kvtier.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
               "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
               "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def parse_size(key: str, value: Any) -> int:
    """``4096``, ``"4KiB"``, ``"2 GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size in bytes, got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(key, f"expected a size such as 4096 or '2GiB', got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def parse_enum(key: str, cls: type[enum.Enum], value: Any) -> Any:
    """The member of ``cls`` named by ``value`` (case-insensitive); ConfigError otherwise."""
    try:
        return cls(str(value).strip().lower())
    except ValueError:
        names = ", ".join(m.value for m in cls)
        raise ConfigError(key, f"unknown value {value!r} (known: {names})") from None


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
