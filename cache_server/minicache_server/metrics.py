"""Prometheus metrics of the cache server: requests and their latency, hits and misses
by tier, evictions, promotions and corrupt entries (`CacheMetrics`, counted as they
happen), and what the store holds (`StoreTotals`: bytes by tier, the device budget,
fp16 bytes, compression ratio, sequences, whether Redis answers), computed from the
store when Prometheus scrapes.

The metric types and the HTTP endpoint are prometheus-client's, through the wrappers
the worker uses too (`minicache_client.serving.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from minicache_client.serving.metrics import MetricSet

if TYPE_CHECKING:
    from minicache_server.sequence_store import SequenceStore


class CacheMetrics(MetricSet):
    """Every metric the server exports; `watch(store)` adds the store's totals."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "minicache_requests_total", "RPCs by method and status code", ("method", "code")
        )
        self.request_seconds = self.histogram(
            "minicache_request_seconds", "RPC latency by method", ("method",)
        )
        self.hits = self.counter(
            "minicache_hits_total", "Layer-group entries served, by tier", ("tier",)
        )
        self.misses = self.counter(
            "minicache_misses_total", "Reads of sequences or entries not held", ("reason",)
        )
        self.evictions = self.counter(
            "minicache_evictions_total", "Entries moved from the device tier to Redis"
        )
        self.promotions = self.counter(
            "minicache_promotions_total", "Entries moved from Redis back to the device tier"
        )
        self.corrupt_entries = self.counter(
            "minicache_corrupt_entries_total", "Entries read from Redis that failed verification"
        )

    def watch(self, store: SequenceStore) -> None:
        """Export `store`'s totals, read at every scrape."""
        self.registry.register(StoreTotals(store))


class StoreTotals(Collector):
    """Gauges of what a `SequenceStore` holds, computed from it at scrape time.

    Scrapes run on the metrics HTTP thread while requests change the store on the event
    loop: the sequences are copied with one `list()` first and each sequence's overflow
    bytes summed in one `sum()` (each a single step under the GIL), so a put or delete
    that lands meanwhile cannot break an iteration."""

    def __init__(self, store: SequenceStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        sequences = list(store.sequences.values())
        device_bytes = store.device.used_bytes
        overflow_bytes = sum(sum(s.overflow_bytes.values()) for s in sequences)
        fp16 = sum(s.fp16_bytes for s in sequences)
        stored = device_bytes + overflow_bytes

        tiers = GaugeMetricFamily(
            "minicache_tier_bytes", "Stored bytes held by tier", labels=("tier",)
        )
        tiers.add_metric((store.device.name,), device_bytes)
        tiers.add_metric(("redis",), overflow_bytes)
        yield tiers
        yield GaugeMetricFamily(
            "minicache_device_budget_bytes",
            "Byte budget of the device tier",
            value=store.device.budget_bytes,
        )
        yield GaugeMetricFamily(
            "minicache_fp16_bytes",
            "The held KV's size in fp16 (the compression baseline)",
            value=fp16,
        )
        yield GaugeMetricFamily(
            "minicache_compression_ratio",
            "fp16 bytes of held KV / stored bytes",
            value=fp16 / stored if stored else 0,
        )
        yield GaugeMetricFamily("minicache_sequences", "Sequences held", value=len(sequences))
        if store.overflow is not None:
            yield GaugeMetricFamily(
                "minicache_overflow_available",
                "1 when the Redis overflow tier answers",
                value=1 if store.overflow.available else 0,
            )
