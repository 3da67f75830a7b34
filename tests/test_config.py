"""Configuration: file, then KVTIER_* environment, then engine dict; bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import TierName, WritePolicy, load_config, parse_size
from kvtier.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg.chunk_size == 256 and cfg.tiers == [TierName.MEMORY]
    assert cfg.memory.max_bytes > 0 and cfg.write_policy is WritePolicy.WRITE_THROUGH


def test_precedence_file_env_engine(tmp_path: Path) -> None:
    f = tmp_path / "kvtier.yaml"
    f.write_text("chunk_size: 512\nmemory:\n  max_bytes: 1GiB\ntiers: [memory, disk]\n"
                 "disk:\n  path: /tmp/x\n")
    cfg = load_config(f, env={"KVTIER_MEMORY__MAX_BYTES": "2GiB"})
    assert cfg.chunk_size == 512 and cfg.memory.max_bytes == 2 * 1024**3
    assert cfg.tiers == [TierName.MEMORY, TierName.DISK] and cfg.disk.path == "/tmp/x"
    cfg = load_config(env={"KVTIER_CONFIG": str(f), "KVTIER_CHUNK_SIZE": "1024"},
                      engine={"chunk_size": 128, "disk.path": "/tmp/y"})
    assert cfg.chunk_size == 128 and cfg.disk.path == "/tmp/y"


def test_sizes() -> None:
    assert parse_size("k", "4KiB") == 4096 and parse_size("k", "1.5 GB") == 1_500_000_000
    assert parse_size("k", 10) == 10


@pytest.mark.parametrize("engine,key", [
    ({"chunk_sise": 256}, "chunk_sise"),
    ({"memory": {"max_byte": 1}}, "memory.max_byte"),
    ({"memory.max_bytes": -1}, "memory.max_bytes"),
    ({"memory.max_bytes": "lots"}, "memory.max_bytes"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": "256"}, "chunk_size"),
    ({"tiers": ["memory", "ssd"]}, "tiers[1]"),
    ({"tiers": ["memory", "memory"]}, "tiers"),
    ({"tiers": []}, "tiers"),
    ({"write_policy": "sometimes"}, "write_policy"),
    ({"disk": 3}, "disk"),
    ({"redis.timeout_s": 0}, "redis.timeout_s"),
    ({"redis.contains_timeout_s": 0}, "redis.contains_timeout_s"),
    ({"redis.orphan_part_ttl_s": 0}, "redis.orphan_part_ttl_s"),
    ({"redis.orphan_part_ttl_s": 1.5}, "redis.orphan_part_ttl_s"),
    ({"redis": {"reconnect_backoff_s": 5, "reconnect_backoff_max_s": 2}},
     "redis.reconnect_backoff_max_s"),
    ({"store_partial_chunks": "yes"}, "store_partial_chunks"),
])
def test_bad_values_name_the_key(engine: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={}, engine=engine)
    assert err.value.key == key and key in str(err.value)


def test_bad_env_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk.max_bytes"):
        load_config(env={"KVTIER_DISK__MAX_BYTES": "-5"})
    with pytest.raises(ConfigError, match="KVTIER_CONFIG"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, env={})


def test_chunk_size_must_be_whole_blocks() -> None:
    cfg = load_config(env={}, engine={"chunk_size": 192})
    cfg.check_block_size(64)
    with pytest.raises(ConfigError, match="chunk_size.*multiple.*128"):
        cfg.check_block_size(128)


def test_round_trip_to_dict() -> None:
    cfg = load_config(env={}, engine={"tiers": "memory,disk", "write_policy": "write_back"})
    assert load_config(env={}, engine=cfg.to_dict()) == cfg


def test_redis_safety_keys_load_from_env() -> None:
    cfg = load_config(env={"KVTIER_REDIS__CONTAINS_TIMEOUT_S": "0.1",
                           "KVTIER_REDIS__RECONNECT_BACKOFF_MAX_S": "10",
                           "KVTIER_REDIS__ORPHAN_PART_TTL_S": "60"})
    r = cfg.redis
    assert (r.contains_timeout_s, r.reconnect_backoff_max_s, r.orphan_part_ttl_s) == (0.1, 10, 60)


def test_tool_variables_in_the_environment_are_not_config_keys() -> None:
    """A shell that exports the controller's token (or the bench's LMCache venv) for
    `kvtier controller` / `kvtier bench` still starts vLLM with kvtier."""
    env = {"KVTIER_CONTROLLER_TOKEN": "x", "KVTIER_LMCACHE_VENV": "/tmp/v",
           "KVTIER_TRANSFER_TOKEN": "t", "KVTIER_CONTROL_TOKEN": "c",
           "KVTIER_SMOLLM2_WHEEL": "/tmp/w.whl", "KVTIER_STEP_TRACE": "/tmp/t.jsonl"}
    cfg = load_config(env=env)
    assert cfg.transfer.token == "t" and cfg.controller.token == ""


def test_every_bytes_key_takes_a_size() -> None:
    from kvtier.config import KvtierConfig

    keys = [f"{s}.{k}" for s, f in KvtierConfig.model_fields.items()
            for k in getattr(f.annotation, "model_fields", {}) if k.endswith("_bytes")]
    assert "disk.read_pool_bytes" in keys and len(keys) == 6
    cfg = load_config(env={}, engine={k: "2MiB" for k in keys})
    assert all(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) == 2 * 1024**2
               for k in keys)


def test_sections_build_from_keywords_and_take_assignments() -> None:
    from kvtier.config import DiskConfig, PeerConfig

    disk = DiskConfig(path="/x", max_bytes="1KiB", codec="ZSTD")
    assert disk.max_bytes == 1024 and disk.codec.value == "zstd"
    with pytest.raises(ConfigError) as err:
        DiskConfig(max_bytes=-1)
    assert err.value.key == "disk.max_bytes"
    with pytest.raises(ConfigError, match=r"peer.peers\[1\]"):
        PeerConfig(peers="a:1,nohost")
    disk.path = "/y"  # the loader and tests set fields after construction
    assert disk.path == "/y"
    with pytest.raises(ValueError):
        disk.pathh = "/z"  # type: ignore[attr-defined]


def test_secrets_are_never_shown() -> None:
    secrets = {"control.token": "tok-A", "controller.token": "tok-B", "transfer.token": "tok-C",
               "peer.controller_token": "tok-D", "redis.url": "redis://:tok-E@h:1/0"}
    cfg = load_config(env={}, engine=secrets)
    assert not any(v in repr(cfg) for v in secrets.values())
    for key in secrets:
        with pytest.raises(ConfigError) as err:
            load_config(env={}, engine={key: ["tok-F"]})
        assert err.value.key == key and "tok-F" not in str(err.value)


def test_every_source_is_checked_on_its_own(tmp_path: Path) -> None:
    """A bad value is named even where a later source overrides it, and a key given
    both as a value and as a section in one source is an error, as before pydantic."""
    f = tmp_path / "kvtier.yaml"
    f.write_text("disk: 3\n")
    with pytest.raises(ConfigError, match="disk"):
        load_config(f, env={}, engine={"disk.path": "/x"})
    with pytest.raises(ConfigError, match="disk"):
        load_config(env={}, engine={"disk": 3, "disk.path": "/x"})
    with pytest.raises(ConfigError, match="KVTIER_CHUNK_SIZE"):
        load_config(env={"KVTIER_CHUNK_SIZE": "[1"})
