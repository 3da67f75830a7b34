"""The management API inside a real ``vllm serve`` (tiny model, CPU) on 127.0.0.1.

One server for the module: kvtier's connector with a memory tier of 8 chunks
and a disk tier, the API on with a token from a file, vLLM's own prefix cache
off (so every hit is kvtier's). Each operation is checked by what the next
request loads (``cached_tokens``) and by its greedy output, compared with
another kvtier hit of the same length (see tests/test_vllm.py on why a hit is
compared with a hit).

The scheduler learns of memory-tier changes the API makes (clear, evict,
move) from the worker's report at the end of the next engine step; a request
scheduled before that may be promised chunks that are gone, and vLLM then
recomputes them (right output, no hit). :meth:`Instance.tick` runs one short
step so the next request is planned on the new state.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from kvtier.codecs import ChunkData, ChunkMeta, Codec, parse_header
from kvtier.control.client import encode_chunk
from kvtier.keys import ChunkKey
from kvtier.testing.models import build_model, make_document
from kvtier.testing.offline import KV_CONNECTOR, KV_CONNECTOR_MODULE
from kvtier.testing.procs import free_port
from kvtier.testing.vllm_cpu import memory_utilization, vllm_env

pytestmark = pytest.mark.vllm

CHUNK = 256
TOKEN = "tok-7f3a9c-vllm"
MAX_BODY = 4 * 1024**2


class Instance:
    """A running vLLM OpenAI server with kvtier and its management API."""

    def __init__(self, model: str, root: Path) -> None:
        self.model, self.root = model, root
        self.port, self.control = free_port(), free_port()
        (root / "token").write_text(TOKEN + "\n")
        self.extra = {"tiers": ["memory", "disk"], "disk.path": str(root / "chunks"),
                      "memory.max_bytes": 8 * 512 * 1024, "control.port": self.control,
                      "control.token_file": str(root / "token"),
                      "control.max_body_bytes": MAX_BODY}
        self.log_path = root / "server.log"
        self.api_url = f"http://127.0.0.1:{self.control}"

    def start(self) -> None:
        ktc = {"kv_connector": KV_CONNECTOR, "kv_connector_module_path": KV_CONNECTOR_MODULE,
               "kv_role": "kv_both", "kv_connector_extra_config": self.extra}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               self.model, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
               "--dtype", "bfloat16", "--max-model-len", "4096", "--no-enable-prefix-caching",
               "--enable-prompt-tokens-details", "--seed", "0",
               "--gpu-memory-utilization", str(memory_utilization(self.model)),
               "--kv-transfer-config", json.dumps(ktc)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=vllm_env(multiprocess=True), stdout=self._log,
                                     stderr=self._log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 400
        while True:
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, "vLLM not healthy in 400 s\n" + self.log_tail()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def complete(self, prompt: list[int]) -> tuple[str, int]:
        """Greedy text of 8 tokens and the prompt tokens that came from the cache."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions",
                                     json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.loads(resp.read())
        cached = (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return out["choices"][0]["text"], cached

    def tick(self) -> None:
        """One short engine step (a prompt under a chunk: nothing stored or loaded)."""
        self.complete([11, 12, 13])

    def api(self, op: str, body: Any = None, token: str = TOKEN) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        method = "GET" if op in ("status", "metrics") else "POST"
        path = {"status": "/v1/status", "metrics": "/metrics"}.get(op, f"/v1/{op}")
        data = None if method == "GET" else json.dumps(body or {}).encode()
        req = urllib.request.Request(self.api_url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, raw.decode() if op == "metrics" else json.loads(raw)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def ok(self, op: str, body: Any = None) -> Any:
        code, res = self.api(op, body)
        assert code == 200, (op, res)
        return res

    def where(self, prompt: list[int]) -> dict[str, list[bool]]:
        return self.ok("lookup", {"tokens": prompt})["tiers"]

    def on_disk(self, prompt: list[int]) -> None:
        """Wait (bounded) for the background writer to put the prompt's chunks on disk."""
        deadline = time.monotonic() + 60
        while not all(self.where(prompt)["disk"]):
            assert time.monotonic() < deadline, "chunks not on disk in 60 s"
            time.sleep(0.1)

    def reset(self) -> None:
        self.ok("clear")
        self.tick()


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_model("tiny"))


@pytest.fixture(scope="module")
def vllm(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = Instance(model, tmp_path_factory.mktemp("control-vllm"))
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def doc(model: str, seed: int) -> list[int]:
    return make_document(model, 1100, seed)  # 4 whole chunks + 76 tokens


def test_pin_survives_eviction_pressure_and_unpin_releases(vllm: Instance, model: str) -> None:
    a = doc(model, 1)
    vllm.reset()
    vllm.complete(a)
    vllm.on_disk(a)
    assert vllm.ok("evict", {"tokens": a, "tier": "disk"})["removed"] == 4  # memory only now
    assert vllm.ok("pin", {"tokens": a})["pinned"] == 4
    for seed in (2, 3):  # 8 more chunks through 8 slots, 4 of them pinned
        vllm.complete(doc(model, seed))
    assert vllm.where(a) == {"memory": [True] * 4, "disk": [False] * 4}
    assert vllm.complete(a)[1] == 4 * CHUNK
    assert vllm.ok("unpin", {"tokens": a})["unpinned"] == 4
    for seed in (4, 5):
        vllm.complete(doc(model, seed))
    assert vllm.where(a) == {"memory": [False] * 4, "disk": [False] * 4}
    assert vllm.complete(a)[1] == 0


def test_move_memory_to_disk_keeps_serving_hits(vllm: Instance, model: str) -> None:
    a = doc(model, 6)
    vllm.reset()
    vllm.complete(a)
    hit_text, cached = vllm.complete(a)
    assert cached == 4 * CHUNK
    vllm.on_disk(a)
    disk_hits = vllm.ok("status")["tiers"]["disk"]["hits"]
    assert vllm.ok("move", {"tokens": a, "from": "memory", "to": "disk"})["moved"] == 4
    assert vllm.where(a) == {"memory": [False] * 4, "disk": [True] * 4}
    vllm.tick()
    assert vllm.complete(a) == (hit_text, 4 * CHUNK)
    assert vllm.ok("status")["tiers"]["disk"]["hits"] >= disk_hits + 4


def test_clear_empties_every_tier(vllm: Instance, model: str) -> None:
    a = doc(model, 7)
    vllm.reset()
    vllm.complete(a)
    vllm.on_disk(a)
    assert vllm.ok("clear")["removed"] >= 8
    assert all(t["num_chunks"] == 0 for t in vllm.ok("status")["tiers"].values())
    vllm.tick()
    assert vllm.complete(a)[1] == 0


def test_compress_then_decompress_keeps_greedy_outputs_equal(vllm: Instance,
                                                             model: str) -> None:
    a = doc(model, 8)
    vllm.reset()
    vllm.complete(a)
    vllm.on_disk(a)
    hit = vllm.complete(a)
    assert hit[1] == 4 * CHUNK
    for tier in ("memory", "disk"):
        assert vllm.ok("compress", {"tokens": a, "tier": tier}) == {"recoded": 4}
    assert vllm.complete(a) == hit  # from compressed memory
    assert vllm.ok("evict", {"tokens": a, "tier": "memory"})["removed"] == 4
    vllm.tick()
    assert vllm.complete(a) == hit  # from compressed disk
    assert vllm.ok("decompress", {"tokens": a, "tier": "disk"}) == {"recoded": 4}
    assert vllm.ok("evict", {"tokens": a, "tier": "memory"})["removed"] == 4
    vllm.tick()
    assert vllm.complete(a) == hit  # from raw disk again


def test_without_the_token_requests_are_401_and_change_nothing(vllm: Instance,
                                                               model: str) -> None:
    a = doc(model, 9)
    vllm.reset()
    vllm.complete(a)
    vllm.on_disk(a)
    for token in ("", "wrong", TOKEN + "0"):
        assert vllm.api("clear", {}, token)[0] == 401
        assert vllm.api("evict", {"tokens": a}, token)[0] == 401
        assert vllm.api("status", None, token)[0] == 401
    assert vllm.where(a) == {"memory": [True] * 4, "disk": [True] * 4}
    assert vllm.complete(a)[1] == 4 * CHUNK


def _chunk_files(vllm: Instance, a: list[int]) -> list[tuple[ChunkKey, bytes]]:
    keys = [ChunkKey(bytes.fromhex(k)) for k in vllm.ok("lookup", {"tokens": a})["keys"]]
    root = Path(vllm.extra["disk.path"])
    return [(k, (root / k.hex()[:2] / f"{k.hex()}.kvc").read_bytes()) for k in keys]


def test_admit_takes_checked_chunks_and_refuses_poisoned_ones(vllm: Instance,
                                                              model: str) -> None:
    a = doc(model, 10)
    vllm.reset()
    vllm.complete(a)
    vllm.on_disk(a)
    hit = vllm.complete(a)
    files = _chunk_files(vllm, a)
    key, blob = files[0]
    meta = parse_header(key, blob).meta
    raw = ChunkData(meta, np.frombuffer(blob[128:], np.uint8))
    bomb = ChunkData(ChunkMeta(meta.dtype, meta.shape, Codec.ZLIB), np.frombuffer(
        zlib.compress(bytes(64 * 1024**2), 9), np.uint8))  # 64 MiB of zeros in ~64 KiB
    half = ChunkData(ChunkMeta(meta.dtype, (1, *meta.shape[1:])),
                     raw.payload[:raw.payload.size // 2])  # one block of two
    cases = {
        "another tenant": {"tokens": a, "salt": "tenant-b",
                           "chunks": [{"index": 0, "data": encode_chunk(key, raw)}]},
        "wrong size": {"tokens": a, "chunks": [{"index": 0, "data": encode_chunk(key, half)}]},
        "decompression bomb": {"tokens": a, "chunks": [
            {"index": 0, "data": encode_chunk(key, bomb)}]},
        "oversized": {"tokens": a, "chunks": [
            {"index": i, "data": base64.b64encode(b).decode()} for i, (_, b) in
            enumerate(files * 2)]},
    }
    vllm.reset()
    for name, body in cases.items():
        try:
            code, res = vllm.api("admit", body)
        except (urllib.error.URLError, ConnectionError) as err:
            # Refused before the client finished sending: the server answers 413 and closes,
            # and depending on timing the client's next write sees a reset or a broken pipe
            # (urllib wraps errors while sending, not while reading the answer).
            reason = getattr(err, "reason", err)
            assert name == "oversized" and isinstance(reason, ConnectionError), (name, err)
            code, res = 413, {}
        assert code in (400, 413), (name, res)
        assert all(t["num_chunks"] == 0 for t in vllm.ok("status")["tiers"].values()), name
    good = {"tokens": a, "chunks": [{"index": i, "data": base64.b64encode(b).decode()}
                                    for i, (_, b) in enumerate(files)]}
    assert vllm.ok("admit", good) == {"admitted": 4}
    vllm.tick()
    assert vllm.complete(a) == hit


def test_kvtier_ctl_against_the_running_api(vllm: Instance, model: str, tmp_path: Path) -> None:
    a = doc(model, 11)
    vllm.reset()
    vllm.complete(a)
    (tmp_path / "prompt.json").write_text(json.dumps(a))
    ctl = [sys.executable, "-m", "kvtier.cli.main", "ctl", "--url", vllm.api_url,
           "--token-file", str(vllm.root / "token")]

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*ctl, *args] if env is None else [*ctl[:6], *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, **(env or {})})

    out = run("lookup", "--tokens-file", str(tmp_path / "prompt.json"))
    assert out.returncode == 0 and "4 of 4 chunks stored, 1024 tokens would load" in out.stdout
    status = run("--json", "status")
    assert json.loads(status.stdout)["tiers"]["memory"]["num_chunks"] == 4
    assert "memory" in run("status").stdout.splitlines()[2]
    assert run("pin", "--tokens-file", str(tmp_path / "prompt.json"), "--ttl", "600"
               ).stdout.startswith("pinned: 4")
    assert run("unpin", "--tokens-file", str(tmp_path / "prompt.json")).returncode == 0
    via_env = run("status", env={"KVTIER_CONTROL__TOKEN": TOKEN})
    assert via_env.returncode == 0, via_env.stderr
    refused = run("clear", env={"KVTIER_CONTROL__TOKEN": "nope"})
    assert refused.returncode == 1 and "401" in refused.stderr
    assert "kvtier_tier_hits_total" in run("metrics").stdout
    assert run("clear").stdout.startswith("removed:")


def test_metrics_and_no_secret_in_the_server_log(vllm: Instance, model: str) -> None:
    a = doc(model, 12)
    vllm.reset()
    vllm.complete(a)
    vllm.complete(a)
    code, text = vllm.api("metrics")
    assert code == 200
    lines = text.splitlines()
    assert "# TYPE kvtier_tier_hits_total counter" in lines
    assert any(line.startswith('kvtier_tier_loaded_bytes_total{tier="memory"}') and
               float(line.split()[-1]) > 0 for line in lines)
    assert 'kvtier_writer_queue_capacity_chunks{tier="disk"} 256.0' in lines
    assert TOKEN not in vllm.log_path.read_text(errors="replace")
