"""Layer 0: the one reconnect backoff: when a failing server may be asked again.

After a failure the server is left alone for a delay that starts at
``first_s`` and doubles on each further failure up to ``max_s`` (equal values
give a fixed delay), jittered by +-``jitter`` so that many instances do not
retry in step. A success resets it. :meth:`Backoff.claim` lets one caller at
a time probe a server whose delay has passed while the others keep skipping
it (for callers on many threads, such as the Redis tier); :meth:`Backoff.ready`
only tells. The clock and the random draw can be replaced, for tests.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable

JITTER = 0.2


class Backoff:
    """A doubling, capped, jittered delay after failures, reset by a success.

    Thread-safe. ``delay_s`` is 0 while the server is healthy.
    """

    def __init__(self, first_s: float, max_s: float, jitter: float = JITTER,
                 clock: Callable[[], float] = time.monotonic,
                 draw: Callable[[float, float], float] = random.uniform) -> None:
        if first_s < 0 or not 0 <= jitter < 1:
            raise ValueError(f"backoff: first_s {first_s} must be >= 0 and jitter {jitter} "
                             "in [0, 1)")
        self.first_s = first_s
        self.max_s = max(first_s, max_s)
        self.jitter = jitter
        self.delay_s = 0.0
        self._retry_at = 0.0
        self._clock = clock
        self._draw = draw
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Whether the server may be asked now (healthy, or its delay has passed)."""
        return self.delay_s == 0.0 or self._clock() >= self._retry_at

    def claim(self) -> bool:
        """Like :meth:`ready`, but a caller that gets True after a delay is the one probe:
        the others get False for another delay, or until the probe's outcome is known."""
        if self.delay_s == 0.0:  # the healthy path takes no lock
            return True
        with self._lock:
            now = self._clock()
            if now < self._retry_at:
                return False
            self._retry_at = now + self.delay_s
            return True

    def failed(self) -> float:
        """The server failed a call: the wait (jittered) before it may be asked again."""
        with self._lock:
            self.delay_s = min(self.max_s, 2 * self.delay_s if self.delay_s else self.first_s)
            wait = self.delay_s
            if self.jitter:
                wait *= self._draw(1 - self.jitter, 1 + self.jitter)
            self._retry_at = self._clock() + wait
            return wait

    def succeeded(self) -> None:
        """The server answered: ask it freely again, and start from ``first_s`` next time."""
        if self.delay_s:
            with self._lock:
                self.delay_s = 0.0
                self._retry_at = 0.0
