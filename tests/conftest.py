"""Shared fixtures, and how the suite runs on several workers (pytest-xdist).

``make test`` runs the suite on one worker per core (``-n <cores> --dist loadgroup``):
tests are handed out one at a time, except that the tests of a module sharing a
module-scoped fixture (a vLLM server, a cluster, a redis-server) stay together on
one worker, so that fixture starts once. Each worker's vLLM instances get their own
core (``VLLM_CPU_OMP_THREADS_BIND``), so two instances never fight over the same
cores; runs compared inside one test share a worker and so the same binding. A test
that sets its own binding (tensor parallelism, two instances side by side) keeps it.
"""

from __future__ import annotations

import os

import pytest

from tests.redis_server import redis_cluster, redis_server  # noqa: F401


def _bind_worker_to_a_core() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    if not worker.startswith("gw") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if len(cores) < 2 or count < 2:
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[int(worker[2:]) % len(cores)])


_bind_worker_to_a_core()

# The canary (verify.sample_rate, default 0.01) serves a sampled hit cold; vLLM's
# server gives requests random ids, so a test asserting exact hits through it would
# fail now and then. Tests run without it unless they ask (tests/test_vllm_canary.py
# sets its rate in the connector's config, which wins over the environment).
os.environ.setdefault("KVTIER_VERIFY__SAMPLE_RATE", "0")


CHEAP_SHARED = frozenset({"model"})
"""Module-scoped fixtures that cost nothing to set up twice (a cached model path)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the users of a module's shared fixtures on one worker (``--dist loadgroup``;
    xdist reads the mark after this hook, in its own trylast hook)."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = any(d.scope != "function" and d.baseid
                     for name, defs in info.name2fixturedefs.items()
                     if name not in CHEAP_SHARED for d in defs)
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
