"""The one place kvtier's configuration is loaded and validated.

Sources, later wins: a YAML file (``path`` or ``$KVTIER_CONFIG``), then
``KVTIER_*`` environment variables (``KVTIER_CHUNK_SIZE=256``; nested keys
with a double underscore: ``KVTIER_MEMORY__MAX_BYTES=4GiB``), then a dict the
engine integration passes (vLLM's ``kv_connector_extra_config``; nested dicts
or dotted keys such as ``"disk.path"``). A source that gives a section's
``token`` or ``token_file`` replaces both as earlier sources gave them.

Each source is validated on its own (so a bad value is an error even where a later
source overrides it), then the merge as a whole, then what spans keys (token files,
exposed hosts, tiers that need other keys). Errors are :class:`ConfigError` naming the
key. Each component receives only its own section.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from kvtier.config.cluster import (parse_address, peer_from_controller, validate_cluster,
                                   validate_controller)
from kvtier.config.tls import is_wildcard, require_tls
from kvtier.config.fields import config_error, secret_keys
from kvtier.config.secrets import DEPRECATED_TOKEN_ENV, TOKEN_SECTIONS, deprecated_env_token
from kvtier.config.sections import ControlConfig, KvtierConfig
from kvtier.config.values import CODEC_MODULES, TierName, WritePolicy, is_loopback
from kvtier.errors import ConfigError

ENV_PREFIX = "KVTIER_"
ENV_FILE = "KVTIER_CONFIG"
# KVTIER_* variables that are not configuration keys: tooling and tests, `kvtier ctl`'s
# URL, and the deprecated token spellings (read by kvtier.config.secrets, not as keys).
NON_CONFIG_ENV = frozenset({ENV_FILE, "KVTIER_MODEL_DIR", "KVTIER_SKIP_REDIS",
                            "KVTIER_CONTROL_URL", "KVTIER_LMCACHE_VENV", "KVTIER_SMOLLM2_WHEEL",
                            "KVTIER_STEP_TRACE", "KVTIER_TRANSFER_CHILD_SECRET",
                            *DEPRECATED_TOKEN_ENV})
# Keys whose values are secrets (the fields declared repr=False): never shown in an error
# message, and taken from the environment as the raw string (YAML would read "0x1f" as 31).
SECRET_KEYS = secret_keys(KvtierConfig)


def _put(node: dict[str, Any], raw_key: Any, value: Any, prefix: str = "") -> None:
    """Set ``raw_key`` (any case, ``-`` for ``_``, dotted for nesting) in ``node``."""
    name = str(raw_key).strip().lower().replace("-", "_")
    head, dot, rest = name.partition(".")
    if dot:  # dotted form from an engine dict: "disk.path"
        value, name = {rest: value}, head
    if isinstance(value, Mapping):
        sub = node.setdefault(name, {})
        if not isinstance(sub, dict):
            raise ConfigError(prefix + name, "given both as a value and as a mapping of keys")
        for k, v in value.items():
            _put(sub, k, v, f"{prefix}{name}.")
    elif isinstance(node.get(name), dict):
        raise ConfigError(prefix + name, "given both as a value and as a mapping of keys")
    else:
        node[name] = value


def _source(data: Mapping[str, Any]) -> dict[str, Any]:
    """One source as nested plain dicts, checked on its own."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        _put(out, k, v)
    try:
        KvtierConfig.model_validate(out)
    except ValidationError as e:
        raise config_error(e, KvtierConfig) from None
    return out


def _merge(base: dict[str, Any], later: dict[str, Any]) -> None:
    """``later`` over ``base``; a section's token and token_file count as one setting."""
    for name, value in later.items():
        old = base.get(name)
        if isinstance(old, dict) and isinstance(value, dict):
            if name in TOKEN_SECTIONS and ("token" in value or "token_file" in value):
                old.pop("token", None)
                old.pop("token_file", None)
            _merge(old, value)
        else:
            base[name] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = ".".join(name[len(ENV_PREFIX):].lower().split("__"))
        if key in SECRET_KEYS or not raw.strip():
            _put(out, key, raw)
            continue
        try:  # YAML scalars give "true" -> bool, "256" -> int, "[a, b]" -> list
            _put(out, key, yaml.safe_load(raw))
        except yaml.YAMLError:
            raise ConfigError(key, f"${name} is not a YAML value") from None
    return out


def _check(cfg: KvtierConfig) -> None:
    """What no single key can check: keys that depend on others, token files, packages."""
    r = cfg.redis
    if r.reconnect_backoff_max_s < r.reconnect_backoff_s:
        raise ConfigError("redis.reconnect_backoff_max_s", "must be >= redis.reconnect_backoff_s "
                          f"({r.reconnect_backoff_s}), got {r.reconnect_backoff_max_s}")
    _check_control(cfg.control)
    _check_tls(cfg)
    validate_controller(cfg.controller)
    validate_cluster(cfg.transfer, cfg.peer, TierName.PEER in cfg.tiers)
    if TierName.DISK in cfg.tiers and not cfg.disk.path:
        raise ConfigError("disk.path", "the disk tier is enabled but has no path")
    if cfg.write_policy is WritePolicy.WRITE_BACK and cfg.tiers[0] is not TierName.MEMORY:
        raise ConfigError("write_policy", "write_back needs the memory tier first in 'tiers'")
    _check_integrity(cfg)
    for key, codec in (("disk.codec", cfg.disk.codec), ("redis.codec", cfg.redis.codec)):
        module = CODEC_MODULES.get(codec)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(key, f"{codec.value} needs the {module} package: "
                              "install kvtier[codecs]")


def _check_integrity(cfg: KvtierConfig) -> None:
    if not cfg.integrity.key_file:
        return
    cfg.integrity.read_key()  # a key file that cannot be read, or too short, stops start-up
    if importlib.util.find_spec("cryptography") is None:  # no weaker MAC to fall back to
        raise ConfigError("integrity.key_file", "a key needs the cryptography package "
                          "(AES-GMAC): pip install 'kvtier[integrity]'")


def _check_tls(cfg: KvtierConfig) -> None:
    """TLS files usable; no surface off loopback without TLS (unless waived); an
    instance registering with a controller gives out addresses others can dial."""
    cfg.tls.check()
    files = cfg.tls.files()
    if cfg.control.port:
        require_tls("control.host", cfg.control.host, files, cfg.tls.insecure)
    if cfg.transfer.port:
        require_tls("transfer.host", cfg.transfer.host, files, cfg.tls.insecure)
    if cfg.transfer.advertise:
        parse_address("transfer.advertise", cfg.transfer.advertise)
    for key, url in (("controller.url", cfg.controller.url),
                     ("peer.controller_url", cfg.peer.controller_url)):
        host = urlsplit(url).hostname or ""
        if url.startswith("http://") and not is_loopback(host) and not cfg.tls.insecure:
            raise ConfigError(key, f"{url} is plain http off loopback: the controller token "
                              "and this instance's credential would cross the network in "
                              "clear; use https:// (tls.ca_file to check it), or accept that "
                              "with tls.insecure: true")
    if not cfg.controller.url:
        return
    for key, host, port, advertised in (
            ("control", cfg.control.host, cfg.control.port, cfg.control.advertise),
            ("transfer", cfg.transfer.host, cfg.transfer.port, cfg.transfer.advertise)):
        if port and not advertised and is_wildcard(host):
            raise ConfigError(f"{key}.advertise", f"{key}.host {host} binds every address, "
                              "which is no address for others to dial: set "
                              f"{key}.advertise to this machine's reachable address")


def _check_control(ctl: ControlConfig) -> None:
    if not ctl.port:
        return
    token = ctl.resolve_token()  # a token file that cannot be read stops start-up here
    if not token and not is_loopback(ctl.host):
        raise ConfigError("control.host", f"{ctl.host} is reachable from other machines: "
                          "set control.token or control.token_file (anyone who reaches the "
                          "port could clear the cache or admit chunks), or bind 127.0.0.1")


def _read_file(path: str | Path) -> Mapping[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(ENV_FILE, f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:  # its text is not shown: the file may hold a token
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(ENV_FILE, f"{p} is not valid YAML{where}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(ENV_FILE, f"{p} must hold a YAML mapping")
    return data


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                engine: Mapping[str, Any] | None = None) -> KvtierConfig:
    """Build the validated configuration from file, environment and engine dict."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    path = path or env.get(ENV_FILE)
    if path:
        _merge(merged, _source(_read_file(path)))
    _merge(merged, _source(_env_overrides(env)))
    if engine:
        _merge(merged, _source(engine))
    # The deprecated KVTIER_TRANSFER_TOKEN, as before: only where no source gave a token.
    old_token = deprecated_env_token("transfer", env).strip()
    transfer = merged.get("transfer", {})
    if old_token and not transfer.get("token") and not transfer.get("token_file"):
        merged.setdefault("transfer", {})["token"] = old_token
    try:
        cfg = KvtierConfig.model_validate(merged)
    except ValidationError as e:
        raise config_error(e, KvtierConfig) from None
    peer_from_controller(cfg.controller, cfg.peer)
    _check(cfg)
    return cfg
