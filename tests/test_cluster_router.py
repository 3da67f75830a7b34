"""Controller + KV-aware router in front of two real ``vllm serve`` instances.

Two instances (tiny model, kvtier memory tier, vLLM's own prefix cache off,
``controller.url`` set, KV events published to the controller under their
instance ids, management API on for resyncs), one controller with its index
in a real redis-server plus a second controller replica on the same Redis,
one router, all on 127.0.0.1, started once for the module. The instances want an API key
(``vllm serve --api-key``), which only the router holds (``--backend-api-key-file``);
callers hold the router's keys (an operator's, which sees the ``x-kvtier-*`` headers, and
a tenant's). The tests run in order: the last ones kill the controller, then the
instances.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers, start_all
from kvtier.testing.cluster import KvtierProcess, controller, router
from kvtier.testing.procs import free_port, wait_until
from kvtier.testing.redis_proc import RedisProcess
from tests.redis_server import require_redis
from tests.vllm_run import doc, model  # noqa: F401

pytestmark = [pytest.mark.vllm, pytest.mark.redis]
NAMES = ("inst-a", "inst-b")
OPERATOR, TENANT, BACKEND = "op-" + "a" * 29, "tenant-" + "b" * 25, "vllm-" + "c" * 27


def _keys(root: Path) -> list[str]:
    """The router's flags for the keys above (files written into ``root``)."""
    (root / "router-keys").write_text(f"{OPERATOR} operator\n{TENANT} tenant-a\n")
    (root / "backend-key").write_text(BACKEND + "\n")
    return ["--api-key-file", str(root / "router-keys"),
            "--backend-api-key-file", str(root / "backend-key")]


def _keyed(rtr: KvtierProcess) -> KvtierProcess:
    rtr.token = OPERATOR  # its .call() speaks as the operator
    return rtr


class Cluster:
    def __init__(self, ctl: KvtierProcess, replica: KvtierProcess, rtr: KvtierProcess,
                 servers: dict[str, Servers], model: str) -> None:
        self.ctl, self.replica, self.rtr, self.servers, self.model = ctl, replica, rtr, servers, \
            model

    def ask(self, base: str, prompt: Any, max_tokens: int = 4, key: str = "", **more: Any
            ) -> tuple[int, Any, dict[str, str]]:
        """A completion at ``base`` with ``key`` (default: the operator's at a router, the
        instances' own at an instance)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, **more}
        direct = any(base == s.base_url for s in self.servers.values())
        key = key or (BACKEND if direct else OPERATOR)
        req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw, status, headers = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read(), e.code, dict(e.headers)
        text = raw.decode()
        return status, (json.loads(text) if not more.get("stream") else text), \
            {k.lower(): v for k, v in headers.items()}

    def cached_at(self, name: str, prompt: list[int], at: KvtierProcess | None = None) -> int:
        _, out, _ = (at or self.ctl).call("/v1/lookup", {"model": self.model,
                                                         "token_ids": prompt})
        return next((i["cached_tokens"] for i in out.get("instances", [])
                     if i["instance"] == name), 0)

    def registered(self) -> set[str]:
        try:
            return {i["instance"] for i in self.ctl.call("/v1/instances")[1]["instances"]}
        except OSError:
            return set()


def _server(name: str, model: str, root: Path, ctl: KvtierProcess) -> Servers:
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": ctl.events, "topic": name}
    eng = EngineSettings(model=model, max_model_len=2048, num_gpu_blocks=48,
                         kv_budget_bytes=64 << 20, dtype="bfloat16", threads_bind="0-1",
                         extra_args=("--no-enable-prefix-caching", "--served-model-name",
                                     "tiny", "--kv-events-config", json.dumps(events),
                                     "--api-key", BACKEND))
    srv = Servers(ServeConfig(name, sys.executable), eng, root / f"{name}.log")
    srv.cfg.kv_transfer = {
        "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": {
            "tiers": ["memory"], "memory.max_bytes": "64MiB", "control.port": free_port(),
            "controller.url": ctl.url, "controller.instance_id": name,
            "controller.instance_url": srv.base_url, "controller.heartbeat_s": 0.5}}
    return srv


@pytest.fixture(scope="module")
def cluster(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # vLLM imports this tree
    require_redis()
    redis = RedisProcess(root / "redis")
    redis.start()
    ctl = controller(root / "controller.log", redis_url=redis.url, ttl_s=4.0,
                     extra=["--tokenizer", f"tiny={model}"]).start()
    replica = controller(root / "replica.log", redis_url=redis.url, ttl_s=4.0).start()
    servers = {n: _server(n, model, root, ctl) for n in NAMES}
    errors = start_all(servers.values())
    rtr = None
    try:
        assert not errors, errors
        rtr = _keyed(router(root / "router.log", [
            "--controller", ctl.url, "--model-path", model, *_keys(root),
            *(a for s in servers.values() for a in ("--instance", s.base_url))])).start()
        c = Cluster(ctl, replica, rtr, servers, "tiny")
        wait_until(lambda: c.registered() == set(NAMES), 60, "both instances registered")
        yield c
    finally:
        if rtr is not None:
            rtr.stop()
        for s in servers.values():
            if s.procs:
                s.__exit__()
        ctl.stop()
        replica.stop()
        redis.close()


def test_a_repeated_prefix_goes_to_the_instance_that_holds_it(cluster: Cluster,
                                                                model: str) -> None:
    prompt = doc(model, 801)
    status, first, h1 = cluster.ask(cluster.rtr.url, prompt)
    assert status == 200 and h1["x-kvtier-instance"] in NAMES
    holder = h1["x-kvtier-instance"]
    wait_until(lambda: cluster.cached_at(holder, prompt) >= 1024, 60, "the KV events")
    status, again, h2 = cluster.ask(cluster.rtr.url, prompt)
    assert h2["x-kvtier-instance"] == holder and h2["x-kvtier-reason"] == "cache_hit"
    assert int(h2["x-kvtier-cached-tokens"]) >= 1024
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # it hit there
    other = next(n for n in NAMES if n != holder)
    status, direct, _ = cluster.ask(cluster.servers[other].base_url, prompt)
    assert direct["choices"][0]["text"] == again["choices"][0]["text"] == \
        first["choices"][0]["text"]
    _, text, _ = cluster.rtr.call("/metrics")
    assert f'kvtier_router_requests_total{{instance="{holder}",reason="cache_hit"}}' in text
    # the second controller replica answers the same from the shared Redis index
    lookup = {"model": cluster.model, "token_ids": prompt}
    assert cluster.replica.call("/v1/lookup", lookup)[1] == cluster.ctl.call("/v1/lookup",
                                                                             lookup)[1]
    assert cluster.cached_at(holder, prompt, at=cluster.replica) >= 1024


def test_prompts_are_counted_as_vllm_counts_them(cluster: Cluster) -> None:
    status, out, h = cluster.ask(cluster.rtr.url, "The router tokenizes this string prompt.")
    assert status == 200 and int(h["x-kvtier-prompt-tokens"]) == out["usage"]["prompt_tokens"]
    body = {"model": cluster.model, "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Which instance answers?"}]}
    status, out, h = cluster.rtr.call("/v1/chat/completions", body)
    assert status == 200 and h["x-kvtier-instance"] in NAMES
    assert int(h["x-kvtier-prompt-tokens"]) == out["usage"]["prompt_tokens"]
    # the controller answers a string prompt too (with its own --tokenizer for the model)
    status, out, _ = cluster.ctl.call("/v1/lookup", {"model": cluster.model, "prompt": "hi"})
    assert status == 200 and {i["instance"] for i in out["instances"]} == set(NAMES)
    assert cluster.rtr.call("/v1/models")[1]["data"][0]["id"] == cluster.model


def test_keys_tenants_and_the_header_oracle_with_real_vllm(cluster: Cluster,
                                                           model: str) -> None:
    prompt = doc(model, 812, 600)
    # a caller without the router's key, or with the instances' key: 401, no headers
    for key in ("x" * 32, BACKEND):
        status, _, h = cluster.ask(cluster.rtr.url, prompt, key=key)
        assert status == 401 and not any(k.startswith("x-kvtier") for k in h)
    # the operator caches the prompt in the shared cache and sees where it went
    status, first, h = cluster.ask(cluster.rtr.url, prompt)
    assert status == 200 and h["x-kvtier-instance"] in NAMES
    wait_until(lambda: cluster.cached_at(h["x-kvtier-instance"], prompt) >= 512, 60,
               "the KV events")
    # a tenant gets the same answer (vLLM took the tenant's cache_salt), no headers, and
    # no hit: its salt keys its own space (vLLM counts no cached tokens for it)
    status, out, h = cluster.ask(cluster.rtr.url, prompt, key=TENANT)
    assert status == 200 and not any(k.startswith("x-kvtier") for k in h)
    assert out["choices"][0]["text"] == first["choices"][0]["text"]
    assert not (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    # /metrics is the operator's
    assert cluster.rtr.call("/metrics", token=TENANT)[0] == 403


def test_a_router_finds_the_instances_through_the_controller(cluster: Cluster, model: str,
                                                             tmp_path: Path) -> None:
    with _keyed(router(tmp_path / "router.log", ["--controller", cluster.ctl.url,
                                                 "--model-path", model,
                                                 *_keys(tmp_path)])) as rtr:
        wait_until(lambda: rtr.call("/health")[1]["instances"] == 2, 30, "discovery")
        status, _, h = cluster.ask(rtr.url, doc(model, 810, 300))
        assert status == 200 and h["x-kvtier-instance"] in NAMES


def test_streaming_through_the_router(cluster: Cluster, model: str) -> None:
    prompt = doc(model, 802, 600)
    _, plain, _ = cluster.ask(cluster.rtr.url, prompt)
    status, sse, headers = cluster.ask(cluster.rtr.url, prompt, stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in sse.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e).get("choices"))
    assert text == plain["choices"][0]["text"]


def test_pd_mode_prefills_on_one_instance_then_decodes_on_the_other(
        cluster: Cluster, model: str, tmp_path: Path) -> None:
    a, b = (cluster.servers[n].base_url for n in NAMES)
    prompt = doc(model, 811)
    with _keyed(router(tmp_path / "pd.log", ["--controller", cluster.ctl.url, "--prefill", a,
                                             "--decode", b, *_keys(tmp_path)])) as pd:
        status, out, h = cluster.ask(pd.url, prompt, max_tokens=6)
        assert status == 200 and h["x-kvtier-prefill-instance"] == "inst-a"
        assert h["x-kvtier-instance"] == "inst-b" and float(h["x-kvtier-prefill-ms"]) > 0
    wait_until(lambda: cluster.cached_at("inst-a", prompt) >= 1024, 60, "the prefill's chunks")
    _, direct, _ = cluster.ask(a, prompt, max_tokens=6)
    assert out["choices"][0]["text"] == direct["choices"][0]["text"]


def test_a_dead_controller_costs_no_request_and_instances_come_back(cluster: Cluster,
                                                                    model: str) -> None:
    prompt = doc(model, 803)
    _, _, h = cluster.ask(cluster.rtr.url, prompt)
    holder = h["x-kvtier-instance"]
    cluster.ctl.stop(signal.SIGKILL)
    for seed in (804, 805):
        status, out, h = cluster.ask(cluster.rtr.url, doc(model, seed, 400))
        assert status == 200 and out["choices"][0]["text"] is not None
        assert h["x-kvtier-reason"] == "least_loaded"
    cluster.ctl.start()  # same ports: vLLM's publishers reconnect, instances re-register
    registrations = 'kvtier_controller_events_total{label="ok",what="register"} 2.0'
    wait_until(lambda: registrations in cluster.ctl.call("/metrics")[1], 60, "re-registration")
    assert cluster.registered() == set(NAMES)
    # the fresh process resynced the instances from their snapshots into the shared index
    wait_until(lambda: cluster.cached_at(holder, prompt) >= 1024, 60, "a resync")


def test_a_dead_instance_is_routed_around_then_leaves_and_none_left_is_clear(
        cluster: Cluster, model: str) -> None:
    victim, survivor = cluster.servers["inst-b"], "inst-a"
    victim.__exit__()
    for seed in (806, 807, 808):
        status, _, h = cluster.ask(cluster.rtr.url, doc(model, seed, 300))
        assert status == 200 and h["x-kvtier-instance"] == survivor
    wait_until(lambda: cluster.registered() == {survivor}, 30, "inst-b leaving the index")
    cluster.servers[survivor].__exit__()
    status, out, h = cluster.ask(cluster.rtr.url, doc(model, 809, 300))
    assert status == 503 and "no instance available" in out["error"]["message"]
    assert not any(k.startswith("x-kvtier") for k in h)
