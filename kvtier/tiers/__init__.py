"""Layer 3: storage tiers, one module per medium.

``tier_class(name)`` maps a tier name to its class, importing it lazily so an
optional dependency (redis-py) is only needed when its tier is used.
"""

from __future__ import annotations

import importlib

from kvtier.tiers.base import Tier, TierStats, TierUsage

_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "memory": ("kvtier.tiers.memory", "MemoryTier", None),
    "disk": ("kvtier.tiers.disk", "DiskTier", None),
    "redis": ("kvtier.tiers.redis", "RedisTier", "pip install 'kvtier[redis]'"),
    "peer": ("kvtier.tiers.peer", "PeerTier", None),
}


def tier_class(name: str) -> type[Tier]:
    """The class of tier ``name``; ImportError with an install hint if its extra is missing."""
    try:
        module, cls, hint = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tier {name!r} (known: {', '.join(_REGISTRY)})") from None
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        if hint is None:
            raise
        raise ImportError(f"the {name} tier needs an optional dependency: {hint} ({exc})") from exc


__all__ = ["Tier", "TierStats", "TierUsage", "tier_class"]
