"""Layer 4: the hierarchy of tiers (lookup, put, get, promote, evict, pin)."""

from kvtier.store.hierarchy import ChunkStore, PrefixHit, StoreEvents, lookup_hit, lookup_prefix
from kvtier.store.index import KeyIndex
from kvtier.store.writer import BackgroundWriter

__all__ = ["BackgroundWriter", "ChunkStore", "KeyIndex", "PrefixHit", "StoreEvents", "lookup_hit",
           "lookup_prefix"]
