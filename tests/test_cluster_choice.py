"""The router's choice rule, and the router process against stand-in OpenAI servers
(real HTTP on 127.0.0.1, no vLLM): failover, streaming, a clear 503, PD phases."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvtier.cluster.choice import Candidate, choose
from kvtier.testing.cluster import KvtierProcess, router


def test_longest_prefix_wins_until_its_load_outweighs_it() -> None:
    a, b = Candidate("a", 0, 1000), Candidate("b", 0, 0)
    assert choose([a, b], 1000).name == "a" and choose([a, b], 1000).reason == "cache_hit"
    busy = Candidate("a", 1, 1000)  # 1000 - 0.5 * 1 * 1000 = 500 > 0
    assert choose([busy, b], 1000).name == "a"
    busier = Candidate("a", 3, 1000)  # 1000 - 1500 < 0: the idle one
    c = choose([busier, b], 1000)
    assert c.name == "b" and c.reason == "least_loaded"
    assert choose([Candidate("a", 0, 512), Candidate("b", 0, 1024)], 1100).name == "b"


def test_no_prefix_anywhere_is_least_loaded_then_rotation() -> None:
    cands = [Candidate("a", 2), Candidate("b", 1), Candidate("c", 1)]
    assert {choose(cands, 100, turn=t).name for t in range(4)} == {"b", "c"}
    assert choose(cands, 100, policy="least_loaded").reason == "least_loaded"
    assert [choose(cands, 100, policy="round_robin", turn=t).name for t in range(3)] == \
        ["a", "b", "c"]
    assert choose([Candidate("a", 0, 900)], 1000, policy="least_loaded").reason == \
        "least_loaded"
    with pytest.raises(ValueError, match="no instance"):
        choose([], 10)
    with pytest.raises(ValueError, match="policy"):
        choose(cands, 10, policy="random")


class FakeOpenAI:
    """Answers /v1/completions like vLLM (JSON or SSE), or fails with 500."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.bodies = name, fail, []
        self.break_stream = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if outer.fail:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                text = {"choices": [{"text": outer.name}], "max_tokens": body.get("max_tokens")}
                if body.get("stream") and outer.break_stream:  # one event, then the line drops
                    data = f"data: {json.dumps(text)}\n\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(10 * len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if body.get("stream"):
                    data = (f"data: {json.dumps(text)}\n\ndata: [DONE]\n\n").encode()
                    ctype = "text/event-stream"
                else:
                    data, ctype = json.dumps(text).encode(), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = FakeOpenAI("a"), FakeOpenAI("b", fail=True)
    yield a, b
    a.close()
    b.close()


def post(r: KvtierProcess, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    return r.call("/v1/completions", body)


def test_router_fails_over_streams_and_says_when_none_is_left(
        fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Path) -> None:
    a, b = fakes
    with router(tmp_path / "router.log", ["--instance", b.url, "--instance", a.url,
                                          "--policy", "round_robin", "--debug-headers"]) as r:
        for _ in range(2):  # whichever comes first, the answer is a's
            status, out, headers = post(r, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
            assert status == 200 and out["choices"][0]["text"] == "a"
            assert headers["x-kvtier-instance"] == a.url
        status, out, headers = post(r, {"model": "m", "prompt": [1], "stream": True})
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert out.startswith("data: ") and out.rstrip().endswith("data: [DONE]")
        status, out, _ = post(r, {"model": "m", "prompt": [1]})
        assert status == 200
        a.break_stream = True
        status, out, _ = post(r, {"model": "m", "prompt": [1], "stream": True})
        events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == "a"  # what came, came
        assert "failed mid-stream" in json.loads(events[1])["error"]["message"]
        assert events[-1] == "[DONE]"
        a.break_stream = False
        a.fail = True
        status, out, _ = post(r, {"model": "m", "prompt": [1]})
        assert status == 503 and "no instance available" in out["error"]["message"]
        assert r.call("/v1/completions", [])[0] == 400  # type: ignore[arg-type]  # not an object
        _, text, _ = r.call("/metrics")
        assert "kvtier_router_instance_failures_total" in text


def test_pd_mode_prefills_one_token_then_decodes(fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                 tmp_path: Path) -> None:
    a, b = fakes
    b.fail = False
    with router(tmp_path / "router.log", ["--prefill", a.url, "--decode", b.url,
                                          "--debug-headers"]) as r:
        status, out, headers = post(r, {"model": "m", "prompt": [5, 6], "max_tokens": 7,
                                        "stream": True})
        assert status == 200 and '"text": "b"' in out
        assert headers["x-kvtier-prefill-instance"] == a.url
        assert float(headers["x-kvtier-prefill-ms"]) >= 0
        assert a.bodies[-1]["max_tokens"] == 1 and a.bodies[-1]["stream"] is False
        assert b.bodies[-1]["max_tokens"] == 7 and b.bodies[-1]["stream"] is True
        a.fail = True  # prefill fails: straight to decode
        status, out, headers = post(r, {"model": "m", "prompt": [5, 6]})
        assert status == 200 and out["choices"][0]["text"] == "b"
        assert headers["x-kvtier-prefill-instance"] == "none"


class FakeController:
    """Answers the router's ``/v1/lookup`` and ``/v1/instances``, or redirects them."""

    def __init__(self, instance: str) -> None:
        self.auth: list[str | None] = []
        self.redirect = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.auth.append(self.headers.get("Authorization"))
                if outer.redirect:
                    self.send_response(307)
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                data = json.dumps({"instances": [{"instance": "i1", "url": instance,
                                                  "cached_tokens": 256}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *a: Any) -> None:
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_router_lookup_sends_the_token_and_backs_off_a_refused_redirect() -> None:
    from kvtier.cluster.router import Router

    ctl = FakeController("http://127.0.0.1:9/")

    async def go() -> list[dict[str, int] | None]:
        r = Router(["http://127.0.0.1:9"], controller=ctl.url, controller_token="t",
                   controller_backoff_s=60.0)
        try:
            out = [await r.lookup("m", [1, 2, 3], None)]
            ctl.redirect = True
            out += [await r.lookup("m", [1, 2, 3], None), await r.lookup("m", [1], None)]
            assert r.backends["http://127.0.0.1:9"].name == "i1"
            return out
        finally:
            await r.close()

    try:
        assert asyncio.run(go()) == [{"http://127.0.0.1:9": 256}, None, None]
        assert ctl.auth == ["Bearer t", "Bearer t"]  # the third was skipped: backoff
    finally:
        ctl.server.shutdown()
        ctl.server.server_close()


def test_bench_cluster_dispatches_parts_and_prints_its_table(
        capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.bench.cluster import routing
    from kvtier.cli.main import main

    with pytest.raises(SystemExit):
        main(["bench", "cluster", "--part", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    summary = {p: {"hit_rate": h, "ttft_p50_s": 0.2, "ttft_p90_s": 1.0, "qps": 2.0,
                   "decisions": {"instance=inst-0,reason=cache_hit": 3.0}}
               for p, h in (("round_robin", 0.5), ("kv", 0.75))}
    text = routing.table({"summary": summary})
    assert "round_robin" in text and "75.0%" in text and "inst-0" in text


def test_router_and_controller_refuse_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli.main import main

    for argv, msg in ((["router", "--prefill", "http://a"], "both --prefill and --decode"),
                      (["router"], "give --instance"),
                      (["router", "--instance", "localhost:1"], "not an http:// URL"),
                      (["controller", "--host", "0.0.0.0"], "TLS is off: give --tls-cert"),
                      (["controller", "--host", "0.0.0.0", "--insecure-no-tls"],
                       "without a token"),
                      (["controller", "--ttl-s", "1", "--heartbeat-s", "2"], "--heartbeat-s")):
        with pytest.raises(SystemExit, match=msg):
            main(argv)
