"""Small helpers for child processes and local services: ports, bounded waits, results."""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable

HOST = "127.0.0.1"


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
    """A TCP port on 127.0.0.1 that is free now (and ``port + bus_offset`` too, if given)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if bus_offset is None:
            return port
        if port + bus_offset < 65536 and port_free(port + bus_offset):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


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
