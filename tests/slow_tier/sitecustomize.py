"""Test-only: makes the disk tier's reads slow (see tests/test_vllm_async.py), or
holds a write across a reset (tests/test_reset_vllm.py).

Imported at start-up by every Python process whose PYTHONPATH holds this
folder; wraps ``DiskTier.get_many`` with a sleep of ``TEST_DISK_DELAY_S``
seconds per call. Scheduler-side lookups (``contains_many``) stay fast.

With ``TEST_DISK_HOLD_FIRST_WRITE=1``, the process's first disk write waits
until the folder is first listed (``iter_keys``: every clear lists it; at most
120 s), then 1 s more: a write in flight when vLLM is reset, which lands after
the scheduler has cleared the folder.
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


if os.environ.get("TEST_DISK_HOLD_FIRST_WRITE"):
    import threading

    from kvtier.tiers import disk as _disk_h

    _listed, _first = threading.Event(), threading.Lock()
    _put_many, _iter_keys = _disk_h.DiskTier.put_many, _disk_h.DiskTier.iter_keys

    def _held_put_many(self, items):  # type: ignore[no-untyped-def]
        if _first.acquire(blocking=False):  # never released: only the first write
            _listed.wait(120)
            time.sleep(1)
        return _put_many(self, items)

    def _noted_iter_keys(self):  # type: ignore[no-untyped-def]
        _listed.set()
        return _iter_keys(self)

    _disk_h.DiskTier.put_many = _held_put_many
    _disk_h.DiskTier.iter_keys = _noted_iter_keys
