"""Layer 7: starts the management API inside vLLM's workers.

Registered as a vLLM general plugin (entry point ``vllm.general_plugins`` in
pyproject.toml), which vLLM loads in every process it starts. It only adds a
hook to the connector; the server starts in a worker once its cache engine
exists, and only if ``control.port`` is set. It also adds the cluster
controller's registration hook (starts only if ``controller.url`` is set).
"""

from __future__ import annotations

import logging

from kvtier.config import KvtierConfig
from kvtier.control.api import CacheAPI
from kvtier.control.server import ControlServer
from kvtier.engine.cache_engine import CacheEngine

log = logging.getLogger(__name__)
_servers: list[ControlServer] = []


def start_control_server(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Engine-ready hook: serve the management API on ``control.port + rank``."""
    if not cfg.control.port:
        return
    api = CacheAPI(engine.store, engine.hasher, engine.layout)
    try:
        server = ControlServer(api, cfg.control, cfg.control.port + rank)
    except BaseException:
        api.close()
        raise
    _servers.append(server)
    log.info("kvtier: management API on %s (token %s)", server.url,
             "required" if cfg.control.resolve_token() else "off")


def register() -> None:
    """vLLM plugin entry point: the management API and the controller registration
    (:mod:`kvtier.cluster.vllm_plugin`; one entry point, so an installed kvtier
    needs no new metadata for it)."""
    from kvtier.cluster.vllm_plugin import start_registrar
    from kvtier.connectors import vllm as connector

    for hook in (start_control_server, start_registrar):
        if hook not in connector.ENGINE_READY_HOOKS:
            connector.ENGINE_READY_HOOKS.append(hook)
