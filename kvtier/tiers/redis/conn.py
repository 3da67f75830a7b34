"""Layer 3: the Redis tier's connections to its server, and when to stop asking it.

Two clients share one backoff: the main one (``timeout_s`` bounds every socket
wait) for reads, writes and management, and a quick one
(``contains_timeout_s``) for presence checks, which the engine's scheduler
asks on every lookup: a hung server (accepting connections, never answering)
costs a lookup at most that.

After a failure the server is not asked for a backoff that starts at
``reconnect_backoff_s`` and doubles on each failed retry up to
``reconnect_backoff_max_s``, with +-20% jitter so that many instances do not
retry in step. When the backoff has passed, one call probes the server (the
others keep skipping it meanwhile); a success resets the backoff. A skipped
call costs nothing and counts ``errors``. The backoff is
:class:`kvtier.net.backoff.Backoff`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from kvtier.config import RedisConfig, redact_url
from kvtier.net.backoff import Backoff
from kvtier.tiers.base import TierStats
from kvtier.tiers.redis.resp import RespPacker, packing_connection

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisConnection:
    """The clients of one tier and their backoff (see the module docstring)."""

    def __init__(self, cfg: RedisConfig, redis_module: Any, stats: TierStats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.zero_copy = False
        """Whether values may be :class:`~kvtier.tiers.redis.resp.Concat` (our packer is in use)."""
        self._redis = redis_module
        self._clients: dict[bool, Any] = {}  # quick? -> client
        self._lock = threading.Lock()
        self.backoff = Backoff(cfg.reconnect_backoff_s, cfg.reconnect_backoff_max_s)
        r = redis_module
        self.down_errors = (r.ConnectionError, r.TimeoutError, r.exceptions.ClusterError,
                            r.exceptions.RedisClusterException, OSError)

    def call(self, op: Callable[[Any], T], fallback: T, quick: bool = False) -> T:
        """Run ``op`` on a client (``quick``: the presence-check one); a failing server
        gives ``fallback`` and a backoff. Never raises for the server's failures."""
        if not self.backoff.claim():
            self.stats.add(errors=1)
            return fallback
        try:
            out = op(self._client(quick))
        except self.down_errors as exc:
            wait = self.backoff.failed()
            log.warning("redis tier: %s unreachable (%s); retrying in %.2f s",
                        redact_url(self.cfg.url), exc, wait)
            self.stats.add(errors=1)
            if self.cfg.cluster:  # rediscover the nodes from scratch next time
                self.close()
            return fallback
        except self._redis.RedisError as exc:  # the server answered: it is up
            self.backoff.succeeded()
            log.warning("redis tier: %s", exc)
            self.stats.add(errors=1)
            return fallback
        self.backoff.succeeded()
        return out

    def close(self) -> None:
        """Close the clients (new ones are made on the next call). Idempotent."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                client.close()
            except self.down_errors:
                pass  # closing a dead connection: nothing left to release

    def _client(self, quick: bool) -> Any:
        client = self._clients.get(quick)
        if client is not None:
            return client
        with self._lock:
            if quick not in self._clients:
                self._clients[quick] = self._make_client(
                    self.cfg.contains_timeout_s if quick else self.cfg.timeout_s)
            return self._clients[quick]

    def _make_client(self, timeout_s: float) -> Any:
        r = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        # No retries inside redis-py: a failed call is a miss now, and the backoff
        # above decides when to try again (redis-py's default retries would wait).
        common: dict[str, Any] = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0))
        if not self.cfg.cluster:
            self.zero_copy = True
            return r.Redis.from_url(self.cfg.url, command_packer=RespPacker(), **common)
        # A cluster passes only known kwargs to its nodes; a connection class that
        # installs the packer gets through for plain TCP (TLS forces its own class).
        if urlparse(self.cfg.url).scheme == "redis":
            common["connection_class"] = packing_connection(r.Connection)
            self.zero_copy = True
        return r.cluster.RedisCluster.from_url(self.cfg.url, **common)
