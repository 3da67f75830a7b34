"""The Redis tier: chunks in a Redis / Valkey server or cluster.

``tier`` (the :class:`RedisTier`), ``conn`` (connections, bounded waits, reconnect
backoff), ``values`` (a chunk as Redis values), ``split`` (chunks over several values),
``resp`` (writes header and payload as separate socket writes, no join).
"""

from kvtier.tiers.redis.tier import RedisTier

__all__ = ["RedisTier"]
