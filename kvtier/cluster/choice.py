"""Layer 7: the router's choice of an instance (pure: no I/O, no clock).

The rule, for a prompt of ``P`` tokens::

    score(i) = cached_tokens(i) - alpha * inflight(i) * P

``cached_tokens(i)``: the prefix instance ``i`` holds (the controller's
lookup, any tier); ``inflight(i)``: requests the router has in flight there.
Each request in flight counts as ``alpha`` of this prompt recomputed (with
alpha 0.5, an instance holding the whole prompt keeps it up to one request
in flight more than an idle instance without it, and loses it at two). The
highest score wins; ties go to fewer requests in flight, then round-robin.
With no cached prefix anywhere (or no lookup) this is plain least-loaded.
``round_robin`` ignores both (the benchmark's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

POLICIES = ("kv", "least_loaded", "round_robin")


@dataclass(frozen=True)
class Candidate:
    """One instance that may take the request."""

    name: str
    inflight: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str
    """``cache_hit`` (chosen for its prefix), ``least_loaded``, ``round_robin``."""
    cached_tokens: int
    score: float


def choose(cands: Sequence[Candidate], prompt_tokens: int, alpha: float = 0.5,
           policy: str = "kv", turn: int = 0) -> Choice:
    """The instance for one request. ``turn`` (a counter the caller increments per request)
    breaks ties in rotation. Raises ValueError for no candidates or an unknown policy."""
    if not cands:
        raise ValueError("no instance to choose from")
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    n = len(cands)
    if policy == "round_robin":
        c = cands[turn % n]
        return Choice(c.name, "round_robin", c.cached_tokens, 0.0)
    unit = max(prompt_tokens, 1)

    def score(c: Candidate) -> float:
        cached = c.cached_tokens if policy == "kv" else 0
        return cached - alpha * c.inflight * unit

    order = sorted(range(n), key=lambda i: (-score(cands[i]), cands[i].inflight,
                                            (i - turn) % n))
    best = cands[order[0]]
    hit = policy == "kv" and best.cached_tokens > 0
    return Choice(best.name, "cache_hit" if hit else "least_loaded", best.cached_tokens,
                  score(best))
