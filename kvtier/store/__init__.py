"""Layer 4: the hierarchy of tiers (lookup, put, get, promote, evict, pin, clear)."""

from kvtier.store.epoch import EpochGate
from kvtier.store.events import StoreEvents
from kvtier.store.hierarchy import ChunkStore, PrefixHit, lookup_hit, lookup_prefix
from kvtier.store.index import KeyIndex
from kvtier.store.writer import BackgroundWriter

__all__ = ["BackgroundWriter", "ChunkStore", "EpochGate", "KeyIndex", "PrefixHit", "StoreEvents",
           "lookup_hit", "lookup_prefix"]
