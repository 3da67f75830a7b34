"""The report page renders every part from stored results, keeps the sections of
parts it did not rerun, and dates a section measured on another day. Results
are made-up numbers in each benchmark's JSON shape (the benchmarks themselves
run real processes; here only the page is under test)."""

from __future__ import annotations

from kvtier.bench import report

CODECS = {"setup": {"model": "small", "prompts": 2, "prompt_tokens": 1024, "chunks": 8,
                    "raw_bytes": 8 << 20, "chunk_meta": "bf16", "repeats": 3, "max_tokens": 8,
                    "baseline": "raw (same run, same hits)", "hit_tokens_expected": 2048},
          "codecs": [{"codec": "zstd", "lossless": True, "bits": None, "ratio": 1.52,
                      "encode_gbps": 0.4, "decode_gbps": 0.9, "token_agreement": 1.0,
                      "max_abs_logprob_diff": 0.0, "mean_abs_logprob_diff": 0.0,
                      "hit_tokens": 2048},
                     {"codec": "q8", "lossless": False, "bits": 8, "ratio": 1.98,
                      "encode_gbps": None, "decode_gbps": 0.5, "token_agreement": 0.995,
                      "max_abs_logprob_diff": 0.2, "mean_abs_logprob_diff": 0.01,
                      "hit_tokens": 2048}]}
HIT = {"setup": {"model": "/m/small-v1", "dtype": "bfloat16", "threads_bind": "0-1",
                 "tiers": ["memory", "redis"], "engine_kv_blocks": 77, "doc_tokens": 4000,
                 "decoders": 2, "decode_tokens": 64},
       "configs": [{"config": "async", "hit_ttft_ms": 557.0, "hit_cached_tokens": 3968,
                    "itl_p99_vs_own_hit": 0.9,
                    "itl_p99_ms": 114.0, "itl_p99_ms_no_hit": 33.0, "itl_p99_ratio": 3.45,
                    "itl_max_ms": 131.0}]}
PD_KEYS = ("itl_p50_ms", "itl_p99_ms", "itl_p999_ms", "itl_max_ms", "ttft_p50_ms", "ttft_p99_ms")
CLUSTER = {
    "routing": {"setup": {"model": "/m/tiny-v1", "dtype": "bfloat16", "kvtier": "memory tier",
                          "workload": "multi-round-qa", "requests": 30,
                          "settings": {"users": 6}, "concurrency": 6},
                "summary": {p: {"hit_rate": h, "ttft_p50_s": 0.2, "ttft_p90_s": 1.0, "qps": 2.0}
                            for p, h in (("round_robin", 0.6), ("kv", 0.75))},
                "router_hit_rate": 0.75, "roundrobin_hit_rate": 0.6},
    "pd": {"setup": {"longs": 4, "long_tokens": 1024, "interval_s": 4.0, "decoders": 3,
                     "decode_tokens": 48},
           **{f"{w}_{k}": 100.0 for w in ("single", "pd") for k in PD_KEYS},
           "itl_p99_single_over_pd": 1.5, "long_outputs_equal": 4, "pd_transfer_gbps": 0.1},
    "transfer": {"setup": {"chunks": 16, "chunk_bytes": 4 << 20, "repeats": 3},
                 "loopback_tcp_gbps": 2.4, "transfer_gbps": 2.3, "store_gbps": 1.9,
                 "transfer_vs_loopback": 0.96, "contains_ms_p50": 0.1}}
OLD_PAGE = """# kvtier benchmarks

## Cache engine: paged KV <-> chunks (`kvtier bench engine`)

engine text kept

## Something retired

not kept
"""


def entry(result: dict, date: str = "2026-12-04") -> dict:
    return {"cmd": "kvtier bench x", "date": date, "result": result}


def test_page_renders_new_parts_keeps_old_sections_and_dates_stale_ones() -> None:
    saved = {"codecs": entry(CODECS), "redis-hit": entry(HIT, "2026-12-01"),
             "cluster": entry(CLUSTER)}
    page = report.render(saved, "2026-12-04", OLD_PAGE)
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert [h.split(" (")[0] for h in headings] == [
        "## Cache engine: paged KV <-> chunks", "## Codecs on real vLLM KV",
        "## A large Redis hit while others decode", "## Many instances"]
    assert "engine text kept" in page and "not kept" not in page
    assert headings[2].endswith("(measured 2026-12-01)") and "measured" not in headings[1]
    assert "| zstd | lossless | 1.52x |" in page and "| q8 | 8-bit | 1.98x | - |" in page
    assert "| async | 557 | 3968 | 114 | 33 | 3.45x | 0.90x | 131 |" in page
    assert "Hit rate router / round-robin: 1.25x (goal >= 1.5x)" in page
    assert "ITL p99 one instance / PD: 1.50x" in page and "Transfer / raw TCP: 0.96x" in page
    # Rendering the page again from itself keeps every section as it was.
    assert report.render({}, "2026-12-04", page).split("\n", 4)[4] == page.split("\n", 4)[4]
