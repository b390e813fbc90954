"""Prometheus metrics of both services, with prometheus-client.

A service declares its metrics once, as attributes of a `MetricSet` subclass
(`CacheMetrics`, `WorkerMetrics`). Each set owns its own `CollectorRegistry` rather
than the library's global one, so several servers in one process (the tests start
many) neither collide on names nor count each other's requests. Exposition and the
HTTP endpoint are the library's: `serve_metrics` serves a set's registry on its port.

`Counter` and `Histogram` are thin wrappers over the library's labelled metrics that
take the labels as keyword arguments of the update, the one call the services make:
`metrics.requests.inc(method="Put", code="OK")`,
`metrics.request_seconds.observe(seconds, method="Put")`. Totals of what a service
holds are not updated as requests go: a collector registered with
`MetricSet.registry` computes them when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Counter:
    """A prometheus-client `Counter`; `inc(amount, **labels)` counts one label set."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.registry = registry
        self.metric = prometheus_client.Counter(name, documentation, labels, registry=registry)

    def inc(self, amount: float = 1, **labels: str) -> None:
        (self.metric.labels(**labels) if labels else self.metric).inc(amount)

    def value(self, **labels: str) -> float:
        """The count of one label set as the registry exposes it (0 before any)."""
        return self.registry.get_sample_value(self.name, labels) or 0


class Histogram:
    """A prometheus-client `Histogram`; `observe(value, **labels)` records one label
    set's observation."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> None:
        self.name = name
        self.registry = registry
        self.metric = prometheus_client.Histogram(
            name, documentation, labels, registry=registry, buckets=buckets
        )

    def observe(self, value: float, **labels: str) -> None:
        (self.metric.labels(**labels) if labels else self.metric).observe(value)

    def count(self, **labels: str) -> int:
        """Observations of one label set as the registry exposes them (0 before any)."""
        return int(self.registry.get_sample_value(f"{self.name}_count", labels) or 0)


class MetricSet:
    """A service's metrics in a registry of their own. Subclasses call
    `super().__init__()`, then declare each metric with `counter` or `histogram`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What the library's default registry carries too: resident memory, CPU, open
        # files, the interpreter's version and garbage collections.
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(self.registry, name, documentation, labels)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> Histogram:
        return Histogram(self.registry, name, documentation, labels, buckets)

    def render(self) -> str:
        """The registry in the Prometheus text format, as a scrape gets it."""
        return prometheus_client.generate_latest(self.registry).decode()


def serve_metrics(metrics: MetricSet, host: str, port: int) -> WSGIServer:
    """Serve `metrics` with prometheus-client's HTTP server in a daemon thread (port 0
    picks a free port). Returns the server: `.server_port` is the bound port, and
    `shutdown()` then `server_close()` stop it."""
    server, _ = prometheus_client.start_http_server(port, host, registry=metrics.registry)
    return server
