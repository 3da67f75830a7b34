"""Codecs in real vLLM (tiny model): a tier configured with a lossless codec through the
connector's extra config serves hits bitwise equal to vLLM's own; the codecs benchmark
runs end to end at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.codecs import HEADER_SIZE, Codec, parse_header
from tests.vllm_run import CHUNK, doc, kvtier_cfg, model, own_hit, req, run, same_output  # noqa: F401

pytestmark = pytest.mark.vllm


def test_a_zstd_disk_tier_serves_hits_bitwise_equal(model: str, tmp_path: Path) -> None:
    prompt = doc(model, 21)
    cfg = kvtier_cfg(tmp_path, ["disk"], **{"disk.codec": "zstd"})
    # The short second request gives the first one's saves the engine step they run in.
    run(model, [[req(prompt)], [req(doc(model, 22, 40), max_tokens=1)]], cfg)
    files = {f.stem: f.read_bytes() for f in (tmp_path / "chunks").rglob("*.kvc")}
    assert len(files) >= 4
    for name, data in files.items():
        header = parse_header(bytes.fromhex(name), data[:HEADER_SIZE])
        assert header.meta.codec is Codec.ZSTD
        assert header.payload_len < 0.8 * header.meta.raw_nbytes
    (hit,), = run(model, [[req(prompt)]], cfg)
    assert hit["num_cached_tokens"] == 4 * CHUNK
    assert same_output(hit, own_hit(model, prompt, 4 * CHUNK))


def test_an_instance_never_serves_another_instances_lossy_chunks(model: str,
                                                                   tmp_path: Path) -> None:
    """Two instances on one folder: one writes q8 (it opted in), the other (raw) must
    miss every chunk and answer exactly as cold; the q8 instance still hits its own."""
    prompt = doc(model, 25)
    lossy = kvtier_cfg(tmp_path, ["disk"], **{"disk.codec": "q8"})
    plain = kvtier_cfg(tmp_path, ["disk"])
    tail = req(doc(model, 26, 40), max_tokens=1)  # gives the saves their engine step
    run(model, [[req(prompt)], [tail]], lossy)
    files = list((tmp_path / "chunks").rglob("*.kvc"))
    assert files and all(parse_header(bytes.fromhex(f.stem), f.read_bytes()[:HEADER_SIZE])
                         .meta.codec is Codec.Q8 for f in files)
    (raw,), = run(model, [[req(prompt)]], plain, prefix_caching=False)
    (cold,), = run(model, [[req(prompt)]], kvtier_cfg(tmp_path / "cold", ["disk"]),
                   prefix_caching=False)  # an empty folder: the same connector, no hit
    assert raw["num_cached_tokens"] == 0 and same_output(raw, cold)
    (own,), = run(model, [[req(prompt)]], lossy, prefix_caching=False)
    assert own["num_cached_tokens"] == 4 * CHUNK


def test_bench_codecs_runs_end_to_end_at_toy_size(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli.main", "bench", "codecs", "--quick",
                           "--codecs", "zstd,q8", "--json", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["codec"]: r for r in res["codecs"]}
    assert set(rows) == {"raw", "zstd", "q8", "raw+1ulp"}
    for r in rows.values():
        assert {"codec", "lossless", "bits", "ratio", "encode_gbps", "decode_gbps",
                "token_agreement", "max_abs_logprob_diff"} <= set(r)
        assert r["hit_tokens"] == res["setup"]["hit_tokens_expected"] > 0
    assert rows["zstd"]["bitwise_equal"] and rows["zstd"]["ratio"] > 1.3
    assert rows["q8"]["bits"] == 8 and rows["q8"]["ratio"] > 1.9
    assert list(tmp_path.iterdir()) == []  # scratch folder removed
