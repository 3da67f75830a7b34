"""Helpers of the real-vLLM tests: documents, requests, one instance per run, references.

Every vLLM instance runs in its own process (:func:`kvtier.testing.offline.run_instance`),
so "a new instance" in these tests is a real restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtier.testing.models import build_model, make_document
from kvtier.testing.offline import run_instance

CHUNK = 256


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_model("tiny"))


def doc(model: str, seed: int, n: int = 1100) -> list[int]:
    return make_document(model, n, seed)  # 4 whole chunks + 76 tokens


def req(prompt: list[int], salt: str | None = None, max_tokens: int = 8,
        lora: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"prompt": prompt, "salt": salt, "max_tokens": max_tokens, "lora": lora}


def kvtier_cfg(tmp_path: Path, tiers: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"tiers": tiers or ["memory", "disk"], "disk.path": str(tmp_path / "chunks"),
            "memory.max_bytes": "128MiB", **extra}


def run(model: str, rounds: list[list[dict]], kvtier: dict | None, **spec: Any) -> list[list[dict]]:
    return run_instance({"model": model, "kvtier": kvtier, "rounds": rounds, **spec})["rounds"]


def same_output(a: dict, b: dict) -> bool:
    return a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]


def own_hit(model: str, prompt: list[int], hit_tokens: int, first: list[int] | None = None,
            lora: dict[str, Any] | None = None, **spec: Any) -> dict:
    """vLLM alone (no kvtier) on ``prompt`` after ``first`` (default: the prompt itself),
    so that its own prefix cache gives ``hit_tokens`` of it: the reference for a hit."""
    out = run(model, [[req(first or prompt, lora=lora)], [req(prompt, lora=lora)]], None, **spec)
    assert out[1][0]["num_cached_tokens"] == hit_tokens
    return out[1][0]


