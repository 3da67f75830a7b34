"""Test-only: makes the disk tier's reads slow (see tests/test_vllm_async.py).

Imported at start-up by every Python process whose PYTHONPATH holds this
folder; wraps ``DiskTier.get_many`` with a sleep of ``TEST_DISK_DELAY_S``
seconds per call. Scheduler-side lookups (``contains_many``) stay fast.
"""

import os
import time

_DELAY = float(os.environ.get("TEST_DISK_DELAY_S", "0") or 0)

if _DELAY > 0:
    from kvtier.tiers import disk as _disk

    _get_many = _disk.DiskTier.get_many

    def _slow_get_many(self, keys):  # type: ignore[no-untyped-def]
        time.sleep(_DELAY)
        return _get_many(self, keys)

    _disk.DiskTier.get_many = _slow_get_many
