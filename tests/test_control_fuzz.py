"""Schema-driven fuzzing of the whole management API (hypothesis, from ``/openapi.json``).

The API is served for real (uvicorn on 127.0.0.1) over a real store: a memory
tier and a disk tier, with a stored prompt. For every operation in the
OpenAPI document, hypothesis draws request bodies from the operation's JSON
schema (biased towards tier names, prompts and a chunk that exist, so the
operations really run), plus arbitrary JSON and arbitrary bytes. Every answer
must be a JSON object with a status below 500, and the server must stay up
with its tiers within their capacity.

CI runs a bounded number of examples (``derandomize``: the same requests
each run); only ``pytest -m fuzz`` runs a larger, random campaign
(``KVTIER_FUZZ_EXAMPLES`` per operation, default 400).
"""

from __future__ import annotations

import json
import os
from collections import Counter
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.control.client import encode_chunk
from tests.test_control import TOKEN, Setup, make_setup

CI_EXAMPLES = 40
BIG_EXAMPLES = int(os.environ.get("KVTIER_FUZZ_EXAMPLES", "400"))
SENT: Counter[str] = Counter()  # requests by "METHOD path status", printed at the end


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = make_setup(tmp_path_factory.mktemp("fuzz"), memory_chunks=8, token=TOKEN)
    yield s
    print(f"\nfuzz: {sum(SENT.values())} requests:", dict(sorted(SENT.items())))
    s.server.close()
    s.store.close()


@pytest.fixture(scope="module")
def spec(served: Setup) -> dict[str, Any]:
    return json.loads(send(served.url, "GET", "/openapi.json")[1])


def send(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, body, {"Authorization": f"Bearer {TOKEN}",
                                                    "Content-Type": "application/json"},
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            code, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        code, raw = err.code, err.read()
    SENT[f"{method} {path} {code}"] += 1
    return code, raw


# -- JSON schema -> strategy ------------------------------------------------------------


def from_schema(schema: dict[str, Any], components: dict[str, Any],
                hints: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Values valid for ``schema`` (the subset of JSON schema pydantic emits)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(components[name], components, hints))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, hints) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = {name: _prop(name, sub, components, hints)
                 for name, sub in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items()
                                               if k not in required})
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components, hints),
                        min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 40), 40))
    if kind == "integer":
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**63) - 1)
        return st.integers(int(schema.get("minimum", -2**63)), int(high))
    if kind == "number":
        return st.floats(schema.get("minimum", schema.get("exclusiveMinimum")),
                         schema.get("maximum"), allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in schema)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=min(schema.get("maxLength", 64), 64))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON


def _prop(name: str, schema: dict[str, Any], components: dict[str, Any],
          hints: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    plain = from_schema(schema, components, hints)
    return st.one_of(hints[name], plain) if name in hints else plain


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


def hints_for(s: Setup) -> dict[str, st.SearchStrategy]:
    """Values that exist in the served store, so operations do real work."""
    keys = s.engine.hasher.keys(s.tokens)
    (chunk,) = s.store.get_many(keys[:1])
    assert chunk is not None
    data = encode_chunk(keys[0], chunk)
    chunk.release()
    prompts = [s.tokens, s.tokens[:16], s.tokens + [5, 6, 7]]
    tiers = st.sampled_from(["memory", "disk"])
    return {"tier": tiers, "from": tiers, "to": tiers, "tokens": st.sampled_from(prompts),
            "keys": st.lists(st.sampled_from([k.hex() for k in keys]), max_size=4),
            "data": st.just(data), "index": st.integers(0, 4), "salt": st.just("tenant-b")}


# -- the fuzz ---------------------------------------------------------------------------


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, path, body schema or None) of every operation in the document."""
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            out.append((method.upper(), path, body.get("schema")))
    return out


def one_address(body: Any, pick: int) -> Any:
    """Mostly one of ``tokens`` / ``keys``, as the API wants (the schema cannot say so)."""
    if isinstance(body, dict) and "tokens" in body and "keys" in body and pick:
        body.pop("keys" if pick == 1 else "tokens")
        if pick == 2:
            body.pop("salt", None)
    return body


def check(code: int, raw: bytes, what: str) -> None:
    assert code < 500, f"{what} -> {code} {raw[:300]!r}"
    if code >= 400:
        assert isinstance(json.loads(raw).get("error"), str), what


def fuzz(served: Setup, spec: dict[str, Any], examples: int, derandomize: bool) -> None:
    ops = operations(spec)
    assert len(ops) == 14, [p for _, p, _ in ops]  # 10 operations, status, snapshot, health, metrics
    hints = hints_for(served)
    schemas = spec["components"]["schemas"]

    def request(op: tuple[str, str, dict[str, Any] | None]) -> st.SearchStrategy:
        method, path, schema = op
        if schema is None:
            return st.just((method, path, None))
        valid = st.tuples(from_schema(schema, schemas, hints), st.integers(0, 2)).map(
            lambda v: json.dumps(one_address(*v)).encode())
        junk = JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
        return st.tuples(st.just(method), st.just(path), st.one_of(valid, valid, valid, junk))

    body = st.sampled_from(ops).flatmap(request)

    @settings(max_examples=examples * len(ops), deadline=None, database=None,
              derandomize=derandomize,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(body)
    def one(req: tuple[str, str, bytes | None]) -> None:
        method, path, data = req
        code, raw = send(served.url, method, path, data)
        if path != "/metrics" and not path.startswith("/docs"):
            check(code, raw, f"{method} {path} {data[:300] if data else b''!r}")

    one()
    assert send(served.url, "GET", "/health")[0] == 200
    for tier in served.store.tiers:
        usage = tier.usage()
        assert usage.used_bytes <= usage.capacity_bytes, tier.name


def test_fuzz_the_api_from_its_openapi_schema(served: Setup, spec: dict[str, Any]) -> None:
    fuzz(served, spec, CI_EXAMPLES, derandomize=True)


@pytest.mark.fuzz
def test_fuzz_longer(served: Setup, spec: dict[str, Any], request: pytest.FixtureRequest
                     ) -> None:
    if "fuzz" not in (request.config.option.markexpr or ""):
        pytest.skip("the long campaign runs only when asked for: pytest -m fuzz")
    fuzz(served, spec, BIG_EXAMPLES, derandomize=False)
