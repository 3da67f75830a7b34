"""Peer to peer under real serving: instance B reads the chunks instance A computed.

Two ``vllm serve`` (tiny model, one core each, vLLM's own prefix cache off):
A has the memory tier and the transfer server; B has the memory tier and the
peer tier with ``peers: [A]``. A prompt served on A is then a hit on B, read
over the transfer channel, and B's greedy tokens and logprobs are those of
vLLM's own prefix-cache hit of the same length. With A killed, B still answers
every request (recompute), none hangs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from kvtier.testing.procs import free_port, wait_until
from tests.cluster_run import CHUNK, Instance
from tests.vllm_run import doc, model, own_hit  # noqa: F401

pytestmark = pytest.mark.vllm

DOCS = 3
HIT = 4 * CHUNK  # doc(): 4 whole chunks + 76 tokens


@pytest.fixture(scope="module")
def pair(model: str, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
         ) -> Iterator[tuple[Instance, Instance, list[list[int]], dict]]:
    root = tmp_path_factory.mktemp("p2p")
    docs = [doc(model, 500 + i) for i in range(DOCS)]
    reference = own_hit(model, docs[0], HIT)  # vLLM's own prefix-cache hit of HIT tokens
    port = free_port()
    a = Instance(model, root, "a", {"tiers": ["memory"], "transfer.port": port}, cores="0")
    try:
        b = Instance(model, root, "b", {"tiers": ["memory", "peer"],
                                        "peer.peers": [f"127.0.0.1:{port}"]}, cores="1")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b, docs, reference
    finally:
        b.stop()
        a.stop()


def test_a_prompt_served_on_a_is_a_peer_hit_on_b(pair: tuple) -> None:
    a, b, docs, reference = pair
    first = a.complete(docs[0])
    assert first["cached"] == 0
    wait_until(lambda: a.lookup(docs[0]) == 4, 60, "A's chunks of the prompt")
    before = b.tiers()["peer"]
    out = b.complete(docs[0])
    after = b.tiers()["peer"]
    assert out["cached"] >= HIT
    assert after["hits"] - before["hits"] >= 4 and after["corrupt"] == 0
    assert out["tokens"] == first["tokens"] == reference["token_ids"]
    assert out["logprobs"] == pytest.approx(reference["logprobs"], abs=0, rel=0)
    # Promoted into B's memory: asked again, B no longer needs A.
    assert b.tiers()["memory"]["num_chunks"] >= 4


def test_with_a_killed_b_recomputes_and_never_hangs(pair: tuple) -> None:
    a, b, docs, _ = pair
    served = a.complete(docs[1])  # A holds docs[1] when it dies
    cold = a.complete(docs[2])
    wait_until(lambda: a.lookup(docs[1]) == 4, 60, "A's chunks of the prompt")
    a.kill()
    before = b.tiers()["peer"]
    for i, ref in ((1, served), (2, cold)):
        out = b.complete(docs[i])  # B's scheduler finds A down: a miss, recomputed
        assert out["tokens"] == ref["tokens"]
        assert out["cached"] == 0
    assert b.tiers()["peer"]["hits"] == before["hits"]
