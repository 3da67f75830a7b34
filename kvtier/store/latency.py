"""Layer 4: fixed-bucket latency histograms (plain Python), read by the metrics exporter."""

from __future__ import annotations

import threading
from bisect import bisect_left

BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0)
"""Upper bounds, in seconds: a chunk batch moves in about a millisecond from memory
and in hundreds from a slow remote tier."""


class LatencyHistogram:
    """Counts of observations per bucket, and their sum (thread-safe, bounded)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS_S) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        with self._lock:
            self._counts[bisect_left(BUCKETS_S, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (upper bound, count) pairs ending with ``+Inf``, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip([*map(str, BUCKETS_S), "+Inf"], counts):
            running += n
            out.append((bound, running))
        return out, total
