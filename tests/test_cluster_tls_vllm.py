"""A cluster across addresses of this machine other than 127.0.0.1, with TLS everywhere
and per-instance identities: a controller, two ``vllm serve`` instances with kvtier, a
router, on this machine's non-loopback address (traffic to it never leaves the
machine). Every kvtier surface speaks mutual TLS with one throwaway CA: the
controller, both management APIs, both transfer servers, the router; instances
register with the controller token and then hold a credential only they know; their
KV events are relayed over the controller's HTTPS API (vLLM publishes to a loopback
socket); chunks are signed with the cluster's integrity key.

A prompt sent through the router is computed on one instance; the other, asked
directly, reads its chunks over the TLS transfer channel (found through the
controller's ``/v1/locate``) and answers with greedy tokens and logprobs bitwise
equal to vLLM's own prefix-cache hit of the same length.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers, start_all
from kvtier.net.tls import TlsFiles, client_context
from kvtier.testing.cluster import KvtierProcess, controller, router
from kvtier.testing.procs import free_port, wait_until
from kvtier.testing.tls import make_certs, non_loopback_address
from tests.cluster_run import CHUNK, MODEL_ID, ROOT
from tests.vllm_run import doc, model, own_hit  # noqa: F401

pytestmark = pytest.mark.vllm
HOST = non_loopback_address()
NAMES = ("inst-a", "inst-b")
HIT = 4 * CHUNK  # doc(): 4 whole chunks + 76 tokens


class Cluster:
    def __init__(self, root: Path, model: str) -> None:
        assert HOST is not None
        self.root, self.model = root, model
        names = ["controller", "router", "admin", *NAMES]
        self.certs = {n: TlsFiles(c.cert_file, c.key_file, c.ca_file)
                      for n, c in make_certs(root / "certs", names, [HOST]).items()}
        self.secrets = {n: secrets.token_urlsafe(32) for n in ("controller", "control",
                                                               "transfer", "operator")}
        self.files = {}
        for name, value in self.secrets.items():
            self.files[name] = root / f"{name}.token"
            self.files[name].write_text(value)
        (root / "integrity.key").write_text(secrets.token_hex(32))
        (root / "keys").write_text(f"{self.secrets['operator']} operator\n")
        self.admin = client_context(self.certs["admin"])
        self.ctl: KvtierProcess | None = None
        self.rtr: KvtierProcess | None = None
        self.servers: dict[str, Servers] = {}
        self.control: dict[str, str] = {}

    def tls_args(self, name: str) -> list[str]:
        c = self.certs[name]
        return ["--tls-cert", c.cert_file, "--tls-key", c.key_file, "--tls-ca", c.ca_file]

    def start_controller(self) -> None:
        self.ctl = controller(self.root / "controller.log", self.secrets["controller"],
                              ttl_s=6.0, host=HOST, ssl_context=self.admin,
                              extra=self.tls_args("controller"))
        self.ctl.start()

    def instance(self, name: str, cores: str, peer: bool) -> Servers:
        assert self.ctl is not None
        relay, control, transfer = free_port(), free_port(), free_port()
        self.control[name] = f"https://{HOST}:{control}"
        c = self.certs[name]
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://127.0.0.1:{relay}", "topic": name}
        eng = EngineSettings(model=self.model, max_model_len=2048, num_gpu_blocks=64,
                             kv_budget_bytes=64 << 20, threads_bind=cores, host=HOST,
                             extra_args=("--no-enable-prefix-caching",
                                         "--kv-events-config", json.dumps(events)))
        srv = Servers(ServeConfig(name, sys.executable), eng, self.root / f"{name}.log")
        srv.cfg.kv_transfer = {
            "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": {
                "tiers": ["memory", "peer"] if peer else ["memory"],
                "memory.max_bytes": "64MiB", "model_id": MODEL_ID,
                "control.host": HOST, "control.port": control,
                "control.token_file": str(self.files["control"]),
                "transfer.host": HOST, "transfer.port": transfer,
                "transfer.token_file": str(self.files["transfer"]),
                "tls.cert_file": c.cert_file, "tls.key_file": c.key_file,
                "tls.ca_file": c.ca_file,
                "integrity.key_file": str(self.root / "integrity.key"),
                "controller.url": self.ctl.url, "controller.instance_id": name,
                "controller.token_file": str(self.files["controller"]),
                "controller.instance_url": srv.base_url, "controller.heartbeat_s": 0.5,
                "controller.relay_events": True, "peer.contains_timeout_s": 2.0}}
        self.servers[name] = srv
        return srv

    def start_router(self) -> None:
        assert self.ctl is not None
        c = self.certs["router"]
        args = [*self.tls_args("router"), "--controller", self.ctl.url,
                "--controller-token-file", str(self.files["controller"]),
                "--api-key-file", str(self.root / "keys"), "--model-path", self.model,
                *(a for s in self.servers.values() for a in ("--instance", s.base_url))]
        assert c.cert_file
        self.rtr = router(self.root / "router.log", args, ssl_context=self.admin, host=HOST)
        self.rtr.start()

    def registered(self) -> dict[str, Any]:
        assert self.ctl is not None
        try:
            return {i["instance"]: i for i in self.ctl.call("/v1/instances")[1]["instances"]}
        except OSError:
            return {}

    def manage(self, name: str, path: str, body: Any = None) -> Any:
        with httpx.Client(verify=self.admin, timeout=30) as client:
            resp = client.request("POST" if body is not None else "GET",
                                  self.control[name] + path, json=body, headers={
                                      "Authorization": f"Bearer {self.secrets['control']}"})
        resp.raise_for_status()
        return resp.json()

    def complete(self, base: str, prompt: list[int], key: str = "",
                 verify: Any = True) -> tuple[dict[str, Any], dict[str, str]]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "return_token_ids": True, "logprobs": 1}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(verify=verify, timeout=300) as client:
            resp = client.post(f"{base}/v1/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        choice = out["choices"][0]
        details = out["usage"].get("prompt_tokens_details") or {}
        return ({"tokens": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"],
                 "cached": details.get("cached_tokens") or 0}, dict(resp.headers))

    def stop(self) -> None:
        if self.rtr is not None:
            self.rtr.stop()
        for s in self.servers.values():
            if s.procs:
                s.__exit__()
        if self.ctl is not None:
            self.ctl.stop()


@pytest.fixture(scope="module")
def cluster(model: str, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
            ) -> Iterator[tuple[Cluster, list[int], dict]]:
    if HOST is None:
        pytest.skip("this machine has no address other than loopback")
    import os

    os.environ["PYTHONPATH"] = ROOT  # vLLM's processes import this checkout
    root = tmp_path_factory.mktemp("tls-cluster")
    prompt = doc(model, 900)
    reference = own_hit(model, prompt, HIT)  # vLLM's own prefix-cache hit of HIT tokens
    c = Cluster(root, model)
    try:
        c.start_controller()
        c.instance("inst-a", "0", peer=True)
        c.instance("inst-b", "1", peer=True)
        errors = start_all(c.servers.values())
        assert not errors, errors
        wait_until(lambda: set(c.registered()) == set(NAMES), 60, "both instances registered")
        c.start_router()
        yield c, prompt, reference
    finally:
        c.stop()


def test_every_surface_is_on_the_non_loopback_address_over_tls(cluster: tuple) -> None:
    c, _, _ = cluster
    records = c.registered()
    for name in NAMES:
        rec = records[name]
        assert rec["control"] == c.control[name] and rec["control"].startswith(f"https://{HOST}:")
        assert rec["transfer"].startswith(f"{HOST}:")
        assert c.manage(name, "/v1/status")["tiers"]["memory"]
    plain = c.control["inst-a"].replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(plain + "/v1/status", timeout=5)
    # another registrant holding the controller token cannot take over inst-a's record
    assert c.ctl is not None
    rec = records["inst-a"]
    hijack = {k: rec[k] for k in ("instance", "url", "model", "namespace", "layout",
                                  "chunk_size", "tiers", "transfer", "topic")}
    status, out, _ = c.ctl.call("/v1/register", {**hijack, "control": f"https://{HOST}:1"})
    assert status == 403, out
    assert c.registered()["inst-a"]["control"] == c.control["inst-a"]


def test_a_prompt_routed_to_one_instance_is_a_tls_peer_hit_on_the_other(cluster: tuple
                                                                          ) -> None:
    c, prompt, reference = cluster
    assert c.rtr is not None
    first, headers = c.complete(c.rtr.url, prompt, c.secrets["operator"], c.admin)
    holder = headers["x-kvtier-instance"]
    other = next(n for n in NAMES if n != holder)
    wait_until(lambda: c.manage(holder, "/v1/lookup", {"tokens": prompt})["hit_chunks"] == 4,
               60, "the holder's chunks")
    before = c.manage(other, "/v1/status")["tiers"]["peer"]
    out, _ = c.complete(c.servers[other].base_url, prompt)
    after = c.manage(other, "/v1/status")["tiers"]["peer"]
    assert out["cached"] >= HIT
    assert after["hits"] - before["hits"] >= 4 and after["corrupt"] == 0
    assert out["tokens"] == first["tokens"] == reference["token_ids"]
    assert out["logprobs"] == pytest.approx(reference["logprobs"], abs=0, rel=0)
