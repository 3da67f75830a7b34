"""Layer 4: which tiers the store reads, and the canary's verdicts per tier.

The canary (:mod:`kvtier.connectors.vllm.canary`) compares a sample of stored
chunks with the engine's own recompute. A tier that served wrong-but-valid KV
more than ``verify.max_mismatches`` times is taken out of service: the store
stops reading it and the scheduler's lookups stop counting it, until an
operator puts it back (the management API's ``resume``). Bytes-level checks
cannot catch such a chunk (its header and checksums are right), so the state
is kept here, where every reader of the store looks.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger(__name__)


class TierService:
    """Out-of-service tiers and verification counts (thread-safe: the canary's thread
    writes, the engine thread, the management API and the metrics read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out: set[str] = set()
        self._recent: Counter[str] = Counter()  # mismatches since the tier was last resumed
        self.mismatches: Counter[str] = Counter()
        """Mismatches per tier since start (``kvtier_verify_mismatch_total{tier}``)."""
        self.checks = 0
        """Stored copies compared with the engine's recompute since start."""
        self._changes: dict[str, bool] = {}  # tier -> out of service, not yet reported

    def readable(self, tier: str) -> bool:
        """Whether the store may read ``tier`` (and lookups count it)."""
        return tier not in self._out

    @property
    def out_of_service(self) -> list[str]:
        """Tiers taken out of service, sorted."""
        with self._lock:
            return sorted(self._out)

    def checked(self, n: int = 1) -> None:
        """Count ``n`` compared copies."""
        with self._lock:
            self.checks += n

    def mismatch(self, tier: str, limit: int) -> bool:
        """Count a mismatch of ``tier``; True when it takes the tier out of service
        (more than ``limit`` since it was last put back)."""
        with self._lock:
            self.mismatches[tier] += 1
            self._recent[tier] += 1
            if self._recent[tier] < limit or tier in self._out:
                return False
            self._out.add(tier)
            self._changes[tier] = True
        log.error("kvtier: the %s tier served %d chunks that differ from the engine's own "
                  "KV: taken OUT OF SERVICE (not read, not counted in lookups) until an "
                  "operator resumes it (management API: POST /v1/resume)", tier, limit)
        return True

    def resume(self, tier: str) -> bool:
        """Put ``tier`` back in service (its recent mismatches forgotten); True if it was out."""
        with self._lock:
            self._recent[tier] = 0
            if tier not in self._out:
                return False
            self._out.discard(tier)
            self._changes[tier] = False
        log.warning("kvtier: the %s tier is back in service (resumed by an operator)", tier)
        return True

    def take_changes(self) -> dict[str, bool]:
        """Tiers taken out (True) or put back (False) since the last call, for the
        scheduler's lookups."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes
