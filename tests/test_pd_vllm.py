"""Prefill/decode disaggregation, transfer side, under real serving.

A producer (``kv_role: kv_producer``, memory tier + transfer server) prefills
a prompt (``max_tokens=1``); the consumer (``kv_consumer``, memory tier + the
peer tier pointing at the producer) then gets the same request and loads the
prompt's whole chunks from the producer instead of computing them. Its greedy
tokens and logprobs are those of one instance hitting its own prefix cache
for the same length. With the producer killed the consumer still answers
(recompute). The router's PD mode does these two calls in production; here
the test does them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from kvtier.testing.procs import free_port, wait_until
from tests.cluster_run import CHUNK, Instance
from tests.vllm_run import doc, model, own_hit, req, run  # noqa: F401

pytestmark = pytest.mark.vllm

WHOLE = 4 * CHUNK  # doc(): 4 whole chunks + 76 tokens


@pytest.fixture(scope="module")
def pd(model: str, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
       ) -> Iterator[tuple[Instance, Instance, list[list[int]], dict, list[dict]]]:
    root = tmp_path_factory.mktemp("pd")
    docs = [doc(model, 700 + i) for i in range(3)]
    reference = own_hit(model, docs[0], WHOLE)
    cold = run(model, [[req(d) for d in docs[1:]]], None, sequential=True)[0]
    port = free_port()
    producer = Instance(model, root, "producer", {"tiers": ["memory"], "transfer.port": port},
                        cores="0", role="kv_producer")
    try:
        consumer = Instance(model, root, "consumer", {"tiers": ["memory", "peer"],
                                                      "peer.peers": [f"127.0.0.1:{port}"]},
                            cores="1", role="kv_consumer")
    except BaseException:
        producer.stop()
        raise
    try:
        yield producer, consumer, docs, reference, cold
    finally:
        consumer.stop()
        producer.stop()


def test_consumer_decodes_from_the_producers_prefill(pd: tuple) -> None:
    producer, consumer, docs, reference, _ = pd
    assert len(producer.complete(docs[0], max_tokens=1)["tokens"]) == 1
    wait_until(lambda: producer.lookup(docs[0]) == 4, 60, "the producer's chunks")
    out = consumer.complete(docs[0])
    assert out["cached"] >= WHOLE
    assert consumer.tiers()["peer"]["hits"] >= 4
    assert out["tokens"] == reference["token_ids"]
    assert out["logprobs"] == reference["logprobs"]


def test_producer_killed_consumer_recomputes(pd: tuple) -> None:
    producer, consumer, docs, _, cold = pd
    producer.complete(docs[1], max_tokens=1)
    wait_until(lambda: producer.lookup(docs[1]) == 4, 60, "the producer's chunks")
    producer.kill()
    for d, ref in zip(docs[1:], cold):
        out = consumer.complete(d)
        assert out["tokens"] == ref["token_ids"] and out["cached"] == 0
