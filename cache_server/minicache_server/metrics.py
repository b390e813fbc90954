"""Prometheus metrics of the cache server (`CacheMetrics`): requests and their latency,
hits and misses by tier, evictions, promotions, bytes held and the compression ratio.

The metric types, the text format and the HTTP endpoint are the ones the worker uses
too (`minicache_client.serving.metrics`).
"""

from __future__ import annotations

from minicache_client.serving.metrics import Counter, Gauge, Histogram, MetricSet


class CacheMetrics(MetricSet):
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.requests = Counter(
            "minicache_requests_total", "RPCs by method and status code", ("method", "code")
        )
        self.request_seconds = Histogram(
            "minicache_request_seconds", "RPC latency by method", ("method",)
        )
        self.hits = Counter(
            "minicache_hits_total", "Layer-group entries served, by tier", ("tier",)
        )
        self.misses = Counter(
            "minicache_misses_total", "Reads of sequences or entries not held", ("reason",)
        )
        self.evictions = Counter(
            "minicache_evictions_total", "Entries moved from the device tier to Redis"
        )
        self.promotions = Counter(
            "minicache_promotions_total", "Entries moved from Redis back to the device tier"
        )
        self.corrupt_entries = Counter(
            "minicache_corrupt_entries_total", "Entries read from Redis that failed verification"
        )
        self.tier_bytes = Gauge("minicache_tier_bytes", "Stored bytes held by tier", ("tier",))
        self.device_budget_bytes = Gauge(
            "minicache_device_budget_bytes", "Byte budget of the device tier"
        )
        self.fp16_bytes = Gauge(
            "minicache_fp16_bytes", "The held KV's size in fp16 (the compression baseline)"
        )
        self.compression_ratio = Gauge(
            "minicache_compression_ratio", "fp16 bytes of held KV / stored bytes"
        )
        self.sequences = Gauge("minicache_sequences", "Sequences held")
        self.overflow_available = Gauge(
            "minicache_overflow_available", "1 when the Redis overflow tier answers"
        )
