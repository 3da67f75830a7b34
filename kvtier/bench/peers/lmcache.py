"""LMCache 0.5.6, the reference system, as a peer of ``kvtier bench serve``.

It runs in its multiprocess mode (its in-process connector caches nothing on
the CPU platform): a separate ``lmcache server`` process and vLLM's in-tree
``LMCacheMPConnector``. It lives in its own venv, because it pins other
versions of numpy, protobuf and grpcio: ``scripts/setup_peer_lmcache.sh``
makes ``.venv-lmcache`` in the current folder; ``KVTIER_LMCACHE_VENV``
points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvtier.testing.procs import free_port


def lmcache_venv() -> Path:
    """LMCache's venv: ``$KVTIER_LMCACHE_VENV``, or ``.venv-lmcache`` in the current folder."""
    return Path(os.environ.get("KVTIER_LMCACHE_VENV") or Path.cwd() / ".venv-lmcache")


def lmcache_available() -> bool:
    """True when LMCache's venv exists."""
    return (lmcache_venv() / "bin" / "lmcache").exists()


def lmcache_server(kv_budget_bytes: int
                   ) -> tuple[str, dict[str, Any], list[str], dict[str, str], str]:
    """(python for vLLM, KV transfer config, server command, server env, server ready URL).

    The server gets ``kv_budget_bytes`` of CPU memory (whole GiB), 256-token
    chunks, LRU eviction, loopback only and no metrics port (by default it
    binds 0.0.0.0:9090), and the transfer mode that matches vLLM's on the CPU.
    """
    venv = lmcache_venv()
    if not lmcache_available():
        raise FileNotFoundError(f"LMCache's venv {venv} is missing: run "
                                f"scripts/setup_peer_lmcache.sh (or leave out 'lmcache')")
    port, http_port = free_port(), free_port()
    gib = max(1, round(kv_budget_bytes / 2**30))
    cmd = [str(venv / "bin" / "lmcache"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
           "--disable-metrics", "--l1-size-gb", str(gib), "--no-l1-use-lazy",
           "--chunk-size", "256", "--eviction-policy", "LRU",
           "--supported-transfer-mode", "auto", "--shm-name", f"kvtier-bench-{port}"]
    env = {"LMCACHE_TRACK_USAGE": "false", "LMCACHE_DISABLE_BANNER": "1"}
    kv_transfer = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1",
                                                 "lmcache.mp.port": port,
                                                 "lmcache.mp.mq_timeout": 60}}
    return (str(venv / "bin" / "python"), kv_transfer, cmd, env,
            f"http://127.0.0.1:{http_port}/healthcheck")
