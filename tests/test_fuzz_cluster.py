"""Schema-driven fuzzing of the cluster's HTTP surfaces, beside the management API's
(``tests/test_control_fuzz.py``, whose JSON-schema strategies this reuses).

- **Router**: a real router (uvicorn, the Guard, API keys with tenants and an
  operator) in front of a stand-in instance and controller (a small real HTTP
  server, ``tests/test_security_router.StandIn``: what is under test is the router).
  Bodies are OpenAI-shaped (prompts as text, token ids, batches, chat messages; any
  ``cache_salt``, ``stream``, ``max_tokens``) or arbitrary JSON or bytes, sent with
  an operator's, a tenant's, a shared, a wrong or no key. Every answer is below 500
  with a JSON error when 4xx; the routing headers reach operators only and never an
  error; the router still serves after.
- **Controller**: its own OpenAPI document drives the bodies of every operation
  (valid per the schema, biased to a registered instance and its prompt), plus
  arbitrary JSON and bytes; every answer is below 500 with a JSON error when 4xx and
  the controller still answers ``/health`` and lookups after.

CI runs a bounded, derandomized number of examples; ``pytest -m fuzz`` more.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.cluster.router_keys import parse_keys
from kvtier.cluster.router_serve import RouterServing
from tests.test_control_fuzz import JSON
from tests.test_security_router import (BACKEND_KEY, KEYS_TEXT, OP, SHARED, TEN_A, RunningRouter,
                                        StandIn, kvtier_headers)

CI_EXAMPLES = 120
BIG_EXAMPLES = int(os.environ.get("KVTIER_FUZZ_EXAMPLES", "2000"))


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
def test_fuzz_the_router_long(routed: tuple[RunningRouter, StandIn]) -> None:
    fuzz_router(routed[0], BIG_EXAMPLES, derandomize=False)
