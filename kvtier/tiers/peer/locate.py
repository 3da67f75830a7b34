"""Layer 3: asks the controller which instances hold a prompt's chunks.

``POST {controller_url}/v1/locate`` with ``{"keys": [32-hex keys], "exclude":
instance id or null}`` and a bearer token answers ``{"holders": [{"instance",
"transfer": "host:port", "chunks": leading keys held, "tiers": {...}}]}``,
most chunks first. The answer is parsed defensively (size-bounded, every
field checked); anything off is a failure the caller turns into a miss.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

from kvtier.config.cluster import parse_address
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey

MAX_ANSWER = 1024**2


@dataclass(frozen=True)
class Holder:
    """An instance that holds ``chunks`` leading keys, reachable at ``transfer``."""

    instance: str
    transfer: str
    chunks: int


class LocateError(Exception):
    """The controller could not be asked or answered something unusable."""


def locate(url: str, token: str, keys: Sequence[ChunkKey], exclude: str | None,
           timeout_s: float) -> list[Holder]:
    """Holders of ``keys``' leading chunks, most first; LocateError on any failure."""
    parts = urlsplit(url.rstrip("/"))
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    body = json.dumps({"keys": [k.hex() for k in keys], "exclude": exclude or None}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        conn.request("POST", f"{parts.path}/v1/locate", body, headers)
        resp = conn.getresponse()
        data = resp.read(MAX_ANSWER + 1)
        if resp.status != 200:
            raise LocateError(f"controller answered {resp.status}")
    except (OSError, http.client.HTTPException) as exc:
        raise LocateError(f"controller unreachable: {exc}") from None
    finally:
        conn.close()
    if len(data) > MAX_ANSWER:
        raise LocateError("controller answer too large")
    return parse_holders(data, len(keys))


def parse_holders(data: bytes, num_keys: int) -> list[Holder]:
    """The ``holders`` of a locate answer, checked; LocateError if malformed."""
    try:
        doc = json.loads(data)
        holders = []
        for h in doc["holders"]:
            chunks = h["chunks"]
            if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 0:
                raise LocateError(f"bad chunk count {chunks!r}")
            transfer = str(h["transfer"])
            parse_address("transfer", transfer)
            holders.append(Holder(str(h.get("instance", "")), transfer, min(chunks, num_keys)))
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise LocateError(f"malformed locate answer: {exc}") from None
    return sorted(holders, key=lambda h: -h.chunks)
