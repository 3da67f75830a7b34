"""Layer 7: registers a vLLM instance with the controller (``controller.url``).

An engine-ready hook, added by the same vLLM general plugin as the management
API (:func:`kvtier.control.vllm_plugin.register`). It runs in rank 0's worker
only: one record per instance, with shard 0's namespace (the controller
computes shard 0's keys, the ones kvtier's KV events publish; with TP > 1 a
chunk is only usable when every rank holds it, which the instance checks
itself when it is asked). What it registers:

- ``model``: vLLM's served model name (the ``model`` field of OpenAI requests);
- ``namespace`` (digest) and ``key_namespace`` (its fields), ``block_size``
  when partial chunks are stored: so the controller computes the same keys;
- ``topic``: vLLM's ``--kv-events-config`` topic (the controller reads this
  instance's events under it; "" means the instance id);
- ``control``: the management API's URL (``control.advertise``, else from its
  host and port; shown, never dialed by the controller), ``transfer``: the
  peer tier's ``host:port`` (:attr:`TransferConfig.address`: ``transfer.advertise``
  or host:port; absent or port 0: none), ``url``: ``controller.instance_url``.

The registrar presents the credential the controller issues, speaks TLS as
``tls`` says, and pushes the store's snapshot (:func:`store_snapshot`) when the
controller asks. With ``controller.relay_events`` it also relays vLLM's KV
events (:class:`~kvtier.cluster.relay.EventRelay`) from the loopback endpoint of
``--kv-events-config``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

from kvtier.cluster.agent import Registrar
from kvtier.cluster.relay import EventRelay
from kvtier.config import KvtierConfig
from kvtier.engine.cache_engine import CacheEngine
from kvtier.store import manage
from kvtier.errors import UnsupportedConfig

log = logging.getLogger(__name__)
_registrars: list[Registrar] = []
_relays: list[EventRelay] = []


def store_snapshot(engine: CacheEngine) -> dict[str, Any]:
    """Every key each tier holds now: what the management API's ``/v1/snapshot``
    answers (:func:`kvtier.store.manage.snapshot`)."""
    return manage.snapshot(engine.store, engine.hasher)


def instance_body(cfg: KvtierConfig, engine: CacheEngine, vllm_config: Any = None) -> dict:
    """What this instance registers (see the module docstring)."""
    ns = engine.hasher.namespace
    model, topic, tokenizer = ns.model_id, "", None
    if vllm_config is not None:
        served = getattr(vllm_config.model_config, "served_model_name", None)
        model = (served[0] if isinstance(served, list) else served) or model
        events = getattr(vllm_config, "kv_events_config", None)
        if events is not None and getattr(events, "enable_kv_cache_events", False):
            topic = getattr(events, "topic", "") or ""
        tokenizer = getattr(vllm_config.model_config, "tokenizer", None)
    instance = cfg.controller.instance_id or f"{socket.gethostname()}:{os.getpid()}"
    control = cfg.control.advertise or None
    if cfg.control.port and not control:
        host = f"[{cfg.control.host}]" if ":" in cfg.control.host else cfg.control.host
        scheme = "https" if cfg.tls.files().serving else "http"
        control = f"{scheme}://{host}:{cfg.control.port}"
    transfer = cfg.transfer.address or None
    return {"instance": instance, "url": cfg.controller.instance_url or None, "model": str(model),
            "namespace": ns.seed().hex(), "key_namespace": dataclasses.asdict(ns),
            "layout": ns.layout, "chunk_size": ns.chunk_size,
            "block_size": engine.hasher.granule if engine.hasher.store_partial else 0,
            "tiers": [t.value for t in cfg.tiers], "control": control, "transfer": transfer,
            "topic": topic or instance,
            "tokenizer": str(tokenizer) if tokenizer and os.path.isdir(str(tokenizer)) else None}


def register_again(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Namespace hook: the worker took the scheduler's namespace; the controller gets a new
    registration with it (the router and lookups key prompts with what it registered).
    Everything else registered stays (vLLM's config is not at hand during a step)."""
    ns = engine.hasher.namespace
    for registrar in _registrars:
        registrar.reregister({**registrar.body, "namespace": ns.seed().hex(),
                              "key_namespace": dataclasses.asdict(ns), "layout": ns.layout,
                              "chunk_size": ns.chunk_size})


def _current_vllm_config() -> Any:
    try:
        from vllm.config import get_current_vllm_config_or_none

        return get_current_vllm_config_or_none()
    except ImportError:
        return None


def start_registrar(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Engine-ready hook: register rank 0 with ``controller.url`` and keep heartbeating."""
    if not cfg.controller.url or rank != 0:
        return
    vllm_config = _current_vllm_config()
    body = instance_body(cfg, engine, vllm_config)
    c = cfg.controller
    events = getattr(vllm_config, "kv_events_config", None) if vllm_config is not None else None
    relay_at = ""
    if c.relay_events:
        if events is None or not getattr(events, "enable_kv_cache_events", False):
            raise UnsupportedConfig("controller.relay_events: vLLM publishes no KV events: "
                                    "pass --kv-events-config with enable_kv_cache_events and "
                                    "a tcp://127.0.0.1:PORT endpoint")
        relay_at = str(getattr(events, "endpoint", ""))
    registrar = Registrar(c.url, body, c.resolve_token(), c.heartbeat_s, c.timeout_s,
                          snapshot=lambda: store_snapshot(engine), tls=cfg.tls.files())
    _registrars.append(registrar)
    if relay_at:
        try:
            _relays.append(EventRelay(relay_at, registrar))
        except (OSError, ValueError) as e:
            raise UnsupportedConfig(f"controller.relay_events: {e}") from None
    log.info("kvtier: registering %s (model %s) at the controller %s%s", body["instance"],
             body["model"], c.url, f" (KV events relayed from {relay_at})" if relay_at else "")
