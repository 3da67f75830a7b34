"""Schema-driven fuzzing of the cluster's HTTP surfaces, beside the management API's
(``tests/test_control_fuzz.py``, whose JSON-schema strategies this reuses).

- **Router**: a real router (uvicorn, the Guard, API keys with tenants and an
  operator) in front of a stand-in instance and controller (a small real HTTP
  server, ``tests/router_standin.StandIn``: what is under test is the router).
  Bodies are OpenAI-shaped (prompts as text, token ids, batches, chat messages; any
  ``cache_salt``, ``stream``, ``max_tokens``) or arbitrary JSON or bytes, sent with
  an operator's, a tenant's, a shared, a wrong or no key. Every answer is below 500
  with a JSON error when 4xx; the routing headers reach operators only and never an
  error; the router still serves after.
- **Controller**: a real controller (uvicorn in a thread of this process, a memory
  index, a controller token) with one registered instance whose index holds a
  prompt. Its own OpenAPI document drives the bodies of every operation (valid per
  the schema, biased to that instance's name, namespace, prompt, keys and KV event
  batches), plus arbitrary JSON and bytes, sent with the controller token (now and
  then none or a wrong one) and the instance credential header right, wrong, empty,
  overlong or absent. Every answer is below 500 with a JSON error when 4xx; no
  request without the instance's own credential changes its record or its index; the
  controller still answers ``/health``, ``/v1/instances`` and lookups after.

CI runs a bounded, derandomized number of examples; ``pytest -m fuzz`` more
(``KVTIER_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import threading
from collections import Counter
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.cluster.app import CREDENTIAL, ControllerMetrics, serve
from kvtier.cluster.controller import Controller
from kvtier.cluster.router_keys import parse_keys
from kvtier.cluster.router_serve import RouterServing
from kvtier.cluster.state import MemoryState
from kvtier.keys import Namespace
from kvtier.testing.procs import HOST, free_port, wait_until
from tests.test_cluster_controller import NS, TOKEN, batch, body, keys_of, stored
from tests.test_cluster_controller import PROMPT as TOKEN_IDS
from tests.test_control_fuzz import JSON, check, from_schema, operations
from tests.router_standin import (BACKEND_KEY, KEYS_TEXT, OP, SHARED, TEN_A, RunningRouter,
                                        StandIn, kvtier_headers)

CI_EXAMPLES = 120
CI_CONTROLLER_EXAMPLES = 40  # per operation (11): 440 requests
BIG_EXAMPLES = int(os.environ.get("KVTIER_FUZZ_EXAMPLES", "2000"))


def long_campaign(request: pytest.FixtureRequest) -> None:
    """The long campaigns run only when asked for (``pytest -m fuzz``), not in CI."""
    if "fuzz" not in (request.config.option.markexpr or ""):
        pytest.skip("the long campaign runs only when asked for: pytest -m fuzz")


@pytest.fixture(scope="module")
def routed() -> Iterator[tuple[RunningRouter, StandIn]]:
    backend = StandIn()
    r = RunningRouter(RouterServing(keys=parse_keys(KEYS_TEXT, "keys"),
                                    max_body_bytes=64 * 1024, body_timeout_s=5.0),
                      [backend.url], backend.url, backend_key=BACKEND_KEY,
                      request_timeout_s=10.0)
    yield r, backend
    r.close()
    backend.close()


TOKENS = st.lists(st.integers(-5, 70_000), max_size=40)
PROMPT = st.one_of(st.text(max_size=60), TOKENS, st.lists(st.text(max_size=20), max_size=3),
                   st.lists(TOKENS, max_size=3), JSON)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                           "content": st.one_of(st.text(max_size=40), JSON)}),
                    max_size=3) | JSON
BODY = st.fixed_dictionaries({"model": st.one_of(st.just("m"), JSON)}, optional={
    "prompt": PROMPT, "messages": MESSAGES, "cache_salt": st.one_of(st.text(max_size=20), JSON),
    "stream": st.one_of(st.booleans(), JSON), "max_tokens": st.one_of(st.integers(), JSON),
    "max_completion_tokens": st.integers()})
REQUEST = st.tuples(
    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                     "/nope"]),
    st.sampled_from([OP, TEN_A, SHARED, "w" * 32, None]),
    st.one_of(BODY.map(lambda b: json.dumps(b).encode()), BODY.map(lambda b: json.dumps(b)
                                                                   .encode()),
              JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))


def fuzz_router(router: RunningRouter, examples: int, derandomize: bool) -> None:
    client = httpx.Client(timeout=30)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(REQUEST)
    def one(req: tuple[str, str | None, bytes]) -> None:
        path, key, data = req
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        method = "GET" if path in ("/v1/models", "/metrics") else "POST"
        resp = client.request(method, router.url + path, content=data if method == "POST"
                              else None, headers=headers)
        what = f"{method} {path} key={key and key[:3]} {data[:200]!r}"
        assert resp.status_code < 500, f"{what} -> {resp.status_code} {resp.text[:300]}"
        if resp.status_code >= 400 or key != OP:
            assert not kvtier_headers(resp), what
        if resp.status_code >= 400 and path != "/nope":
            assert resp.json().get("error"), what

    one()
    ok = client.post(router.url + "/v1/completions", headers={"Authorization": f"Bearer {TEN_A}"},
                     json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 1})
    assert ok.status_code == 200
    client.close()


def test_fuzz_the_router(routed: tuple[RunningRouter, StandIn]) -> None:
    fuzz_router(routed[0], CI_EXAMPLES, derandomize=True)


@pytest.mark.fuzz
def test_fuzz_the_router_long(routed: tuple[RunningRouter, StandIn],
                              request: pytest.FixtureRequest) -> None:
    long_campaign(request)
    fuzz_router(routed[0], BIG_EXAMPLES, derandomize=False)


# -- the controller ---------------------------------------------------------------------

LOOKUP = {"model": "tiny", "token_ids": TOKEN_IDS}
PROMPTS = [TOKEN_IDS, TOKEN_IDS[:300], TOKEN_IDS + [7, 8], []]
NAME = "fuzzed"  # the registered instance whose record only its credential may change
HOT = ["instance", "key_namespace", "block_size", "tiers", "batches", "keys", "token_ids"]
RIGHT, WRONG = "<right>", "<wrong>"  # credential placeholders, replaced when sending


@dataclasses.dataclass
class RunningController:
    """``kvtier controller``'s pieces (``serve(Controller(MemoryState))``) in a thread."""

    ctl: Controller
    server: Any
    thread: threading.Thread
    url: str
    credential: str  # NAME's, from its registration's answer

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.ctl.close()


@pytest.fixture(scope="module")
def controlled() -> Iterator[RunningController]:
    # no expiry during the run; pushed snapshots taken every 0.1 s (not mostly 429)
    ctl = Controller(MemoryState(ttl_s=3600.0), heartbeat_s=60.0, resync_interval_s=0.2)
    port = free_port()
    server = serve(ctl, ControllerMetrics(), HOST, port, TOKEN, max_body_bytes=256 * 1024,
                   timeout_s=5.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the controller")
    url = f"http://{HOST}:{port}"
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        out = c.post(url + "/v1/register", json=body(NAME)).json()
        assert out["credential"] and out["resync"], out
        snap = c.post(url + "/v1/snapshot", headers={CREDENTIAL: out["credential"]},
                      json={"instance": NAME, "namespace": NS.layout, "chunk_size": 256,
                            "tiers": {"memory": [k.hex() for k in keys_of()]}})
        assert snap.status_code == 200, snap.text
        found = c.post(url + "/v1/lookup", json={"model": "tiny", "token_ids": TOKEN_IDS})
        found = found.json()
        assert found["instances"][0]["cached_tokens"] > 0, found  # lookups do real work
    r = RunningController(ctl, server, thread, url, out["credential"])
    yield r
    r.close()


def controller_hints() -> dict[str, st.SearchStrategy]:
    """Values the controller knows, so operations get past validation and do real work."""
    keys = [k.hex() for k in keys_of()]
    payloads = [base64.b64encode(p).decode() for p in (
        batch(stored(keys_of())), batch(stored(keys_of()[:2], "DISK")),
        batch({"type": "BlockRemoved", "block_hashes": keys_of()[:1], "medium": "CPU"}),
        batch({"type": "AllBlocksCleared"}), b"\x93\x01")] + ["!!", ""]
    names = st.sampled_from([NAME, NAME, NAME, "other", "ghost"])
    urls = st.sampled_from(["http://127.0.0.1:7001/v1", "https://example.com", "http://[::1]:9"])
    hex_keys = st.lists(st.sampled_from(keys), max_size=6)
    hints = {
        "instance": names, "topic": names, "exclude": names, "model": st.just("tiny"),
        "namespace": st.sampled_from([NS.seed().hex(), NS.layout]),
        "key_namespace": st.fixed_dictionaries({
            "chunk_size": st.sampled_from([256, 256, 128, 100])}, optional={
            "salt": st.sampled_from(["", "s1"]), "tp_size": st.integers(1, 3),
            "hash_version": st.integers(1, 3)}).map(lambda o: {**dataclasses.asdict(NS), **o}),
        "layout": st.just(NS.layout),
        "chunk_size": st.just(256), "block_size": st.sampled_from([128, 128, 0, 96]),
        "tiers": st.just(["memory"]) | st.dictionaries(st.sampled_from(["memory", "disk"]),
                                                        hex_keys, max_size=2),
        "url": urls, "control": urls, "transfer": st.just("127.0.0.1:9100"),
        "token_ids": st.sampled_from(PROMPTS), "keys": hex_keys,
        "salt": st.sampled_from(["", "tenant-b"]), "seq": st.integers(0, 20),
        "payload": st.sampled_from(payloads)}
    # three branches each against the schema's one (hypothesis flattens nested one_of):
    # mostly values that pass validation and reach the controller's logic
    return {k: st.one_of(v, v, v) for k, v in hints.items()}


def known_good() -> dict[str, Any]:
    """A valid body per operation, for NAME (the fuzz changes some fields of it)."""
    keys = [k.hex() for k in keys_of()]
    return {"/v1/register": body(NAME), "/v1/heartbeat": {"instance": NAME},
            "/v1/snapshot": {"instance": NAME, "namespace": NS.layout, "chunk_size": 256,
                             "tiers": {"memory": keys}},
            "/v1/events": {"instance": NAME, "batches": [
                {"seq": 0, "payload": base64.b64encode(batch(stored(keys_of()))).decode()}]},
            "/v1/lookup": {"model": "tiny", "token_ids": TOKEN_IDS}, "/v1/locate": {"keys": keys}}


def consistent(path: str, body: Any, pick: bool) -> Any:
    """Mostly what the schema cannot say: a lookup with ``token_ids`` only; a registration
    whose ``namespace`` is the digest of its ``key_namespace``."""
    if not pick or not isinstance(body, dict):
        return body
    if path == "/v1/lookup":
        body.pop("prompt", None)
        if not isinstance(body.get("token_ids"), list):
            body["token_ids"] = PROMPTS[0]
    if path == "/v1/register" and isinstance(body.get("key_namespace"), dict):
        try:
            body["namespace"] = Namespace(**body["key_namespace"]).seed().hex()
        except (TypeError, ValueError):
            pass
    return body


def state_of(ctl: Controller) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """NAME's record (credential digest and last heartbeat included) and its index."""
    return copy.deepcopy(ctl.state.get(NAME)), ctl.state.counts(NAME)


def fuzz_controller(running: RunningController, examples: int, derandomize: bool) -> None:
    client = httpx.Client(timeout=30)
    spec = client.get(running.url + "/openapi.json",
                      headers={"Authorization": f"Bearer {TOKEN}"}).json()
    ops = operations(spec)
    assert {p for _, p, _ in ops} == {"/health", "/metrics", "/v1/instances", "/v1/register",
                                      "/v1/heartbeat", "/v1/snapshot", "/v1/events",
                                      "/v1/lookup", "/v1/locate"}
    ops += [("GET", "/v1/register", None), ("POST", "/nope", None)]  # 405, 404: JSON too
    hints, schemas = controller_hints(), spec["components"]["schemas"]
    good = known_good()

    def request(op: tuple[str, str, dict[str, Any] | None]) -> st.SearchStrategy:
        method, path, schema = op
        junk = JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
        if schema is None:
            return st.tuples(st.just(method), st.just(path), st.none() | junk)
        drawn = from_schema(schema, schemas, hints)
        valid = st.tuples(drawn, st.booleans()).map(
            lambda v: json.dumps(consistent(path, *v)).encode())
        if path in good:  # a known good body with up to three fields drawn (or dropped)
            named = schemas[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
            fields = sorted(named["properties"])
            fields += [f for f in HOT if f in fields]  # twice as likely
            near = st.tuples(drawn, st.lists(st.sampled_from(fields), max_size=3),
                             st.booleans()).map(lambda v: json.dumps(consistent(path, {
                                 **{k: x for k, x in good[path].items() if k not in v[1]},
                                 **{k: v[0][k] for k in v[1] if k in v[0]}}, v[2])).encode())
            return st.tuples(st.just(method), st.just(path),
                             st.one_of(near, near, valid, valid, junk))
        return st.tuples(st.just(method), st.just(path), st.one_of(valid, valid, valid, junk))

    req = st.tuples(st.sampled_from(ops).flatmap(request),
                    st.sampled_from([TOKEN] * 8 + [None, "w" * 24]),
                    st.sampled_from([RIGHT, RIGHT, WRONG, None, None, "", "x" * 300]))
    before, auth = state_of(running.ctl), {"Authorization": f"Bearer {TOKEN}"}
    sent: Counter[str] = Counter()  # requests by "METHOD path status", printed at the end
    culprit: list[str] = []

    @settings(max_examples=examples * len(ops), deadline=None, database=None,
              derandomize=derandomize,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(req)
    def one(r: tuple[tuple[str, str, bytes | None], str | None, str | None]) -> None:
        nonlocal before
        (method, path, data), token, cred = r
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if cred is not None:
            headers[CREDENTIAL] = {RIGHT: running.credential,
                                   WRONG: running.credential[::-1]}.get(cred, cred)
        resp = client.request(method, running.url + path, content=data, headers=headers)
        sent[f"{method} {path} {resp.status_code}"] += 1
        what = f"{method} {path} token={token and token[:3]} cred={cred and cred[:8]} " \
               f"{(data or b'')[:300]!r}"
        if path != "/metrics" or resp.status_code >= 400:
            check(resp.status_code, resp.content, what)
        looked = client.post(running.url + "/v1/lookup", json=LOOKUP, headers=auth)
        if looked.status_code != 200:  # the server's state outlives the example: the culprit
            culprit.append(culprit[0] if culprit else what)  # is the first to see it
            raise AssertionError(f"{culprit[0]} broke lookups: {looked.text[:300]}")
        after = state_of(running.ctl)
        if cred != RIGHT or token != TOKEN:
            assert after == before, f"{what} changed {NAME}: {before} -> {after}"
        before = after

    one()
    print(f"\ncontroller fuzz: {sum(sent.values())} requests:", dict(sorted(sent.items())))
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get(running.url + "/health").status_code == 200
        listed = c.get(running.url + "/v1/instances")
        assert listed.status_code == 200 and NAME in {i["instance"] for i in
                                                      listed.json()["instances"]}
        # its owner still re-registers it (what its own credential may have changed)
        again = c.post(running.url + "/v1/register", json=body(NAME),
                       headers={CREDENTIAL: running.credential})
        assert again.status_code == 200 and again.json()["credential"] is None, again.text
        found = c.post(running.url + "/v1/lookup",
                       json={"model": "tiny", "token_ids": TOKEN_IDS})
        assert found.status_code == 200 and found.json()["prompt_tokens"] == len(TOKEN_IDS)
        assert NAME in {i["instance"] for i in found.json()["instances"]}
    client.close()


def test_fuzz_the_controller(controlled: RunningController) -> None:
    fuzz_controller(controlled, CI_CONTROLLER_EXAMPLES, derandomize=True)


@pytest.mark.fuzz
def test_fuzz_the_controller_long(controlled: RunningController,
                                  request: pytest.FixtureRequest) -> None:
    long_campaign(request)
    fuzz_controller(controlled, BIG_EXAMPLES // 10, derandomize=False)


def test_a_registration_whose_key_namespace_cannot_key_prompts_is_refused(
        controlled: RunningController) -> None:
    """Found by the fuzz: one registration (the controller token is enough) with a block size
    that does not divide its chunk size made every lookup of its model a 400."""
    bad = [dict(key_namespace=dataclasses.asdict(dataclasses.replace(NS, chunk_size=100))),
           dict(block_size=100), dict(block_size=96, chunk_size=100)]
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for i, over in enumerate(bad):
            reg = body(f"poison-{i}", **over)
            if "key_namespace" in over:
                reg["namespace"] = Namespace(**over["key_namespace"]).seed().hex()
            out = c.post(controlled.url + "/v1/register", json=reg)
            assert out.status_code == 400, (over, out.text)
            assert out.json()["error"].startswith(("key_namespace", "block_size")), out.text
        found = c.post(controlled.url + "/v1/lookup", json=LOOKUP)
        assert found.status_code == 200 and NAME in {i["instance"] for i in
                                                      found.json()["instances"]}
