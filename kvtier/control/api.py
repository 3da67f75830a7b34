"""Layer 7: the management API over cached KV, by prompt or by chunk key.

:class:`CacheAPI` turns requests (plain dicts, as decoded from JSON) into the
store's management operations: lookup, admit, evict, move, clear, pin, unpin,
compress, decompress, status. Bad input raises ``ValueError`` naming the
field; the HTTP layer maps it to a 400.
"""

from __future__ import annotations

from typing import Any, Callable

from kvtier.codecs import Codec, decode
from kvtier.errors import CorruptChunk
from kvtier.keys import KEY_BYTES, ChunkHasher, ChunkKey
from kvtier.store import ChunkStore, lookup_hit, manage


class CacheAPI:
    """Management operations for one store; prompts are hashed in ``hasher``'s namespace."""

    def __init__(self, store: ChunkStore, hasher: ChunkHasher) -> None:
        self.store = store
        self.hasher = hasher
        self.routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "lookup": self.lookup, "evict": self.evict, "move": self.move,
            "clear": self.clear, "pin": self.pin, "unpin": self.unpin,
            "compress": self.compress, "decompress": self.decompress, "status": self.status,
        }

    # -- request parsing --------------------------------------------------------

    def keys(self, req: dict[str, Any]) -> list[ChunkKey]:
        """Keys named by ``keys`` (hex strings) or ``tokens`` (+ optional ``salt``)."""
        if "keys" in req:
            raw = req["keys"]
            if not isinstance(raw, list):
                raise ValueError("keys: expected a list of hex strings")
            try:
                keys = [ChunkKey(bytes.fromhex(k)) for k in raw]
            except (TypeError, ValueError):
                raise ValueError("keys: every key must be a hex string") from None
            if any(len(k) != KEY_BYTES for k in keys):
                raise ValueError(f"keys: every key must be {KEY_BYTES} bytes ({2 * KEY_BYTES} hex)")
            return keys
        return self._hasher(req).keys(self._tokens(req))

    def _tokens(self, req: dict[str, Any]) -> list[int]:
        tokens = req.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens: expected a list of token ids (or give 'keys')")
        return tokens

    def _hasher(self, req: dict[str, Any]) -> ChunkHasher:
        return self.hasher.with_salt(str(req["salt"])) if req.get("salt") else self.hasher

    def _tier(self, req: dict[str, Any], field: str, required: bool = True) -> str | None:
        name = req.get(field)
        if name is None and not required:
            return None
        names = [t.name for t in self.store.tiers]
        if name not in names:
            raise ValueError(f"{field}: unknown tier {name!r} (have: {', '.join(names)})")
        return name

    # -- operations ---------------------------------------------------------------

    def lookup(self, req: dict[str, Any]) -> dict[str, Any]:
        """How much of a prompt is cached, and where each chunk lives.

        By ``tokens``, ``hit_tokens`` is what a load would give the engine: the
        whole stored chunks, then (with ``store_partial_chunks``) the longest
        stored head of the next chunk, whose key is the last of ``hit_keys``.
        """
        keys = self.keys(req)
        out: dict[str, Any] = {"chunks": len(keys), "keys": [k.hex() for k in keys],
                               "tiers": manage.locate(self.store, keys)}
        if "keys" in req:
            out.update(hit_chunks=self.store.lookup(keys), hit_tokens=None)
        else:
            found = lookup_hit(self.store.tiers, self._hasher(req), self._tokens(req), keys)
            out.update(hit_chunks=found.chunks, hit_tokens=found.tokens,
                       hit_keys=[k.hex() for k in found.keys])
        return out

    def evict(self, req: dict[str, Any]) -> dict[str, Any]:
        """Remove chunks from one tier (``tier``) or all; pinned chunks stay."""
        return {"removed": manage.evict(self.store, self.keys(req),
                                        self._tier(req, "tier", required=False))}

    def move(self, req: dict[str, Any]) -> dict[str, Any]:
        """Move chunks from tier ``from`` to tier ``to``."""
        src, dst = self._tier(req, "from"), self._tier(req, "to")
        assert src is not None and dst is not None
        return {"moved": manage.move(self.store, self.keys(req), src, dst)}

    def clear(self, req: dict[str, Any]) -> dict[str, Any]:
        """Delete everything in one tier (``tier``) or all."""
        return {"removed": manage.clear(self.store, self._tier(req, "tier", required=False))}

    def pin(self, req: dict[str, Any]) -> dict[str, Any]:
        """Protect memory-tier chunks from eviction."""
        return {"pinned": manage.pin(self.store, self.keys(req))}

    def unpin(self, req: dict[str, Any]) -> dict[str, Any]:
        """Undo pin."""
        manage.unpin(self.store, self.keys(req))
        return {"ok": True}

    def compress(self, req: dict[str, Any]) -> dict[str, Any]:
        """Re-encode chunks in ``tier`` with a lossless codec (``codec``: zlib)."""
        name = str(req.get("codec", "zlib")).upper()
        if name not in Codec.__members__ or name == "RAW":
            raise ValueError(f"codec: unknown lossless codec {req.get('codec')!r} (have: zlib)")
        tier = self._tier(req, "tier")
        assert tier is not None
        return {"recoded": manage.recode(self.store, self.keys(req), tier, Codec[name])}

    def decompress(self, req: dict[str, Any]) -> dict[str, Any]:
        """Store chunks of ``tier`` raw again."""
        tier = self._tier(req, "tier")
        assert tier is not None
        return {"recoded": manage.recode(self.store, self.keys(req), tier, Codec.RAW)}

    def admit(self, key_hex: str, blob: bytes, tier: str | None) -> dict[str, Any]:
        """Admit one encoded chunk (header + payload, as the disk tier writes it)."""
        try:
            key = ChunkKey(bytes.fromhex(key_hex))
        except ValueError:
            raise ValueError("key: not a hex string") from None
        try:
            chunk = decode(key, blob)
        except CorruptChunk as exc:
            raise ValueError(f"body: {exc}") from None
        if tier is not None:
            self._tier({"tier": tier}, "tier")
        return {"admitted": manage.admit(self.store, [(key, chunk)], tier)}

    def status(self, req: dict[str, Any]) -> dict[str, Any]:
        """Usage and counters of every tier."""
        out = {}
        for t in self.store.tiers:
            u = t.usage()
            out[t.name] = {"used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes,
                           "num_chunks": u.num_chunks, **t.stats.as_dict()}
        return {"namespace": self.hasher.namespace.layout, "chunk_size": self.hasher.chunk_size,
                "tiers": out}

    def metrics(self) -> str:
        """Prometheus text exposition of every tier's counters and usage."""
        lines = []
        for tier, values in self.status({})["tiers"].items():
            for name, value in values.items():
                lines.append(f'kvtier_{name}{{tier="{tier}"}} {value}')
        return "\n".join(lines) + "\n"
