"""The configurations ``kvtier bench serve`` compares, and their server processes.

Each configuration is one real ``python -m vllm.entrypoints.openai.api_server``
on 127.0.0.1 (the ``vllm`` console command does not work in this install),
started fresh for the configuration, with the same engine settings for all:
threads pinned the same way (``VLLM_CPU_OMP_THREADS_BIND``: with vLLM's
default, a run with a KV connector gets a core more than one without, which
fakes a speed-up), the same engine KV size (capped with
``--num-gpu-blocks-override`` so vLLM's own prefix cache overflows on
purpose), greedy decoding. What differs is only the KV layer behind vLLM:

- ``vllm``: vLLM alone, its own prefix cache on (the baseline);
- ``kvtier-memory``, ``kvtier-disk``: kvtier's connector, memory tier alone,
  or memory plus a disk tier in a scratch folder, on kvtier's defaults
  (partial last chunks kept in whole blocks); ``kvtier-redis`` (named only): memory
  plus a Redis tier, on its own ``redis-server`` started beside vLLM;
- ``kvtier-unverified``, ``kvtier-verify-all`` (named only, not in ``all``): the memory
  configuration with the canary off (``verify.sample_rate: 0``) and on every hit (``1``);
  ``kvtier-memory`` runs the default rate, so these two give the canary's cost;
- ``native``: vLLM's own ``OffloadingConnector``; stock, it does not run on
  the CPU platform, so it runs with :mod:`kvtier.bench.peers.vllm_native_cpu`
  (a CPU copy spec) and is labelled so;
- ``lmcache``: LMCache 0.5.6 in its multiprocess mode (``lmcache server``
  plus vLLM's ``LMCacheMPConnector``), from its own venv
  (:mod:`kvtier.bench.peers.lmcache`).

All KV layers get the same CPU memory budget.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kvtier.bench.peers.lmcache import lmcache_server
from kvtier.testing.procs import HOST, free_port, log_tail
from kvtier.testing.redis_proc import redis_binary
from kvtier.testing.vllm_cpu import memory_utilization
from kvtier.threads import pin_process, process_named, process_tree

NATIVE_SPEC = ("CPUCopyOffloadingSpec", "kvtier.bench.peers.vllm_native_cpu")
CONFIG_NAMES = ("vllm", "kvtier-memory", "kvtier-disk", "native", "lmcache",
                "kvtier-unverified", "kvtier-verify-all", "kvtier-redis")
DEFAULT_CONFIGS = CONFIG_NAMES[:5]
"""What ``--configs all`` runs; the canary's two configurations and memory plus Redis are
asked for by name."""
VERIFY_RATES = {"kvtier-unverified": 0.0, "kvtier-verify-all": 1.0}
LABELS = {"vllm": "vLLM alone (prefix cache on)",
          "kvtier-memory": "vLLM + kvtier (memory)",
          "kvtier-unverified": "vLLM + kvtier (memory, canary off)",
          "kvtier-verify-all": "vLLM + kvtier (memory, canary on every hit)",
          "kvtier-disk": "vLLM + kvtier (memory + disk)",
          "kvtier-redis": "vLLM + kvtier (memory + Redis)",
          "native": "vLLM native offloading + CPU copy shim",
          "lmcache": "vLLM + LMCache 0.5.6 (multiprocess server)"}


@dataclass(frozen=True)
class EngineSettings:
    """What every configuration's vLLM gets, identically."""

    model: str
    max_model_len: int
    num_gpu_blocks: int
    kv_budget_bytes: int
    dtype: str = "bfloat16"
    threads_bind: str = field(default_factory=lambda: f"0-{(os.cpu_count() or 1) - 1}")
    max_num_batched_tokens: int | None = None
    extra_args: tuple[str, ...] = ()
    """More ``vllm serve`` arguments, the same for every configuration."""
    host: str = "127.0.0.1"
    """Address ``vllm serve`` binds (and is reached at)."""
    pin_engine_core: bool = True
    """Bind vLLM's engine-core process (its scheduler) to the first core of
    ``threads_bind``, where the worker's main thread runs (one worker only). Unbound, the
    kernel moves it between cores: beside the worker's main thread, which yields while
    it waits for the scheduler, a step starts at once; beside an OpenMP thread spinning
    on the other core it waits for a time slice. On two cores the tiny model's rounds
    then came out in two modes, median ITL about 3 or 8 ms, whichever every
    configuration happened to get; bound, eight rounds in a row gave 3.0-3.3 ms."""


@dataclass
class Sidecar:
    """A process a configuration needs beside vLLM (LMCache's server)."""

    cmd: list[str]
    env: dict[str, str]
    ready_url: str = ""
    ready_port: int = 0
    """Ready once this port on 127.0.0.1 takes connections (a server that is not HTTP)."""


@dataclass
class ServeConfig:
    """One configuration: which Python runs vLLM, its KV transfer config, any sidecar."""

    name: str
    python: str
    kv_transfer: dict[str, Any] | None = None
    sidecar: Sidecar | None = None

    @property
    def label(self) -> str:
        """The human name used in tables and plots."""
        return LABELS[self.name]


def make_config(name: str, eng: EngineSettings, scratch: Path) -> ServeConfig:
    """The configuration called ``name`` (one of :data:`CONFIG_NAMES`)."""
    py = sys.executable
    budget = eng.kv_budget_bytes
    if name == "vllm":
        return ServeConfig(name, py)
    if name in ("kvtier-memory", "kvtier-disk", *VERIFY_RATES):
        # kvtier's defaults (partial last chunks kept in whole blocks, as vLLM's
        # native offloading keeps every whole block); only the tiers and budget differ.
        extra: dict[str, Any] = {"tiers": ["memory"], "memory.max_bytes": budget}
        if name in VERIFY_RATES:
            extra["verify.sample_rate"] = VERIFY_RATES[name]
        if name == "kvtier-disk":
            extra.update({"tiers": ["memory", "disk"], "disk.path": str(scratch / "kvtier-disk")})
        side = None
        if name == "kvtier-redis":
            port = free_port()
            extra.update({"tiers": ["memory", "redis"], "redis.url": f"redis://{HOST}:{port}/0"})
            side = Sidecar([redis_binary(), "--port", str(port), "--bind", HOST, "--save", "",
                            "--appendonly", "no", "--dir", str(scratch)], {}, ready_port=port)
        return ServeConfig(name, py, {"kv_connector": "KvtierConnector",
                                      "kv_connector_module_path": "kvtier.connectors.vllm",
                                      "kv_role": "kv_both", "kv_connector_extra_config": extra},
                           side)
    if name == "native":
        spec_name, spec_module = NATIVE_SPEC
        return ServeConfig(name, py, {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                      "kv_connector_extra_config": {
                                          "spec_name": spec_name, "spec_module_path": spec_module,
                                          "cpu_bytes_to_use": budget}})
    if name == "lmcache":
        python, kv_transfer, cmd, env, ready_url = lmcache_server(eng.kv_budget_bytes)
        return ServeConfig(name, python, kv_transfer, Sidecar(cmd, env, ready_url))
    raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIG_NAMES)}")


class Servers:
    """The running processes of one configuration (a context manager)."""

    def __init__(self, cfg: ServeConfig, eng: EngineSettings, log_path: Path,
                 start_timeout_s: float = 600.0) -> None:
        self.cfg, self.eng, self.log_path = cfg, eng, log_path
        self.port = free_port()
        self.base_url = f"http://{eng.host}:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.startup_s = 0.0

    def __enter__(self) -> Servers:
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        try:
            if self.cfg.sidecar is not None:
                side = self.cfg.sidecar
                self._spawn(side.cmd, {**os.environ, **side.env})
                self._wait(side.ready_url or f"tcp:{side.ready_port}", t0)
            self._spawn(self._vllm_cmd(), self._vllm_env())
            self._wait(f"{self.base_url}/health", t0)
            self._pin_engine_core()
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        # vLLM first, then its sidecar: vLLM's connector still talks to it while
        # stopping. Each runs in its own session; the whole group gets the signal,
        # so vLLM's engine-core and worker processes go too.
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
            _signal_group(proc, signal.SIGKILL)  # stragglers of a leader that exited
        self.procs.clear()
        self._log.close()

    def _vllm_cmd(self) -> list[str]:
        e = self.eng
        cmd = [self.cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", e.model,
               "--host", e.host, "--port", str(self.port), "--dtype", e.dtype,
               "--enforce-eager", "--seed", "0", "--max-model-len", str(e.max_model_len),
               "--num-gpu-blocks-override", str(e.num_gpu_blocks),
               "--enable-prompt-tokens-details",
               "--gpu-memory-utilization", str(memory_utilization(e.model))]
        if e.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
        cmd += list(e.extra_args)
        if self.cfg.kv_transfer is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.cfg.kv_transfer)]
        return cmd

    def _vllm_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"VLLM_CPU_OMP_THREADS_BIND": self.eng.threads_bind,
                    "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "LMCACHE_TRACK_USAGE": "false"})
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: two processes
        return env

    def _pin_engine_core(self) -> None:
        """See :attr:`EngineSettings.pin_engine_core`."""
        bind = self.eng.threads_bind
        first = bind.split(",")[0].split("-")[0]
        if not self.eng.pin_engine_core or "|" in bind or not first.isdigit():
            return  # several workers (no one core), or vLLM's own choice ("auto")
        core = process_named(process_tree(self.procs[-1].pid), "VLLM::EngineCor")
        if core is None:
            raise RuntimeError(f"{self.cfg.name}: no vLLM engine-core process to bind")
        cpu = {int(first)}
        if not pin_process(core, cpu) or os.sched_getaffinity(core) != cpu:
            raise RuntimeError(f"{self.cfg.name}: vLLM's engine core not bound to CPU {cpu}")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        self._log.write(f"\n==== {' '.join(cmd)}\n".encode())
        self._log.flush()
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait(self, url: str, t0: float) -> None:
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    self._log.flush()
                    raise RuntimeError(f"{self.cfg.name}: a server exited with {proc.returncode}"
                                       f" while starting (log: {self.log_path}); its log ends:\n"
                                       + log_tail(self.log_path))
            if time.monotonic() - t0 > self.start_timeout_s:
                raise TimeoutError(f"{self.cfg.name}: {url} not ready in "
                                   f"{self.start_timeout_s:.0f} s (log: {self.log_path}); its log "
                                   "ends:\n" + log_tail(self.log_path))
            try:
                if url.startswith("tcp:"):
                    socket.create_connection((HOST, int(url[4:])), timeout=2).close()
                else:
                    urllib.request.urlopen(url, timeout=2).close()
                return
            except OSError:
                time.sleep(1)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def start_all(servers: Iterable[Servers]) -> list[BaseException]:
    """Start several configurations' processes side by side (each start is mostly
    waiting). Returns the errors; when there are any, the ones that did start are
    stopped again."""
    servers = list(servers)
    errors: list[BaseException] = []

    def start(s: Servers) -> None:
        try:
            s.__enter__()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            if s.procs:
                s.__exit__()
    return errors
