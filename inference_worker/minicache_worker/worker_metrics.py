"""Prometheus metrics of the inference worker: requests by status code and their
latency, turns, resumed turns, recomputes by reason, failed stores, tokens, time to
first token. The metric types and the HTTP
endpoint are prometheus-client's, through the wrappers the cache server uses too
(`minicache_client.serving.metrics`)."""

from __future__ import annotations

from minicache_client.serving.metrics import MetricSet

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics(MetricSet):
    def __init__(self) -> None:
        super().__init__()
        # The cache server's request pair under the worker's prefix, counted by the one
        # RPC wrapper (`minicache_client.serving.rpc_methods`): a caller that cancels or
        # leaves is CANCELLED. Buckets up to a minute: a Generate streams a whole turn.
        self.requests = self.counter(
            "minicache_worker_requests_total", "RPCs by method and status code", ("method", "code")
        )
        self.request_seconds = self.histogram(
            "minicache_worker_request_seconds",
            "RPC latency by method (a Generate's whole stream)",
            ("method",),
            buckets=TTFT_BUCKETS_S,
        )
        self.turns = self.counter("minicache_worker_turns_total", "Turns generated", ("residency",))
        self.resumed_turns = self.counter(
            "minicache_worker_resumed_turns_total",
            "Turns whose history KV came from the cache service",
        )
        self.recomputes = self.counter(
            "minicache_worker_recomputes_total",
            "Turns whose history was recomputed instead of restored, by reason",
            ("reason",),
        )
        self.store_failures = self.counter(
            "minicache_worker_store_failures_total",
            "Turns whose KV the cache service did not take in full",
        )
        self.prefilled_tokens = self.counter(
            "minicache_worker_prefilled_tokens_total", "Tokens run through prefills"
        )
        self.generated_tokens = self.counter(
            "minicache_worker_generated_tokens_total", "Tokens generated"
        )
        self.time_to_first_token = self.histogram(
            "minicache_worker_time_to_first_token_seconds",
            "From a turn's start to its first token, by whether its history was restored",
            ("resumed",),
            buckets=TTFT_BUCKETS_S,
        )
