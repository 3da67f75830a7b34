"""Small helpers for child processes and local services: ports, bounded waits, results."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HOST = "127.0.0.1"
PORT_BLOCK = 1500
"""Ports each pytest-xdist worker draws from, a block of its own."""


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The result a child process printed: its last stdout line that is a JSON object.

    Children (``kvtier bench ... --json``, one vLLM instance) print their result
    as one JSON line last; anything vLLM or a library printed before it is skipped.
    None when there is no such line.
    """
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def free_port(bus_offset: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now (and ``port + bus_offset`` too, if given).

    Ports come from below the kernel's ephemeral range, never from ``bind(0)``: an
    ephemeral port handed out here could be handed out again, before the server
    that wants it binds it, to a client's connection or to another process asking
    the kernel for "any port" (vLLM picks its internal ports that way). Each
    pytest-xdist worker draws from a block of its own, so two workers never pick
    the same port either; within a process, ports are not repeated until the block
    wraps around.
    """
    with _lock:
        for _ in range(PORT_BLOCK):
            port = next(_ports())
            if not port_free(port):
                continue
            if bus_offset is None:
                return port
            if port + bus_offset < 65536 and port_free(port + bus_offset):
                return port
    raise RuntimeError("no free port (pair) found on 127.0.0.1")


_lock = threading.Lock()
_cycle: Iterator[int] | None = None


def _ports() -> Iterator[int]:
    global _cycle
    if _cycle is None:
        low, high = _ephemeral_range()
        # The room below the ephemeral range (32768 by default), else above it.
        first, last = (1024, low) if low - 1024 >= 8 * PORT_BLOCK else (high + 1, 65536)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        blocks = max(1, (last - first) // PORT_BLOCK)
        if worker.startswith("gw") and worker[2:].isdigit():
            block = int(worker[2:]) % blocks
        else:  # not under xdist (a CLI, a benchmark): a block at random
            block = random.randrange(blocks)
        start = last - (block + 1) * PORT_BLOCK
        offset = random.randrange(PORT_BLOCK)  # a child process of the same worker starts elsewhere
        _cycle = itertools.cycle([start + (offset + i) % PORT_BLOCK for i in range(PORT_BLOCK)])
    return _cycle


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound now."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check()`` every 20 ms until it is true; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def log_tail(path: str | os.PathLike[str], max_chars: int = 3000) -> str:
    """The end of a child's log, for an error that says why the child failed (a CI run
    keeps the error, not the log file)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"
    return text[-max_chars:]
