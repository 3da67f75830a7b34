"""Layer 4: the store's epoch, which makes a clear (and vLLM's reset) a barrier.

Work that lands in a tier some time after it started records the epoch it
started in, and lands only while that epoch is still current:

- a queued background write (:class:`~kvtier.store.writer.BackgroundWriter`),
- the promotion into memory of a chunk read from a lower tier (a load, a
  prefetch, the ``kvtier-fetch`` thread),
- the commit of a save into memory (and so its write-through).

A clear bumps the epoch, so nothing that started before it lands after it.

The race this closes: a writer that checked the epoch and is mid-write when a
clear starts would land its chunk after the clear. Holding a lock around a
whole disk or Redis write would put the engine's thread (a commit, a
promotion) behind slow I/O, so the two kinds of landing are handled apart:

- fast landings (into memory: a commit, a promotion) hold the gate's lock
  around check *and* publish (:meth:`EpochGate.publish`), so a clear runs
  either wholly before or wholly after them;
- slow landings (a lower tier's write) are counted while they run
  (:meth:`EpochGate.landing`); a clear waits for them, bounded by
  ``wait_s``, before it deletes anything, so what they wrote is deleted too.
  A write that outlives the bound (a hung tier) deletes what it wrote as
  soon as it returns (the writer checks the epoch again after the write):
  only then can a chunk from before the barrier be seen after it, for as long
  as the hung write took past the bound.

The epoch is odd while a clear runs: work that starts during a clear (and
may read a tier the clear has not reached yet) never lands either.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class EpochGate:
    """The epoch of one store and the landings in progress (thread-safe)."""

    def __init__(self, wait_s: float = 10.0) -> None:
        self.wait_s = wait_s
        """How long a clear waits for slow writes in progress before it deletes."""
        self._epoch = 0
        self._active = 0  # slow landings in progress
        self._cond = threading.Condition()
        self._clearing = threading.Lock()  # one clear at a time: keeps the epoch's parity

    @property
    def epoch(self) -> int:
        """The current epoch: what work starting now records."""
        return self._epoch

    def is_open(self, epoch: int) -> bool:
        """Whether work that started in ``epoch`` may still land."""
        return epoch == self._epoch and not epoch & 1

    @contextmanager
    def publish(self, epoch: int) -> Iterator[bool]:
        """Yields whether work of ``epoch`` may land, holding the gate meanwhile: the
        caller publishes (quickly: into memory) inside, and no clear starts until it
        is done. Never wait for I/O inside."""
        with self._cond:
            yield self.is_open(epoch)

    @contextmanager
    def landing(self, epoch: int) -> Iterator[bool]:
        """Yields whether a slow write of ``epoch`` may start; while it runs, a clear
        waits for it (up to ``wait_s``). After it, the caller checks
        :meth:`is_open` again and undoes what it wrote if a clear began meanwhile."""
        with self._cond:
            ok = self.is_open(epoch)
            if ok:
                self._active += 1
        try:
            yield ok
        finally:
            if ok:
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

    @contextmanager
    def barrier(self) -> Iterator[bool]:
        """A clear: close the epoch (nothing that started before lands from now on),
        wait up to ``wait_s`` for slow writes in progress, then yield whether they all
        ended; the caller deletes inside. A new epoch opens on exit."""
        with self._clearing:
            with self._cond:
                self._epoch += 1  # odd: closed
                deadline = time.monotonic() + self.wait_s
                while self._active and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                drained = not self._active
            try:
                yield drained
            finally:
                with self._cond:
                    self._epoch += 1  # even: open again, to work that starts from now
