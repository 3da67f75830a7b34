"""The canary in real vLLM: a wrong-but-valid chunk (checksums right, another prompt's
KV under this prompt's key) is caught by a sampled request, counted, deleted, replaced
by vLLM's own KV, and its tier taken out of service."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.codecs.format import HEADER_SIZE, encode_header, parse_header
from kvtier.config import DiskConfig
from kvtier.keys import ChunkHasher
from kvtier.testing.offline import run_instance
from kvtier.testing.vllm_cpu import key_namespace
from kvtier.tiers.disk import DiskTier
from tests.vllm_run import doc, kvtier_cfg, model, req, run, same_output  # noqa: F401

pytestmark = pytest.mark.vllm


def test_the_canary_catches_a_wrong_but_valid_chunk_and_replaces_it(model: str,
                                                                    tmp_path: Path) -> None:
    prompt, other = doc(model, 31), doc(model, 32)
    cfg = kvtier_cfg(tmp_path, model_id="canary-test", **{"verify.sample_rate": 0.0})
    first = run(model, [[req(prompt)], [req(other)]], cfg)  # both stored on disk
    hasher = ChunkHasher(key_namespace(model, {"model_id": "canary-test"}))
    key, donor_key = hasher.keys(prompt)[2], hasher.keys(other)[2]
    (target,) = (tmp_path / "chunks").rglob(f"{key.hex()}*")
    (donor,) = (tmp_path / "chunks").rglob(f"{donor_key.hex()}*")
    original, data = target.read_bytes(), donor.read_bytes()
    # The other prompt's chunk 2 under this prompt's key: header and checksums valid.
    payload = data[HEADER_SIZE:]
    meta = parse_header(donor_key, data).meta
    target.write_bytes(encode_header(key, meta, payload) + payload)
    tier = DiskTier(DiskConfig(path=str(tmp_path / "chunks")))
    try:
        (chunk,) = tier.get_many([key])  # bytes-level checks pass: only the canary sees it
        assert chunk is not None and tier.stats.corrupt == 0
        chunk.release()
    finally:
        tier.close()

    out = run_instance({"model": model, "rounds": [[req(prompt)], [req(prompt)]],
                        "prefix_caching": False,  # vLLM's own hit would hide kvtier's
                        "kvtier": {**cfg, "verify.sample_rate": 1.0,
                                   "verify.max_mismatches": 1}})
    (canary,), (again,) = out["rounds"]
    # Answered cold (the hit was recomputed, not served): exactly the first cold run.
    assert canary["num_cached_tokens"] == 0 and again["num_cached_tokens"] == 0
    assert same_output(canary, first[0][0])
    totals = out["kvtier_worker"]
    assert totals.get("verify_mismatch_disk") == 1 and totals.get("verify_mismatches") == 1
    assert totals.get("verify_checks", 0) >= 3  # chunks 0-2 on disk at least
    # max_mismatches 1: the disk tier went out of service, so the second request's
    # check read memory only (vLLM's own copies, which match): still one mismatch.
    assert totals.get("verify_tiers_out") == 1 and "verify_mismatch_memory" not in totals
    # The wrong file is gone, replaced by vLLM's recompute: the first instance's bytes.
    assert target.read_bytes() == original
