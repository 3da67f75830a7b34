"""Faults under real serving: every request succeeds, every output is right, every fault is seen.

One ``vllm serve`` (tiny model, its own prefix cache off so repeats go to
kvtier) with kvtier on memory (two chunks' worth, so hits come from the lower
tiers) + disk (a folder on a tmpfs this test mounts, so it can be made
read-only or full for real) + a real redis-server. A stream of requests over
a few documents runs through phases; in each, a fault is injected for real:

- redis-server killed, then restarted (empty);
- redis-server paused (SIGSTOP) for seconds while a request decodes, then resumed;
- chunk files with a flipped byte, truncated, swapped between two keys, zeroed;
- the folder remounted read-only; the file system filled (real ENOSPC);
- vLLM killed (SIGKILL) while disk writes are in flight, restarted on the same folder;
- (a separate instance) a disk budget smaller than one chunk.

Each request's greedy tokens are compared with a cold run of vLLM alone, and
kvtier's counters (management API ``/v1/status``) must show the fault.
With ``FAULTS_REPORT=path`` the table of the run is written there.
Mounting needs root (CI and the dev machines run as root); without it the
test is skipped with the reason.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers
from kvtier.keys import ChunkHasher
from kvtier.testing.vllm_cpu import key_namespace
from kvtier.testing.procs import free_port
from kvtier.testing.redis_proc import RedisProcess, command
from tests.redis_server import require_redis
from tests.vllm_run import CHUNK, doc, model, req, run  # noqa: F401

pytestmark = [pytest.mark.vllm, pytest.mark.redis]

MODEL_ID = "faults"
DOC_TOKENS = 700  # 2 whole chunks + 188 tokens
NUM_DOCS = 8  # 0-3 main, 4-5 new during the healthy baseline, 6-7 while Redis is paused
MAX_TOKENS = 4


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if not _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]):
        pytest.skip("cannot mount a tmpfs here (needs root): the read-only and "
                    "disk-full faults need a real file system of their own")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Stack:
    """The server under test, its Redis and disk folder, and what was seen."""

    def __init__(self, model: str, root: Path, disk: Path, redis: RedisProcess) -> None:
        self.model, self.root, self.disk, self.redis = model, root, disk, redis
        self.control = free_port()
        self.server: Servers | None = None
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[int, list[int]] = {}
        self.docs = [doc(model, 300 + i, DOC_TOKENS) for i in range(NUM_DOCS)]
        hasher = ChunkHasher(key_namespace(model, {"model_id": MODEL_ID}))
        self.keys = [hasher.keys(d) for d in self.docs]

    def start(self) -> None:
        extra = {"tiers": ["memory", "disk", "redis"], "memory.max_bytes": "1MiB",
                 "disk.path": str(self.disk / "chunks"), "redis.url": self.redis.url,
                 "redis.timeout_s": 0.5, "model_id": MODEL_ID,
                 "control.port": self.control}
        cfg = ServeConfig("kvtier-faults", sys.executable, {
            "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra})
        eng = EngineSettings(model=self.model, max_model_len=1024, num_gpu_blocks=33,
                             kv_budget_bytes=1 << 20, dtype="bfloat16",
                             extra_args=("--no-enable-prefix-caching",))
        self.server = Servers(cfg, eng, self.root / "server.log").__enter__()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.server is not None:
            if sig == signal.SIGKILL:
                for proc in self.server.procs:
                    os.killpg(proc.pid, signal.SIGKILL)
            self.server.__exit__()
            self.server = None

    # -- requests -------------------------------------------------------------

    def ask(self, i: int) -> dict[str, Any]:
        assert self.server is not None
        body = {"model": self.model, "prompt": self.docs[i], "max_tokens": MAX_TOKENS,
                "temperature": 0, "return_token_ids": True}
        try:
            out = _post(f"{self.server.base_url}/v1/completions", body)
            tokens = out["choices"][0]["token_ids"]
            cached = (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            return {"ok": True, "tokens": tokens, "cached": cached or 0}
        except OSError as exc:
            return {"ok": False, "error": str(exc), "tokens": None, "cached": 0}

    def phase(self, name: str, docs: list[int], detect: tuple[str, str] | None,
              during: Any = None) -> dict[str, Any]:
        """Ask ``docs``; check outputs; check the counter ``detect`` = (tier, stat) grew."""
        before = self.status()
        results = [self.ask(i) for i in docs]
        after = self.status()
        seen = (after[detect[0]][detect[1]] - before[detect[0]][detect[1]]) if detect else None
        row = {"case": name, "requests": len(results),
               "succeeded": sum(r["ok"] for r in results),
               "equal": sum(r["tokens"] == self.reference[i] for i, r in zip(docs, results)),
               "hit_tokens": sum(r["cached"] for r in results),
               "detected": f"{detect[0]}.{detect[1]} +{seen}" if detect else "-",
               **(during or {})}
        self.rows.append(row)
        assert row["succeeded"] == row["requests"], (name, results)
        assert row["equal"] == row["requests"], (name, results, docs)
        if detect:
            assert seen and seen > 0, f"{name}: {detect} did not count the fault"
        return row

    def status(self) -> dict[str, dict[str, int]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}/v1/status",
                                    timeout=30) as resp:
            return json.loads(resp.read())["tiers"]

    def clear(self, tier: str) -> None:
        _post(f"http://127.0.0.1:{self.control}/v1/clear", {"tier": tier})

    def chunk_file(self, d: int, c: int) -> Path:
        (f,) = (self.disk / "chunks").rglob(f"{self.keys[d][c].hex()}.kvc")
        return f


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())


def stream_gaps(base_url: str, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Seconds between the streamed tokens of one request."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    times = [time.perf_counter() for line in conn.getresponse()
             if line.startswith(b"data: ") and b"[DONE]" not in line]
    conn.close()
    return [b - a for a, b in zip(times, times[1:])]


def worst_gap_while(stack: Stack, action: Any, new_docs: list[int]) -> float:
    """Worst inter-token gap of a decoding request while ``action`` runs and new
    requests (each a lookup in the shared tiers) arrive."""
    assert stack.server is not None
    gaps: list[float] = []
    t = threading.Thread(target=lambda: gaps.extend(stream_gaps(
        stack.server.base_url, stack.model, stack.docs[0][:300], 48)))
    t.start()
    time.sleep(1.0)
    with action():
        for i in new_docs:
            stack.ask(i)
    t.join(120)
    return max(gaps[2:] or [0.0])


@contextmanager
def nothing() -> Iterator[None]:
    yield


@pytest.fixture(scope="module")
def stack(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_redis()
    root = tmp_path_factory.mktemp("faults")
    with tmpfs(root / "disk", "64m") as disk:
        redis = RedisProcess(root / "redis")
        redis.start()
        s = Stack(model, root, disk, redis)
        cold = run(model, [[req(d, max_tokens=MAX_TOKENS) for d in s.docs]], None,
                   sequential=True)
        s.reference = {i: r["token_ids"] for i, r in enumerate(cold[0])}
        s.start()
        try:
            yield s
        finally:
            s.stop()
            redis.close()
            report = os.environ.get("FAULTS_REPORT")
            if report:
                Path(report).write_text(json.dumps(s.rows, indent=1))


def test_faults_under_serving(stack: Stack) -> None:
    s = stack
    s.phase("healthy: store, then hits", [0, 1, 2, 3, 0, 1, 2, 3], None)
    # A request decodes while two new documents arrive (their lookups ask every tier).
    healthy = worst_gap_while(s, nothing, [4, 5])

    @contextmanager
    def paused() -> Iterator[None]:
        """Redis accepts connections and never answers, for a few seconds."""
        os.kill(s.redis._proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            yield
            time.sleep(3)
        finally:
            os.kill(s.redis._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    before = s.status()["redis"]["errors"]
    worst = worst_gap_while(s, paused, [6, 7])
    s.rows.append({"case": "redis paused (SIGSTOP) while a request decodes",
                   "worst_itl_s": round(worst, 3), "healthy_worst_itl_s": round(healthy, 3),
                   "detected": f"redis.errors +{s.status()['redis']['errors'] - before}"})
    s.phase("after redis resumed", [6, 7, 0], None)

    # Redis killed: only it has the chunks (memory cleared, disk files removed).
    s.clear("memory")
    s.clear("disk")
    s.redis.stop()
    s.phase("redis killed", [0, 1, 2], ("redis", "errors"))
    s.redis.start()  # empty: it keeps nothing on disk
    s.phase("redis restarted (empty)", [0, 1, 2, 3, 4, 0], None)

    # Chunk files damaged four ways; Redis and memory emptied so disk must serve.
    command(s.redis.port, "FLUSHALL")
    s.clear("memory")
    f = s.chunk_file(0, 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped payload byte
    f.write_bytes(bytes(data))
    f = s.chunk_file(1, 0)
    f.write_bytes(f.read_bytes()[:1000])  # truncated
    a, b = s.chunk_file(2, 0), s.chunk_file(3, 0)
    tmp = a.with_name(a.name + ".swap")
    os.replace(a, tmp)  # two valid chunks under each other's key
    os.replace(b, a)
    os.replace(tmp, b)
    f = s.chunk_file(4, 1)
    f.write_bytes(bytes(f.stat().st_size))  # zeroed
    row = s.phase("chunk files flipped, truncated, swapped, zeroed", [0, 1, 2, 3, 4],
                  ("disk", "corrupt"))
    assert row["detected"] == "disk.corrupt +5"

    # The folder read-only: writes fail (counted), reads and serving go on.
    command(s.redis.port, "FLUSHALL")
    s.clear("memory")
    s.clear("disk")
    assert _mount(["-o", "remount,ro", str(s.disk)])
    try:
        s.phase("disk folder read-only", [3, 4, 3], ("disk", "errors"))
    finally:
        assert _mount(["-o", "remount,rw", str(s.disk)])

    # The file system full: a real ENOSPC on every chunk write.
    s.clear("memory")
    s.clear("disk")
    ballast = s.disk / "ballast"
    subprocess.run(["dd", "if=/dev/zero", f"of={ballast}", "bs=1M", "count=100"],
                   capture_output=True)
    try:
        s.phase("disk full (ENOSPC)", [5, 5], ("disk", "dropped"))
    finally:
        ballast.unlink()

    # vLLM killed while disk writes are in flight, restarted on the same folder.
    command(s.redis.port, "FLUSHALL")
    s.clear("disk")
    threads = [threading.Thread(target=s.ask, args=(i,)) for i in range(NUM_DOCS)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    s.stop(signal.SIGKILL)
    for t in threads:
        t.join(60)
    s.start()
    s.phase("vLLM SIGKILLed mid-write, restarted", list(range(NUM_DOCS)) * 2, None)
    leftovers = list((s.disk / "chunks").rglob("*.tmp"))
    assert not leftovers, f"temp files of the killed writer were not cleaned: {leftovers}"


def test_a_disk_budget_below_one_chunk_is_a_miss(model: str, tmp_path: Path) -> None:
    prompt = doc(model, 310, DOC_TOKENS)
    (cold,), = run(model, [[req(prompt)]], None)
    cfg = {"tiers": ["disk"], "disk.path": str(tmp_path / "chunks"), "disk.max_bytes": "64KiB"}
    out = run(model, [[req(prompt)], [req(prompt)]], cfg, prefix_caching=False)
    assert [r[0]["num_cached_tokens"] for r in out] == [0, 0]
    assert all(r[0]["token_ids"] == cold["token_ids"] for r in out)
    assert not list((tmp_path / "chunks").rglob("*.kvc"))
