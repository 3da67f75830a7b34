"""The controller without vLLM: a real ``kvtier controller`` process, KV event batches
published on a real ZMQ PUB socket in vLLM's wire format, snapshots pushed by a real
:class:`~kvtier.cluster.agent.Registrar` (the controller dials no instance)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator

import msgspec
import pytest
import zmq

from kvtier.cluster.events import parse_batch
from kvtier.keys import ChunkHasher, Namespace
from kvtier.testing.cluster import KvtierProcess, controller
from kvtier.testing.procs import wait_until
from kvtier.testing.redis_proc import RedisProcess
from tests.redis_server import require_redis

TOKEN = "s3cret-controller"
NS = Namespace("tiny", "vllm_cpu:L4:H2:D64:B128:bfloat16", 256)
HASHER = ChunkHasher(NS, store_partial=True, granule=128)
PROMPT = list(range(1000, 2100))  # 4 whole chunks + 76 tokens (no whole block: no key)


def body(instance: str, **over: Any) -> dict[str, Any]:
    return {"instance": instance, "url": f"http://127.0.0.1:1/{instance}", "model": "tiny",
            "namespace": NS.seed().hex(), "key_namespace": dataclasses.asdict(NS),
            "layout": NS.layout, "chunk_size": 256, "block_size": 128, "tiers": ["memory"],
            "control": None, "transfer": f"127.0.0.1:{9000 + len(instance)}", **over}


CRED = "X-Kvtier-Instance-Token"


def register(ctl: KvtierProcess, instance: str, **over: Any) -> str:
    """Register ``instance``; its credential."""
    status, out, _ = ctl.call("/v1/register", body(instance, **over))
    assert status == 200, out
    return out["credential"]


def beat(ctl: KvtierProcess, instance: str, credential: str) -> tuple[int, Any, dict]:
    return ctl.call("/v1/heartbeat", {"instance": instance}, headers={CRED: credential})


def batch(*events: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode([time.time(), list(events), None])


def stored(keys: list[bytes], medium: str = "CPU", block_size: int = 256) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": keys, "parent_block_hash": None,
            "token_ids": [], "block_size": block_size, "lora_id": None, "medium": medium,
            "lora_name": None}


class Publisher:
    """What vLLM's ZmqEventPublisher does: connect, send (topic, seq, payload)."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.connect(endpoint)
        self.topic, self.seq = topic.encode(), 0

    def send(self, payload: bytes, seq: int | None = None) -> None:
        self.seq = self.seq if seq is None else seq
        self.sock.send_multipart((self.topic, self.seq.to_bytes(8, "big"), payload))
        self.seq += 1

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvtierProcess]:
    with controller(tmp_path_factory.mktemp("ctl") / "controller.log", TOKEN, ttl_s=3.0,
                    extra=["--resync-interval-s", "0.5"]) as c:
        yield c


def cached(ctl: KvtierProcess, instance: str, prompt: list[int] = PROMPT) -> int:
    _, out, _ = ctl.call("/v1/lookup", {"model": "tiny", "token_ids": prompt})
    return next((i["cached_tokens"] for i in out["instances"] if i["instance"] == instance), -1)


def keys_of(prompt: list[int] = PROMPT) -> list[bytes]:
    return [bytes(k) for k in HASHER.keys(prompt)]


def test_parse_batch_keeps_kvtier_events_only() -> None:
    k = keys_of()
    change = parse_batch(batch(stored(k[:2]), stored([b"x" * 32], "GPU", 128),
                               stored(k[2:3], "DISK"),
                               {"type": "BlockRemoved", "block_hashes": k[:1], "medium": "CPU"}),
                         256)
    assert change.stored == {"memory": k[:2], "disk": k[2:3]}
    assert change.removed == {"memory": k[:1]} and change.ignored == 1
    assert parse_batch(batch(stored(k), {"type": "AllBlocksCleared"}), 256).cleared
    with pytest.raises(ValueError):
        parse_batch(b"\xc1 not msgpack", 256)


def test_access_registration_and_bad_input(ctl: KvtierProcess) -> None:
    assert ctl.call("/health", token="")[0] == 200
    assert ctl.call("/v1/instances", token="wrong")[0] == 401
    assert ctl.call("/v1/register", body("a1"), token="")[0] == 401
    status, out, _ = ctl.call("/v1/register", body("a1"))
    assert status == 200 and out["topic"] == "a1" and out["events"].startswith("tcp://127.0.0.1:")
    cred, resync = out["credential"], out["resync"]
    assert len(cred) >= 40 and resync  # a new instance: its snapshot is wanted
    status, again, _ = ctl.call("/v1/register", body("a1"), headers={CRED: cred})
    assert status == 200 and again["credential"] is None  # kept, not given again
    assert beat(ctl, "a1", cred)[0] == 200
    assert beat(ctl, "a1", "")[0] == 403
    status, out, _ = beat(ctl, "nobody", cred)
    assert status == 404 and "register again" in out["error"]
    status, out, _ = ctl.call("/v1/register", body("a2", namespace="0" * 32))
    assert status == 400 and out["error"].startswith("key_namespace")
    status, out, _ = ctl.call("/v1/lookup", {"model": "tiny"})
    assert status == 400 and "token_ids" in out["error"]
    status, out, _ = ctl.call("/v1/locate", {"keys": ["zz"]})
    assert status == 400 and out["error"].startswith("keys.0")
    status, out, _ = ctl.call("/v1/lookup", {"model": "tiny", "prompt": "hello"})
    assert status == 400 and "tokenizer" in out["error"]
    names = [i["instance"] for i in ctl.call("/v1/instances")[1]["instances"]]
    assert "a1" in names and "a2" not in names


def test_events_feed_lookup_and_locate(ctl: KvtierProcess) -> None:
    register(ctl, "ev1")
    pub = Publisher(ctl.events, "ev1")
    k = keys_of()
    try:
        # a subscriber sees only what is sent once the connection is up: repeat
        wait_until(lambda: (pub.send(batch(stored(k[:3]))) or cached(ctl, "ev1") == 768),
                   30, "the first KV events")
        pub.send(batch(stored(k[3:], "CPU"), stored(k[:2], "DISK")))
        wait_until(lambda: cached(ctl, "ev1") == 1024, 10, "the rest of the prompt")
        _, out, _ = ctl.call("/v1/lookup", {"model": "tiny", "token_ids": PROMPT})
        me = next(i for i in out["instances"] if i["instance"] == "ev1")
        assert me["tiers"] == {"memory": 1024, "disk": 512} and out["prompt_tokens"] == 1100
        assert out["instances"][0]["instance"] == "ev1"  # best first
        _, out, _ = ctl.call("/v1/locate", {"keys": [x.hex() for x in k]})
        assert out["holders"][0] == {"instance": "ev1", "transfer": "127.0.0.1:9003",
                                     "chunks": 4, "tiers": {"memory": 4, "disk": 2}}
        _, out, _ = ctl.call("/v1/locate", {"keys": [x.hex() for x in k], "exclude": "ev1"})
        assert all(h["instance"] != "ev1" for h in out["holders"])
        # a salted prompt has other keys; a removal cuts the prefix where it falls
        assert ctl.call("/v1/lookup", {"model": "tiny", "token_ids": PROMPT, "salt": "t2"}
                        )[1]["instances"][0]["cached_tokens"] == 0
        pub.send(batch({"type": "BlockRemoved", "block_hashes": [k[1]], "medium": "CPU"}))
        pub.send(batch({"type": "BlockRemoved", "block_hashes": [k[2]], "medium": "CPU"}))
        # key 1 is still on disk; key 2 nowhere: the prefix ends before it
        wait_until(lambda: cached(ctl, "ev1") == 512, 10, "the removal")
        pub.send(batch({"type": "AllBlocksCleared"}))
        wait_until(lambda: cached(ctl, "ev1") == 0, 10, "the clear")
    finally:
        pub.close()


def stored_batches(ctl: KvtierProcess) -> float:
    text = ctl.call("/metrics")[1]
    line = 'kvtier_controller_events_total{label="stored",what="event"} '
    return sum(float(x[len(line):]) for x in text.splitlines() if x.startswith(line))


def test_resyncs_are_asked_and_pushed_after_registration_and_a_sequence_gap(
        ctl: KvtierProcess) -> None:
    from kvtier.cluster.agent import Registrar

    k = keys_of()
    held = {"keys": k[:2]}
    snapshot = lambda: {"namespace": NS.layout, "chunk_size": 256,  # noqa: E731
                        "tiers": {"memory": [x.hex() for x in held["keys"]]}}
    reg = Registrar(ctl.url, body("rs1"), TOKEN, heartbeat_s=0.2, snapshot=snapshot)
    try:
        wait_until(lambda: cached(ctl, "rs1") == 512, 10, "the snapshot after registering")
        pub = Publisher(ctl.events, "rs1")
        try:
            before = stored_batches(ctl)
            wait_until(lambda: pub.send(batch(stored(k[:1]))) or stored_batches(ctl) > before,
                       30, "the events connection")  # contiguous numbers: no gap
            wait_until(lambda: reg.snapshots >= 2, 10, "the resync of a first message")
            held["keys"] = k  # the instance stored more, and the events of it are lost
            assert cached(ctl, "rs1") == 512
            pub.send(batch(), pub.seq + 50)  # 50 batches lost
            wait_until(lambda: cached(ctl, "rs1") == 1024, 10, "a resync after the gap")
        finally:
            pub.close()
        # a snapshot pushed unasked, right after one, is refused (rate limit)
        status, out, _ = ctl.call("/v1/snapshot", {"instance": "rs1", **snapshot()},
                                  headers={CRED: reg.credential})
        assert status in (200, 429)
        status, out, _ = ctl.call("/v1/snapshot", {"instance": "rs1", **snapshot()},
                                  headers={CRED: reg.credential})
        assert status == 429 and "resync" in out["error"]
    finally:
        reg.close()


def test_an_instance_that_stops_heartbeating_leaves_the_index(ctl: KvtierProcess) -> None:
    cred = register(ctl, "quiet")
    names = lambda: [i["instance"] for i in ctl.call("/v1/instances")[1]["instances"]]  # noqa
    assert "quiet" in names()
    wait_until(lambda: "quiet" not in names(), 15, "expiry after the 3 s TTL")
    assert beat(ctl, "quiet", cred)[0] == 404
    assert register(ctl, "quiet") != cred  # the name is free again: a new credential
    expired = 'kvtier_controller_events_total{label="ttl",what="expired"}'
    wait_until(lambda: expired in ctl.call("/metrics")[1], 10, "the sweeper")  # reads hid it
    assert 'kvtier_controller_requests_total{code="404",op="heartbeat"}' in ctl.call("/metrics")[1]


def test_the_registrar_registers_heartbeats_and_backs_off_when_refused(
        ctl: KvtierProcess) -> None:
    from kvtier.cluster.agent import Registrar

    names = lambda: [i["instance"] for i in ctl.call("/v1/instances")[1]["instances"]]  # noqa
    good = Registrar(ctl.url, body("agent1"), TOKEN, heartbeat_s=0.2, timeout_s=2.0)
    bad = Registrar(ctl.url, body("agent2"), "wrong", heartbeat_s=0.2, timeout_s=2.0,
                    max_backoff_s=1.0)
    try:
        assert good.registered.wait(10) and "agent1" in names()
        time.sleep(4.0)  # past the 3 s TTL: only the heartbeats keep it
        assert "agent1" in names() and good.registrations == 1 and good.credential
        assert not bad.registered.is_set() and "agent2" not in names()
        assert bad.backoff.delay_s == 1.0  # 401s: doubled from 0.5 up to its cap
        # a worker that took the scheduler's namespace registers it again (its namespace
        # hook), same credential, everything else it registered unchanged
        from types import SimpleNamespace

        from kvtier.cluster import vllm_plugin
        other = dataclasses.replace(NS, model_id="tiny|config=other")
        cred = good.credential
        engine = SimpleNamespace(hasher=SimpleNamespace(namespace=other))
        vllm_plugin._registrars.append(good)
        try:
            vllm_plugin.register_again(None, engine, 0)  # type: ignore[arg-type]
        finally:
            vllm_plugin._registrars.remove(good)
        wait_until(lambda: good.registrations == 2 and good.registered.is_set(), 10,
                   "the second registration")
        assert good.credential == cred
        record = next(i for i in ctl.call("/v1/instances")[1]["instances"]
                      if i["instance"] == "agent1")
        assert record["namespace"] == other.seed().hex() and record["model"] == "tiny"
        assert record["transfer"] == body("agent1")["transfer"]
    finally:
        good.close()
        bad.close()


@pytest.mark.redis
def test_a_redis_index_answers_the_same_lookup_from_a_second_replica(tmp_path: Path) -> None:
    require_redis()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        with controller(tmp_path / "c1.log", redis_url=server.url) as c1, \
                controller(tmp_path / "c2.log", redis_url=server.url) as c2:
            cred = register(c1, "r1")
            assert c2.call("/v1/register", body("r1"))[0] == 403  # the replicas share owners
            pub = Publisher(c1.events, "r1")
            try:
                wait_until(lambda: pub.send(batch(stored(keys_of()))) or cached(c1, "r1") == 1024,
                           30, "events at the first replica")
            finally:
                pub.close()
            assert cached(c2, "r1") == 1024
            assert c2.call("/v1/lookup", {"model": "tiny", "token_ids": PROMPT})[1] == \
                c1.call("/v1/lookup", {"model": "tiny", "token_ids": PROMPT})[1]
            assert beat(c2, "r1", cred)[0] == 200 and beat(c2, "r1", "x" * 43)[0] == 403
    finally:
        server.close()


@pytest.mark.redis
def test_a_snapshot_cannot_name_a_tier_that_writes_into_another_instances_index(
        tmp_path: Path) -> None:
    """The attack: in the Redis index instance ``sx`` tier ``y:memory`` and instance
    ``sx:y`` tier ``memory`` would be the same set, so ``sx``, with only its own
    credential, could make the controller say ``sx:y`` holds chunks it never stored (and
    route prompts there). Tier names with a separator are refused (400); the victim's
    entry stays its own."""
    require_redis()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        with controller(tmp_path / "c.log", TOKEN, redis_url=server.url) as c:
            k = keys_of()
            attacker = register(c, "sx")
            register(c, "sx:y")
            pub = Publisher(c.events, "sx:y")
            try:
                wait_until(lambda: pub.send(batch(stored(k[:1]))) or cached(c, "sx:y") == 256,
                           30, "the victim's own event")
            finally:
                pub.close()
            forged = {"instance": "sx", "namespace": NS.layout, "chunk_size": 256,
                      "tiers": {"y:memory": [x.hex() for x in k]}}
            status, out, _ = c.call("/v1/snapshot", forged, headers={CRED: attacker})
            assert status == 400 and "tiers.y:memory" in out["error"], out
            assert cached(c, "sx:y") == 256  # still only what it stored itself
            own = {**forged, "tiers": {"memory": [x.hex() for x in k[:2]]}}
            assert c.call("/v1/snapshot", own, headers={CRED: attacker})[0] == 200
            assert cached(c, "sx") == 512 and cached(c, "sx:y") == 256
    finally:
        server.close()


def test_controller_config_is_validated() -> None:
    from kvtier.config import ConfigError, load_config

    cfg = load_config(env={}, engine={"controller.url": "http://127.0.0.1:8800",
                                      "controller.instance_id": "a"})
    assert cfg.controller.url and cfg.controller.heartbeat_s == 2.0
    for bad, key in (({"controller.url": "127.0.0.1:8800"}, "controller.url"),
                     ({"controller.heartbeat_s": 0}, "controller.heartbeat_s"),
                     ({"controller.url": "http://x", "controller.token": "t",
                       "controller.token_file": "/f"}, "controller.token_file"),
                     ({"controller.nope": 1}, "controller.nope")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(env={}, engine=bad)
