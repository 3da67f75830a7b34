"""The disk tier: chunk files in a local or shared folder.

``tier`` (the :class:`DiskTier`: reads, background writes), ``files`` (one chunk file:
names, atomic writes, header-first reads), ``folder`` (the folder's shared byte budget
and lock), ``folder_index`` (what the folder holds, LRU across processes), ``lru``
(the size-bounded LRU index).
"""

from kvtier.tiers.disk.tier import DiskTier

__all__ = ["DiskTier"]
