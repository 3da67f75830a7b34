"""``kvtier bench serve``: workloads, the streaming client, the summary, and a toy run.

The toy run starts real ``vllm serve`` processes (tiny model) for vLLM alone
and vLLM + kvtier; it checks behaviour (outputs equal, kvtier serves the
thrashed prefixes), never timings.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from kvtier.bench.serve import analysis
from kvtier.bench.serve.client import Result, run_workload
from kvtier.bench.serve.run import config_names
from kvtier.bench.serve.workloads import LongDocQA, MultiRoundQA, Turn, Workload
from kvtier.cli.main import main
from kvtier.testing.models import build_model


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_model("tiny"))


def test_long_doc_qa_asks_every_document_each_question(model: str) -> None:
    w = LongDocQA(docs=3, doc_tokens=300, questions=2, question_tokens=8).build(model)
    assert len(w.users) == 3 and w.num_requests == 6
    for d, turns in enumerate(w.users):
        assert [t.round for t in turns] == [0, 1]
        assert turns[0].prompt[:300] == turns[1].prompt[:300]  # same document
        assert turns[0].prompt[300:] != turns[1].prompt[300:]  # another question
    assert w.users[0][0].prompt[:300] != w.users[1][0].prompt[:300]
    assert LongDocQA(docs=3, doc_tokens=300, questions=2, question_tokens=8).build(model) \
        .users[2][1].prompt == w.users[2][1].prompt  # seeded


def test_multi_round_qa_history_is_a_prefix_of_the_next_turn(model: str) -> None:
    m = MultiRoundQA(users=2, rounds=3, system_tokens=50, context_tokens=100, turn_tokens=10,
                     answer_tokens=5)
    w = m.build(model)
    system = w.users[0][0].prompt[:50]
    for turns in w.users:
        assert turns[0].prompt[:50] == system  # shared system prompt
        assert len(turns[0].prompt) == 160
        for a, b in zip(turns, turns[1:]):
            assert b.prompt[:len(a.prompt)] == a.prompt
            assert len(b.prompt) == len(a.prompt) + 15
    assert w.users[0][0].prompt[50:150] != w.users[1][0].prompt[50:150]  # own context


def _result(user: int, rnd: int, ttft: float, cached: int = 0, tokens: list[int] | None = None
            ) -> Result:
    return Result(user, rnd, 100, sent_s=float(rnd), ttft_s=ttft, itl_s=0.01, latency_s=0.5,
                  cached_tokens=cached, token_ids=tokens or [1, 2], logprobs=[-0.5, -0.25])


def test_summary_counts_only_the_measured_rounds_and_computes_ratios() -> None:
    base = [_result(0, 0, 1.0), _result(0, 1, 1.0), _result(1, 1, 3.0)]
    fast = [_result(0, 0, 1.0), _result(0, 1, 0.1, 100), _result(1, 1, 0.3, 50, [1, 3])]
    summary = {"vllm": analysis.summarize("long-doc-qa", base),
               "kvtier-memory": analysis.summarize("long-doc-qa", fast)}
    summary["kvtier-memory"].update(analysis.compare_outputs(fast, base))
    analysis.add_ratios(summary)
    k = summary["kvtier-memory"]
    assert k["ttft_p50_s"] == pytest.approx(0.2) and k["cold_ttft_p50_s"] == 1.0
    assert k["hit_rate"] == pytest.approx(0.75)
    assert k["ttft_p50_speedup_vs_vllm"] == pytest.approx(10.0)
    assert k["outputs_compared"] == 3 and k["outputs_identical"] == 2
    assert k["within_latency_bound"] and summary["vllm"]["qps_ratio_vs_vllm"] == 1.0
    assert "| vLLM + kvtier (memory) |" in analysis.table(summary, {"kvtier-memory":
                                                                  "vLLM + kvtier (memory)"})
    assert math.isnan(analysis.quantile([], 0.5)) and analysis.quantile([1, 2, 3], 0.9) == 2.8


def test_outputs_note_says_whether_the_kv_layers_agree_where_they_part_from_vllm() -> None:
    base = [_result(0, 0, 1.0), _result(0, 1, 1.0), _result(1, 1, 1.0)]
    a = [_result(0, 0, 1.0), _result(0, 1, 1.0, tokens=[1, 3]), _result(1, 1, 1.0)]
    b = [_result(0, 0, 1.0), _result(0, 1, 1.0, tokens=[1, 3]), _result(1, 1, 1.0)]
    assert analysis.compare_outputs(a, base)["outputs_differ"] == [[0, 1]]
    agree = analysis.layers_agree({"vllm": base, "kvtier-memory": a, "native": b})
    assert agree["requests_differing_from_vllm"] == [[0, 1]]
    assert agree["layers_identical_on_them"] == 1
    assert "user 0 turn 1" in analysis.outputs_note(agree)
    assert "comes from the engine" in analysis.outputs_note(agree)
    c = [_result(0, 0, 1.0), _result(0, 1, 1.0, tokens=[1, 4]), _result(1, 1, 1.0, tokens=[9])]
    split = analysis.layers_agree({"vllm": base, "kvtier-memory": a, "native": c})
    assert split["requests_differing_from_vllm"] == [[0, 1], [1, 1]]
    assert split["layers_identical_on_them"] == 0
    assert [sp["request"] for sp in split["splits"]] == [[0, 1], [1, 1]]
    assert split["splits"][0]["groups"] == [["vllm"], ["kvtier-memory"], ["native"]]
    assert split["splits"][1]["groups"] == [["vllm", "kvtier-memory"], ["native"]]
    assert all(sp["same_cached_tokens"] for sp in split["splits"])
    note = analysis.outputs_note(split)
    assert "On user 1 turn 1 the runs split (vllm, kvtier-memory | native) although" in note
    assert "comes from the engine" not in note
    same = analysis.layers_agree({"vllm": base, "kvtier-memory": base})
    assert analysis.outputs_note(same).startswith("Every configuration's greedy outputs equal")


def test_config_names_always_include_the_baseline_and_reject_unknown_ones() -> None:
    assert config_names("kvtier-memory") == ["vllm", "kvtier-memory"]
    assert config_names("native,vllm,kvtier-disk") == ["vllm", "kvtier-disk", "native"]
    with pytest.raises(ValueError, match="'kvtire'"):
        config_names("kvtire")


def _sse_server(events: list[dict[str, Any]]) -> tuple[str, threading.Event]:
    """A real HTTP server on 127.0.0.1 that answers any POST with these events as SSE."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for ev in events:
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), server.shutdown()), daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", stop


def test_client_reads_events_longer_than_aiohttps_line_limit() -> None:
    big = list(range(40_000))  # the first event carries the prompt ids: ~230 KB on one line
    events = [{"choices": [{"token_ids": [7], "prompt_token_ids": big,
                            "logprobs": {"token_logprobs": [-1.5]}}]},
              {"choices": [{"token_ids": [8, 9], "logprobs": {"token_logprobs": [-2.0, -3.0]}}]},
              {"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": 512}}}]
    url, stop = _sse_server(events)
    try:
        w = Workload("t", [[Turn([1, 2, 3], 3, 0, 0)], [Turn([4, 5], 3, 0, 1)]])
        results, _ = asyncio.run(run_workload(url, "m", w, concurrency=1))
    finally:
        stop.set()
    assert len(results) == 2 and all(r.error is None for r in results)
    assert results[0].token_ids == [7, 8, 9] and results[0].logprobs == [-1.5, -2.0, -3.0]
    assert results[0].cached_tokens == 512


def test_client_records_a_refused_connection_as_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    w = Workload("t", [[Turn([1], 2, 0, 0)]])
    (res,), _ = asyncio.run(run_workload(f"http://127.0.0.1:{port}", "m", w, concurrency=1))
    assert res.error is not None and res.token_ids == []


@pytest.mark.vllm
def test_toy_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serve", "--workload", "long-doc-qa", "--toy", "--shape", "tiny",
               "--configs", "vllm,kvtier-memory", "--out", str(tmp_path), "--json",
               "--docs", "4", "--engine-kv-requests", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    s = res["summary"]
    for key in ("ttft_p50_s", "ttft_p90_s", "itl_p50_s", "qps", "hit_rate",
                "ttft_p50_speedup_vs_vllm", "qps_ratio_vs_vllm"):
        assert key in s["kvtier-memory"] and key in s["vllm"]
    k = s["kvtier-memory"]
    # Greedy tokens equal vLLM alone's for every request (logprobs are reported, not
    # asserted: on AVX2-only CPUs vLLM's own numerics depend on the step's token count).
    assert k["errors"] == 0 and k["outputs_identical"] == k["outputs_compared"] == 8
    # The engine holds one document; kvtier holds all four: every question hits.
    assert k["hit_rate"] > 0.8 > s["vllm"]["hit_rate"]
    assert k["verify_sampled"] >= 0 and k["verify_mismatches"] == 0  # the canary's counters
    assert (tmp_path / "long-doc-qa.png").stat().st_size > 10_000
    assert (tmp_path / "results-long-doc-qa.json").exists()


def test_long_doc_qa_on_the_real_model_asks_real_questions_about_shared_documents() -> None:
    """On SmolLM2: stdlib sources in the chat template, a document's questions sharing its
    chunks, answers ending at the end of turn; a workload it has no version of is refused."""
    from transformers import AutoTokenizer

    from kvtier.bench.serve.run import build_workload
    from kvtier.testing.smollm2 import build_smollm2

    smol = str(build_smollm2())
    w = LongDocQA(docs=2, doc_tokens=600, questions=2).build(smol, real=True)
    assert w.num_requests == 4 and w.settings["real"]
    tok = AutoTokenizer.from_pretrained(smol)
    for turns in w.users:
        (a, b) = turns
        assert a.stop_at_eos and b.stop_at_eos and a.prompt != b.prompt
        shared = next(i for i, (x, y) in enumerate(zip(a.prompt, b.prompt)) if x != y)
        assert shared >= 512  # the document's whole chunks are a shared prefix
        text = tok.decode(a.prompt)
        assert "import " in text and "<|im_start|>assistant" in text
    assert w.users[0][0].prompt[:shared] != w.users[1][0].prompt[:shared]  # two documents
    args = type("Args", (), {"workload": "multi-round-qa", "quick": True, "toy": False,
                             "model": None, "shape": "smollm2", "seed": 0})()
    with pytest.raises(ValueError, match="no real-model version"):
        build_workload(args, smol)
