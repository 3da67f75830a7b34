"""The peer tier: other instances' chunks, read-only, over the transfer channel.

``tier`` (the :class:`PeerTier`), ``locate`` (asking the controller which instance
holds a key). The channel itself (wire format, client, server): :mod:`kvtier.transfer`.
"""

from kvtier.tiers.peer.tier import PeerTier

__all__ = ["PeerTier"]
