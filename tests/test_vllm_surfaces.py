"""kvtier where vLLM users already look: /metrics, the stats log line, KV events, reset.

One real ``vllm serve`` (tiny model, kvtier on memory + disk, vLLM's own
prefix cache off) with ``--kv-events-config`` publishing to a ZMQ subscriber this test binds on
127.0.0.1, and ``VLLM_SERVER_DEV_MODE``
for vLLM's ``/reset_prefix_cache`` endpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVEventBatch

from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers
from kvtier.keys import ChunkHasher
from kvtier.testing.vllm_cpu import key_namespace
from kvtier.testing.procs import free_port
from tests.vllm_run import CHUNK, doc, model  # noqa: F401

pytestmark = pytest.mark.vllm

MODEL_ID = "surfaces"


class Served:
    def __init__(self, server: Servers, events: zmq.Socket, log: Path) -> None:
        self.server, self.events, self.log = server, events, log
        self.seen: list[Any] = []
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def ask(self, prompt: list[int]) -> int:
        """Cached tokens of one completion of ``prompt``."""
        body = {"model": self.server.eng.model, "prompt": prompt, "max_tokens": 4,
                "temperature": 0}
        out = _post(f"{self.server.base_url}/v1/completions", body)
        return (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    def events_until(self, done: Any, timeout_s: float = 30.0) -> list[Any]:
        """Read published events until ``done(all events so far)`` or the timeout."""
        deadline = time.monotonic() + timeout_s
        while not done(self.seen) and time.monotonic() < deadline:
            if self.events.poll(200):
                _topic, _seq, payload = self.events.recv_multipart()
                self.seen.extend(self._decoder.decode(payload).events)
        return self.seen

    def wait_subscribed(self, model: str, timeout_s: float = 120.0) -> None:
        """A ZMQ subscriber gets only what is published once its connection is up:
        send small new prompts (each stores a chunk, an event) until one arrives."""
        deadline = time.monotonic() + timeout_s
        for seed in range(9000, 9100):
            assert time.monotonic() < deadline, "no KV event reached the subscriber"
            self.ask(doc(model, seed, 300))
            if self.events_until(lambda ev: bool(ev), 3.0):
                self.seen.clear()
                return

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.server.base_url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        values = [float(m.group(1)) for m in
                  re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        return sum(values)


def _post(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, json.dumps(body or {}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        data = resp.read()
    return json.loads(data) if data.strip() else {}


@pytest.fixture(scope="module")
def served(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("surfaces")
    port = free_port()
    events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://127.0.0.1:{port}", "topic": "kv"}
    extra = {"tiers": ["memory", "disk"], "disk.path": str(root / "chunks"),
             "memory.max_bytes": "64MiB", "model_id": MODEL_ID}
    cfg = ServeConfig("kvtier-surfaces", sys.executable, {
        "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": extra})
    eng = EngineSettings(model=model, max_model_len=2048, num_gpu_blocks=48,
                         kv_budget_bytes=64 << 20, dtype="bfloat16",
                         extra_args=("--no-enable-prefix-caching", "--kv-events-config",
                                     json.dumps(events_cfg)))
    saved = {k: os.environ.get(k) for k in ("VLLM_SERVER_DEV_MODE", "VLLM_LOG_STATS_INTERVAL")}
    os.environ.update(VLLM_SERVER_DEV_MODE="1", VLLM_LOG_STATS_INTERVAL="1")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    # vLLM binds a wildcard endpoint and connects to any other: a host:port endpoint
    # keeps everything on loopback, with the subscriber bound and vLLM connecting.
    sub.bind(events_cfg["endpoint"])
    try:
        with Servers(cfg, eng, root / "server.log") as server:
            s = Served(server, sub, root / "server.log")
            s.wait_subscribed(model)
            yield s
    finally:
        sub.close(linger=0)
        ctx.term()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_hits_show_in_vllm_metrics_log_line_and_kv_events(model: str, served: Served) -> None:
    prompt = doc(model, 501)
    assert served.ask(prompt) == 0
    assert served.ask(prompt) == 4 * CHUNK
    hasher = ChunkHasher(key_namespace(model, {"model_id": MODEL_ID}))
    keys = [bytes(k) for k in hasher.keys(prompt)]

    def stored_in(medium: str, events: list[Any]) -> set[bytes]:
        return {h for e in events if isinstance(e, BlockStored) and e.medium == medium
                for h in e.block_hashes}
    events = served.events_until(lambda ev: set(keys) <= stored_in("CPU", ev)
                                 and set(keys) <= stored_in("DISK", ev))
    assert set(keys) <= stored_in("CPU", events), "memory stores on vLLM's KV events stream"
    assert set(keys) <= stored_in("DISK", events), "disk stores on vLLM's KV events stream"
    first = next(e for e in events if isinstance(e, BlockStored) and e.block_hashes == [keys[0]])
    assert first.parent_block_hash is None and first.token_ids == prompt[:CHUNK]
    assert first.block_size == CHUNK
    deadline = time.monotonic() + 30
    while served.metric("vllm:kvtier_hit_tokens_total") < 4 * CHUNK:
        assert time.monotonic() < deadline, "kvtier's counters never reached vLLM's /metrics"
        time.sleep(1)
    assert served.metric("vllm:kvtier_stored_bytes_total") > 0
    assert served.metric("vllm:kvtier_loaded_bytes_total") > 0
    while "kvtier_hit_tokens" not in served.log.read_text(errors="replace"):
        assert time.monotonic() < deadline + 30, "no kvtier counters on vLLM's stats log line"
        time.sleep(1)


def test_reset_prefix_cache_with_the_connector_empties_kvtier(model: str, served: Served) -> None:
    prompt = doc(model, 502)
    served.ask(prompt)
    assert served.ask(prompt) == 4 * CHUNK
    assert _post(f"{served.server.base_url}/reset_prefix_cache?reset_external=true")["success"]
    assert served.ask(prompt) == 0  # neither memory nor disk had it any more
    events = served.events_until(lambda ev: any(isinstance(e, AllBlocksCleared) for e in ev))
    assert any(isinstance(e, AllBlocksCleared) for e in events)
    assert served.ask(prompt) == 4 * CHUNK  # and it fills again
