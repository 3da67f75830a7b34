"""Layer 4: background writes to a slow tier through a bounded queue.

The engine must never wait for disk or network. A store hands chunks (each
holding a reference on its buffer) to :meth:`BackgroundWriter.submit`, which
returns at once; worker threads write them and release the references. When
the queue is full the new batch is dropped and counted: a later request
recomputes it, nothing waits.

A writer may encode what it writes (the tier's configured codec): the work
runs on its threads, after the check for chunks already present, never on
the engine's.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Sequence

from kvtier.codecs import ChunkData, Codec, compress
from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundWriter:
    """Writes batches to ``tier`` on ``num_threads`` threads, ``max_pending`` chunks queued,
    each RAW chunk encoded with ``codec`` first."""

    def __init__(self, tier: Tier, max_pending: int = 256, num_threads: int = 1,
                 codec: Codec = Codec.RAW,
                 on_written: Callable[[list[ChunkKey]], None] | None = None) -> None:
        self.tier = tier
        self.codec = codec
        self._refused_logged = False
        self.on_written = on_written
        """Called (on the writer thread) with the keys each batch newly stored."""
        self.max_pending = max_pending
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # chunks queued or being written
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"kvtier-{tier.name}-writer",
                                          daemon=True) for _ in range(num_threads)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, items: Sequence[tuple[ChunkKey, ChunkData]]) -> bool:
        """Queue a batch; never blocks. False (and the batch released) if it does not fit."""
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
        self._queue.put(list(items))
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
            batch = self._queue.get()
            if batch is _STOP:
                return
            try:
                present = self.tier.contains_many([k for k, _ in batch])
                todo = [item for item, there in zip(batch, present) if not there]
                todo = self._encode(todo)
                if todo:
                    done = self.tier.put_many(todo)
                    if self.on_written is not None:
                        self.on_written([k for (k, _), ok in zip(todo, done) if ok])
            except Exception:  # a tier bug must not kill the writer thread
                log.exception("kvtier: background write to %s failed", self.tier.name)
                self.tier.stats.add(errors=1)
            finally:
                for _, chunk in batch:
                    chunk.release()
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()

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
