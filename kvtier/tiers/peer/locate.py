"""Layer 3: asks the controller which instances hold a prompt's chunks.

``POST {controller_url}/v1/locate`` with ``{"keys": [32-hex keys], "exclude":
instance id or null}`` and a bearer token answers ``{"holders": [{"instance",
"transfer": "host:port", "chunks": leading keys held, "tiers": {...}}]}``,
most chunks first. The call goes through :class:`kvtier.net.http.HttpClient`
(bounded wait, no redirect, body cut past ``MAX_ANSWER``); the answer is
parsed defensively (every field checked); anything off is a failure the
caller turns into a miss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from kvtier.config.cluster import parse_address
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.net.http import HttpClient, HttpError, StatusError, TooLarge

MAX_ANSWER = 1024**2


@dataclass(frozen=True)
class Holder:
    """An instance that holds ``chunks`` leading keys, reachable at ``transfer``."""

    instance: str
    transfer: str
    chunks: int


class LocateError(Exception):
    """The controller could not be asked or answered something unusable."""


def locate(http: HttpClient, url: str, token: str, keys: Sequence[ChunkKey],
           exclude: str | None, timeout_s: float) -> list[Holder]:
    """Holders of ``keys``' leading chunks, most first; LocateError on any failure."""
    body = {"keys": [k.hex() for k in keys], "exclude": exclude or None}
    try:
        resp = http.request("POST", f"{url.rstrip('/')}/v1/locate", token=token,
                            json_body=body, timeout_s=timeout_s, max_bytes=MAX_ANSWER)
    except StatusError as exc:  # a redirect too: the controller answers directly
        raise LocateError(f"controller answered {exc.status}") from None
    except TooLarge:
        raise LocateError("controller answer too large") from None
    except HttpError as exc:
        raise LocateError(f"controller unreachable: {exc}") from None
    return parse_holders(resp.body, len(keys))


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
