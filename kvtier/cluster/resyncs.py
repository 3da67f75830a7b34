"""Layer 7: when the controller asks an instance for its snapshot (rate-limited, coalesced).

A resync replaces what the index holds for an instance with the instance's own
list of keys. The controller never fetches it: it *asks*, in the answer to the
instance's next registration or heartbeat (``"resync": true``), and the
instance pushes ``POST /v1/snapshot`` with its credential. :class:`Resyncs`
keeps, per instance, whether one is wanted and when one was last asked:

- at most one ask per ``interval_s`` per instance; wants in between are
  coalesced into one pending ask (a flood of ``AllBlocksCleared`` or sequence
  gaps costs one snapshot per interval, not one each);
- a pushed snapshot is taken at most once per ``interval_s / 2`` per instance
  (an instance that pushes unasked is answered 429).

State is this process's: with replicas sharing Redis, the replica that sees an
instance's events asks at that instance's next heartbeat to it.
"""

from __future__ import annotations

import threading
import time


class Resyncs:
    """Pending asks and their rate limit, per instance."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._asked: dict[str, float] = {}
        self._taken: dict[str, float] = {}

    def want(self, instance: str) -> bool:
        """Note that ``instance``'s snapshot is wanted; False if one is already pending."""
        with self._lock:
            if instance in self._pending:
                return False
            self._pending.add(instance)
            return True

    def ask(self, instance: str) -> bool:
        """Whether to ask ``instance`` now (a pending want, and none asked within the
        interval); asking clears the want."""
        now = time.monotonic()
        with self._lock:
            if instance not in self._pending or \
                    now - self._asked.get(instance, -1e18) < self.interval_s:
                return False
            self._pending.discard(instance)
            self._asked[instance] = now
            return True

    def take(self, instance: str) -> bool:
        """Whether a pushed snapshot of ``instance`` is taken now (rate limit)."""
        now = time.monotonic()
        with self._lock:
            if now - self._taken.get(instance, -1e18) < self.interval_s / 2:
                return False
            self._taken[instance] = now
            return True

    def forget(self, instance: str) -> None:
        """A new owner of the name starts afresh."""
        with self._lock:
            self._pending.discard(instance)
            self._asked.pop(instance, None)
            self._taken.pop(instance, None)
