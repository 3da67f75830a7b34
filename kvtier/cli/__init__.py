"""kvtier's command line (``kvtier ...``) and what its subcommands share."""

from __future__ import annotations

import json
from typing import Any


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
