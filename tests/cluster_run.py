"""Helpers of the multi-instance tests: real ``vllm serve`` processes with kvtier on 127.0.0.1.

Each instance gets its own core (``VLLM_CPU_OMP_THREADS_BIND``) so two can run
side by side; their vLLM children import kvtier from this checkout
(``PYTHONPATH``), the vLLM plugin included.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers
from kvtier.testing.procs import free_port

ROOT = str(Path(__file__).resolve().parents[1])
MODEL_ID = "cluster"
CHUNK = 256


class Instance:
    """One ``vllm serve`` with kvtier (``extra``: its kvtier config), its management API on."""

    def __init__(self, model: str, root: Path, name: str, extra: dict[str, Any], cores: str,
                 role: str = "kv_both") -> None:
        self.model, self.name = model, name
        self.control = free_port()
        extra = {"memory.max_bytes": "64MiB", "model_id": MODEL_ID, "control.port": self.control,
                 **extra}
        cfg = ServeConfig(name, sys.executable, {
            "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": role, "kv_connector_extra_config": extra})
        eng = EngineSettings(model=model, max_model_len=2048, num_gpu_blocks=64,
                             kv_budget_bytes=64 << 20, threads_bind=cores,
                             extra_args=("--no-enable-prefix-caching",))
        path = os.environ.get("PYTHONPATH", "")
        if ROOT not in path.split(os.pathsep):  # vLLM's processes import this checkout
            os.environ["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")
        self.server = Servers(cfg, eng, root / f"{name}.log").__enter__()
        self.base_url = self.server.base_url

    def complete(self, prompt: list[int], max_tokens: int = 8) -> dict[str, Any]:
        """Greedy completion: tokens, logprobs, cached prompt tokens."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "return_token_ids": True, "logprobs": 1}
        out = post(f"{self.base_url}/v1/completions", body)
        choice = out["choices"][0]
        details = out["usage"].get("prompt_tokens_details") or {}
        return {"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"],
                "cached": details.get("cached_tokens") or 0}

    def tiers(self) -> dict[str, dict[str, int]]:
        """Per-tier counters from the management API."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}/v1/status",
                                    timeout=30) as resp:
            return json.loads(resp.read())["tiers"]

    def lookup(self, prompt: list[int]) -> int:
        """Whole chunks of ``prompt`` this instance's tiers hold (management API)."""
        out = post(f"http://127.0.0.1:{self.control}/v1/lookup", {"tokens": prompt})
        return int(out["hit_chunks"])

    def kill(self) -> None:
        """SIGKILL every process of the instance (no clean shutdown)."""
        for proc in self.server.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop()

    def stop(self) -> None:
        self.server.__exit__()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())
