"""The one place kvtier's configuration is loaded and validated.

Sources, later wins: a YAML file (``path`` or ``$KVTIER_CONFIG``), then
``KVTIER_*`` environment variables (``KVTIER_CHUNK_SIZE=256``; nested keys
with a double underscore: ``KVTIER_MEMORY__MAX_BYTES=4GiB``), then a dict the
engine integration passes (vLLM's ``kv_connector_extra_config``; nested dicts
or dotted keys such as ``"disk.path"``).

Unknown keys and impossible values raise :class:`ConfigError` naming the key.
Each component receives only its own section.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvtier.config.cluster import peer_from_controller, validate_cluster, validate_controller
from kvtier.config.sections import ControlConfig, KvtierConfig
from kvtier.config.values import (CODEC_MODULES, CodecName, TierName, WritePolicy, is_loopback,
                                  parse_enum, parse_size)
from kvtier.errors import ConfigError

ENV_PREFIX = "KVTIER_"
ENV_FILE = "KVTIER_CONFIG"
# KVTIER_* variables that are not configuration keys (tooling, tests, `kvtier ctl`).
NON_CONFIG_ENV = frozenset({ENV_FILE, "KVTIER_MODEL_DIR", "KVTIER_SKIP_REDIS",
                            "KVTIER_CONTROL_TOKEN", "KVTIER_CONTROL_URL",
                            "KVTIER_TRANSFER_TOKEN", "KVTIER_CONTROLLER_TOKEN",
                            "KVTIER_LMCACHE_VENV"})
# Keys whose values are secrets: never shown in an error message, and taken from the
# environment as the raw string (not parsed as YAML, which would turn "0x1f" into 31).
SECRET_KEYS = frozenset({"control.token", "controller.token", "redis.url", "transfer.token",
                         "peer.controller_token"})


def _coerce(key: str, ftype: Any, value: Any) -> Any:
    if key in SECRET_KEYS:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got a {type(value).__name__}")
        return value
    if key.endswith("bytes"):
        return parse_size(key, value)
    if ftype in ("bool", bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if ftype in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if ftype in ("float", float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if ftype in ("str", str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return str(value)
    if ftype == "WritePolicy":
        return parse_enum(key, WritePolicy, value)
    if ftype == "CodecName":
        return parse_enum(key, CodecName, value)
    if ftype == "list[str]":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return list(value)
    if ftype == "list[TierName]":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of tier names, got {value!r}")
        tiers = [parse_enum(f"{key}[{i}]", TierName, v) for i, v in enumerate(value)]
        if len(set(tiers)) != len(tiers):
            raise ConfigError(key, f"a tier is listed twice: {value!r}")
        return tiers
    raise AssertionError(f"no coercion for {key}: {ftype}")


def _apply(obj: Any, data: Mapping[str, Any], prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for raw_key, value in data.items():
        name = str(raw_key).strip().lower().replace("-", "_")
        key = f"{prefix}{name}"
        if "." in name:  # dotted form from an engine dict: "disk.path"
            head, rest = name.split(".", 1)
            _apply(obj, {head: {rest: value}}, prefix)
            continue
        if name not in fields:
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(fields))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"expected a mapping, got {value!r}")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, fields[name].type, value))


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        # YAML scalars give "true" -> bool, "256" -> int, "[a, b]" -> list.
        secret = ".".join(path) in SECRET_KEYS
        node[path[-1]] = raw if secret or not raw.strip() else yaml.safe_load(raw)
    return out


def _validate(cfg: KvtierConfig) -> None:
    if cfg.chunk_size <= 0:
        raise ConfigError("chunk_size", f"must be positive, got {cfg.chunk_size}")
    checks = [("memory.max_bytes", cfg.memory.max_bytes, 0),
              ("disk.max_bytes", cfg.disk.max_bytes, 0),
              ("disk.write_queue", cfg.disk.write_queue, 1),
              ("redis.ttl_s", cfg.redis.ttl_s, 0),
              ("redis.max_value_bytes", cfg.redis.max_value_bytes, 1024),
              ("redis.write_queue", cfg.redis.write_queue, 1),
              ("control.port", cfg.control.port, 0),
              ("control.max_body_bytes", cfg.control.max_body_bytes, 1024),
              ("control.max_concurrency", cfg.control.max_concurrency, 1),
              ("control.workers", cfg.control.workers, 1)]
    for key, value, low in checks:
        if value < low:
            raise ConfigError(key, f"must be >= {low}, got {value}")
    if cfg.control.port > 65535:
        raise ConfigError("control.port", f"must be a TCP port, got {cfg.control.port}")
    _validate_control(cfg.control)
    validate_controller(cfg.controller)
    validate_cluster(cfg.transfer, cfg.peer, TierName.PEER in cfg.tiers)
    for key, value in (("load_timeout_s", cfg.load_timeout_s),
                       ("redis.timeout_s", cfg.redis.timeout_s),
                       ("redis.contains_timeout_s", cfg.redis.contains_timeout_s)):
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    for key, value, low in (("redis.orphan_part_ttl_s", cfg.redis.orphan_part_ttl_s, 1),
                            ("redis.reconnect_backoff_s", cfg.redis.reconnect_backoff_s, 0)):
        if value < low:
            raise ConfigError(key, f"must be >= {low}, got {value}")
    if cfg.redis.reconnect_backoff_max_s < cfg.redis.reconnect_backoff_s:
        raise ConfigError("redis.reconnect_backoff_max_s", "must be >= redis.reconnect_backoff_s "
                          f"({cfg.redis.reconnect_backoff_s}), got "
                          f"{cfg.redis.reconnect_backoff_max_s}")
    if not cfg.tiers:
        raise ConfigError("tiers", "at least one tier is needed")
    if TierName.DISK in cfg.tiers and not cfg.disk.path:
        raise ConfigError("disk.path", "the disk tier is enabled but has no path")
    if cfg.write_policy is WritePolicy.WRITE_BACK and cfg.tiers[0] is not TierName.MEMORY:
        raise ConfigError("write_policy", "write_back needs the memory tier first in 'tiers'")
    for key, codec in (("disk.codec", cfg.disk.codec), ("redis.codec", cfg.redis.codec)):
        module = CODEC_MODULES.get(codec)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(key, f"{codec.value} needs the {module} package: "
                              "install kvtier[codecs]")


def _validate_control(ctl: ControlConfig) -> None:
    if ctl.request_timeout_s <= 0:
        raise ConfigError("control.request_timeout_s", "must be positive")
    if not ctl.port:
        return
    token = ctl.resolve_token()  # a token file that cannot be read stops start-up here
    if not token and not is_loopback(ctl.host):
        raise ConfigError("control.host", f"{ctl.host} is reachable from other machines: "
                          "set control.token or control.token_file (anyone who reaches the "
                          "port could clear the cache or admit chunks), or bind 127.0.0.1")


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                engine: Mapping[str, Any] | None = None) -> KvtierConfig:
    """Build the validated configuration from file, environment and engine dict."""
    env = os.environ if env is None else env
    cfg = KvtierConfig()
    path = path or env.get(ENV_FILE)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(ENV_FILE, f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(ENV_FILE, f"{p} must hold a YAML mapping")
        _apply(cfg, data)
    _apply(cfg, _env_overrides(env))
    if engine:
        _apply(cfg, engine)
    cfg.transfer.take_env_token(env)
    peer_from_controller(cfg.controller, cfg.peer)
    _validate(cfg)
    return cfg