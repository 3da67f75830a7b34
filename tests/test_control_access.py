"""The management API's defences, over real HTTP on 127.0.0.1: the bearer token,
bounded bodies, a checked ``admit``, and no secret in logs or error messages."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from kvtier.codecs import ChunkData, ChunkMeta, Codec, encode
from kvtier.config import ControlConfig, load_config, redact_url
from kvtier.control.api import CacheAPI
from kvtier.control.client import ControlClient, ControlError, encode_chunk
from kvtier.control.server import ControlServer
from kvtier.errors import ConfigError
from kvtier.keys import ChunkHasher, Namespace
from kvtier.store import ChunkStore
from kvtier.tiers.memory import MemoryTier
from tests.test_control import (CHUNK_BYTES, LAY, TOKEN, Setup, call, get, loads_bitwise,
                                make_setup)


@pytest.fixture()
def guarded(tmp_path: Path) -> Iterator[Setup]:
    s = make_setup(tmp_path, token=TOKEN, max_body_bytes=64 * 1024, request_timeout_s=2.0)
    yield s
    s.server.close()
    s.store.close()


def raw_http(url: str, head: str, body: bytes = b"", read_s: float = 10.0) -> tuple[int, bytes]:
    """Send exactly ``head`` + ``body`` and read the answer: status and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and _complete(data):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def auth(token: str = TOKEN) -> str:
    return f"Authorization: Bearer {token}\n"


# -- access ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "wrong-token", TOKEN + "x", TOKEN[:-1]])
def test_without_the_right_token_every_operation_is_401_and_changes_nothing(
        guarded: Setup, token: str) -> None:
    url, tokens = guarded.url, guarded.tokens
    for op, body in [("clear", {}), ("evict", {"tokens": tokens}), ("lookup", {"tokens": tokens}),
                     ("move", {"tokens": tokens, "from": "memory", "to": "disk"}),
                     ("pin", {"tokens": tokens}), ("unpin", {"tokens": tokens}),
                     ("compress", {"tokens": tokens, "tier": "disk"}),
                     ("admit", {"tokens": tokens, "chunks": [{"index": 0, "data": ""}]})]:
        code, res = call(url, op, body, token)
        assert code == 401 and TOKEN not in json.dumps(res), (op, res)
    for path in ("/v1/status", "/metrics", "/openapi.json", "/docs"):
        assert get(url, path, token)[0] == 401
    assert get(url, "/health", token)[0] == 200
    code, res = call(url, "lookup", {"tokens": tokens}, TOKEN)
    assert code == 200 and res["tiers"] == {"memory": [True] * 4, "disk": [True] * 4}
    assert guarded.store.memory.usage().num_chunks == 4
    assert not any(guarded.store.memory.is_pinned(k) for k in guarded.engine.hasher.keys(tokens))


def test_a_401_is_answered_before_the_body_is_read(guarded: Setup) -> None:
    """An unauthenticated client cannot make the server read (or wait for) a body."""
    code, body = raw_http(guarded.url, "POST /v1/lookup HTTP/1.1\nHost: x\n"
                          "Content-Length: 60000\n")  # announces a body, sends none
    assert code == 401 and b"bearer token" in body


def test_with_the_token_it_works_and_the_client_sends_it(guarded: Setup, tmp_path: Path) -> None:
    assert ControlClient(guarded.url, TOKEN).call("lookup", {"tokens": guarded.tokens}
                                                  )["hit_chunks"] == 4
    with pytest.raises(ControlError) as err:
        ControlClient(guarded.url, "nope").status()
    assert err.value.status == 401 and "nope" not in str(err.value)


@pytest.mark.parametrize("header,code", [(f"bearer {TOKEN}", 200), (f"Bearer  {TOKEN} ", 200),
                                         (f"Basic {TOKEN}", 401), (TOKEN, 401), ("Bearer", 401),
                                         (f"Bearer {TOKEN}\nAuthorization: Bearer x", 401)])
def test_the_scheme_is_bearer_in_any_case_and_one_header_only(guarded: Setup, header: str,
                                                              code: int) -> None:
    assert raw_http(guarded.url, f"GET /v1/status HTTP/1.1\nHost: x\n"
                    f"Authorization: {header}\n")[0] == code


def test_a_non_loopback_host_without_a_token_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="control.host"):
        load_config(env={}, engine={"control.port": 8700, "control.host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="control.host"):
        ControlServer(None, ControlConfig(host="0.0.0.0"), 0)  # type: ignore[arg-type]
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    cfg = load_config(env={}, engine={"control.port": 8700, "control.host": "0.0.0.0",
                                      "control.token_file": str(token), "tls.insecure": True})
    assert cfg.control.resolve_token() == TOKEN and TOKEN not in repr(cfg)
    with pytest.raises(ConfigError, match="control.token_file"):
        load_config(env={}, engine={"control.port": 8700,
                                    "control.token_file": str(tmp_path / "missing")})


def test_the_token_from_the_environment_is_taken_verbatim_and_never_echoed() -> None:
    cfg = load_config(env={"KVTIER_CONTROL__TOKEN": "0x1f"})
    assert cfg.control.token == "0x1f"  # not YAML's 31
    with pytest.raises(ConfigError) as err:
        load_config(env={}, engine={"control.token": ["hunter2"]})
    assert "hunter2" not in str(err.value)


def test_the_ctl_variables_are_not_configuration_keys() -> None:
    """An operator's shell with ``kvtier ctl``'s variables can still start vLLM."""
    cfg = load_config(env={"KVTIER_CONTROL_TOKEN": "x", "KVTIER_CONTROL_URL": "http://h:1"})
    assert cfg.control.token == ""


def test_redact_url_hides_the_redis_password() -> None:
    assert redact_url("redis://:hunter2@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact_url("rediss://me:hunter2@h/1") == "rediss://me:***@h/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("length,codes", [("-5", {400}), ("abc", {400}), ("1e3", {400}),
                                          (str(10**30), {400, 413}),  # the parser may refuse it
                                          (str(64 * 1024 + 1), {413})])
def test_a_bad_or_huge_content_length_is_refused_before_reading(guarded: Setup, length: str,
                                                                codes: set[int]) -> None:
    got, _ = raw_http(guarded.url, f"POST /v1/lookup HTTP/1.1\nHost: x\n{auth()}"
                      f"Content-Type: application/json\nContent-Length: {length}\n")
    assert got in codes


def test_a_chunked_body_is_cut_off_at_the_limit(guarded: Setup) -> None:
    piece = b"[" + b"1," * 8000  # 16 KB per chunk, never a whole JSON value
    body = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(8))
    code, res = raw_http(guarded.url, f"POST /v1/lookup HTTP/1.1\nHost: x\n{auth()}"
                         "Content-Type: application/json\nTransfer-Encoding: chunked\n",
                         body + b"0\r\n\r\n")
    assert code == 413 and b"limit" in res


def test_a_body_that_never_comes_is_a_408(guarded: Setup) -> None:
    code, _ = raw_http(guarded.url, f"POST /v1/lookup HTTP/1.1\nHost: x\n{auth()}"
                       "Content-Type: application/json\nContent-Length: 100\n", b"{")
    assert code == 408


# -- admit --------------------------------------------------------------------------------


def real_chunk(s: Setup, index: int = 0) -> tuple[bytes, ChunkData]:
    key = s.engine.hasher.keys(s.tokens)[index]
    (chunk,) = s.store.get_many([key])
    assert chunk is not None
    data = ChunkData(chunk.meta, chunk.payload.copy())
    chunk.release()
    return key, data


def admit(s: Setup, data: str, index: int = 0, tokens: list[int] | None = None,
          **extra: object) -> tuple[int, dict]:
    body = {"tokens": s.tokens if tokens is None else tokens,
            "chunks": [{"index": index, "data": data}], **extra}
    return call(s.url, "admit", body, TOKEN)


def test_a_checked_chunk_is_admitted_and_loads_bitwise(guarded: Setup) -> None:
    chunks = [real_chunk(guarded, i) for i in range(4)]
    assert call(guarded.url, "clear", {}, TOKEN)[1]["removed"] == 8
    body = {"tokens": guarded.tokens, "chunks": [
        {"index": i, "data": encode_chunk(k, c)} for i, (k, c) in enumerate(chunks)]}
    assert call(guarded.url, "admit", body, TOKEN) == (200, {"admitted": 4})
    assert loads_bitwise(guarded)
    key, chunk = chunks[0]
    zipped = ChunkData(ChunkMeta(chunk.meta.dtype, chunk.meta.shape, Codec.ZLIB),
                       np.frombuffer(zlib.compress(chunk.payload.tobytes()), np.uint8))
    assert call(guarded.url, "clear", {}, TOKEN)[0] == 200
    assert admit(guarded, encode_chunk(key, zipped), tier="disk") == (200, {"admitted": 1})


def test_a_lossy_chunk_is_admitted_only_with_lossy_true(guarded: Setup) -> None:
    """A q8 chunk would make this instance serve lossy KV: refused unless the caller
    says lossy: true; then this instance (only) reads it back."""
    from kvtier.codecs import compress

    key, chunk = real_chunk(guarded)
    q8 = compress(ChunkData(chunk.meta, chunk.payload.copy()), Codec.Q8)
    assert call(guarded.url, "clear", {}, TOKEN)[0] == 200
    code, res = admit(guarded, encode_chunk(key, q8))
    assert code == 400 and "lossy" in res["error"] and res["error"].startswith("chunks[0]"), res
    assert [t.usage().num_chunks for t in guarded.store.tiers] == [0, 0]
    assert Codec.Q8 not in guarded.store.lossy_ok
    assert admit(guarded, encode_chunk(key, q8), lossy=True) == (200, {"admitted": 1})
    assert Codec.Q8 in guarded.store.lossy_ok
    (got,) = guarded.store.get_many([key])
    assert got is not None and got.meta.codec is Codec.RAW
    got.release()


def poisoned(s: Setup) -> dict[str, tuple[str, dict]]:
    """Requests ``admit`` must refuse, each with the field and words its error names."""
    key, chunk = real_chunk(s)
    meta = chunk.meta
    other_ns = ChunkHasher(Namespace("another-model", LAY.signature(), 8)).keys(s.tokens)[0]
    other_salt = s.engine.hasher.with_salt("tenant-b").keys(s.tokens)[0]
    half = ChunkData(ChunkMeta(meta.dtype, (1, *meta.shape[1:])), chunk.payload[:len(
        chunk.payload) // 2].copy())
    f16 = ChunkData(ChunkMeta("float16", meta.shape), np.zeros(meta.raw_nbytes // 2, np.uint8))
    bomb = ChunkData(ChunkMeta(meta.dtype, meta.shape, Codec.ZLIB), np.frombuffer(
        zlib.compress(bytes(64 * 1024**2), 9), np.uint8))  # 64 MiB of zeros in ~64 KiB
    short = ChunkData(ChunkMeta(meta.dtype, meta.shape, Codec.ZLIB), np.frombuffer(
        zlib.compress(bytes(100)), np.uint8))
    flipped = bytearray(b"".join(bytes(b) for b in encode(key, chunk)))
    flipped[-1] ^= 1
    return {
        "foreign namespace": (encode_chunk(other_ns, chunk), {}),
        "another tenant's salt": (encode_chunk(other_salt, chunk), {}),
        "another chunk of the prompt": (encode_chunk(key, chunk), {"index": 1}),
        "wrong size": (encode_chunk(key, half), {}),
        "wrong dtype": (encode_chunk(key, f16), {}),
        "oversized": (base64.b64encode(bytes(meta.raw_nbytes * 2)).decode(), {}),
        "decompression bomb": (encode_chunk(key, bomb), {}),
        "decodes short": (encode_chunk(key, short), {}),
        "payload checksum": (base64.b64encode(bytes(flipped)).decode(), {}),
        "not base64": ("@@@@", {}),
        "index past the prompt": (encode_chunk(key, chunk), {"index": 9}),
    }


@pytest.mark.parametrize("case", ["foreign namespace", "another tenant's salt",
                                  "another chunk of the prompt", "wrong size", "wrong dtype",
                                  "oversized", "decompression bomb", "decodes short",
                                  "payload checksum", "not base64", "index past the prompt"])
def test_a_poisoned_admit_is_refused_and_stores_nothing(guarded: Setup, case: str) -> None:
    data, extra = poisoned(guarded)[case]
    assert call(guarded.url, "clear", {}, TOKEN)[0] == 200
    code, res = admit(guarded, data, **extra)
    assert code in (400, 413) and res["error"].startswith(("chunks[0]", "body")), res
    guarded.store.flush(10)
    assert [t.usage().num_chunks for t in guarded.store.tiers] == [0, 0]
    assert guarded.store.memory.stats.puts == 4  # the setup's own, nothing since


def test_one_refused_chunk_stores_none_of_the_batch(guarded: Setup) -> None:
    (k0, c0), (k1, c1) = real_chunk(guarded, 0), real_chunk(guarded, 1)
    assert call(guarded.url, "clear", {}, TOKEN)[0] == 200
    body = {"tokens": guarded.tokens, "chunks": [{"index": 0, "data": encode_chunk(k0, c0)},
                                                 {"index": 1, "data": encode_chunk(k0, c1)}]}
    code, res = call(guarded.url, "admit", body, TOKEN)
    assert code == 400 and res["error"].startswith("chunks[1].data:")
    assert [t.usage().num_chunks for t in guarded.store.tiers] == [0, 0]


# -- secrets --------------------------------------------------------------------------


def test_no_secret_in_log_lines_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    caplog.set_level(logging.DEBUG)
    s = make_setup(tmp_path, token=TOKEN)
    try:
        call(s.url, "lookup", {"tokens": s.tokens}, "wrong-" + TOKEN)
        call(s.url, "lookup", {"tokens": "x"}, TOKEN)
        call(s.url, "explode", {}, TOKEN)
        raw_http(s.url, f"GET /v1/status?token={TOKEN[:3]} HTTP/1.1\nHost: x\n{auth()}")
    finally:
        s.server.close()
        s.store.close()
    assert TOKEN not in caplog.text
    with pytest.raises(ConfigError) as err:
        load_config(env={}, engine={"redis.url": 5})
    assert "expected a string" in str(err.value)


# -- bounded work -------------------------------------------------------------------------


class Stuck(MemoryTier):
    """A tier whose operations hang until ``gate`` is set (a disk that stopped answering)."""

    name = "stuck"

    def __init__(self) -> None:
        super().__init__(4 * CHUNK_BYTES, CHUNK_BYTES)
        self.gate = threading.Event()

    def delete_many(self, keys):  # type: ignore[no-untyped-def]
        self.gate.wait(60)
        return super().delete_many(keys)


def test_a_hung_operation_is_a_504_and_the_server_keeps_answering(tmp_path: Path) -> None:
    stuck = Stuck()
    store = ChunkStore([MemoryTier(8 * CHUNK_BYTES, CHUNK_BYTES), stuck])
    hasher = ChunkHasher(Namespace("m", LAY.signature(), 8))
    server = ControlServer(CacheAPI(store, hasher, LAY),
                           ControlConfig(workers=1, request_timeout_s=0.5), 0)
    try:
        assert call(server.url, "evict", {"tokens": [1] * 8, "tier": "stuck"})[0] == 504
        assert get(server.url, "/health")[0] == 200  # the event loop is free
        code, res = call(server.url, "lookup", {"tokens": [1] * 8})  # the one worker is not
        assert code == 503 and res["error"].startswith("server:")
        stuck.gate.set()
        deadline = time.monotonic() + 30
        while call(server.url, "lookup", {"tokens": [1] * 8})[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stuck.gate.set()
        server.close()
        store.close()
