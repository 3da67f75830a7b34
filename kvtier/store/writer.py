"""Layer 4: background writes to a slow tier through a bounded queue.

The engine must never wait for disk or network. A store hands chunks (each
holding a reference on its buffer) to :meth:`BackgroundWriter.submit`, which
returns at once; worker threads write them and release the references. When
the queue is full the new batch is dropped and counted: a later request
recomputes it, nothing waits.

A writer may encode what it writes (the tier's configured codec): the work
runs on its threads, after the check for chunks already present, never on
the engine's.

With a store's :class:`~kvtier.store.epoch.EpochGate`, each batch records the
epoch it was submitted in: a batch still queued when the store is cleared is
dropped (released, never written), and a clear waits (bounded) for the batch
being written (see :mod:`kvtier.store.epoch`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

from kvtier.codecs import ChunkData, Codec, compress
from kvtier.keys import ChunkKey
from kvtier.store.epoch import EpochGate
from kvtier.threads import NamedThread
from kvtier.tiers.base import Tier

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundWriter:
    """Writes batches to ``tier`` on ``num_threads`` threads, ``max_pending`` chunks queued,
    each RAW chunk encoded with ``codec`` first."""

    def __init__(self, tier: Tier, max_pending: int = 256, num_threads: int = 1,
                 codec: Codec = Codec.RAW,
                 on_written: Callable[[list[ChunkKey]], None] | None = None,
                 gate: EpochGate | None = None) -> None:
        self.tier = tier
        self.gate = gate
        """The store's epoch: a batch from an epoch a clear closed is never written."""
        self.codec = codec
        self._refused_logged = False
        self.on_written = on_written
        """Called (on the writer thread) with the keys each batch newly stored."""
        self.max_pending = max_pending
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # chunks queued or being written
        self._cond = threading.Condition()
        self._threads = [NamedThread(target=self._run, name=f"kvtier-{tier.name}-writer",
                                     daemon=True) for _ in range(num_threads)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, items: Sequence[tuple[ChunkKey, ChunkData]], epoch: int | None = None
               ) -> bool:
        """Queue a batch; never blocks. False (and the batch released) if it does not fit.
        ``epoch``: when the chunks' work started (default: now); written only while the
        gate's epoch is still that one."""
        if not items:
            return True
        with self._cond:
            fits = not self._closed and self._pending + len(items) <= self.max_pending
            if fits:
                self._pending += len(items)
        if not fits:
            self.tier.stats.add(dropped=len(items))
            for _, chunk in items:
                chunk.release()
            return False
        if epoch is None and self.gate is not None:
            epoch = self.gate.epoch
        self._queue.put((epoch, list(items)))
        return True

    @property
    def pending(self) -> int:
        """Chunks queued or being written now."""
        with self._cond:
            return self._pending

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish queued writes (bounded by ``timeout_s``) and stop the threads."""
        if self._closed:
            return
        self.flush(timeout_s)
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            epoch, batch = job
            try:
                self._write(epoch, batch)
            except Exception:  # a tier bug must not kill the writer thread
                log.exception("kvtier: background write to %s failed", self.tier.name)
                self.tier.stats.add(errors=1)
            finally:
                for _, chunk in batch:
                    chunk.release()
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()

    def _write(self, epoch: int | None, batch: list[tuple[ChunkKey, ChunkData]]) -> None:
        if self.gate is None or epoch is None:
            self._put(batch)
            return
        with self.gate.landing(epoch) as ok:
            if not ok:  # queued before a clear: dropped, never written
                return
            done = self._put(batch, report=False)
        if self.gate.is_open(epoch):
            if done and self.on_written is not None:
                self.on_written(done)
            return
        # A clear began while this batch was being written and gave up waiting for it
        # (or will delete it anyway): what landed must not outlive the clear.
        if done:
            self.tier.delete_many(done)

    def _put(self, batch: list[tuple[ChunkKey, ChunkData]], report: bool = True
             ) -> list[ChunkKey]:
        """Write what the tier lacks; returns the keys newly stored."""
        present = self.tier.contains_many([k for k, _ in batch])
        todo = self._encode([item for item, there in zip(batch, present) if not there])
        if not todo:
            return []
        done = [k for (k, _), ok in zip(todo, self.tier.put_many(todo)) if ok]
        if report and self.on_written is not None:
            self.on_written(done)
        return done

    def _encode(self, items: list[tuple[ChunkKey, ChunkData]]
                ) -> list[tuple[ChunkKey, ChunkData]]:
        """Items encoded with the codec (private copies; the originals are released by
        the caller). A chunk the codec refuses is not written: counted, logged once."""
        if self.codec is Codec.RAW:
            return items
        out = []
        for key, chunk in items:
            if chunk.meta.codec is not Codec.RAW:
                out.append((key, chunk))
                continue
            try:
                out.append((key, compress(chunk, self.codec)))
            except ValueError as exc:
                self.tier.stats.add(errors=1)
                if not self._refused_logged:
                    self._refused_logged = True
                    log.error("kvtier: %s.codec %s refuses a chunk %s: %s; such chunks are not "
                              "written to %s (further ones only counted as errors)",
                              self.tier.name, self.codec.name.lower(), chunk.meta.shape, exc,
                              self.tier.name)
        return out
