"""Layer 4: what changed in a store's tiers since the last drain, for a remote index
(the scheduler's :class:`~kvtier.store.index.KeyIndex`) and vLLM's KV events."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

from kvtier.keys import ChunkKey


@dataclass
class StoreEvents:
    """Keys that entered or left this process's memory tier since the last drain.

    Net effect: a key stored and then evicted in the same period is only in
    ``evicted`` (and the other way round), so the order of applying the two
    lists does not matter.
    """

    stored: list[ChunkKey] = field(default_factory=list)
    evicted: list[ChunkKey] = field(default_factory=list)
    tiers: dict[str, tuple[list[ChunkKey], list[ChunkKey]]] = field(default_factory=dict)
    """Per tier (memory too): (keys stored, keys removed) by this process."""


class EventLog:
    """Net memory-tier changes since the last drain (thread-safe)."""

    def __init__(self) -> None:
        self._state: dict[ChunkKey, bool] = {}  # key -> present now
        self._lock = threading.Lock()

    def record(self, added: Sequence[ChunkKey], removed: Sequence[ChunkKey]) -> None:
        """Note keys added and removed (a memory tier's ``on_change`` hook)."""
        with self._lock:
            for key in added:
                self._state[key] = True
            for key in removed:
                self._state[key] = False

    def drain(self) -> StoreEvents:
        """The net changes since the last drain."""
        with self._lock:
            state, self._state = self._state, {}
        return StoreEvents([k for k, there in state.items() if there],
                           [k for k, there in state.items() if not there])

    def stored(self, keys: Sequence[ChunkKey]) -> None:
        """Note keys added (a background writer's ``on_written`` hook)."""
        self.record(keys, ())
