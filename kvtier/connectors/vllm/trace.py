"""Layer 6: a debug timeline of the worker's part of each engine step.

``KVTIER_STEP_TRACE=/path/file.jsonl`` in a vLLM worker's environment makes it
append one JSON line per connector hook it runs (``start_load``,
``wait_for_save``, ``get_finished``): the wall-clock start (``t``, seconds since
the epoch, to line up with a client's timestamps), its duration (``ms``), and
what the step asked of it (tokens loaded in the step, chunks saved, background
loads started, whether the step computed anything). Off by default: it is for
finding what in kvtier's part of a step makes a decoder wait
(``benchmarks/prefix_repetition.py --trace``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any

ENV = "KVTIER_STEP_TRACE"


class StepTrace:
    """Appends one line per hook to a file (line-buffered; several workers may share it:
    each line is one write)."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", buffering=1)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @classmethod
    def from_env(cls) -> StepTrace | None:
        """The trace ``KVTIER_STEP_TRACE`` names, or None (the default)."""
        path = os.environ.get(ENV, "")
        return cls(path) if path else None

    def mark(self, hook: str, t0: float, meta: Any) -> None:
        """Record a hook that started at ``t0`` (``time.perf_counter``) and ends now."""
        ms = (time.perf_counter() - t0) * 1e3
        line: dict[str, Any] = {"t": round(time.time() - ms / 1e3, 6), "pid": self._pid,
                                "hook": hook, "ms": round(ms, 3)}
        if meta is not None:
            line.update(
                idle=meta.idle,
                load_tokens=sum(ld.end_token - ld.start_token for ld in meta.loads
                                if not ld.is_async),
                async_loads=sum(ld.is_async for ld in meta.loads),
                save_chunks=sum(len(s.keys[0]) - s.start_chunk for s in meta.saves))
        with self._lock:
            self._file.write(json.dumps(line) + "\n")
