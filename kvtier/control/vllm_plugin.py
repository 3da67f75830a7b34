"""Layer 7: starts the management API and the transfer server inside vLLM's workers.

Registered as a vLLM general plugin (entry point ``vllm.general_plugins`` in
pyproject.toml), which vLLM loads in every process it starts. It only adds a
hook to the connector; the servers start in a worker once its cache engine
exists, and only if ``control.port`` / ``transfer.port`` is set (the transfer
server over TLS when the ``tls`` section serves). It also adds the cluster controller's registration hook (starts only if
``controller.url`` is set).
"""

from __future__ import annotations

import logging

from kvtier.config import KvtierConfig
from kvtier.control.api import CacheAPI
from kvtier.control.server import ControlServer
from kvtier.engine.cache_engine import CacheEngine
from kvtier.errors import UnsupportedConfig
from kvtier.store.build import chunk_mac
from kvtier.transfer.server import TransferServer

log = logging.getLogger(__name__)
_servers: list[ControlServer] = []
_transfer: list[TransferServer] = []


def start_control_server(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Engine-ready hook: serve the management API on ``control.port + rank``."""
    if not cfg.control.port:
        return
    api = CacheAPI(engine.store, engine.hasher, engine.layout)
    try:
        server = ControlServer(api, cfg.control, cfg.control.port + rank, cfg.tls.files(),
                               cfg.tls.insecure)
    except BaseException:
        api.close()
        raise
    _servers.append(server)
    log.info("kvtier: management API on %s (token %s)", server.url,
             "required" if cfg.control.resolve_token() else "off")


def start_transfer_server(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Engine-ready hook: serve the transfer channel on ``transfer.port`` (one worker per
    instance for now; TLS with the ``tls`` section's certificate)."""
    namespace = engine.hasher.namespace
    digest = namespace.seed().hex()
    if not cfg.transfer.port:
        return
    try:
        if namespace.tp_size > 1 or namespace.pp_size > 1:
            raise UnsupportedConfig(
                f"kvtier transfer: tensor/pipeline parallel size {namespace.tp_size}/"
                f"{namespace.pp_size}: the transfer server serves one worker per instance for "
                "now; unset transfer.port (peers then recompute) or run with TP=PP=1")
        server = TransferServer(engine.store, cfg.transfer, digest, mac=chunk_mac(cfg),
                                tls=cfg.tls.files())
    except BaseException:
        cfg.transfer.port = 0  # so the controller registration advertises no server
        raise
    _transfer.append(server)
    log.info("kvtier: transfer server on %s (namespace %s, token %s, chunks %s, %s)",
             server.address, digest, "required" if cfg.transfer.resolve_token() else "off",
             "signed" if server.mac is not None else "unsigned",
             "TLS" if server.tls is not None else "plain TCP")


def follow_namespace(cfg: KvtierConfig, engine: CacheEngine, rank: int) -> None:
    """Namespace hook: the worker adopted the scheduler's namespace; its transfer server
    serves that one's chunks (peers ask with the scheduler's digest). The controller
    registration follows in :func:`kvtier.cluster.vllm_plugin.register_again`."""
    for server in _transfer:
        server.namespace = engine.hasher.namespace.seed().hex()


def register() -> None:
    """vLLM plugin entry point: the management API and the controller registration
    (:mod:`kvtier.cluster.vllm_plugin`; one entry point, so an installed kvtier
    needs no new metadata for it)."""
    from kvtier.cluster.vllm_plugin import register_again, start_registrar
    from kvtier.connectors import vllm as connector

    for hook in (start_control_server, start_transfer_server, start_registrar):
        if hook not in connector.ENGINE_READY_HOOKS:
            connector.ENGINE_READY_HOOKS.append(hook)
    for hook in (follow_namespace, register_again):
        if hook not in connector.NAMESPACE_HOOKS:
            connector.NAMESPACE_HOOKS.append(hook)
