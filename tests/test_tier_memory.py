"""The memory tier runs the tier conformance suite."""

from __future__ import annotations

import pytest

from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier
from kvtier.tiers.memory import MemoryTier
from tests.tier_conformance import TierConformance


class TestMemoryTier(TierConformance):
    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return MemoryTier((capacity_chunks or 64) * self.payload_max, self.payload_max)

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        pytest.skip("not applicable: in-process memory is trusted, it is never re-checked")

    def break_backend(self, tier: Tier) -> None:
        pytest.skip("not applicable: the memory tier lives and dies with its process")
