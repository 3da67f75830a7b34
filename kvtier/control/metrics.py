"""Layer 7: Prometheus metrics of the store, read from the live objects at scrape time.

:class:`StoreCollector` turns each tier's :class:`~kvtier.tiers.base.TierStats`,
its usage and its background writer's queue into metric families when
Prometheus scrapes, so the tiers' counters stay the one source of truth (no
second set of counters to keep in step). The API's own request counts and
durations are ordinary ``prometheus_client`` metrics in the same registry.
The registry is kvtier's own, not ``prometheus_client``'s global one (vLLM
has its own metrics there).
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from kvtier.control.api import CacheAPI

# (metric name without _total, TierStats field, help)
_COUNTERS = [
    ("kvtier_tier_hits", "hits", "Chunks found on read."),
    ("kvtier_tier_misses", "misses", "Chunks asked for and not found (absent, corrupt or down)."),
    ("kvtier_tier_stored_chunks", "puts", "Chunks written into the tier."),
    ("kvtier_tier_stored_bytes", "put_bytes", "Payload bytes written into the tier."),
    ("kvtier_tier_loaded_bytes", "get_bytes", "Payload bytes read from the tier."),
    ("kvtier_tier_evictions", "evictions", "Chunks evicted to make room."),
]
# failures by cause: TierStats field -> cause label
_FAILURES = {"corrupt": "corrupt", "errors": "error", "dropped": "dropped",
             "foreign": "foreign", "forged": "forged"}


class StoreCollector(Collector):
    """Metric families of every tier of ``api.store``, computed on each scrape."""

    def __init__(self, api: CacheAPI) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        store = self.api.store
        stats = {t.name: t.stats.as_dict() for t in store.tiers}
        for name, key, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["tier"])
            for tier, values in stats.items():
                fam.add_metric([tier], values[key])
            yield fam
        fail = CounterMetricFamily(
            "kvtier_tier_failures", "Reads and writes that failed, by cause: corrupt (header or "
            "checksum, served as a miss), error (I/O, connection), dropped (a full queue or "
            "tier: the write was skipped), foreign (another format version: a miss, kept), "
            "forged (no valid MAC under the cluster's integrity key: a miss, deleted).",
            labels=["tier", "cause"])
        for tier, values in stats.items():
            for field, cause in _FAILURES.items():
                fail.add_metric([tier, cause], values[field])
        yield fail
        yield from self._usage()
        yield from self._queues()
        for op, doc in (("load", "Seconds per batch of chunks loaded into the engine's KV "
                         "(lower-tier reads and decoding included)."),
                        ("store", "Seconds per batch of chunks gathered out of the engine's KV "
                         "(lower-tier writes run in the background and are not included).")):
            buckets, total = store.latency[op].snapshot()
            yield HistogramMetricFamily(f"kvtier_{op}_seconds", doc, buckets=buckets,
                                        sum_value=total)
        yield from self._verify()
        pins = GaugeMetricFamily("kvtier_pinned_chunks", "Memory-tier chunks pinned through "
                                 "the management API.")
        pins.add_metric([], self.api.pins.count())
        yield pins

    def _verify(self) -> list[Metric]:
        service = self.api.store.service
        checks = CounterMetricFamily("kvtier_verify_checks", "Stored copies the canary "
                                     "compared with the engine's recompute.")
        checks.add_metric([], service.checks)
        bad = CounterMetricFamily("kvtier_verify_mismatch", "Stored copies that were not "
                                  "the engine's KV (deleted), by tier.", labels=["tier"])
        out = GaugeMetricFamily("kvtier_tier_out_of_service", "1 while the canary holds the "
                                "tier out of service (until resumed).", labels=["tier"])
        for t in self.api.store.tiers:
            bad.add_metric([t.name], service.mismatches[t.name])
            out.add_metric([t.name], 0 if service.readable(t.name) else 1)
        return [checks, bad, out]

    def _usage(self) -> list[Metric]:
        used = GaugeMetricFamily("kvtier_tier_used_bytes", "Bytes the tier uses.",
                                 labels=["tier"])
        cap = GaugeMetricFamily("kvtier_tier_capacity_bytes", "Bytes the tier may use.",
                                labels=["tier"])
        chunks = GaugeMetricFamily("kvtier_tier_chunks", "Chunks the tier holds.",
                                   labels=["tier"])
        for t in self.api.store.tiers:
            u = t.usage()
            used.add_metric([t.name], u.used_bytes)
            cap.add_metric([t.name], u.capacity_bytes)
            chunks.add_metric([t.name], u.num_chunks)
        return [used, cap, chunks]

    def _queues(self) -> list[Metric]:
        depth = GaugeMetricFamily("kvtier_writer_queue_chunks", "Chunks waiting for or being "
                                  "written by the tier's background writer.", labels=["tier"])
        cap = GaugeMetricFamily("kvtier_writer_queue_capacity_chunks", "Chunks the writer's "
                                "queue takes before it drops writes.", labels=["tier"])
        for w in self.api.store.writers:
            depth.add_metric([w.tier.name], w.pending)
            cap.add_metric([w.tier.name], w.max_pending)
        return [depth, cap]


class ControlMetrics:
    """kvtier's own registry: the store's families plus the API's request metrics."""

    def __init__(self, api: CacheAPI) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(api))
        self.requests = Counter("kvtier_control_requests", "Management API requests, by "
                                "operation and HTTP status.", ["op", "code"],
                                registry=self.registry)
        self.duration = Histogram("kvtier_control_request_duration_seconds", "Time to answer a "
                                  "management API request.", ["op"], registry=self.registry,
                                  buckets=(.001, .005, .02, .1, .5, 2, 10, 30))

    def observe(self, op: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(op, str(code)).inc()
        self.duration.labels(op).observe(seconds)
