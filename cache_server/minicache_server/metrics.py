"""Prometheus metrics of the cache server: requests and their latency, hits and misses
by tier, evictions, promotions and corrupt entries (`CacheMetrics`, counted as they
happen), and what the store holds (`StoreTotals`: bytes by tier, named by the tiers, the device budget,
staging held by puts in progress and the puts waiting for it, fp16 bytes, compression
ratio, sequences, whether Redis answers), computed from the store when Prometheus
scrapes.

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
    from minicache_server.store import SequenceStore


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
            "minicache_evictions_total", "Entries moved one tier down (device to disk or Redis)"
        )
        self.promotions = self.counter(
            "minicache_promotions_total", "Entries moved from a lower tier back to the device"
        )
        self.corrupt_entries = self.counter(
            "minicache_corrupt_entries_total",
            "Entries read from the disk or Redis tier that failed verification",
        )

    def watch(self, store: SequenceStore) -> None:
        """Export `store`'s totals, read at every scrape."""
        self.registry.register(StoreTotals(store))


class StoreTotals(Collector):
    """Gauges of what a `SequenceStore` holds, computed from it at scrape time.

    Tier bytes are each tier's own count (`StorageTier.used_bytes`, labelled by the
    tier's name). Scrapes run on the metrics HTTP thread while requests change the store
    on the event loop: the sequences are copied with one `list()` first, so a put or
    delete that lands meanwhile cannot break an iteration."""

    def __init__(self, store: SequenceStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        chain = store.chain
        sequences = list(store.sequences.values())
        fp16 = sum(s.fp16_bytes for s in sequences)
        stored = sum(sum(s.entry_bytes) for s in sequences)

        tiers = GaugeMetricFamily(
            "minicache_tier_bytes", "Stored bytes held by tier", labels=("tier",)
        )
        for tier in chain.tiers:
            tiers.add_metric((tier.name,), tier.used_bytes)
        yield tiers
        yield GaugeMetricFamily(
            "minicache_device_budget_bytes",
            "Byte budget of the device tier",
            value=chain.device.budget_bytes,
        )
        yield GaugeMetricFamily(
            "minicache_staging_bytes",
            "Bytes of the staging budget held by puts in progress, reserved or staged",
            value=store.staged_bytes,
        )
        yield GaugeMetricFamily(
            "minicache_staging_waiting",
            "Streamed puts waiting for room to stage",
            value=store.staging_waiting,
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
        redis_tier = chain.tier("redis")
        if redis_tier is not None:
            yield GaugeMetricFamily(
                "minicache_overflow_available",
                "1 when the Redis tier answers",
                value=1 if redis_tier.available else 0,
            )
