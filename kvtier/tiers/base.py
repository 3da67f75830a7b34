"""Layer 3: the interface every storage tier implements.

A tier maps chunk keys to chunk bytes. The interface is narrow and batch
first: six primitives. Four take many keys at once (``contains_many``,
``put_many``, ``get_many``, ``delete_many``), so a remote tier can answer in one
round trip; two describe what the tier holds (``usage``, ``iter_keys``).
Everything else (prefix lookup, clear) derives from them. Failures of the medium (down, slow, full, corrupt) are never raised:
they come back as misses or ``False`` and are counted in :class:`TierStats`.
"""

from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass, field, fields
from typing import Iterator, Protocol, Sequence

from kvtier.codecs import ChunkData
from kvtier.errors import ForeignChunk, ForgedChunk
from kvtier.keys import ChunkKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierUsage:
    """How full a tier is."""

    used_bytes: int
    capacity_bytes: int
    num_chunks: int


@dataclass
class TierStats:
    """Counters of what happened in a tier; read them, never branch on them."""

    puts: int = 0
    put_bytes: int = 0
    hits: int = 0
    misses: int = 0
    get_bytes: int = 0
    evictions: int = 0
    corrupt: int = 0
    """Reads that failed the header or checksum check (served as misses, deleted)."""
    foreign: int = 0
    """Reads that found a chunk of another kvtier format version (served as misses,
    left in place for the release that wrote it)."""
    forged: int = 0
    """Reads, with the cluster's integrity key, of a chunk without a valid MAC (served as
    misses, deleted: a process without the key wrote it, or someone forged it)."""
    errors: int = 0
    """Operations that failed in the medium (I/O error, connection lost)."""
    dropped: int = 0
    """Writes not done because a queue or the capacity was full."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        """Add to several counters atomically."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        """Plain counters, for metrics and JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class Tier(abc.ABC):
    """One storage medium. Thread-safe: any method may be called from any thread."""

    name: str = "tier"
    read_only: bool = False
    """True for a tier that only reads (the peer tier): the store runs no writer for it."""

    def __init__(self) -> None:
        self.stats = TierStats()
        self._foreign_logged = False
        self._forged_logged = False

    def _count_foreign(self, exc: ForeignChunk) -> None:
        """Count a chunk of another format version; log only the first (a rolling
        upgrade meets many, and each is expected)."""
        self.stats.add(foreign=1)
        if not self._foreign_logged:
            self._foreign_logged = True
            log.warning("%s tier: %s; served as a miss and left in place for the release "
                        "that wrote it (further ones are only counted as 'foreign')",
                        self.name, exc)

    def _count_forged(self, exc: ForgedChunk) -> None:
        """Count a chunk that failed its MAC; log only the first (a peer or a writer
        without the key sends many, and one line says what to fix)."""
        self.stats.add(forged=1)
        if not self._forged_logged:
            self._forged_logged = True
            log.warning("%s tier: %s; served as a miss (further ones are only counted as "
                        "'forged'): give every instance sharing this tier the same "
                        "integrity.key_file", self.name, exc)

    @abc.abstractmethod
    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys are present. Cheap: no payload moves. A down tier says all False."""

    @abc.abstractmethod
    def put_many(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> list[bool]:
        """Store chunks; blocks until done. True per item if the tier holds it afterwards.

        A key already present is not written again. The tier does not keep a
        reference to the caller's payload after returning (it copies or writes).
        """

    @abc.abstractmethod
    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkData | None]:
        """Payloads of the keys, None for a miss (absent, corrupt, or tier down).

        Every returned chunk must be ``release()``d by the caller.
        """

    @abc.abstractmethod
    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Remove keys; returns how many were present. Absent keys are ignored."""

    @abc.abstractmethod
    def usage(self) -> TierUsage:
        """Bytes used, capacity, number of chunks."""

    @abc.abstractmethod
    def iter_keys(self) -> Iterator[ChunkKey]:
        """Every key held (a snapshot; may miss concurrent changes)."""

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """Length of the longest run of present keys from the start."""
        n = 0
        for present in self.contains_many(keys):
            if not present:
                break
            n += 1
        return n

    def clear(self) -> int:
        """Delete every chunk; returns how many were deleted."""
        return self.delete_many(list(self.iter_keys()))

    def close(self) -> None:
        """Release resources (threads, connections, files). Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class HasContains(Protocol):
    """Anything asked about presence: a tier, a store's index."""

    def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]: ...


def lookup_prefix(sources: Sequence[HasContains], keys: Sequence[ChunkKey]) -> int:
    """Longest run of keys present in some source, asking each source (in order)
    only about keys from the first one still missing."""
    present = [False] * len(keys)
    for source in sources:
        start = first_false(present)
        if start == len(keys):
            break
        for i, there in enumerate(source.contains_many(keys[start:]), start):
            present[i] = present[i] or there
    return first_false(present)


def lookup_first(sources: Sequence[HasContains], keys: Sequence[ChunkKey]) -> int:
    """Index of the first key present in some source (``len(keys)`` if none): one
    presence call per source, each about the keys before the first one an earlier
    source holds (a remote tier answers every candidate in one round trip)."""
    end = len(keys)
    for source in sources:
        if not end:
            break
        for i, there in enumerate(source.contains_many(keys[:end])):
            if there:
                end = i
                break
    return end


def first_false(flags: Sequence[bool]) -> int:
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)
